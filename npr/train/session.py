"""A training run's frame: run directory, accelerate, model + optimiser + schedule, resume,
checkpoints and metrics. Stages build one ``TrainSession`` and write their loop around it.

Run directory layout::

    RUN/config.yaml          the exact resolved config (readable back with --config)
    RUN/metrics.jsonl        one line per step (plus eval lines)
    RUN/checkpoints/step-N/  HF model + tokenizer, trainer_state.pt, rng_state_rank*.pt
    RUN/final/               HF model + tokenizer: the next stage's --model
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from npr.models import load_model_and_tokenizer, save_model
from npr.train.checkpoint import (CheckpointError, checkpoint_steps, latest_checkpoint, load_trainer_state,
                                  save_checkpoint)
from npr.train.config import RESUMABLE_FIELDS, ConfigError
from npr.train.overrides import (build_config, config_differences, config_to_yaml, read_yaml_layer, resolve_config,
                                  written_values)
from npr.train.schedule import build_optimizer, build_scheduler
from npr.train.tracking import MetricsLog, truncate_metrics

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to compute): where, whether to resume, how loud."""

    out_dir: Path
    resume: bool = False
    quiet: bool = False
    command: str = ""  # the command line, for the header of config.yaml


def resolve_run_config(stage: str, cls: type, out_dir: Path, resume: bool, preset: str | None,
                       config_path: str | None, flags: dict[str, Any]) -> Any:
    """The config of a run; on ``resume`` the saved ``config.yaml`` is the base (with
    ``stop_after`` cleared), and only ``RESUMABLE_FIELDS`` may differ from it. A fresh run
    refuses a directory that holds checkpoints or a final model.

    On resume ``config.yaml`` is read like any ``--config`` file (errors name its line and
    field) and compared with the values the run recorded in it when it started: a hand edit of
    a field that is not resumable is refused, since the checkpoints were trained without it.
    """
    saved_path = out_dir / CONFIG_FILE
    if not resume:
        if saved_path.exists() and (checkpoint_steps(out_dir) or (out_dir / "final").exists()):
            raise ConfigError(f"{out_dir} already holds a run (checkpoints or final/); pass --resume to continue it, "
                              "or choose another --out")
        return resolve_config(stage, cls, preset, config_path, flags)
    if not saved_path.is_file():
        raise CheckpointError(f"--resume: {saved_path} does not exist; point --out at the directory of the run to "
                              "continue, or drop --resume to start one")
    values, origins = read_yaml_layer(saved_path, cls)
    _refuse_edits(cls, saved_path, values, origins)
    saved = build_config(cls, values, origins=origins)
    # a planned interruption applies to the process that was interrupted, not to the resumed one
    config = resolve_config(stage, cls, preset, config_path, flags, base={**asdict(saved), "stop_after": None},
                            base_origins=origins)
    changed = {k: v for k, v in config_differences(saved, config).items() if k not in RESUMABLE_FIELDS}
    if changed:
        listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"--resume: the run in {out_dir} was trained with a different config ({listing}); "
                          f"only {', '.join(sorted(RESUMABLE_FIELDS))} may change on resume")
    return config


def _refuse_edits(cls: type, saved_path: Path, values: dict[str, Any], origins: dict[str, str]) -> None:
    """Raise ``ConfigError`` when ``config.yaml`` no longer holds what the run wrote into it,
    for a field that may not change on resume (checked against ``written_values``)."""
    written = written_values(saved_path)
    if written is None:
        return  # written before npr recorded the values: nothing to compare with
    defaults = {f.name: f.default for f in fields(cls)}
    for name, old in written.items():
        new = values.get(name, defaults.get(name))
        if name in RESUMABLE_FIELDS or new == old:
            continue
        where = origins.get(name, str(saved_path))
        how = f"changed from {old!r} to {new!r}" if name in values else f"removed (it was {old!r})"
        raise ConfigError(f"{where}: config field {name!r} was {how} after the run wrote {saved_path}; its "
                          f"checkpoints were trained with {old!r}. Put the value back, or start a new run (another "
                          f"--out) with it; on --resume only {', '.join(sorted(RESUMABLE_FIELDS))} may change, "
                          "as flags (e.g. --save-every 10)")


def model_source(config, options: RunOptions) -> str:
    """What the run loads: the latest checkpoint on resume, else ``config.model``."""
    return str(latest_checkpoint(Path(options.out_dir))) if options.resume else config.model


