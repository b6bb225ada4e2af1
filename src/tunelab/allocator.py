"""Give freed tensor memory back to the operating system as soon as it is freed.

PyTorch's CPU tensors come from the C library's malloc. glibc serves a block of at least its *mmap threshold* with a
private mapping that `free` returns to the OS at once, and smaller blocks from its heap, which keeps them. The
threshold starts at 128 KiB but rises to the size of each mapped block freed (up to 32 MiB), so after the first few
steps every activation and every temporary up to 32 MiB comes from the heap, where fragmentation keeps freed blocks
resident: peak memory then counts temporaries long gone. Measured on a 1.1B Llama-shaped model (`bench/memory.py
--model tinyllama-1.1b`, 2 steps of 256 tokens): QLoRA's dequantised per-layer weights (up to 46 MB each, freed after
each matmul) held peak private memory at 4,863 MiB, 1,684 MiB with a fixed 1 MiB threshold; LoRA 7,156 -> 4,857 MiB.

It has a price: every large allocation is then a fresh mapping whose pages the kernel zeroes on first touch. On the
135M embedded model (LoRA, 8 rows of 256 tokens, idle 2-core Xeon) a step took 15.5 s instead of 10.4 (peak RSS 6.3
instead of 10.2 GiB); on the 1.1B model, whose matmuls are large next to its activations, the time per step did not
change within the noise of a shared machine. So `tunelab train` applies it to QLoRA runs only, where memory is the
point of the method.

The processes `tunelab train --nproc` launches (the default layout on a multi-core CPU) get jemalloc instead, when
the machine has it (Debian's `libjemalloc2`), preloaded by `preload_env`: it returns freed pages without the cost
of a mapping per tensor. Measured on the embedded model (`bench/train_throughput.py --variants tunelab`, two DDP
processes, idle 2-core Xeon, the two runs back to back): peak RSS 3,031 MiB per process against 4,696 with glibc, at
the same speed (195.2 vs 196.9 tokens/s) and the same final loss. `TUNELAB_ALLOCATOR=glibc` keeps glibc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
THRESHOLD_BYTES = 1 << 20


def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (it also stops the threshold from rising). True when
    applied; elsewhere (macOS, musl, Windows) a no-op: those allocators do not have this behaviour or this knob."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1)


ALLOCATOR_ENV = "TUNELAB_ALLOCATOR"  # "glibc": launched processes keep glibc's allocator


def preload_env(env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The variables to add to `env` for launched training processes (LD_PRELOAD of jemalloc, when the machine has
    it), and what was chosen, for the log. An LD_PRELOAD already set, TUNELAB_ALLOCATOR=glibc, or a machine without
    jemalloc keep glibc's allocator."""
    if env.get(ALLOCATOR_ENV) == "glibc":
        return {}, f"glibc ({ALLOCATOR_ENV}=glibc)"
    if env.get("LD_PRELOAD"):
        return {}, "as LD_PRELOAD gives"
    library = ctypes.util.find_library("jemalloc") if sys.platform.startswith("linux") else None
    if library is None:
        return {}, "glibc (no jemalloc on this machine: `apt install libjemalloc2` saves memory)"
    return {"LD_PRELOAD": library}, f"jemalloc ({library}, preloaded: freed memory returns to the system)"
