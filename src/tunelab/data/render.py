"""Render chat examples to token ids with a loss mask.

Three traps this module exists to avoid (each has a test):
- a doubled BOS: the chat template often writes the BOS text itself, and the tokenizer adds another;
- a missing EOS in the labels: the model then never learns to stop;
- training on the prompt when the user asked for completion-only (or silently masking everything).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import ChatExample
from tunelab.errors import DataError, Problem

IGNORE = -100  # label value the loss skips (PyTorch's cross-entropy ignore_index)


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken; not shifted (the model shifts)
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def render_text(example: ChatExample, tokenizer: PreTrainedTokenizerBase) -> str:
    """The exact text the model sees (used by previews and generation prompts)."""
    if example.is_conversation:
        return _template(tokenizer, _as_dicts(example.messages))
    return example.prompt + example.completion


def tokenize(
    example: ChatExample,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int | None = None,
    train_on_prompt: bool = False,
) -> Tokenized:
    if example.is_conversation:
        ids, trained = _tokenize_conversation(example, tokenizer, train_on_prompt)
    else:
        ids, trained = _tokenize_completion(example, tokenizer, train_on_prompt)
    labels = [tok if keep else IGNORE for tok, keep in zip(ids, trained, strict=True)]
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return Tokenized(ids, labels, truncated)


def windows(tokenized: Tokenized, size: int) -> list[Tokenized]:
    """`tokenized` cut into consecutive pieces of at most `size` tokens, so raw text longer than a row is trained in
    full rather than cut at `size` (continued pre-training reads every token, as Hugging Face's `run_clm` example
    does). A last piece of one token is dropped: the model has nothing to predict from it."""
    ids, labels = tokenized.input_ids, tokenized.labels
    pieces = [Tokenized(ids[i : i + size], labels[i : i + size]) for i in range(0, len(ids), size)]
    return [p for p in pieces if len(p.input_ids) > 1]


def _tokenize_conversation(
    example: ChatExample, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool
) -> tuple[list[int], list[bool]]:
    messages = _as_dicts(example.messages)
    text = _template(tokenizer, messages)
    spans = [] if train_on_prompt else _trained_spans(example, tokenizer, messages, text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoding["input_ids"]
    # A token is trained when it starts inside an assistant span (content + end-of-turn token).
    trained = [train_on_prompt or any(a <= start < b for a, b in spans) for start, _ in encoding["offset_mapping"]]
    return _with_bos(tokenizer, text, ids, trained)


def _trained_spans(
    example: ChatExample, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], text: str
) -> list[tuple[int, int]]:
    """Character spans of the assistant replies, found by rendering the conversation turn by turn."""
    spans = []
    for i, message in enumerate(example.messages):
        if message.role != "assistant" or not message.trained:
            continue
        # The header ("<|im_start|>assistant\n") is the generation prompt: the model never has to produce it.
        start = len(_template(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_template(tokenizer, messages[: i + 1]))
        # The turn ends with its end-of-turn token; the template's newline after it is never generated.
        end = start + len(text[start:end].rstrip())
        if not text.startswith(_template(tokenizer, messages[: i + 1])):
            raise DataError(
                [
                    Problem(
                        f"line {example.line}",
                        "the chat template does not render turn by turn "
                        "(an earlier turn changes when a later one is added)",
                        "use a template without cross-turn rewriting, or task.train_on_prompt: true",
                        "template_not_incremental",
                    )
                ]
            )
        spans.append((start, end))
    return spans


def _tokenize_completion(
    example: ChatExample, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool
) -> tuple[list[int], list[bool]]:
    # Tokenised separately so the prompt/completion boundary is a token boundary.
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = prompt + completion + eos
    trained = [train_on_prompt] * len(prompt) + [True] * (len(completion) + len(eos))
    return _with_bos(tokenizer, example.prompt, ids, trained)


def _with_bos(
    tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int], trained: list[bool]
) -> tuple[list[int], list[bool]]:
    """Prepend BOS only when the tokenizer normally adds one and the text does not already start with it."""
    bos = tokenizer.bos_token_id
    if bos is None or not _adds_bos(tokenizer) or (ids and ids[0] == bos):
        return ids, trained
    return [bos, *ids], [False, *trained]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def _template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> str:
    if not messages and not add_generation_prompt:
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return str(text)


def _as_dicts(messages: Any) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def generation_prompt(example: ChatExample, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(prompt text ending where the model should answer, reference answer) for the last reply of an example."""
    if not example.is_conversation:
        return example.prompt, example.completion
    last = max(i for i, m in enumerate(example.messages) if m.role == "assistant")
    prompt = _template(tokenizer, _as_dicts(example.messages[:last]), add_generation_prompt=True)
    return prompt, example.messages[last].content


def encode_prompt(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a generation prompt, with the same single-BOS rule as training."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _with_bos(tokenizer, text, ids, [False] * len(ids))[0]
