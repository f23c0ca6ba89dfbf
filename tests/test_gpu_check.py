"""The prepared GPU check's CPU dry run (``benchmarks/gpu_check.sh --device cpu --tiny``): it must not rot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for section in ("## parity", "## decode", "## parallel"):
        assert section in text
    for kernel in ("flex", "sdpa"):  # the dry run compiles flex too (fp32)
        match = re.search(
            rf"parity tiny float32/{kernel}: max \|engine - flat\| = (\S+), seeded sampling reproduces: "
            r"(\w+)",
            text,
        )
        assert float(match.group(1)) <= 1e-4 and match.group(2) == "True", text
    report = json.loads(out.read_text())
    assert len(report["decode"]) == 4 and all(row["npr_tok_s"] > 0 for row in report["decode"])
    assert [row["k"] for row in report["parallel"]] == [2]
