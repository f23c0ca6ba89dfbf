"""The prepared GPU check's CPU dry mode: the same script and functions as on an H100/H200 (a
2-layer Qwen3-shaped miniature, 512-token rows), so CI catches a broken check before a GPU does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_train_check_dry_mode():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_train_check.sh"), "--dry"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("flex vs dense (fp32, ") and "max |logit diff|" in lines[0]
    assert any(line.startswith("tree (dense)") for line in lines)  # CPU: the layout auto picks there
    assert any(line.startswith("causal (no mask)") for line in lines)
    assert lines[-1].startswith("tree/causal at 512: memory n/a (CPU), time ")
