"""Packing: rows fill up, and packed examples never see each other."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tunelab.data.packing import collate, pack, unpacked
from tunelab.data.render import IGNORE, Tokenized


def _example(n: int, start: int) -> Tokenized:
    ids = [(start + i) % 200 + 5 for i in range(n)]
    return Tokenized(ids, ids)


def test_best_fit_fills_rows_and_keeps_every_token() -> None:
    examples = [_example(n, n) for n in (60, 30, 40, 70, 25, 5, 90)]
    rows = pack(examples, max_len=100)
    assert all(len(r.input_ids) <= 100 for r in rows)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)
    assert len(rows) == 4  # 320 tokens cannot fit in 3 rows of 100; best fit needs only 4
    # Positions restart at 0 at each example: as many restarts as examples.
    assert sum(r.position_ids.count(0) for r in rows) == len(examples)
    assert all(r.position_ids[0] == 0 for r in rows)


def test_collate_pads_with_ignored_labels_and_restarting_positions() -> None:
    rows = unpacked([_example(3, 0), _example(5, 9)])
    batch = collate(rows, pad_id=0, packed=True)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["labels"][0, 3:].tolist() == [IGNORE, IGNORE]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert "attention_mask" not in batch
    padded = collate(rows, pad_id=0, packed=False)
    assert padded["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]


def test_packed_examples_do_not_attend_to_each_other(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    a, b = _example(7, 1), _example(11, 50)
    row = pack([a, b], max_len=64)
    assert len(row) == 1
    with torch.no_grad():
        inputs = {k: v for k, v in collate(row, 0, packed=True).items() if k != "labels"}
        packed = model(**inputs, use_cache=False).logits[0]  # the block mask needs no cache (see train/loop.py)
        alone_b = model(input_ids=torch.tensor([b.input_ids])).logits[0]
        alone_a = model(input_ids=torch.tensor([a.input_ids])).logits[0]
    order = row[0].input_ids
    first, second = (alone_a, alone_b) if order[: len(a.input_ids)] == a.input_ids else (alone_b, alone_a)
    torch.testing.assert_close(packed[: len(first)], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[len(first) :], second, atol=1e-5, rtol=1e-5)
