"""An evaluation's run directory: who may write it, resume integrity, and the commit ledger.

``npr eval --out DIR`` refuses a directory that holds another run unless ``--resume`` (the
same settings, model weights, problems and prompt, checked against ``DIR/config.json``) or
``--overwrite`` is given. Samples are appended to ``samples.jsonl`` as they finish;
``progress.json`` is the commit record, rewritten atomically each time problems complete:

    {"done": {benchmark: [problem id, ...]}, "wall_time_s": {benchmark: seconds}}

A problem counts as done only once it is listed there, and its wall time is the benchmark's
clock at that moment. So after an interruption (Ctrl-C, ``kill -9``, a power cut) a resumed
run keeps exactly the committed problems, redoes the rest from their own seeds, and its wall
time excludes whatever ran after the last commit (the discarded work).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from npr.eval.preflight import EvalError
from npr.fsio import atomic_write_json, atomic_write_text

RUN_FILES = ("config.json", "samples.jsonl", "results.json", "report.html", "progress.json")
SAMPLES, PROGRESS, CONFIG = "samples.jsonl", "progress.json", "config.json"


class RunDirError(EvalError):
    """An output directory that holds another run, or a run that does not match on --resume."""


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """The cheap checks, before anything is loaded: ``out`` is a directory (or can be one) and
    holds no other run unless ``--resume`` or ``--overwrite`` says what to do with it."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose another --out")
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not (resume or overwrite):
        raise RunDirError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or --overwrite to replace it, or choose another --out"
        )
    if resume and not (out / CONFIG).exists() and (out / SAMPLES).exists():
        raise RunDirError(
            f"--resume: {out} has {SAMPLES} but no {CONFIG}, so what produced those samples is "
            "unknown; use --overwrite to start again, or another --out"
        )


def _saved_description(out: Path) -> dict:
    try:
        return json.loads((out / CONFIG).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise RunDirError(
            f"--resume: {out / CONFIG} cannot be read ({type(e).__name__}: {e}); "
            "use --overwrite to start the run again, or another --out"
        ) from e


def resume_mismatches(saved: dict, description: dict) -> list[str]:
    """What differs between a run's saved ``config.json`` and this command's description:
    settings (by name), the model's weights, each benchmark's problems, the prompt."""
    problems = []
    old, new = saved.get("settings", {}), description["settings"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        problems.append("settings " + ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    if saved.get("model_sha256") != description["model_sha256"]:
        problems.append(
            f"the model's weights (sha256 {str(saved.get('model_sha256'))[:12]}… -> "
            f"{description['model_sha256'][:12]}…: the checkpoint at {new.get('model')!r} changed)"
        )
    old_data, new_data = saved.get("data_sha256") or {}, description["data_sha256"]
    data = sorted(b for b in new_data if old_data.get(b) != new_data[b])
    if data and "data_sha256" in saved:
        problems.append("the problems of " + ", ".join(data) + " (the data file changed)")
    if saved.get("prompt") != description["prompt"]:
        problems.append("the prompt (chat template or instruction)")
    return problems


def prepare_out_dir(out: Path, description: dict, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready to write: on ``resume`` refuse any mismatch with its ``config.json``;
    on ``overwrite`` delete the run files (only those); then create it. Writes nothing else."""
    check_out_dir(out, resume, overwrite)
    if resume and (out / CONFIG).exists():
        mismatches = resume_mismatches(_saved_description(out), description)
        if mismatches:
            raise RunDirError(
                f"--resume: the run in {out} was made with other inputs: {'; '.join(mismatches)}. "
                "Rerun with the same model, data and flags, or use --overwrite (or another --out) "
                "to start a new run"
            )
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:  # temporaries of an atomic write cut short by a kill (npr.fsio's names)
        for stale in out.glob(f".{name}.tmp*"):
            stale.unlink(missing_ok=True)


def write_description(out: Path, description: dict, resume: bool) -> None:
    """``config.json``, written once: a resumed run keeps the one that its first samples came from."""
    if not (resume and (out / CONFIG).exists()):
        atomic_write_text(out / CONFIG, json.dumps(description, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- the ledger


def _read_lines(path: Path) -> list[tuple[str, dict]]:
    """(raw line, record) of each readable line; a line cut by a crash ends the file."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                break
    return out


@dataclass
class Ledger:
    """The committed state of one run directory (``progress.json``) and its kept records."""

    out: Path
    k: int
    done: dict[str, list[str]] = field(default_factory=dict)
    wall_time_s: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, out: Path, k: int) -> Ledger:
        """Read ``progress.json`` and ``samples.jsonl``; keep the records of committed, complete
        problems (k samples, or one failure record) and atomically rewrite ``samples.jsonl`` to them."""
        ledger = cls(out, k)
        progress = _read_progress(out)
        lines = _read_lines(out / SAMPLES)
        if progress and "done" not in progress:  # before the ledger: {benchmark: seconds}, complete problems count
            ledger.wall_time_s = {b: float(s) for b, s in progress.items()}
            counts = Counter((r["benchmark"], r["problem_id"]) for _, r in lines)
            committed = {key for key, n in counts.items() if n >= k}
        else:
            ledger.wall_time_s = dict(progress.get("wall_time_s", {}))
            committed = {(b, pid) for b, ids in progress.get("done", {}).items() for pid in ids}
        kept = [(raw, r) for raw, r in lines if (r["benchmark"], r["problem_id"]) in committed]
        complete = ledger._complete(r for _, r in kept)
        kept = [(raw, r) for raw, r in kept if (r["benchmark"], r["problem_id"]) in complete]
        for bench, pid in dict.fromkeys((r["benchmark"], r["problem_id"]) for _, r in kept):  # file order
            ledger.done.setdefault(bench, []).append(pid)
        ledger.records = [r for _, r in kept]
        atomic_write_text(out / SAMPLES, "".join(raw + "\n" for raw, _ in kept))
        ledger._write()
        return ledger

    def _complete(self, records) -> set[tuple[str, str]]:
        samples, failed = Counter(), set()
        for r in records:
            key = (r["benchmark"], r["problem_id"])
            if r.get("failure"):
                failed.add(key)
            else:
                samples[key] += 1
        return failed | {key for key, n in samples.items() if n == self.k}

    def is_done(self, bench: str, problem_id: str) -> bool:
        return problem_id in self.done.get(bench, ())

    def commit(self, bench: str, problem_ids: list[str], wall_time_s: float) -> None:
        """Mark problems done (their records are already flushed) at the benchmark clock ``wall_time_s``."""
        self.done.setdefault(bench, []).extend(problem_ids)
        self.wall_time_s[bench] = wall_time_s
        self._write()

    def _write(self) -> None:
        atomic_write_json(self.out / PROGRESS, {"done": self.done, "wall_time_s": self.wall_time_s})


def _read_progress(out: Path) -> dict:
    if not (out / PROGRESS).exists():
        return {}
    try:
        progress = json.loads((out / PROGRESS).read_text(encoding="utf-8"))
        if not isinstance(progress, dict):
            raise ValueError("not a JSON object")
        return progress
    except ValueError as e:
        raise RunDirError(
            f"{out / PROGRESS} cannot be read ({e}); it is npr's record of finished problems: "
            "use --overwrite to start the run again, or another --out"
        ) from e


def read_wall_times(out: Path) -> dict[str, float]:
    """Committed wall time per benchmark from ``progress.json`` (either layout)."""
    progress = _read_progress(out)
    return dict(progress.get("wall_time_s", {})) if "done" in progress else {b: float(s) for b, s in progress.items()}
