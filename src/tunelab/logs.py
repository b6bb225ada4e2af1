"""How much the libraries under tunelab may print: quiet by default, everything with `tunelab --verbose`.

tunelab reports its own progress (model, data, steps, loss, ETA, evaluation) on its console. The libraries it
builds on add progress bars and warnings that tell a user nothing they can act on (weight-loading and GGUF
conversion bars, DeepSpeed choosing the CPU, deprecation notices meant for library authors); they are silenced
here, in one place, before any of those libraries is imported. Errors always get through.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "TUNELAB_VERBOSE"  # inherited by torchrun's and the service's worker processes

# Environment switches read by the libraries themselves (at import or at each bar).
_QUIET_ENV = {
    "TQDM_DISABLE": "1",  # every tqdm bar: transformers' weight loading, GGUF conversion, datasets' map
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
}
# Loggers whose warnings are advice to developers; DeepSpeed's writes to stdout with its own handler.
_NOISY_LOGGERS = ("DeepSpeed", "bitsandbytes", "accelerate", "peft", "datasets", "torch.distributed", "httpx")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure(verbose: bool = False) -> None:
    """Call once, first thing in the CLI; `verbose` (or TUNELAB_VERBOSE=1 from a parent process) lets all through."""
    if verbose or is_verbose():
        os.environ[VERBOSE_ENV] = "1"
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)  # a user's explicit setting wins
    for name in _NOISY_LOGGERS:
        # A filter, not a level: DeepSpeed sets its logger's level when it is imported, but keeps filters.
        logging.getLogger(name).addFilter(_errors_only)
    # Deprecation notices (e.g. transformers' FutureWarning about `is_gradient_checkpointing`) and library
    # UserWarnings are for the code that calls the library, which is tunelab: its tests see them, users need not.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(?!tunelab)")
    _quiet_loaded_libraries()


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _quiet_loaded_libraries() -> None:
    """Libraries imported before `configure` read their environment already; tell them directly."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
