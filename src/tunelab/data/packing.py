"""Pack short examples into full rows, and collate rows into batches.

A packed row holds several examples back to back. Each example's position ids restart at 0; with no attention
mask, transformers derives a block-diagonal causal mask from those restarts, so packed examples never attend to
each other (tested: an example's logits are the same packed or alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.data.render import IGNORE, Tokenized


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    labels: list[int]  # one per token; or, with sequence_label, the row's one class id
    position_ids: list[int]
    sequence_label: bool = False  # a sequence-classification head's row
    # A preference row: the sequence id of each token (2 * pair + 0 for the preferred answer, + 1 for the rejected
    # one; -1 outside the pairs). Such a row holds several sequences, so it always carries restarting positions.
    segments: list[int] | None = None


def pack(examples: list[Tokenized], max_len: int) -> list[Row]:
    """Best-fit packing: each example goes into the fullest row it fits in (examples are already <= max_len)."""
    return [_concat([examples[i] for i in group]) for group in best_fit([len(e.input_ids) for e in examples], max_len)]


def best_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices grouped into bins of at most `max_len` (a longer item gets a bin of its own): each item goes into
    the fullest bin it fits in."""
    bins: list[list[int]] = []
    free: list[int] = []
    for index, length in enumerate(lengths):
        fits = [i for i, space in enumerate(free) if space >= length]
        if fits:
            best = min(fits, key=lambda i: free[i])
            bins[best].append(index)
            free[best] -= length
        else:
            bins.append([index])
            free.append(max_len - length)
    return bins


def unpacked(examples: list[Tokenized]) -> list[Row]:
    return [_concat([ex]) for ex in examples]


def _concat(group: list[Tokenized]) -> Row:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in group:
        ids += ex.input_ids
        labels += ex.labels
        positions += range(len(ex.input_ids))
    return Row(ids, labels, positions)


def collate(rows: list[Row], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest. Packed batches carry position ids (no mask); others an attention mask."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    # Padding gets its own restarting positions, so it forms a separate "example" nobody attends to.
    positions = torch.arange(width).repeat(len(rows), 1)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
        positions[i, :n] = torch.tensor(row.position_ids)
        positions[i, n:] = torch.arange(width - n)
    if rows[0].sequence_label:
        labels = torch.tensor([r.labels[0] for r in rows])  # the shape sequence-classification heads expect
    batch = {"input_ids": ids, "labels": labels}
    if rows[0].segments is not None:
        batch["segments"] = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            batch["segments"][i, : len(row.input_ids)] = torch.tensor(row.segments)
        packed = True  # a pair's two answers share a row and must not attend to each other
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch


def loss_items(labels: torch.Tensor) -> int:
    """The labels a batch's loss is averaged over. A causal LM's first label is never predicted (token t+1 is
    predicted from t), so counting starts at position 1; a token head's rows start with an unlabelled start token,
    so the same count is exact for them. Sequence labels (one per row) all count."""
    counted = labels if labels.dim() == 1 else labels[:, 1:]
    return int((counted != IGNORE).sum())
