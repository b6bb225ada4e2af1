"""One request's generation: sample tokens step by step, turn them into text deltas, stop on EOS or a stop string.

Sampling happens here, not in the engines, so the PyTorch and ONNX engines answer a (seeded) request the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]


class Decoder(Protocol):
    """One sequence on a model: feed it tokens, get the next-token logits (1-D, vocab)."""

    def feed(self, tokens: Sequence[int]) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def pick_token(logits: torch.Tensor, sampling: Sampling, rng: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling from the tempered distribution."""
    if sampling.temperature == 0 or sampling.top_p == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head whose mass reaches top_p: a token stays if the mass before it is below top_p.
        outside = (sorted_probs.cumsum(0) - sorted_probs) >= sampling.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=rng))


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
            logits = self.decoder.feed(self.prompt_ids)
            for step in range(self.sampling.max_tokens):
                token = pick_token(logits, self.sampling, rng)
                if token in self.eos_ids:
                    self.finish_reason = "stop"
                    return
                self.completion_tokens += 1
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
