"""A full disk is named, not a traceback: one line (exit 2) saying which path ran out of space and how
to continue, no half-written file left behind, and the same command with --resume finishes the run once
there is space. On a small tmpfs where this machine allows mounting (root), and with an ENOSPC-raising
writer everywhere."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npr.cli.main import main

RG = "rg:chain_sum?size=20&seed=1&terms=2"


def npr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "npr.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def leftovers(root: Path) -> list[str]:
    """Half-written files: checkpoint/final partials, atomic-write temporaries, sample parts, lock files."""
    return sorted(
        str(p)
        for p in root.rglob(".*")
        if ".partial" in p.name or ".tmp" in p.name or ".rank" in p.name or p.name.endswith(".lock")
    )


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (resizable with .grow); skipped where mounting is not allowed."""
    mounted = []

    def mount(size: str) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        if (
            os.geteuid() != 0
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True
            ).returncode
            != 0
        ):
            pytest.skip("cannot mount a tmpfs here (the ENOSPC-writer tests below cover the same paths)")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=True)


def grow(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)


def _one_line(proc: subprocess.CompletedProcess, command: str, path: Path, hint: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"npr {command}: error: no space left on the device holding {path}"), proc.stderr
    assert hint in proc.stderr, proc.stderr


@pytest.mark.slow
def test_training_on_a_full_disk_names_it_leaves_no_partial_and_resumes(small_disk):
    """Before: RuntimeError '... unexpected pos 242432 vs 242324' and an orphan .step-2.partial."""
    disk = small_disk("2m")
    run = disk / "run"
    args = [
        "train",
        "stage2",
        "--preset",
        "smoke",
        "--out",
        str(run),
        "--quiet",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "0",
    ]
    _one_line(npr(*args), "train", run / "checkpoints", "run the same command again with --resume")
    assert leftovers(disk) == []
    grow(disk)
    proc = npr(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "final" / "model.safetensors").is_file() and leftovers(disk) == []


@pytest.mark.slow
def test_eval_on_a_full_disk_names_it_and_resumes(small_disk):
    """Before: a bare OSError [Errno 28] traceback."""
    disk = small_disk("64k")
    out = disk / "ev"
    args = [
        "eval",
        "--model",
        "tiny-random-llama",
        "--benchmarks",
        RG,
        "--k",
        "2",
        "--max-new-tokens",
        "200",
        "--dtype",
        "float32",
        "--out",
        str(out),
        "--quiet",
    ]
    _one_line(npr(*args), "eval", out, "run the same command again with --resume")
    assert leftovers(disk) == []
    grow(disk)
    proc = npr(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "results.json").is_file() and len((out / "samples.jsonl").read_text().splitlines()) == 40


def test_view_on_a_full_disk_leaves_no_temporary(small_disk, tmp_path):
    """Before: npr view left its temporary file behind."""
    disk = small_disk("64k")
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps({"output": "<answer>" + "x" * 100_000 + "</answer>"}) + "\n")
    proc = npr("view", str(traces), "--out", str(disk / "page.html"))
    _one_line(proc, "view", disk, "run the same command again")
    assert list(disk.iterdir()) == []


# -- everywhere: a writer that raises ENOSPC ---------------------------------------------------------------------


def test_an_atomic_write_that_hits_enospc_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from npr import fsio

    target = tmp_path / "results.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsio.os, "fsync", full)
    with pytest.raises(OSError) as caught:
        fsio.atomic_write_text(target, "new")
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_the_cli_turns_enospc_into_one_line_naming_the_out(tmp_path, monkeypatch, capsys):
    from npr import fsio

    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps({"output": "<answer>1</answer>"}) + "\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsio.os, "fsync", full)
    assert main(["view", str(traces), "--out", str(tmp_path / "out" / "page.html")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"npr view: error: no space left on the device holding {tmp_path / 'out' / 'page.html'}; free "
        "some space (or choose another --out), then run the same command again\n"
    ), err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_checkpoint_cut_by_a_full_disk_is_removed_and_named(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError about positions, without a file name or errno."""
    import shutil

    from npr.train import checkpoint

    partial = tmp_path / "checkpoints" / ".step-2.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(OSError) as caught:
        with checkpoint._removed_on_failure(partial):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                "data/0: unexpected pos 242432 vs 242324"
            )
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "checkpoints")
    assert not partial.exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 40))  # a short write, disk not full
    partial.mkdir()
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with checkpoint._removed_on_failure(partial):
            raise RuntimeError("unexpected pos 1 vs 2")
    assert not partial.exists()


def test_bugs_are_not_mistaken_for_a_full_disk(monkeypatch):
    import npr.cli.version as version

    def broken(args):
        raise RuntimeError("unexpected pos in a bug")

    monkeypatch.setattr(version, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["version"])
