"""Metrics of a run: ``RUN/metrics.jsonl`` (one JSON object per step, the canonical record), a rich
live display, and the experiment trackers of ``--report-to`` (npr.train.trackers), which get each
line's numeric fields after it is written. Only the main process writes, draws or tracks.

Wall-clock fields (``time_*``, ``*_per_s``) are the only fields of a metrics line that differ
between two runs of the same config; ``deterministic_fields`` drops them for comparisons.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npr.train.trackers import tracked_values

LOGGER = logging.getLogger("npr.train")

# what the live display shows, in order: metric key -> label
DISPLAY = {
    "reward": "reward",
    "accuracy": "acc",
    "format_valid_rate": "fmt-valid",
    "trigger_rate": "trigger",
    "loss": "loss",
    "kept_rate": "kept",
    "gen_rounds": "rounds",
    "tokens_per_s": "tok/s",
    "rollout_tokens_per_s": "tok/s",
}


def is_wall_clock(key: str) -> bool:
    return key.startswith("time_") or key.endswith("_per_s")


def deterministic_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics line without its wall-clock fields."""
    return {k: v for k, v in record.items() if not is_wall_clock(k)}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL log; a torn last line (a process killed while appending) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # only the last line can be half-written
                break
            raise
    return records


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= ``last_step`` (a resumed run logs the later ones
    again; -1 keeps none), dropping a torn last line; rewritten atomically."""
    from npr.fsio import atomic_write_text

    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


truncate_metrics = truncate_jsonl


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends metrics lines, mirrors them to the trackers and the live display (main process only).
    ``trackers``: started accelerate trackers (``npr.train.trackers.start_trackers``), finished by ``close``."""

    def __init__(
        self, run_dir: Path, stage: str, total_steps: int, enabled: bool, quiet: bool, trackers: Sequence[Any] = ()
    ):
        self.path = run_dir / "metrics.jsonl"
        self.stage, self.total, self.enabled = stage, total_steps, enabled
        self.display = LiveDisplay(stage, total_steps) if enabled and not quiet and sys.stdout.isatty() else None
        self.plain = enabled and not quiet and self.display is None
        self.trackers = list(trackers) if enabled else []
        self.console_handler = None
        if self.display is not None or self.plain:  # the console shows notes unless --quiet
            self.console_handler = _ConsoleHandler(self._show)
            for stale in [h for h in LOGGER.handlers if isinstance(h, _ConsoleHandler)]:  # a run that never closed
                LOGGER.removeHandler(stale)
            LOGGER.addHandler(self.console_handler)
            if LOGGER.level == logging.NOTSET:  # an application's own level for npr.train wins
                LOGGER.setLevel(logging.INFO)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            values = tracked_values(record)
            for tracker in self.trackers:
                tracker.log(values, step=record.get("step", 0))
        if self.display is not None:
            self.display.update(record)
        elif self.plain:
            print(summary_line(self.stage, record, self.total), flush=True)

    def note(self, text: str) -> None:
        """A one-off message (dropped samples, checkpoints): an INFO record of the ``npr.train`` logger, shown
        above the live display (or printed) unless quiet; a library user silences or redirects it with
        ``logging.getLogger("npr.train")``."""
        if self.enabled:
            LOGGER.info(text)

    def _show(self, text: str) -> None:
        if self.display is not None:
            self.display.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.console_handler is not None:
            LOGGER.removeHandler(self.console_handler)
            self.console_handler = None
        if self.display is not None:
            self.display.stop()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


class _ConsoleHandler(logging.Handler):
    """Hands each ``npr.train`` record's message to the run's console (the rich display or stdout)."""

    def __init__(self, show):
        super().__init__(logging.INFO)
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.show(record.getMessage())
        except Exception:  # logging's contract: a failing handler reports, never raises into the caller
            self.handleError(record)


def summary_line(stage: str, record: dict[str, Any], total: int) -> str:
    parts = [f"{stage} step {record.get('step', '?')}/{total}"]
    for key, label in DISPLAY.items():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {value:.3g}")
    return "  ".join(parts)


class LiveDisplay:
    """Two live lines: a rich progress bar (stage, step/total, ETA) and the latest metrics."""

    def __init__(self, stage: str, total_steps: int):
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.text import Text

        self._group, self._text = Group, Text
        self.console = Console()
        self.progress = Progress(
            TextColumn(f"[bold]{stage}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(stage, total=total_steps)
        self.live = Live(Group(self.progress, Text("rolling out…")), console=self.console, refresh_per_second=4)
        self.live.start()

    def update(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=record.get("step", 0))
        metrics = summary_line("", record, 0).split("  ", 1)[-1] if len(record) > 2 else ""
        self.live.update(self._group(self.progress, self._text(metrics)))

    def stop(self) -> None:
        self.live.stop()
