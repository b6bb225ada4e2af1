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

    The candidates of an example share its prompt: the prompt runs once and the candidates continue from its
    cached keys and values, so an example costs about one forward pass however many labels there are."""
    model.eval()
    if prompt_learning(model):  # virtual tokens: PEFT manages the cache itself, so each pair runs whole
        return _whole_sequence_logps(model, choices, pad_id, batch_size)
    return [[c.logp for c in group] for group in choice_scores(model, choices, pad_id, batch_size)]


@dataclass(frozen=True)
class ChoiceScore:
    logp: float  # summed over the scored tokens
    tokens: int  # scored tokens
    correct: int  # of them, the ones greedy decoding would have produced (the token accuracy's numerator)


@torch.no_grad()
def choice_scores(
    model: torch.nn.Module, choices: list[list[Tokenized]], pad_id: int, batch_size: int = 16
) -> list[list[ChoiceScore]]:
    """`choice_logps` with token counts and greedy hits (not for prompt learning): `batch_size` examples at a
    time, their prompts left-padded into one forward pass, then all their candidates' own tokens in a second.

    Two savings, since a classification prompt is mostly the same system text and a short input: the prefix every
    example shares runs once per batch (its cache is repeated, not recomputed), and examples are batched in order
    of prompt length, so a batch pads to a similar length rather than to the longest prompt of the data."""
    model.eval()
    shared = [_unscored_prefix(g) for g in choices]
    common = _common_prefix(choices, limit=min(shared, default=1) - 1)  # each example keeps >= 1 prompt token
    order = sorted(range(len(choices)), key=shared.__getitem__)
    scores: dict[int, list[ChoiceScore]] = {}
    with phase("scoring", len(choices), "examples") as shown:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            groups = [choices[i] for i in batch]
            found = _shared_prompt_scores(model, groups, [shared[i] for i in batch], common, pad_id)
            scores.update(zip(batch, found, strict=True))
            shown.advance(len(groups))
    return [scores[i] for i in range(len(choices))]


def loss_metrics_of(scores: list[ChoiceScore]) -> dict[str, float]:
    """`language_metrics` of the reference answers, from their choice scores (the same tokens and mask)."""
    count = sum(s.tokens for s in scores)
    loss = -sum(s.logp for s in scores) / max(count, 1)
    accuracy = sum(s.correct for s in scores) / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": accuracy}


def _shared_prompt_scores(
    model: torch.nn.Module, groups: list[list[Tokenized]], shared: list[int], common: int, pad_id: int
) -> list[list[ChoiceScore]]:
    """Scores of a batch of examples: the data's common prefix (`common` tokens) once, the rest of each prompt
    (up to `shared[b]`) left-padded after it, then every candidate's own tokens from the repeated cache."""
    cache = None
    if common:
        head = groups[0][0].input_ids[:common]
        cache = model(input_ids=torch.tensor([head]), use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(len(groups))
    width = max(shared) - common
    rests = [g[0].input_ids[common:n] for g, n in zip(groups, shared, strict=True)]
    prompt_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rests])
    # The padding sits between the common prefix and each prompt's rest: masked out, and the positions skip it.
    prompt_mask = torch.tensor([[1] * common + [0] * (width - len(r)) + [1] * len(r) for r in rests])
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)[:, common:]
    prompt = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    first = prompt.logits[:, -1].float().log_softmax(-1)  # predicts each candidate's first own token
    # Every example gets as many candidate rows as the largest group (a short group repeats its last one), so the
    # cache can be repeated evenly; the extra rows are not read.
    per = max(len(g) for g in groups)
    cands = [(b, t) for b, g in enumerate(groups) for t in g + [g[-1]] * (per - len(g))]
    prompt.past_key_values.batch_repeat_interleave(per)
    tails = [t.input_ids[shared[b] :] for b, t in cands]
    tail_width = max(len(t) for t in tails)
    # Right-padded tails: a causal model's real positions never see the padding after them.
    tail_mask = torch.tensor([[1] * len(t) + [0] * (tail_width - len(t)) for t in tails])
    logits = model(
        input_ids=torch.tensor([t + [pad_id] * (tail_width - len(t)) for t in tails]),
        attention_mask=torch.cat([prompt_mask.repeat_interleave(per, 0), tail_mask], dim=1),
        position_ids=torch.tensor([[shared[b] + j for j in range(tail_width)] for b, _ in cands]),
        past_key_values=prompt.past_key_values,
    ).logits
    logps = logits.float().log_softmax(-1)
    scored = [_score(t, shared[b], first[b], logps[i]) for i, (b, t) in enumerate(cands)]
    return [scored[b * per : b * per + len(g)] for b, g in enumerate(groups)]


def _common_prefix(choices: list[list[Tokenized]], limit: int) -> int:
    """How many leading tokens every candidate of every example shares (at most `limit`)."""
    sequences = [t.input_ids for group in choices for t in group]
    if not sequences:
        return 0
    first = sequences[0]
    n = 0
    while n < min(limit, len(first)) and all(len(s) > n and s[n] == first[n] for s in sequences):
        n += 1
    return n


def _score(tok: Tokenized, shared: int, first: torch.Tensor, tail: torch.Tensor) -> ChoiceScore:
    total, n, correct = 0.0, 0, 0
    for p in range(shared, len(tok.input_ids)):
        if tok.labels[p] != IGNORE:  # token p is predicted at p - 1: the prompt's last position, or the tail's
            row = first if p == shared else tail[p - shared - 1]
            total += float(row[tok.input_ids[p]])
            n += 1
            correct += int(int(row.argmax()) == tok.input_ids[p])
    return ChoiceScore(total, n, correct)


def _unscored_prefix(group: list[Tokenized]) -> int:
    """Length of the prompt the candidates share and that no candidate scores (at least one token)."""
    first_scored = min(next(i for i, label in enumerate(t.labels) if label != IGNORE) for t in group)
    shared = 0
    while shared < first_scored and len({t.input_ids[shared] for t in group}) == 1:
        shared += 1
    return max(shared, 1)


def prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "isprompt_learning", False))


def _whole_sequence_logps(
    model: torch.nn.Module, choices: list[list[Tokenized]], pad_id: int, batch_size: int
) -> list[list[float]]:
    """Every (prompt, answer) pair as one sequence; sequences of similar length are batched together (little
    padding), each with its own restarting positions so the batch needs no attention mask."""
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
