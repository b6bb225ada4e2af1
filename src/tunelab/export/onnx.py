"""ONNX export in onnxruntime-genai's layout, running the export, and checking it against PyTorch.

The export is onnxruntime-genai's model builder run on the merged Hugging Face model: it writes `model.onnx`
(+ external data), `genai_config.json` and the tokenizer files, which is what `onnxruntime_genai.Model` opens.
int4 and int8 are its weight-only MatMulNBits quantisation (block 32, int8 activations on CPU; int4 by k-quant
with the LM head and the most sensitive layers in int8); on the embedded model int4 is the fastest and int8 the
closer to PyTorch's answers (bench/onnx.py and docs/deploy.md have figures).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import PreTrainedTokenizerBase

from tunelab.atomic import publish_folder
from tunelab.data.render import encode_prompt
from tunelab.errors import TunelabError
from tunelab.export.merge import save_merged
from tunelab.export.onnx_adapters import (
    ADAPTERS_DIR,
    SUFFIX,
    check_lora,
    lora_nodes,
    open_slots,
    slot_adapter,
    slot_names,
    target_modules,
    write_adapter,
)
from tunelab.inference import chat_prompt, load_for_inference
from tunelab.models import load_tokenizer, resolve
from tunelab.train.progress import phase

Precision = Literal["fp32", "int8", "int4"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
GENAI_CONFIG = "genai_config.json"
MANIFEST = "tunelab_onnx.json"

# A fixed prompt set for parity and speed: short chat questions of the kind the embedded model answers.
PARITY_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain what a CPU does in a computer.",
    "Give me three tips for writing clear emails.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "Summarise the rules of chess in two sentences.",
)


def export_onnx(
    model: str,
    out: Path,
    precision: str = "int8",
    adapter: Path | None = None,
    overwrite: bool = False,
    runtime_adapters: Mapping[str, Path] | None = None,
) -> Path:
    """Merge `adapter` (if any) into `model` and write an onnxruntime-genai folder at `out`; or, with
    `runtime_adapters`, the base with LoRA slots and each adapter as `adapters/NAME.onnx_adapter` (onnx_adapters)."""
    if precision not in PRECISIONS:
        raise TunelabError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise TunelabError(f"{out} already exists and is not empty: choose another --out or pass --force")
    if adapter is not None and runtime_adapters:
        raise TunelabError("--adapter merges one adapter, --runtime-adapter keeps several apart: choose one")
    configs = [check_lora(name, path) for name, path in (runtime_adapters or {}).items()]
    loaded, tokenizer = load_for_inference(model, adapter)
    # Build into a temporary sibling and rename, so a failed export never leaves a half-written folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staged = save_merged(loaded, tokenizer, Path(tmp) / "merged")
        del loaded
        built = Path(tmp) / "onnx"
        merged = str(adapter) if adapter else None
        manifest: dict[str, Any] = {"precision": precision, "model": model, "adapter": merged}
        if runtime_adapters:
            manifest["adapters"] = _build_with_slots(staged, built, precision, Path(tmp), runtime_adapters, configs)
        else:
            _run_builder(staged, built, precision, Path(tmp) / "cache")
        (built / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        publish_folder(built, out)
    return out


def _build_with_slots(
    base: Path, built: Path, precision: str, tmp: Path, adapters: Mapping[str, Path], configs: list[dict[str, Any]]
) -> dict[str, str]:
    """The base with a LoRA slot in every targeted module, and each adapter's file; returns name -> file."""
    slots = slot_adapter(base, target_modules(configs), tmp)
    names = slot_names(load_file(str(slots / "adapter_model.safetensors")))
    extra = [f"adapter_path={slots}"]
    if precision != "fp32":  # quantise the base only: the adapters' matrices stay fp32
        extra.append("nodes_to_exclude=" + ",".join(lora_nodes(names)))
    _run_builder(base, built, precision, tmp / "cache", extra)
    opened = set(open_slots(built))
    if opened != set(names):
        raise TunelabError(
            f"the model builder laid out {len(opened)} LoRA slots where {len(names)} were expected "
            "(its layer names differ for this architecture): merge the adapters instead (--adapter)"
        )
    files = {}
    for name, path in adapters.items():
        file = write_adapter(name, path, opened, built / ADAPTERS_DIR / f"{name}{SUFFIX}")
        files[name] = str(file.relative_to(built))
    return files


