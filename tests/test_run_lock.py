"""One writer per run directory (npr.runlock), checked with real processes: a second ``npr train``,
``sample``, ``eval``, ``pipeline`` or ``view`` on a locked output exits 2 naming the holder's PID and
command and writes nothing; a holder killed with ``kill -9`` leaves no stale lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from npr.runlock import RunDirLocked, locked_output_file, locked_run_dir

HOLDER = """
import sys, time
from npr.runlock import locked_output_file, locked_run_dir
hold = locked_output_file if sys.argv[2] == "file" else locked_run_dir
with hold(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def npr(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "npr.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


class Holder:
    """A separate process holding the lock of ``path`` until killed."""

    def __init__(self, path: Path, kind: str = "dir"):
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), kind], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "locked"

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process.stdout.close()


@pytest.fixture
def holder():
    held = []
    yield lambda path, kind="dir": held.append(Holder(path, kind)) or held[-1]
    for h in held:
        if h.process.poll() is None:
            h.kill9()


def _refused(proc: subprocess.CompletedProcess, command: str, holder: Holder) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line
    line = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert line.startswith(f"npr {command}: error: --out "), line
    assert f"is being written by process {holder.process.pid} (" in line and "-c import sys, time" in line, line
    return line


def test_train_refused_while_another_process_holds_the_run_dir_then_kill9_frees_it(tmp_path, holder):
    run = tmp_path / "run"
    h = holder(run)
    proc = npr("train", "stage2", "--preset", "smoke", "--out", str(run), "--quiet")
    _refused(proc, "train", h)
    assert list(run.iterdir()) == []  # nothing written beside the holder
    h.kill9()  # the kernel drops the lock with its holder: no stale lock
    proc = npr("train", "stage2", "--preset", "smoke", "--out", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "final").is_dir()


def test_two_trainings_started_together_on_one_dir_one_wins_and_the_metrics_are_one_runs(tmp_path):
    """The issue's case: both exited 0 and metrics.jsonl interleaved steps 1,1,2,2,3,3."""
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "npr.cli.main",
                "train",
                "stage2",
                "--preset",
                "smoke",
                "--out",
                str(run),
                "--quiet",
                "--learning-rate",
                lr,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for lr in ("1e-3", "2e-3")
    ]
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err for code, err in outcomes if code == 2)
    assert "Traceback" not in loser and loser.startswith("npr train: error: "), loser
    winner_lr = ("1e-3", "2e-3")[[code for code, _ in outcomes].index(0)]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # each step once: one run wrote them
    assert f"learning_rate: {float(winner_lr)}" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("command", ["eval", "sample", "pipeline"])
def test_other_run_commands_refuse_a_locked_out(tmp_path, holder, command):
    run = tmp_path / "run"
    h = holder(run)
    argv = {
        "eval": ["eval", "--model", "tiny-random-llama", "--benchmarks", "rg:chain_sum?size=2&seed=1&terms=2"],
        "sample": ["sample", "--preset", "smoke", "--model", "tiny-random-llama"],
        "pipeline": ["pipeline", "--preset", "smoke"],
    }[command]
    _refused(npr(*argv, "--out", str(run)), command, h)
    assert list(run.iterdir()) == []


def test_view_refuses_an_output_file_being_written_and_leaves_no_lock_file(tmp_path, holder):
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps({"output": "<answer>1</answer>"}) + "\n")
    page = tmp_path / "page.html"
    h = holder(page, "file")
    _refused(npr("view", str(traces), "--out", str(page)), "view", h)
    assert not page.exists()
    h.kill9()
    proc = npr("view", str(traces), "--out", str(page))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "t.jsonl"]  # no .page.html.lock


def test_a_refused_lock_removes_the_directories_it_created(tmp_path):
    run = tmp_path / "a" / "b"
    with locked_run_dir(run):
        with pytest.raises(RunDirLocked, match=f"process {os.getpid()} "):  # flock conflicts within a process too
            with locked_run_dir(run):
                pass
        assert run.is_dir()
    assert not (tmp_path / "a").exists()
    with locked_output_file(tmp_path / "x.html"):
        with pytest.raises(RunDirLocked):
            with locked_output_file(tmp_path / "x.html"):
                pass
    assert list(tmp_path.iterdir()) == []


def test_other_ranks_of_a_launch_do_not_take_the_lock(tmp_path, monkeypatch):
    with locked_run_dir(tmp_path / "run"):
        monkeypatch.setenv("RANK", "1")
        with locked_run_dir(tmp_path / "run"):
            pass


def test_a_refused_command_never_removes_the_holders_directory(tmp_path, monkeypatch):
    """Two commands started together both see the directory missing; the one refused must not rmdir the
    (still empty) directory the other has just created and locked."""
    import npr.runlock as runlock

    run = tmp_path / "run"
    with locked_run_dir(run):
        monkeypatch.setattr(runlock, "_missing_parents", lambda path: [Path(path).absolute()])  # "I created it"
        with pytest.raises(RunDirLocked):
            with locked_run_dir(run):
                pass
        assert run.is_dir()
