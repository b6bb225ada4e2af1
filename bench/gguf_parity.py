"""GGUF export parity: a merged model against its GGUF files, read back by transformers.

    .venv/bin/python bench/gguf_parity.py RUN/merged RUN/gguf/RUN-f16.gguf RUN/gguf/RUN-q8_0.gguf

Prints, per file: the largest logit difference over every position of a few chat prompts, how many greedy answers
are identical (and how many of the reference's tokens are in place), and whether the GGUF tokenizer gives the same
ids. docs/deploy.md quotes its output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

QUESTIONS = [
    "what is your name",
    "Tell me a joke about computers.",
    "What is 12 times 7?",
    "Where is Paris?",
    "How do I boil an egg?",
]


def _greedy(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return list(out[0, ids.shape[1] :].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("merged", type=Path)
    parser.add_argument("gguf", type=Path, nargs="+")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    model = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32).eval()
    texts = [
        str(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True))
        for q in QUESTIONS
    ]
    prompts = [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]
    with torch.no_grad():
        reference = [(model(ids).logits[0], _greedy(model, ids, args.new_tokens)) for ids in prompts]
    n_ref = sum(len(answer) for _, answer in reference)
    for path in args.gguf:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        diff, identical, in_place = 0.0, 0, 0
        with torch.no_grad():
            for ids, (logits, answer) in zip(prompts, reference, strict=True):
                diff = max(diff, (loaded(ids).logits[0] - logits).abs().max().item())
                got = _greedy(loaded, ids, args.new_tokens)
                identical += got == answer
                in_place += sum(a == b for a, b in zip(got, answer, strict=False))
        same_ids = sum(from_gguf(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts)
        print(
            f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB; max abs logit difference {diff:.3g}; greedy answers "
            f"identical {identical}/{len(prompts)} ({in_place}/{n_ref} reference tokens in place); "
            f"tokenizer ids equal {same_ids}/{len(texts)}"
        )


if __name__ == "__main__":
    main()