def set_cpu_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def make_accelerator():
    """An ``Accelerator``; on a machine without CUDA it runs on CPU, and under torchrun (or
    ``accelerate launch --multi_gpu --num_processes N``) N CPU processes train with gloo.

    Mixed precision is not accelerate's: its state is a per-process singleton that refuses a
    second setting, so ``autocast`` below applies the config's choice to the forward passes.
    """
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())


def autocast(device: torch.device, mixed_precision: str):
    """The forward-pass context of ``mixed_precision`` (``bf16``: bf16 autocast over fp32 weights)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


@dataclass
class TrainSession:
    """Handles of one run. ``model`` is the prepared (possibly DDP-wrapped) module."""

    stage: str
    config: Any
    run_dir: Path
    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    total_steps: int
    start_step: int
    log: MetricsLog

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def forward_context(self):
        """Context for the training forward passes: the config's mixed precision."""
        return autocast(self.accelerator.device, self.config.mixed_precision)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def end_step(self) -> int:
        """Step (count) at which this process stops: ``total_steps``, or ``stop_after`` if earlier."""
        stop = self.config.stop_after
        return self.total_steps if stop is None else min(stop, self.total_steps)

    def steps(self) -> range:
        """0-based indices of the optimizer steps this process runs."""
        return range(self.start_step, self.end_step)

    def record(self, step_count: int, metrics: dict[str, Any]) -> None:
        """Log one metrics line for ``step_count`` completed steps (0: before training)."""
        self.log.log({"stage": self.stage, "step": step_count, **metrics})

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Log step ``step`` (0-based) and write a checkpoint when one is due."""
        count = step + 1
        self.record(count, metrics)
        every = self.config.save_every
        if every and count % every == 0 and count < self.end_step:
            self.checkpoint(count)

    def checkpoint(self, count: int) -> Path:
        path = save_checkpoint(self.accelerator, self.model, self.tokenizer, self.optimizer, self.scheduler,
                               self.run_dir, count, self.config.keep_checkpoints)
        self.log.note(f"checkpoint {path}")
        return path

    def finish(self) -> Path | None:
        """Checkpoint at the end; write ``final/`` when the schedule is complete (else None)."""
        count = self.end_step
        if count > self.start_step or count == self.total_steps:
            self.checkpoint(count)
        final = None
        if count == self.total_steps:
            final = self.run_dir / "final"
            if self.is_main:
                save_model(self.unwrapped, self.tokenizer, final)
            self.accelerator.wait_for_everyone()
            self.log.note(f"{self.stage}: done, model in {final}")
        else:
            self.log.note(f"{self.stage}: stopped after step {count} of {self.total_steps}; continue with --resume")
        self.log.close()
        return final


def open_session(stage: str, config, options: RunOptions, total_steps: int) -> TrainSession:
    """Accelerate, the model (fresh, or from the latest checkpoint on resume), AdamW and the
    schedule, prepared for 1..N processes; ``config.yaml`` written by the main process."""
    from accelerate.utils import set_seed

    set_cpu_threads(config.cpu_threads)
    accelerator = make_accelerator()
    run_dir = Path(options.out_dir)
    checkpoint = latest_checkpoint(run_dir) if options.resume else None
    set_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(str(checkpoint) if checkpoint else config.model, dtype=config.dtype,
                                                device=accelerator.device)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        header = f"npr {stage}: resolved config\n{options.command}".strip()
        (run_dir / CONFIG_FILE).write_text(config_to_yaml(config, header), encoding="utf-8")
        if checkpoint is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    model.train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    if checkpoint is not None:
        start = load_trainer_state(checkpoint, optimizer, scheduler, accelerator.process_index,
                                   accelerator.num_processes)
        if accelerator.is_main_process:
            truncate_metrics(run_dir / "metrics.jsonl", start)
    accelerator.wait_for_everyone()
    log = MetricsLog(run_dir, stage, total_steps, accelerator.is_main_process, options.quiet, config.tensorboard)
    if checkpoint is not None:
        log.note(f"{stage}: resumed from {checkpoint} (step {start} of {total_steps})")
    return TrainSession(stage, config, run_dir, accelerator, model, tokenizer, optimizer, scheduler, total_steps,
                        start, log)


class StepTimer:
    """Wall-clock seconds of named phases of a step (``time_<phase>_s`` metrics)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[f"time_{phase}_s"] = self.times.get(f"time_{phase}_s", 0.0) + now - self._start
        self._start = now

