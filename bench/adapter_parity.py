"""The adapter handed to a colleague: loaded with PEFT alone in a fresh folder, against tunelab's own loading.

    .venv/bin/python bench/adapter_parity.py RUN/adapter

Copies the adapter folder into a temporary directory, builds a Hugging Face hub cache there that holds the base the
adapter records (`base_model_name_or_path`) made from the model tunelab resolves that name to (for the embedded
model: its dequantised copy, as HuggingFaceTB/SmolLM2-135M-Instruct), and runs `AutoPeftModelForCausalLM.
from_pretrained` on the copy in a child process with only that cache, offline (it imports no tunelab code).
Prints the largest logit difference against `tunelab.inference.load_for_inference(base, adapter)` over every
position of a few chat prompts, and whether the greedy choices agree. It does not compare with the hub's own
full-precision weights (no hub here): see docs/deploy.md for what that changes for the embedded model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tunelab.inference import load_for_inference
from tunelab.models import resolve

PROMPTS = ["what is your name", "Tell me a joke about computers.", "Where is Paris?"]
REVISION = "0" * 40  # any commit id: the cache only has to be laid out as the hub client lays it out
CHILD = """
import sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained('adapter').eval()
with torch.no_grad():
    torch.save([model(ids).logits for ids in torch.load('ids.pt')], 'logits.pt')
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    args = parser.parse_args()
    base = json.loads((args.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]  # fmt: skip
    ids = [torch.tensor([tokenizer(str(t))["input_ids"]]) for t in texts]
    model, _ = load_for_inference(base, args.adapter)
    with torch.no_grad():
        expected = [model(i).logits for i in ids]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        repo = folder / "hub" / f"models--{base.replace('/', '--')}"
        shutil.copytree(resolve(base).path, repo / "snapshots" / REVISION)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REVISION)
        shutil.copytree(args.adapter, folder / "adapter")
        torch.save(ids, folder / "ids.pt")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the child imports PEFT alone
        env |= {"HF_HUB_CACHE": str(folder / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=folder, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"PEFT alone failed:\n{done.stderr[-2000:]}")
        got = torch.load(folder / "logits.pt")
    diff = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    same = sum(int((g.argmax(-1) == e.argmax(-1)).sum()) for g, e in zip(got, expected, strict=True))
    total = sum(e.shape[1] for e in expected)
    print(
        f"base {base}: max abs logit difference {diff:.3g} over {total} positions of {len(ids)} prompts; "
        f"greedy choice equal at {same}/{total}"
    )


if __name__ == "__main__":
    main()
