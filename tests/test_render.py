"""Chat rendering: one BOS, EOS inside the labels, loss only where the user asked for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tunelab.data.formats import ChatExample, Message
from tunelab.data.render import IGNORE, encode_prompt, generation_prompt, tokenize, windows

CONVO = ChatExample(
    line=1,
    messages=[
        Message("system", "You are terse."),
        Message("user", "hello there"),
        Message("assistant", "hi"),
        Message("user", "how are you"),
        Message("assistant", "fine, thanks"),
    ],
)


@pytest.fixture()
def tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _bos_adding(tokenizer_dir: Path, template_writes_bos: bool) -> PreTrainedTokenizerBase:
    """A Llama-2-like tokenizer: a distinct <s> BOS that the tokenizer itself adds to every encoding."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    prefix = "{{ bos_token }}" if template_writes_bos else ""
    tok.chat_template = prefix + tok.chat_template
    return tok


def _trained_text(tok: PreTrainedTokenizerBase, example: ChatExample, **kw: bool) -> str:
    t = tokenize(example, tok, **kw)
    return str(tok.decode([i for i, label in zip(t.input_ids, t.labels, strict=True) if label != IGNORE]))


def test_only_assistant_replies_and_their_eos_are_trained(tokenizer: PreTrainedTokenizerBase) -> None:
    t = tokenize(CONVO, tokenizer)
    trained = _trained_text(tokenizer, CONVO)
    assert trained == "hi<|im_end|>fine, thanks<|im_end|>"  # not the template's newline after the turn
    assert tokenizer.eos_token_id in [label for label in t.labels if label != IGNORE]
    # The prompt is fully masked: no user or system text leaks into the loss.
    assert "hello" not in trained and "terse" not in trained and "assistant" not in trained


def test_train_on_prompt_trains_every_token(tokenizer: PreTrainedTokenizerBase) -> None:
    t = tokenize(CONVO, tokenizer, train_on_prompt=True)
    assert t.labels == t.input_ids


def test_weight_zero_message_is_not_trained(tokenizer: PreTrainedTokenizerBase) -> None:
    msgs = list(CONVO.messages)
    msgs[2] = Message("assistant", "hi", trained=False)
    assert _trained_text(tokenizer, ChatExample(1, messages=msgs)) == "fine, thanks<|im_end|>"


def test_prompt_completion_trains_completion_and_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    example = ChatExample(1, prompt="Q: two plus two?\nA:", completion=" four")
    t = tokenize(example, tokenizer)
    assert _trained_text(tokenizer, example) == " four<|im_end|>"
    assert t.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(t.input_ids) == "Q: two plus two?\nA: four<|im_end|>"


@pytest.mark.parametrize("template_writes_bos", [True, False])
def test_exactly_one_bos(tiny_tokenizer_dir: Path, template_writes_bos: bool) -> None:
    tok = _bos_adding(tiny_tokenizer_dir, template_writes_bos)
    for example in (CONVO, ChatExample(1, prompt="a prompt", completion=" done")):
        ids = tokenize(example, tok).input_ids
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    prompt, _ = generation_prompt(CONVO, tok)
    assert encode_prompt(prompt, tok).count(tok.bos_token_id) == 1


def test_no_bos_added_when_the_tokenizer_adds_none(tokenizer: PreTrainedTokenizerBase) -> None:
    # SmolLM-style: BOS is <|im_start|>, written by the template at each turn; nothing may be prepended.
    ids = tokenize(CONVO, tokenizer).input_ids
    assert ids[:2] != [tokenizer.bos_token_id] * 2
    assert tokenizer.decode(ids).startswith("<|im_start|>system")


def test_truncation_keeps_the_prefix_and_flags_it(tokenizer: PreTrainedTokenizerBase) -> None:
    full = tokenize(CONVO, tokenizer)
    cut = tokenize(CONVO, tokenizer, max_seq_len=10)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:10] and cut.labels == full.labels[:10]


def test_raw_text_windows_keep_every_token_in_order(tokenizer: PreTrainedTokenizerBase) -> None:
    # Continued pre-training (the domain scenario) trains on all of a long text, in rows of at most max_seq_len.
    whole = tokenize(ChatExample(line=1, prompt="", completion="one two three four five six seven " * 6), tokenizer)
    pieces = windows(whole, 16)
    assert all(2 <= len(p.input_ids) <= 16 for p in pieces)
    assert [i for p in pieces for i in p.input_ids] == whole.input_ids[: sum(len(p.input_ids) for p in pieces)]
    assert len(whole.input_ids) - sum(len(p.input_ids) for p in pieces) <= 1  # at most a 1-token tail is dropped
    assert [x for p in pieces for x in p.labels] == whole.labels[: sum(len(p.labels) for p in pieces)]


def test_generation_prompt_ends_at_the_last_reply(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt, reference = generation_prompt(CONVO, tokenizer)
    assert reference == "fine, thanks"
    assert prompt.endswith("how are you<|im_end|>\n<|im_start|>assistant\n")
