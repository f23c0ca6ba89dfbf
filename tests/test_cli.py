"""The npr command line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest


def npr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npr.cli.main", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    out = npr("--help")
    assert out.returncode == 0
    assert "Native Parallel Reasoner" in out.stdout and "version" in out.stdout and "demo" in out.stdout


def test_version():
    out = npr("version")
    assert out.returncode == 0 and out.stdout.startswith("npr ")


def test_demo_on_tiny_model():
    out = npr("demo", "--model", "tiny-random-llama")
    assert out.returncode == 0, out.stderr
    assert "b1 step 2" in out.stdout and "tree attention mask" in out.stdout


def test_demo_bad_model_is_a_clear_error():
    out = npr("demo", "--model", "./nope")
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


MAPPED_PROBE = """
import ctypes, sys
from npr.cli.main import tune_malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

applied = tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.mallinfo2.restype = ctypes.c_void_p, Mallinfo2
block = libc.malloc(64 << 20)  # a 64 MiB tensor's worth
print(applied, libc.mallinfo2().hblkhd >= 64 << 20)  # bytes in mmapped blocks
libc.free(ctypes.c_void_p(block))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
@pytest.mark.parametrize("setting, applied, mapped", [("1", True, False), ("0", False, True)])
def test_the_console_script_keeps_large_blocks_on_the_heap_unless_told_not_to(setting, applied, mapped):
    """``npr`` (npr.cli.main.console_main) raises glibc's mmap threshold before any work, so a 64 MiB
    block comes from the heap instead of a fresh mapping; ``NPR_MALLOC_TUNING=0`` leaves glibc alone."""
    out = subprocess.run(
        [sys.executable, "-c", MAPPED_PROBE],
        env={**os.environ, "NPR_MALLOC_TUNING": setting},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(applied), str(mapped)]
