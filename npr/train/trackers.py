"""Experiment trackers (``--report-to``): TensorBoard, Weights & Biases, MLflow and Trackio through
accelerate's tracker classes (``accelerate.tracking``), several at once.

``RUN/metrics.jsonl`` stays the canonical record: a tracker receives each line's numeric fields
after the line is written (the same names and values; non-finite ones, written as null, are
left out), at the line's ``step``, and the resolved config once when the run opens. Only the
main process tracks. Where the data goes is each tracker's own setting: TensorBoard writes
``RUN/tensorboard/<stage>``; MLflow reads ``MLFLOW_TRACKING_URI`` (e.g. ``file:///path/mlruns``),
W&B ``WANDB_MODE``/``WANDB_PROJECT``, Trackio ``TRACKIO_DIR``. Every tracker run is in the project
(experiment) ``npr`` and named ``<run dir>-<stage>``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from npr.extras import require

PROJECT = "npr"

# --report-to name -> the module its accelerate tracker imports (the trackers extra installs them)
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def parse_report_to(value: str) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> ``("tensorboard", "mlflow")`` (order kept, repeats dropped); ``none`` or
    empty -> ``()``. ValueError naming the unknown ones."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in TRACKER_MODULES]
    if unknown:
        raise ValueError(
            f"unknown tracker(s) {unknown}; use a comma-separated list of {', '.join(TRACKER_MODULES)}, or none"
        )
    return tuple(dict.fromkeys(names))


def check_trackers(names: tuple[str, ...]) -> None:
    """``MissingExtraError`` naming the ``trackers`` extra when a named tracker's package is missing
    (called before the model loads)."""
    for name in names:
        require(TRACKER_MODULES[name], "trackers")


def resolve_report_to(config) -> tuple[tuple[str, ...], bool]:
    """The trackers of ``config.report_to``, their packages checked; the older ``tensorboard: true`` adds
    tensorboard when its package is installed. -> (names, whether ``tensorboard: true`` found no package)."""
    import importlib.util

    names = parse_report_to(config.report_to)
    check_trackers(names)
    if getattr(config, "tensorboard", False) and "tensorboard" not in names:
        if importlib.util.find_spec("tensorboard") is None:
            return names, True
        names += ("tensorboard",)
    return names, False


def start_trackers(names: tuple[str, ...], run_dir: Path, stage: str, config: dict[str, Any]) -> list:
    """accelerate trackers for ``names``, started, each with ``config`` stored once."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    run_name = f"{Path(run_dir).resolve().name}-{stage}"
    init_kwargs = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}, "trackio": {"name": run_name}}
    trackers = []
    for name in names:
        tracker_class = LOGGER_TYPE_TO_CLASS[name]
        if tracker_class.requires_logging_directory:  # tensorboard: RUN/tensorboard/<stage>
            tracker = tracker_class(stage, Path(run_dir) / "tensorboard", **init_kwargs.get(name, {}))
        else:
            tracker = tracker_class(PROJECT, **init_kwargs.get(name, {}))
        tracker.start()
        tracker.store_init_configuration(tracked_config(config))
        trackers.append(tracker)
    return trackers


def tracked_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as trackers take it: scalars kept, None and anything else as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def tracked_values(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics line (not ``step``, not booleans, finite only)."""
    return {
        k: v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
