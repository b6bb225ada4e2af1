"""lm-eval's Hugging Face model class around a model tunelab already loaded, with two additions: progress in
questions scored, and a log-likelihood scorer that shares key/value caches between requests.

Why a scorer of our own: lm-eval's HFLM runs every (context, answer) request as one full sequence and takes a
log-softmax over the whole vocabulary at every position. TruthfulQA's requests are a 168-token few-shot prompt
(SmolLM2's tokenizer), a ~20-token question and a ~10-token answer, with about 7 answers per question: scoring the
prompt once per 32 questions and taking the log-softmax only at the answers' own positions does about 1/6 of the work,
with the same numbers (up to float rounding; tests compare both against a plain forward pass). Everything else —
tasks, prompts, tokenisation of each request, metrics and aggregation — stays lm-eval's.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import PreTrainedTokenizerBase

ProgressFn = Callable[[int, int], None]  # (questions scored, questions in all)
Request = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation), context ids, continuation ids)
QUESTIONS_PER_CHUNK = 32


class LoadedModelLM(HFLM):
    """Scores `model` as given: lm-eval sees the PeftModel (adapter active), merged or quantised model itself.
    `shared_cache=False` keeps lm-eval's own scorer (the reference the tests compare with)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        on_progress: ProgressFn | None = None,
        shared_cache: bool = True,
    ) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.on_progress = on_progress
        # Prompt-learning adapters (prompt/prefix tuning) put their own tokens or cache in front of the input.
        self.shared_cache = shared_cache and not _is_prompt_learning(model)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Score the requests a few dozen questions at a time, to report progress. A chunk holds every request of
        its documents across tasks, so an answer two tasks share (MC1's are all in MC2) is scored once."""
        order = sorted(range(len(requests)), key=lambda i: (requests[i].doc_id or 0, requests[i].task_name or ""))
        total = len({_question(r) for r in requests})
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        done: set[tuple[str, int]] = set()
        for chunk in _chunks(order, requests):
            scored = super().loglikelihood([requests[i] for i in chunk], disable_tqdm=True)
            for i, result in zip(chunk, scored, strict=True):
                results[i] = result
            done.update(_question(requests[i]) for i in chunk)
            if self.on_progress is not None:
                self.on_progress(len(done), total)
        return results

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        fits = [i for i, (_, ctx, cont) in enumerate(requests) if len(ctx) + len(cont) <= self.max_length]
        if not self.shared_cache or not fits:
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
        results: dict[int, tuple[float, bool]] = {}
        # Requests lm-eval would truncate on the left go through its own scorer, which knows how.
        fitting = set(fits)
        too_long = [i for i in range(len(requests)) if i not in fitting]
        if too_long:
            scored = super()._loglikelihood_tokens([requests[i] for i in too_long], disable_tqdm=True)
            results.update(zip(too_long, scored, strict=True))
        results.update(self._score_grouped([requests[i] for i in fits], fits))
        for i, (strings, _, _) in enumerate(requests):
            self.cache_hook.add_partial("loglikelihood", strings, results[i])
        return [results[i] for i in range(len(requests))]

    def _score_grouped(self, requests: list[Request], indices: list[int]) -> dict[int, tuple[float, bool]]:
        """The prefix every context shares runs once; each distinct (context, continuation) then runs from the end
        of that prefix, many to a batch (few large forward calls: on a busy CPU each call has a high fixed cost)."""
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = defaultdict(list)
        for index, (_, ctx, cont) in zip(indices, requests, strict=True):
            unique[tuple(ctx), tuple(cont)].append(index)
        shared = _common_prefix([ctx for ctx, _ in unique])
        prefix = self._forward_batch(torch.tensor([shared], device=self.device), None, 1) if shared else None
        pairs = list(unique)
        results: dict[int, tuple[float, bool]] = {}
        for start in range(0, len(pairs), int(self.batch_size)):
            batch = pairs[start : start + int(self.batch_size)]
            for pair, scored in zip(batch, self._score_batch(batch, len(shared), prefix), strict=True):
                results.update(dict.fromkeys(unique[pair], scored))
        return results

    def _score_batch(
        self, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], shared: int, prefix: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy?) of each continuation: one row per pair, the context's own tokens and
        the continuation but its last token, right-padded (causal attention: padding never changes earlier
        positions); log-softmax only where a continuation token is predicted."""
        rows = [list(ctx[shared:] + cont[:-1]) for ctx, cont in pairs]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=self.device)
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix.past_key_values)
            cache.batch_repeat_interleave(len(rows))
        logits = self._forward_batch(ids, cache).logits
        scored = []
        for row, (ctx, cont) in enumerate(pairs):
            first = len(ctx) - shared - 1  # the position whose logits predict the continuation's first token
            own = F.log_softmax(logits[row, first : first + len(cont)], dim=-1, dtype=self.softmax_dtype)
            target = torch.tensor(cont, device=self.device)
            total = float(own.gather(-1, target[:, None]).sum())
            scored.append((total, bool((own.argmax(dim=-1) == target).all())))
        return scored

    def _forward_batch(self, ids: torch.Tensor, cache: Any, logits_to_keep: int = 0) -> Any:
        model: Any = self.model
        with torch.no_grad():
            return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)


def _is_prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _common_prefix(contexts: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The tokens every context starts with, leaving each at least one token of its own (whose logits predict the
    continuation's first token)."""
    shortest = min(len(c) for c in contexts) - 1
    first = contexts[0]
    for n in range(shortest):
        if any(c[n] != first[n] for c in contexts):
            return first[:n]
    return first[: max(shortest, 0)]


def _question(request: Instance) -> tuple[str, int]:
    return request.task_name or "", request.doc_id or 0


def _chunks(order: Sequence[int], requests: list[Instance]) -> list[list[int]]:
    """Consecutive runs of `order` covering QUESTIONS_PER_CHUNK document ids each."""
    chunks: list[list[int]] = []
    docs: set[int] = set()
    for i in order:
        doc = requests[i].doc_id or 0
        if doc not in docs and len(docs) == QUESTIONS_PER_CHUNK:
            docs = set()
        if not docs:
            chunks.append([])
        docs.add(doc)
        chunks[-1].append(i)
    return chunks
