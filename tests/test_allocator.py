"""Freed tensor memory goes back to the OS (tunelab.allocator): 4 MiB tensors freed between small ones kept alive,
after glibc's threshold has risen, leave nothing resident with the fix and all of it without."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from tunelab.allocator import ALLOCATOR_ENV, preload_env

SCRIPT = """
import sys, torch
from tunelab.allocator import release_freed_memory

def private_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon"))

if sys.argv[1] == "fixed":
    assert release_freed_memory()
warm = torch.empty(8 << 20, dtype=torch.uint8)
del warm  # a mapped block freed: glibc's dynamic threshold rises past 4 MiB
before = private_mib()
big, small = [], []
for _ in range(50):
    big.append(torch.ones(1 << 20))  # 4 MiB each, 200 MiB in all
    small.append(torch.ones(256))  # kept: they pin the heap behind the big blocks
del big
print(private_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_leave_no_resident_memory() -> None:
    def retained(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])

    assert retained("default") > 150  # glibc's default keeps the freed 200 MiB: the case the fix is for
    assert retained("fixed") < 20


JEMALLOC = ctypes.util.find_library("jemalloc") if sys.platform.startswith("linux") else None


def test_launched_processes_keep_glibc_when_asked_or_when_ld_preload_is_set() -> None:
    assert preload_env({"PATH": "/usr/bin", ALLOCATOR_ENV: "glibc"}) == ({}, "glibc (TUNELAB_ALLOCATOR=glibc)")
    assert preload_env({"LD_PRELOAD": "libmine.so"})[0] == {}  # the user's preload is theirs


@pytest.mark.skipif(JEMALLOC is None, reason="no jemalloc on this machine (Debian: libjemalloc2; .ci/run installs it)")
def test_launched_processes_run_on_jemalloc_when_the_machine_has_it() -> None:
    env, said = preload_env({"PATH": os.environ["PATH"]})
    assert said.startswith("jemalloc") and env == {"LD_PRELOAD": JEMALLOC}
    probe = "import torch; torch.ones(1 << 22); print(open('/proc/self/maps').read())"
    maps = subprocess.run(
        [sys.executable, "-c", probe], env=os.environ | env, capture_output=True, text=True, check=True
    )
    assert "libjemalloc" in maps.stdout  # the library is loaded in a process that runs torch
    assert (
        "libjemalloc"
        not in subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    )
