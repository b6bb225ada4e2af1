"""Many LoRA adapters on one ONNX base, switched per request through onnxruntime-genai's adapter API.

The model builder writes a LoRA adapter's A and B matrices as their own MatMul nodes beside each base MatMul
(`adapter_path`). tunelab builds the base with zero-rank "slots" there: a LoRA of every module any of the adapters
targets, whose weights become graph inputs with a dynamic rank and an empty default (rank 0, so the base alone runs
when no adapter is active). Each adapter is then only its A and B matrices in an `.onnx_adapter` file (ONNX Runtime's
adapter format), B already scaled by alpha / r, which `og.Adapters` loads and `Generator.set_active_adapter`
switches. Under int4 the base is quantised and the slots stay fp32 (the builder's `nodes_to_exclude`), so adapters
are applied at full precision on top of the int4 base.

Plain LoRA only (rsLoRA included): DoRA, PiSSA-style initialisations that rewrite the base weights, per-module rank
patterns and `modules_to_save` change more than A and B, and are refused with a pointer to merging instead.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

from tunelab.errors import TunelabError

ADAPTERS_DIR = "adapters"
SUFFIX = ".onnx_adapter"
_SLOT = re.compile(r"^model\.layers\.\d+\.\w+\.\w+\.lora_[AB]\.MatMul\.weight$")
# PEFT initialisations that leave the base weights as they are (the others subtract their start from the base).
_PLAIN_INITS = (True, False, "gaussian")


def check_lora(name: str, folder: Path) -> dict[str, Any]:
    """The adapter's config, if A and B are all it changes; a TunelabError naming what stands in the way if not."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise TunelabError(f"adapter {name!r}: {folder} has no adapter_config.json (a PEFT adapter folder is needed)")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    problem = _unsupported(config)
    if problem:
        raise TunelabError(
            f"adapter {name!r} ({folder}): {problem}; only plain LoRA adapters can be switched at run time. "
            "Merge it instead: tunelab export onnx --adapter PATH"
        )
    return config


def _unsupported(config: Mapping[str, Any]) -> str | None:
    if config.get("peft_type") != "LORA":
        return f"it is a {config.get('peft_type')} adapter"
    if config.get("use_dora"):
        return "it is DoRA (its magnitude vector rescales the base weights)"
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        return f"its init_lora_weights={config['init_lora_weights']!r} rewrites the base weights"
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "it has per-module ranks (rank_pattern/alpha_pattern)"
    if config.get("modules_to_save"):
        return f"it also trains whole modules ({', '.join(config['modules_to_save'])})"
    return None


def target_modules(configs: list[dict[str, Any]]) -> list[str]:
    """Every module name any adapter targets: the base gets a slot in each."""
    names: set[str] = set()
    for config in configs:
        targets = config.get("target_modules") or []
        if isinstance(targets, str):
            raise TunelabError(f"target_modules={targets!r} is a pattern: list the module names to switch adapters")
        names.update(targets)
    return sorted(names)


def slot_names(weights: Mapping[str, Any]) -> list[str]:
    """The ONNX names of a PEFT adapter's tensors: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
    is the builder's `model.layers.0.attn.q_proj.lora_A.MatMul.weight`."""
    return [_onnx_name(key) for key in weights]


def _onnx_name(peft_key: str) -> str:
    stem = peft_key.removeprefix("base_model.model.").removesuffix(".weight").replace(".self_attn.", ".attn.")
    return f"{stem}.MatMul.weight"


def lora_nodes(slots: list[str]) -> list[str]:
    """The builder's node names of the slots' MatMuls (kept fp32 when the base is quantised)."""
    nodes = []
    for name in slots:
        parts = name.removesuffix(".MatMul.weight").split(".")  # model layers 0 attn q_proj lora_A
        nodes.append("/" + "/".join([parts[0], f"{parts[1]}.{parts[2]}", *parts[3:], "MatMul"]))
    return nodes


def open_slots(folder: Path) -> list[str]:
    """Turn the LoRA weights of a built model into graph inputs of dynamic rank with an empty default (rank 0)."""
    model = onnx.load(str(folder / "model.onnx"))  # external data too: the file is rewritten whole below
    kept, slots = [], []
    for init in model.graph.initializer:
        if not _SLOT.match(init.name):
            kept.append(init)
            continue
        rows, cols = init.dims
        is_a = ".lora_A." in init.name
        empty = np.zeros((rows, 0) if is_a else (0, cols), dtype=np.float32)
        kept.append(numpy_helper.from_array(empty, init.name))
        # One rank per module (A and B share it): an adapter may leave a module out (rank 0) while another is in.
        rank = "rank_" + init.name.split(".lora_")[0].replace(".", "_")
        shape = [rows, rank] if is_a else [rank, cols]
        model.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, shape))
        slots.append(init.name)
    if not slots:
        raise TunelabError("the model builder wrote no LoRA nodes for this model: merge the adapters instead")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    # The builder declared the slot weights and the A outputs with its own rank; left there, ONNX Runtime plans
    # their buffers for that rank and fails on another ("Shape mismatch attempting to re-use buffer").
    declared = [v for v in model.graph.value_info if v.name not in slots and "/lora_A/MatMul/" not in v.name]
    del model.graph.value_info[:]
    model.graph.value_info.extend(declared)
    (folder / "model.onnx.data").unlink(missing_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return slots


def write_adapter(name: str, folder: Path, slots: set[str], out: Path) -> Path:
    """A PEFT LoRA folder as an `.onnx_adapter` file: A transposed, B scaled by the adapter's scaling and transposed,
    under the base's slot names (a module the base has no slot for is an error, not a silent omission)."""
    import onnxruntime as ort

    config = check_lora(name, folder)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (r**0.5 if config.get("use_rslora") else r)
    params = {}
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        target = _onnx_name(key)
        if target not in slots:
            raise TunelabError(
                f"adapter {name!r}: {key} has no slot in this ONNX base (its slots were made for other modules): "
                "export the base again with this adapter among --runtime-adapter"
            )
        matrix = value.astype(np.float32) * (scaling if ".lora_B." in key else 1.0)
        params[target] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(matrix.T))
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(params)
    out.parent.mkdir(parents=True, exist_ok=True)
    adapter.export_adapter(str(out))
    return out


def slot_adapter(base: Path, modules: list[str], workdir: Path) -> Path:
    """A rank-1 LoRA of every targeted module, for the builder to lay out the slots (its weights are replaced)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    out = workdir / "slots"
    get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=modules)).save_pretrained(str(out))
    return out


def convert_for_serving(name: str, source: Path, slots: set[str], cache: Path) -> Path:
    """An adapter given to `tunelab serve --onnx`: an `.onnx_adapter` file as is, a PEFT folder converted."""
    if source.is_file() and source.suffix == SUFFIX:
        return source
    return write_adapter(name, source, slots, cache / f"{name}{SUFFIX}")


def serving_cache() -> Path:
    return Path(tempfile.mkdtemp(prefix="tunelab-onnx-adapters-"))
