"""Build the TruthfulQA fine-tuning files in data/truthfulqa/ from its train.jsonl (test.jsonl is never read).

The training questions are split once more (seed 0, 10 % held out, written to validation.jsonl in test.jsonl's
schema) so that recipes are chosen on validation questions and reported on the test questions: score MC1/MC2 on
them with `TUNELAB_DATA_DIR=<a folder holding truthfulqa/test.jsonl = these questions>`. Each question gives:
- SFT (chat scenario, prompt/completion): the question -> its best answer;
- DPO (preference scenario, TRL's prompt/chosen/rejected): the best answer preferred over each incorrect one.
The prompt is TruthfulQA's own question format ("Q: ...\\nA:"), the one its MC1/MC2 scores are computed with.

    python scripts/truthfulqa_training_files.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "truthfulqa"


def prompt(question: str) -> str:
    return f"Q: {question}\nA:"


def main() -> None:
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    random.Random(0).shuffle(rows)
    n_val = round(0.1 * len(rows))
    held_out = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:n_val])
    (DATA / "validation.jsonl").write_text(held_out, encoding="utf-8")  # the questions, to score MC1/MC2 on
    for split, part in (("validation", rows[:n_val]), ("train", rows[n_val:])):
        sft = [{"prompt": prompt(r["question"]), "completion": " " + r["best_answer"]} for r in part]
        dpo = [
            {"prompt": prompt(r["question"]), "chosen": " " + r["best_answer"], "rejected": " " + wrong}
            for r in part
            for wrong in r["incorrect_answers"]
        ]
        for name, records in ((f"sft_{split}.jsonl", sft), (f"dpo_{split}.jsonl", dpo)):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            (DATA / name).write_text(text, encoding="utf-8")
            print(f"{name}: {len(records)} rows")


if __name__ == "__main__":
    main()