def _run_builder(merged: Path, out: Path, precision: str, cache: Path, extra: Sequence[str] = ()) -> None:
    # In a child process: the builder is a script (it imports its siblings through sys.path) that holds every
    # tensor it writes in memory and prints progress bars; none of that belongs in the caller's process.
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(cache), "--extra_options", "hf_token=false", *extra]
    if precision == "int4":
        # k-quant, with the LM head and the most sensitive layers kept in int8 (llama.cpp's "mixed" recipe): on the
        # embedded model, greedy agreement with PyTorch 72% -> 82% for 15% less speed and 26 MiB more than
        # plain round-to-nearest int4 (bench/onnx.py; docs/deploy.md).
        cmd.append("algo_config=k_quant_mixed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the input is a local folder: never ask the hub
    layers = int(json.loads((merged / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    reading = _BuilderProgress(layers, quantised=precision != "fp32")
    with phase("export", 100, "%") as shown:
        returncode, tail = _follow_builder(cmd, env, lambda line: shown.advance(reading.step(line)))
    if returncode != 0 or not (out / GENAI_CONFIG).is_file():
        raise TunelabError(f"onnxruntime-genai's model builder failed (exit {returncode}):\n" + "\n".join(tail))


class _BuilderProgress:
    """The builder's own lines as a percentage: reading the layers ("Reading layer 3"), then, for int4/int8,
    quantising them (round-to-nearest names each layer's last MatMul; k-quant prints "Progress: [###] 45.45%")."""

    _READ = re.compile(r"^Reading layer (\d+)")
    _QUANT_LAYER = re.compile(r"complete quantization of /model/layers\.(\d+)/mlp/down_proj")
    _QUANT_PERCENT = re.compile(r"^Progress: \[[# ]*\] ([\d.]+)%")

    def __init__(self, layers: int, quantised: bool) -> None:
        self.layers, self.read_share = layers, 50.0 if quantised else 100.0
        self.done = 0.0

    def step(self, line: str) -> int:
        """Whole percentage points this line adds."""
        if read := self._READ.search(line):
            reached = self.read_share * (int(read.group(1)) + 1) / self.layers
        elif quant := self._QUANT_LAYER.search(line):
            reached = self.read_share + (100 - self.read_share) * (int(quant.group(1)) + 1) / self.layers
        elif percent := self._QUANT_PERCENT.search(line):
            reached = self.read_share + (100 - self.read_share) * float(percent.group(1)) / 100
        else:
            return 0
        gained = int(reached) - int(self.done)
        self.done = max(self.done, reached)
        return max(gained, 0)


def _follow_builder(cmd: list[str], env: dict[str, str], on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run the builder, passing each of its output lines on; its exit code and last lines (for an error)."""
    tail: deque[str] = deque(maxlen=8)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as child:
        for line in child.stdout or ():  # text mode splits tqdm's carriage returns into lines too
            tail.append(line.rstrip())
            on_line(line)
    return child.returncode, [line for line in tail if line]


def physical_cores() -> int:
    """The machine's physical cores: ONNX Runtime's best thread count for one session (hyper-threads add little
    to matmuls and cost synchronisation)."""
    import psutil

    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def session_options(threads: int | None = None) -> dict[str, int]:
    """Thread settings for every ONNX Runtime session tunelab opens. Left unset, onnxruntime-genai ran the int4
    model at half the speed of an explicit 2 threads on a 2-core machine."""
    # Errors only: a base with LoRA slots (onnx_adapters) would log a warning per slot at every session start.
    return {"intra_op_num_threads": threads or physical_cores(), "log_severity_level": 3}


class OnnxModel:
    """An exported folder run by onnxruntime-genai, with the Hugging Face tokenizer saved beside it."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import onnxruntime_genai as og

        if not (folder / GENAI_CONFIG).is_file():
            raise TunelabError(f"{folder} is not an ONNX export (no {GENAI_CONFIG}): run `tunelab export onnx`")
        self.folder = folder
        self.genai_config: dict[str, Any] = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
        config = og.Config(str(folder))
        self.session_options = session_options(threads)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": self.session_options}}}))
        self.og = og
        self.model = og.Model(config)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(resolve(str(folder)))
        self.adapters: dict[str, Path] = {}  # name -> .onnx_adapter file, loaded into `_loaded` on first use
        self._loaded: Any = None
        manifest = folder / MANIFEST
        listed = json.loads(manifest.read_text(encoding="utf-8")).get("adapters") if manifest.is_file() else None
        for name, file in (listed or {}).items():
            self.add_adapter(name, folder / file)

    @property
    def slots(self) -> set[str]:
        """The LoRA slots of a base exported with --runtime-adapter (empty for a merged export)."""
        import onnx

        graph = onnx.load(str(self.folder / "model.onnx"), load_external_data=False).graph
        return {i.name for i in graph.input if ".lora_" in i.name}

    def add_adapter(self, name: str, file: Path) -> None:
        if not file.is_file():
            raise TunelabError(f"adapter {name!r}: {file} does not exist")
        if self._loaded is None:
            self._loaded = self.og.Adapters(self.model)
        self._loaded.load(str(file), name)
        self.adapters[name] = file

    def _activate(self, generator: Any, adapter: str | None) -> None:
        if adapter is not None:
            generator.set_active_adapter(self._loaded, adapter)

    @property
    def context_length(self) -> int:
        return int(self.genai_config["model"]["context_length"])

    @property
    def eos_ids(self) -> set[int]:
        eos = self.genai_config["model"]["eos_token_id"]
        return {int(e) for e in (eos if isinstance(eos, list) else [eos])}

    def decoder(self, max_length: int, adapter: str | None = None) -> OnnxDecoder:
        return OnnxDecoder(self, max_length, adapter)

    def greedy(
        self, ids: Sequence[int], max_new_tokens: int, ignore_eos: bool = False, adapter: str | None = None
    ) -> list[int]:
        """Greedy continuation with onnxruntime-genai's own search loop (the fast path)."""
        params = self.og.GeneratorParams(self.model)
        total = len(ids) + max_new_tokens
        params.set_search_options(max_length=total, min_length=total if ignore_eos else 0, do_sample=False)
        generator = self.og.Generator(self.model, params)
        self._activate(generator, adapter)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        while tokens and not ignore_eos and tokens[-1] in self.eos_ids:
            tokens.pop()
        return tokens

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        """Greedy text continuation of `prompt` (already rendered), like `tunelab.evaluate.generate`."""
        tokens = self.greedy(encode_prompt(prompt, self.tokenizer), max_new_tokens)
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()


class OnnxDecoder:
    """One sequence run step by step: feed tokens, read the next-token logits (the caller samples)."""

    def __init__(self, model: OnnxModel, max_length: int, adapter: str | None = None) -> None:
        params = model.og.GeneratorParams(model.model)
        # The KV cache is allocated for max_length up front: size it to the request, not the context window.
        params.set_search_options(max_length=max_length)
        self._generator: Any = model.og.Generator(model.model, params)
        model._activate(self._generator, adapter)

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        self._generator.append_tokens(np.array([tokens], dtype=np.int32))
        logits = self._generator.get_logits()
        return torch.from_numpy(np.array(logits, dtype=np.float32).reshape(-1, logits.shape[-1])[-1])

    def close(self) -> None:
        self._generator = None  # frees the KV cache now, not when the garbage collector gets to it


def generate_onnx(
    folder: Path, prompt: str, max_new_tokens: int, raw: bool = False, threads: int | None = None
) -> str:
    """`tunelab generate --onnx DIR`: greedy reply to a user message (or raw continuation) from an ONNX export."""
    model = OnnxModel(folder, threads)
    text = prompt if raw else chat_prompt(model.tokenizer, [{"role": "user", "content": prompt}])
    return model.generate(text, max_new_tokens)


class SequenceLogits:
    """Logits at every position of a sequence from one ONNX Runtime pass with an empty KV cache: the parity
    check's view of an export, independent of onnxruntime-genai's generation loop."""

    def __init__(self, folder: Path, threads: int | None = None, adapter: Path | None = None) -> None:
        import onnxruntime as ort

        self.config = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]["decoder"]
        options = ort.SessionOptions()
        chosen = session_options(threads)
        options.intra_op_num_threads = chosen["intra_op_num_threads"]
        options.log_severity_level = chosen["log_severity_level"]
        path = str(folder / self.config["filename"])
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.run_options = ort.RunOptions()
        if adapter is not None:  # an .onnx_adapter file on a base with LoRA slots
            lora = ort.LoraAdapter()
            lora.Load(str(adapter))
            self.run_options.add_active_adapter(lora)
            self._lora = lora  # the run options do not keep it alive

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        n = len(ids)
        feeds: dict[str, np.ndarray] = {}
        for spec in self.session.get_inputs():
            if spec.name == "input_ids":
                feeds[spec.name] = np.array([ids], dtype=np.int64)
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones((1, n), dtype=np.int64)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.arange(n, dtype=np.int64)[None]
            elif spec.name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in spec.type else np.float32
                shape = (1, self.config["num_key_value_heads"], 0, self.config["head_size"])
                feeds[spec.name] = np.zeros(shape, dtype=dtype)
        logits = self.session.run(["logits"], feeds, self.run_options)[0]
        return np.asarray(logits[0], dtype=np.float32)


@dataclass(frozen=True)
class Agreement:
    """How often the ONNX model's greedy token equals PyTorch's, over a prompt set.

    `rate` is teacher-forced: along PyTorch's greedy continuation, the share of positions where the ONNX
    model's top token is the same (one early difference does not count against every later token).
    `exact` counts prompts whose free-running ONNX greedy continuation equals PyTorch's token for token.
    """

    rate: float
    exact: int
    prompts: int
    tokens: int


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str] = PARITY_PROMPTS) -> list[list[int]]:
    """The fixed prompt set rendered with the model's chat template, as token ids."""
    return [encode_prompt(chat_prompt(tokenizer, [{"role": "user", "content": p}]), tokenizer) for p in prompts]


@torch.inference_mode()
def logits_max_abs_diff(model: torch.nn.Module, folder: Path, prompts: Sequence[Sequence[int]]) -> float:
    """Largest |ONNX - PyTorch| logit over every position of every prompt."""
    onnx_logits, worst = SequenceLogits(folder), 0.0
    for ids in prompts:
        reference = model(torch.tensor([list(ids)])).logits[0].float().numpy()
        worst = max(worst, float(np.abs(onnx_logits(ids) - reference).max()))
    return worst


@torch.inference_mode()
def greedy_agreement(
    model: torch.nn.Module,
    folder: Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    adapter: str | None = None,
) -> Agreement:
    """`adapter`: one of the export's runtime adapters (tunelab export onnx --runtime-adapter), active in both."""
    runner = OnnxModel(folder)
    onnx_logits = SequenceLogits(folder, adapter=runner.adapters[adapter] if adapter else None)
    matches = total = exact = 0
    for ids in prompts:
        reference = torch_greedy(model, ids, max_new_tokens)  # ends with EOS when the model stopped
        sequence = [*ids, *reference]
        predicted = onnx_logits(sequence[:-1])[len(ids) - 1 :].argmax(-1)
        matches += int((predicted == np.array(reference)).sum())
        total += len(reference)
        stripped = reference[:-1] if reference and reference[-1] in runner.eos_ids else reference
        exact += int(runner.greedy(ids, max_new_tokens, adapter=adapter) == stripped)
    return Agreement(rate=matches / total, exact=exact, prompts=len(prompts), tokens=total)


@torch.inference_mode()
def torch_greedy(
    model: torch.nn.Module, ids: Sequence[int], max_new_tokens: int, ignore_eos: bool = False
) -> list[int]:
    """PyTorch's greedy continuation; with `ignore_eos`, exactly `max_new_tokens` tokens (equal lengths to time)."""
    x = torch.tensor([list(ids)])
    out = model.generate(  # type: ignore[operator]
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else 0,
        do_sample=False,
    )
    return [int(t) for t in out[0, len(ids) :]]
