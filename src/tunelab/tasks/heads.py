"""What the two classification-head scenarios share: loading the base model with a head, the training loss the
loop expects, the start token, and predictions on held-out rows.

A head is a linear layer on the base model's last hidden states. transformers' sequence-classification head reads
each row at its last non-pad token (in a causal model the only one that has seen the whole text); the
token-classification head reads every token. Rows are padded, never packed: a head's label belongs to one example.
Predictions come from the same forward pass as the validation loss, so a head's metrics are computed on every
scored validation row (`eval.max_examples`); `eval.generations` does not apply.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunelab.data.packing import Row, collate
from tunelab.data.render import IGNORE
from tunelab.models import Head, ModelSource, load_classifier
from tunelab.train.progress import phase


@dataclass(frozen=True)
class Predictions:
    loss: float  # mean cross-entropy over the labelled items (rows, or words)
    ids: list[list[int]]  # per row, the most likely class at each labelled position (one for a sequence label)


def load_head_model(
    source: ModelSource, head: Head, labels: list[str], pad_id: int, class_weights: list[float] | None = None
) -> PreTrainedModel:
    """The classifier the loop trains: its loss is normalised like the language model's (see `_step_loss`), with
    each class's items weighted by `class_weights` if given (one per label)."""
    model = load_classifier(source, head, labels, pad_id)
    weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
    model.register_forward_hook(functools.partial(_step_loss, weights=weights), with_kwargs=True)
    return model


def _step_loss(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
    weights: torch.Tensor | None = None,
) -> Any:
    """The loop sums the loss over the labelled items of a micro-batch and divides by those of the whole optimizer
    step (`num_items_in_batch`), so that gradient accumulation and data parallelism give one big batch's gradient.
    transformers' classification heads ignore `num_items_in_batch` and average over the micro-batch, so the loss
    is recomputed here the way the causal LM computes it. Without the argument (evaluation), the head's own loss
    stands. Class weights scale each item's term (the count stays the items': a weight below 1 lowers that class's
    share of the gradient, as it would with fewer such items)."""
    labels, n_items = kwargs.get("labels"), kwargs.get("num_items_in_batch")
    if labels is None or n_items is None:
        return output
    logits = output.logits  # (rows, classes) pooled, or (rows, tokens, classes)
    summed = torch.nn.functional.cross_entropy(
        logits.flatten(0, -2).float(),
        labels.flatten().to(logits.device),
        weight=None if weights is None else weights.to(logits.device),
        ignore_index=IGNORE,
        reduction="sum",
    )
    output.loss = summed / n_items
    return output


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token every head row starts with. Causal LMs read text after a start token (BOS, or the EOS that
    separates documents); the first position is where attention rests, not a good place to classify a word. It has
    no label, which is also what the loop's loss count expects (`tunelab.data.packing.loss_items`)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start rows with")
    return int(token)


def truncation_warning(split: str, truncated: int, max_len: int) -> list[str]:
    if not truncated:
        return []
    return [f"{split}: {truncated} example(s) longer than train.max_seq_len={max_len} were truncated"]


@torch.no_grad()
def predict(model: torch.nn.Module, rows: list[Row], pad_id: int, batch_size: int) -> Predictions:
    """Validation loss and predicted classes at the labelled positions of each row."""
    model.eval()
    loss_sum, count = 0.0, 0
    ids: list[list[int]] = []
    with phase("scoring", len(rows)) as shown:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id, packed=False)
            labels = batch.pop("labels")
            labels = labels.view(len(labels), -1)  # (rows, 1) for sequence labels, (rows, tokens) for token labels
            logits = model(**batch, use_cache=False).logits.float().view(*labels.shape, -1)
            keep = labels != IGNORE
            loss_sum += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
            ids += [row[mask].argmax(-1).tolist() for row, mask in zip(logits, keep, strict=True)]
            shown.advance(len(labels))
    if count == 0:
        raise ValueError("no labelled item in the evaluation rows")
    return Predictions(loss_sum / count, ids)
