"""One request's generation: sample tokens step by step, turn them into text deltas, stop on EOS or a stop string.

Sampling happens here, not in the engines, so the PyTorch and ONNX engines (and both servers) answer a (seeded)
request the same way. The logits go through transformers' logits processors, as `generate` would use them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tunelab.serving.schemas import FinishReason


class Decoder(Protocol):
    """One sequence on a model: feed it tokens, get the next-token logits (1-D, vocab)."""

    def feed(self, tokens: Sequence[int]) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, on the tokens generated so far (not the prompt's):
    logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence  # type: ignore[return-value]


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: a fixed amount added to chosen tokens' logits at every step."""

    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self.ids = torch.tensor([token for token, _ in bias], dtype=torch.long)
        self.values = torch.tensor([value for _, value in bias])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.index_add(1, self.ids, self.values[None].to(scores.dtype))  # type: ignore[return-value]


def logits_processors(sampling: Sampling) -> LogitsProcessorList:
    """What changes the logits before a token is picked; the warpers that only shape sampling come after the
    penalties, in transformers' own order (temperature, top-k, top-p), and only when sampling."""
    processors = LogitsProcessorList()
    if sampling.presence_penalty or sampling.frequency_penalty:
        processors.append(OpenAIPenalties(sampling.presence_penalty, sampling.frequency_penalty))
    if sampling.logit_bias:
        processors.append(LogitBias(sampling.logit_bias))
    if sampling.greedy:
        return processors
    processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


def pick_token(
    logits: torch.Tensor,
    generated: Sequence[int],
    sampling: Sampling,
    rng: torch.Generator,
    processors: LogitsProcessorList | None = None,
) -> int:
    """Greedy at temperature 0 (or top_p 0); otherwise a draw from the processed distribution."""
    processors = logits_processors(sampling) if processors is None else processors
    ids = cast(torch.LongTensor, torch.tensor([list(generated)], dtype=torch.long))
    scores = processors(ids, logits.float()[None])[0]
    if sampling.greedy:
        return int(scores.argmax())
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=rng))


class TextGeneration:
    """Tokens -> text deltas. A delta never ends inside a UTF-8 character or a possible stop string, so a
    streaming client never sees text that the stop rule later takes back."""

    def __init__(
        self,
        decoder: Decoder,
        prompt_ids: Sequence[int],
        sampling: Sampling,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        on_done: Callable[[TextGeneration], None] | None = None,
    ) -> None:
        self.decoder, self.prompt_ids, self.sampling = decoder, list(prompt_ids), sampling
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.on_done = on_done  # told when the generation ends (finished, stopped or cancelled): counts tokens
        self.finish_reason: FinishReason = "length"
        self.completion_tokens = 0

    def tokens(self) -> Generator[int, None, None]:
        rng = torch.Generator()
        if self.sampling.seed is None:
            rng.seed()
        else:
            rng.manual_seed(self.sampling.seed)
        try:
            processors, generated = logits_processors(self.sampling), list[int]()
            logits = self.decoder.feed(self.prompt_ids)
            for step in range(self.sampling.max_tokens):
                token = pick_token(logits, generated, self.sampling, rng, processors)
                if token in self.eos_ids:
                    self.finish_reason = "stop"
                    return
                self.completion_tokens += 1
                generated.append(token)
                yield token
                if step + 1 < self.sampling.max_tokens:  # the last token needs no forward pass after it
                    logits = self.decoder.feed([token])
        finally:
            self.decoder.close()
            if self.on_done is not None:
                self.on_done(self)

    def deltas(self) -> Iterator[str]:
        ids: list[int] = []
        sent, text = 0, ""
        with closing(self.tokens()) as tokens:
            for token in tokens:
                ids.append(token)
                text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
                if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                    continue
                cut = _find_stop(text, self.sampling.stop, start=max(0, sent - _longest(self.sampling.stop)))
                if cut is not None:
                    self.finish_reason = "stop"
                    if cut > sent:
                        yield text[sent:cut]
                    return
                safe = len(text) - _stop_prefix_len(text, self.sampling.stop)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
        if len(text) > sent:
            yield text[sent:]

    def text(self) -> str:
        return "".join(self.deltas())


def _longest(stops: Sequence[str]) -> int:
    return max((len(s) for s in stops), default=0)


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
