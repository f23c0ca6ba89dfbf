"""The npr command line."""

from __future__ import annotations

import subprocess
import sys


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
