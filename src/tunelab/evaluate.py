"""Metrics on held-out data, the same before and after training, and sample generations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.packing import Row, collate
from tunelab.data.render import IGNORE, Tokenized, encode_prompt
from tunelab.train.objectives import MODEL_KEYS, sequence_logps
from tunelab.train.progress import phase


@dataclass(frozen=True)
class Generation:
    prompt: str
    reference: str
    output: str


@torch.no_grad()
def language_metrics(
    model: torch.nn.Module, rows: list[Row], pad_id: int, packed: bool, batch_size: int
) -> dict[str, float]:
    """Token-level loss, perplexity and next-token accuracy over the trained (label) tokens of `rows`."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with phase("loss", len(rows), "rows") as shown:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id, packed)
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits  # no cache: packed rows keep their block mask
            # Prompt-learning models return logits for their virtual tokens too; keep the last positions.
            logits = logits[:, -labels.shape[1] :, :].float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            mask = shift_labels != IGNORE
            summed = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
            loss_sum += float(summed)
            correct += int((shift_logits.argmax(-1)[mask] == shift_labels[mask]).sum())
            count += int(mask.sum())
            shown.advance(len(labels))
    if count == 0:
        raise ValueError("no trained tokens in the evaluation rows")
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / count}


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (deterministic, so before/after differences come from the weights)."""
    model.eval()
    ids = torch.tensor([encode_prompt(prompt, tokenizer)])
    out = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
    sampling: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy continuations of many prompts, left-padded in batches of similar length (same output as one by one).
    `sampling` (e.g. {"temperature": 0.8, "top_p": 0.95, "seed": 0}) samples instead, reproducibly for a seed."""
    model.eval()
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths waste less padding
    outputs: dict[int, str] = {}
    pad = int(tokenizer.pad_token_id)
    options = {k: v for k, v in (sampling or {}).items() if k != "seed"}
    if sampling:
        torch.manual_seed(int(sampling.get("seed", 0)))
    with phase("generation", len(prompts)) as shown:
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in group)
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in group])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in group])
            out = model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=bool(sampling),
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                **options,
            )
            for row, index in zip(out, group, strict=True):
                outputs[index] = str(tokenizer.decode(row[width:], skip_special_tokens=True)).strip()
            shown.advance(len(group))
    return [outputs[i] for i in range(len(prompts))]


@torch.no_grad()
def choice_logps(
    model: torch.nn.Module, choices: list[list[Tokenized]], pad_id: int, batch_size: int = 16
) -> list[list[float]]:
    """For each example, the summed log-probability of each candidate answer: its trained tokens (the answer and
    its end-of-turn token, as training's loss mask covers them) after that example's prompt.

    The prompt is read once per example and its KV cache serves every answer (most of the tokens are the
    prompt's). Prompt-learning models put virtual tokens in front of every input, which a reused cache would
    repeat: they score each (prompt, answer) sequence whole."""
    model.eval()
    if _prompt_learning(model) or any(_shared_length(group) == 0 for group in choices):
        return _sequence_logps(model, choices, pad_id, batch_size)
    scores: list[list[float]] = []
    with phase("scoring", len(choices)) as shown:
        for group in choices:
            scores.append(_shared_prompt_logps(model, group, pad_id))
            shown.advance(1)
    return scores


def _prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _shared_prompt_logps(model: torch.nn.Module, group: list[Tokenized], pad_id: int) -> list[float]:
    """One example's answers after one pass over the tokens they share (up to the first trained token)."""
    start = _shared_length(group)
    prompt = model(input_ids=torch.tensor([group[0].input_ids[:start]]), use_cache=True, logits_to_keep=1)
    cache = prompt.past_key_values
    cache.batch_repeat_interleave(len(group))
    width = max(len(t.input_ids) - start for t in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
    mask = torch.ones((len(group), start + width), dtype=torch.long)
    for j, t in enumerate(group):
        n = len(t.input_ids) - start
        ids[j, :n], labels[j, :n] = torch.tensor(t.input_ids[start:]), torch.tensor(t.labels[start:])
        mask[j, start + n :] = 0  # right padding: nothing real comes after it
    logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    # Token k of an answer is predicted by the position before it: the prompt's last one for k = 0.
    first = prompt.logits[:, -1:].expand(len(group), 1, -1)
    predicting = torch.cat([first, logits[:, :-1]], dim=1).float()
    keep = labels != IGNORE
    token_logps = predicting.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return [float(v) for v in (token_logps * keep).double().sum(-1)]


def _shared_length(group: list[Tokenized]) -> int:
    """How many leading tokens every answer's sequence shares, stopping before the first trained token."""
    first = min(next(i for i, label in enumerate(t.labels) if label != IGNORE) for t in group)
    common = 0
    while common < first and all(t.input_ids[common] == group[0].input_ids[common] for t in group):
        common += 1
    return common


def _sequence_logps(
    model: torch.nn.Module, choices: list[list[Tokenized]], pad_id: int, batch_size: int
) -> list[list[float]]:
    """Every (prompt, answer) sequence scored whole; similar lengths batched together (little padding), each
    with its own restarting positions so the batch needs no attention mask."""
    flat = [t for group in choices for t in group]
    rows = [_sequence_row(t, i) for i, t in enumerate(flat)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    scores = torch.zeros(len(rows), dtype=torch.float64)
    with phase("scoring", len(rows), "answers") as shown:
        for start in range(0, len(order), batch_size):
            group = [rows[i] for i in order[start : start + batch_size]]
            batch = collate(group, pad_id, packed=True)
            logits = model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}, use_cache=False).logits
            ids, sums = sequence_logps(logits, batch["labels"], batch["segments"])
            scores[ids] = sums.double()
            shown.advance(len(group))
    sizes = [len(group) for group in choices]
    return [chunk.tolist() for chunk in scores.split(sizes)]


def _sequence_row(tokenized: Tokenized, sequence_id: int) -> Row:
    n = len(tokenized.input_ids)
    return Row(tokenized.input_ids, tokenized.labels, list(range(n)), segments=[sequence_id] * n)
