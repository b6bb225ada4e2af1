"""Session fixtures: a tiny tokenizer and tiny Llama / Phi-3 models, built in code once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tiny import build_tiny_llama, build_tiny_phi3, build_tiny_tokenizer

# `train.precision: auto` would pick bf16 on a machine where it is faster (AMX), and the tests that compare runs
# (DDP vs one process, resume) have fp32 tolerances: pin auto's answer for the suite and its subprocesses.
# tests/test_precision.py unsets it to test the measurement itself.
os.environ.setdefault("TUNELAB_PRECISION", "fp32")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with the byte-level BPE tokenizer (ChatML template; bos <|im_start|>, eos <|im_end|>, pad <|pad|>)."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def _tiny_tokenizer(tiny_tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, _tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """Folder with a 2-layer Llama (safetensors, generation_config) and the tiny tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), _tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory: pytest.TempPathFactory, _tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """Folder with a 2-layer Phi-3 (fused qkv_proj / gate_up_proj) and the tiny tokenizer."""
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny_phi3"), _tiny_tokenizer)
