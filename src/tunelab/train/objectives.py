"""What the loop minimises. The loop owns the data, the schedule and the normalisation; an objective turns one
micro-batch into a loss (a sum over the batch's items divided by `num_items`, the item count of the whole step)
and into statistics for the log.

- `CausalLM`: the model's own token cross-entropy (also what the classification heads compute).
- `Dpo`: Direct Preference Optimisation (Rafailov et al., 2023), the sigmoid loss on pairs of a preferred and a
  rejected answer, against a reference model's log-probabilities.

The DPO reference is the model before the method wraps it, scored once before training (TRL calls this
`precompute_ref_log_probs`). Since that model never changes, this equals "the base with the adapter switched off"
for every LoRA-family method and QLoRA, and it needs no frozen second copy for full fine-tuning; for PiSSA it is
the original model, which is PiSSA's starting point, where "adapter off" would be the residual alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tunelab.data.packing import Row, collate, loss_items
from tunelab.data.render import IGNORE
from tunelab.train.chunked_loss import chunked_cross_entropy, output_layer
from tunelab.train.distributed import current_world
from tunelab.train.progress import phase

Forward = Callable[[dict[str, Any], float], Any]  # an engine's forward: (model inputs, num_items) -> output


class Objective(Protocol):
    def setup(self, model: torch.nn.Module, rows: list[Row], pad_id: int, batch_size: int) -> None:
        """Called once with the model as loaded, before the method wraps it (on every process)."""
        ...

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """The items this batch adds to the step's normaliser (tokens, rows or pairs)."""
        ...

    def loss(
        self, forward: Forward, batch: dict[str, torch.Tensor], num_items: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to back-propagate, statistics summed over the batch's items)."""
        ...


class CausalLM:
    """The token cross-entropy. With `chunked` (and a model set up whose output layer allows it) it is computed a
    chunk of tokens at a time from the hidden states the output layer receives (`chunked_loss`), inside the
    model's forward (so under its autocast, DDP and DeepSpeed wrapping), and the model computes one position's
    logits only. Otherwise, and for classification heads, it is the model's own loss."""

    def __init__(self, chunked: bool = True) -> None:
        self.chunked = chunked
        self.model: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module, rows: list[Row], pad_id: int, batch_size: int) -> None:
        # The model as loaded: methods wrap it in place, so its output layer is found again at each step.
        self.model = model

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return loss_items(batch["labels"])

    def loss(
        self, forward: Forward, batch: dict[str, torch.Tensor], num_items: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        head = output_layer(self.model) if self.chunked and self.model is not None else None
        labels = batch["labels"]
        if head is None or labels.dim() != 2:
            return forward(batch, num_items).loss, {}
        found: list[torch.Tensor] = []

        def take_hidden(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            # Prompt tuning prepends virtual tokens: the labels cover the last positions. Token t predicts t+1.
            hidden = args[0][:, -labels.shape[1] :]
            flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            found.append(chunked_cross_entropy(flat, head, labels[:, 1:].reshape(-1), num_items))
            return (args[0][:, -1:], *args[1:])  # the model's own logits: one position, unused

        handle = head.register_forward_pre_hook(take_hidden)
        try:
            forward({k: v for k, v in batch.items() if k != "labels"}, num_items)
        finally:
            handle.remove()
        return found[0], {}


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


class Dpo:
    """Sigmoid DPO. `reference` holds one log-probability per sequence id (see `tunelab.data.preference`)."""

    def __init__(self, beta: float, reference: torch.Tensor | None = None) -> None:
        self.beta = beta
        self.reference = reference if reference is not None else torch.empty(0)

    def setup(self, model: torch.nn.Module, rows: list[Row], pad_id: int, batch_size: int) -> None:
        # Under a launch each process scores its share of the rows (a pair never spans two rows) and they
        # exchange the results: the whole table on every process, in 1/N of the time.
        world = current_world()
        table = reference_logps(model, rows[world.rank :: world.size], pad_id, batch_size)
        self.reference = _share_table(table) if world.size > 1 else table

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return len(pair_ids(batch["segments"]))

    def loss(
        self, forward: Forward, batch: dict[str, torch.Tensor], num_items: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = forward({k: v for k, v in batch.items() if k in MODEL_KEYS}, num_items).logits
        ids, logps = sequence_logps(logits, batch["labels"], batch["segments"])
        chosen, rejected = logps[0::2], logps[1::2]
        ref = self.reference[ids].to(logps.dtype)
        losses, stats = dpo_terms(chosen, rejected, ref[0::2], ref[1::2], self.beta)
        return losses.sum() / num_items, stats


def dpo_terms(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair sigmoid DPO losses and the statistics TRL logs, summed over pairs (the loop averages them)."""
    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    with torch.no_grad():
        stats = {
            "dpo_loss": float(losses.sum()),
            "reward_accuracy": float((chosen_reward > rejected_reward).sum()),
            "reward_margin": float((chosen_reward - rejected_reward).sum()),
            "logp_chosen": float(chosen.sum()),
            "logp_rejected": float(rejected.sum()),
        }
    return losses, stats


def pair_ids(segments: torch.Tensor) -> torch.Tensor:
    """The pairs present in a batch (sequence id // 2), sorted."""
    present = segments[segments >= 0].unique()
    return (present // 2).unique()


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the trained tokens of each sequence in the batch, by sequence id (sorted, so a
    pair's chosen (2p) and rejected (2p+1) sequences are adjacent)."""
    logits = logits[:, -labels.shape[1] :, :]  # prompt-learning models prepend virtual tokens
    shifted, targets, seg = logits[:, :-1, :], labels[:, 1:], segments[:, 1:]
    mask = targets != IGNORE
    picked = shifted[mask].float()  # only the trained positions: the vocabulary-wide work stays small
    token_logps = picked.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1) - picked.logsumexp(-1)
    ids, where = seg[mask].unique(return_inverse=True)
    sums = torch.zeros(len(ids), dtype=token_logps.dtype, device=token_logps.device).index_add(0, where, token_logps)
    return ids, sums


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, rows: list[Row], pad_id: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence ids, summed log-probabilities) of every sequence in `rows` under `model`, sorted by id."""
    model.eval()
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    with phase("scoring", len(rows), "rows") as shown:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id, packed=True)
            logits = model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}, use_cache=False).logits
            ids, sums = sequence_logps(logits, batch["labels"], batch["segments"])
            found.append((ids, sums.double()))
            shown.advance(len(batch["input_ids"]))
    ids = torch.cat([f[0] for f in found])
    order = ids.argsort()
    return ids[order], torch.cat([f[1] for f in found])[order]


def reference_logps(model: torch.nn.Module, rows: list[Row], pad_id: int, batch_size: int) -> torch.Tensor:
    """Every sequence's log-probability under `model` (the reference), indexed by sequence id (0 where absent)."""
    if not rows:
        return torch.zeros(0, dtype=torch.float64)
    ids, logps = score_sequences(model, rows, pad_id, batch_size)
    table = torch.zeros(int(ids.max()) + 1, dtype=torch.float64)
    table[ids] = logps
    return table


def _share_table(table: torch.Tensor) -> torch.Tensor:
    """The processes' tables, each holding its own sequences (0 elsewhere), summed into the whole on every one."""
    size = torch.tensor([len(table)])
    torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
    whole = torch.zeros(int(size), dtype=torch.float64)
    whole[: len(table)] = table
    torch.distributed.all_reduce(whole)
    return whole
