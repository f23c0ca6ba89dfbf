"""The pipeline returns a finished step's freed memory to the OS (all steps share one process, whose
allocator settings otherwise keep freed memory resident)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import torch
from npr.cli.main import tune_malloc
from npr.train.freed_memory import return_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

assert tune_malloc()
x = torch.ones(512 * 2**20 // 4)  # 512 MiB from the heap (below the tuned mmap threshold)
del x
kept = rss_mib()
return_freed_memory()
print(kept, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_a_finished_steps_freed_memory_leaves_the_process():
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NPR_MALLOC_TUNING": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    kept, after = map(float, out.stdout.split())
    assert kept - after > 400  # MiB: the tuned heap kept the freed tensor until the trim
