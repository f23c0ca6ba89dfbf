"""Packaging: the core install runs without any extra's package, and a feature that needs one
fails with a one-line NprError naming the extra (missing packages simulated by hiding them)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from npr.errors import NprError
from npr.extras import EXTRAS, MissingExtraError, require

# every package an extra installs (pyproject.toml), hidden from the core-install subprocess below
EXTRA_PACKAGES = (
    "reasoning_gym",
    "starlette",
    "uvicorn",
    "pydantic",
    "anyio",
    "datasets",
    "wandb",
    "mlflow",
    "trackio",
    "tensorboard",
)

# A meta-path wrapper that makes the extras' packages look uninstalled (find_spec -> None, as
# importlib.util.find_spec reports for an absent package); everything else resolves as usual.
HIDE_EXTRAS = textwrap.dedent(f"""
    import sys
    HIDDEN = {EXTRA_PACKAGES!r}

    class Hide:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN or not hasattr(self.inner, "find_spec"):
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
""")


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "starlette", None)  # import of starlette now fails as if not installed
    with pytest.raises(MissingExtraError, match=r"npr serve needs the package 'starlette'.*pip install 'npr\[serve\]'"):
        require("starlette", "serve")
    assert issubclass(MissingExtraError, NprError) and set(EXTRAS) >= {"serve", "gym", "hub", "trackers"}
    assert require("json", "gym").dumps([]) == "[]"
    with pytest.raises(ValueError, match="unknown extra"):
        require("json", "nope")


def test_reasoning_gym_data_without_the_gym_extra(monkeypatch, capsys, tmp_path):
    from npr.cli.main import main
    from npr.data import load_problems

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    monkeypatch.setitem(sys.modules, "reasoning_gym.factory", None)
    with pytest.raises(MissingExtraError, match=r"npr\[gym\]"):
        load_problems("rg:chain_sum?size=2")
    assert main(["train", "stage1", "--preset", "smoke", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the package 'reasoning_gym'" in err[0] and "npr[gym]" in err[0]
    assert not (tmp_path / "run").exists()  # refused before any write


def test_serve_without_the_serve_extra_exits_2_naming_it(monkeypatch, capsys):
    from npr.cli.main import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", "tiny-random-llama"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "npr serve needs the package 'uvicorn'" in err[0] and "npr[serve]" in err[0]


@pytest.mark.slow
def test_core_install_trains_and_samples_without_any_extra(tmp_path):
    """With every extra's package hidden, Stage 3, npr sample and npr eval run on generated data (the
    tiny pipeline's kind) and none of the hidden packages is imported."""
    data = "gen:expressions?size=8&seed=1&parts=2-4"
    script = HIDE_EXTRAS + textwrap.dedent(f"""
        from npr.cli.main import main
        code = main(["train", "stage3", "--preset", "smoke", "--out", {str(tmp_path / "s3")!r}, "--quiet",
                     "--max-steps", "1", "--train-data", {data!r}])
        assert code == 0, code
        code = main(["sample", "--preset", "smoke", "--out", {str(tmp_path / "sample")!r}, "--quiet",
                     "--train-data", {data!r}])
        assert code == 0, code
        code = main(["eval", "--model", "tiny-random-llama", "--benchmarks", {data!r}, "--limit", "2", "--k", "1",
                     "--max-new-tokens", "16", "--dtype", "float32", "--kv-cache-gib", "0.05", "--quiet",
                     "--out", {str(tmp_path / "eval")!r}])
        assert code == 0, code
        leaked = sorted(k for k in sys.modules if k.split(".")[0] in HIDDEN)
        assert not leaked, leaked
        print("core ok")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and "core ok" in out.stdout, out.stderr[-3000:]
