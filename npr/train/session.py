"""A training run's frame: run directory, accelerate, model + optimiser + schedule, resume,
checkpoints and metrics. Stages build one ``TrainSession`` and write their loop around it.

Run directory layout::

    RUN/config.yaml          the exact resolved config (readable back with --config)
    RUN/metrics.jsonl        one line per step (plus eval lines)
    RUN/checkpoints/step-N/  resumable checkpoint with a manifest (npr.train.checkpoint; sharded under FSDP)
    RUN/final/               HF model + tokenizer: the next stage's --model

Parallelism: DDP (every process holds the model) or, with ``fsdp``, FSDP2 through
accelerate's plugin (npr.train.fsdp). The training attention layout (``attention``: flex or
dense, npr.train.logprobs.resolve_attention) and gradient checkpointing are set here, once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from npr.extras import install_hint
from npr.fsio import atomic_write_text
from npr.models import load_model_and_tokenizer
from npr.train.checkpoint import (
    CheckpointError,
    checkpoint_steps,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    save_final,
    saved_progress,
)
from npr.train.config import RESUMABLE_FIELDS, ConfigError
from npr.train.fsdp import check_fsdp_launch, fsdp_plugin, layer_classes, make_fsdp_accelerator
from npr.train.logprobs import resolve_attention, set_attention
from npr.train.overrides import (
    build_config,
    config_differences,
    config_to_yaml,
    read_yaml_layer,
    resolve_config,
    written_values,
)
from npr.train.schedule import build_optimizer, build_scheduler
from npr.train.trackers import resolve_report_to, start_trackers
from npr.train.tracking import MetricsLog, truncate_jsonl
from npr.train.update import NonFiniteGuard, optimizer_step

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to compute): where, whether to resume, how loud."""

    out_dir: Path
    resume: bool = False
    quiet: bool = False
    command: str = ""  # the command line, for the header of config.yaml


def resolve_run_config(
    stage: str,
    cls: type,
    out_dir: Path,
    resume: bool,
    preset: str | None,
    config_path: str | None,
    flags: dict[str, Any],
) -> Any:
    """The config of a run; on ``resume`` the saved ``config.yaml`` is the base (with
    ``stop_after`` cleared), and only ``RESUMABLE_FIELDS`` may differ from it. A fresh run
    refuses a directory that holds checkpoints or a final model.

    On resume ``config.yaml`` is read like any ``--config`` file (errors name its line and
    field) and compared with the values the run recorded in it when it started: a hand edit of
    a field that is not resumable is refused, since the checkpoints were trained without it.
    """
    saved_path = out_dir / CONFIG_FILE
    if not resume:
        if checkpoint_steps(out_dir) or (out_dir / "final").exists():
            raise ConfigError(
                f"{out_dir} already holds a run (checkpoints or final/); pass --resume to continue it, "
                "or choose another --out"
            )
        return resolve_config(stage, cls, preset, config_path, flags)
    if not saved_path.is_file():
        raise CheckpointError(
            f"--resume: {saved_path} does not exist; point --out at the directory of the run to "
            "continue, or drop --resume to start one"
        )
    values, origins = read_yaml_layer(saved_path, cls)
    _refuse_edits(cls, saved_path, values, origins)
    saved = build_config(cls, values, origins=origins)
    # a planned interruption applies to the process that was interrupted, not to the resumed one
    config = resolve_config(
        stage, cls, preset, config_path, flags, base={**asdict(saved), "stop_after": None}, base_origins=origins
    )
    changed = {k: v for k, v in config_differences(saved, config).items() if k not in RESUMABLE_FIELDS}
    if changed:
        listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"--resume: the run in {out_dir} was trained with a different config ({listing}); "
            f"only {', '.join(sorted(RESUMABLE_FIELDS))} may change on resume"
        )
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
        raise ConfigError(
            f"{where}: config field {name!r} was {how} after the run wrote {saved_path}; its "
            f"checkpoints were trained with {old!r}. Put the value back, or start a new run (another "
            f"--out) with it; on --resume only {', '.join(sorted(RESUMABLE_FIELDS))} may change, "
            "as flags (e.g. --save-every 10)"
        )


def resume_checkpoint(config, options: RunOptions) -> Path | None:
    """The checkpoint a run continues from: the latest complete one on ``--resume`` (None when
    the run was interrupted before its first checkpoint: it then starts over), else None."""
    return resume_point(Path(options.out_dir))[0] if options.resume else None


def model_source(config, options: RunOptions) -> str:
    """What the run loads weights and tokenizer from: an unsharded checkpoint on resume, else
    ``config.model`` (a sharded checkpoint's weights are loaded after sharding)."""
    checkpoint = resume_checkpoint(config, options)
    if checkpoint is None or (checkpoint / "sharded").is_dir():
        return config.model
    return str(checkpoint)


def set_cpu_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def make_accelerator(config=None):
    """An ``Accelerator``; on a machine without CUDA it runs on CPU, and under torchrun (or
    ``accelerate launch --multi_gpu --num_processes N``) N CPU processes train with gloo. With
    ``config.fsdp`` its ``prepare`` shards with accelerate's FSDP2 plugin (npr.train.fsdp).

    Mixed precision is not accelerate's: its state is a per-process singleton that refuses a
    second setting, so ``autocast`` below (DDP) or FSDP's MixedPrecisionPolicy applies the
    config's choice.
    """
    from accelerate import Accelerator

    if config is not None and getattr(config, "fsdp", False):
        return make_fsdp_accelerator(fsdp_plugin(config, layers=[]))  # layers are set once the model is loaded
    return Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())


def autocast(device: torch.device, mixed_precision: str):
    """The forward-pass context of ``mixed_precision`` (``bf16``: bf16 autocast over fp32 weights)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


@dataclass
class TrainSession:
    """Handles of one run. ``model`` is the prepared (possibly DDP-wrapped) module.
    ``progress``: the stage's own position, saved in every checkpoint and restored on resume;
    ``data_end``: set by a stage whose data ran out before ``total_steps`` (num_epochs), the
    step count at which the run is then complete."""

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
    progress: dict[str, Any] = field(default_factory=dict)
    data_end: int | None = None
    skip_guard: NonFiniteGuard | None = None

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def forward_context(self):
        """Context for the training forward passes: the config's mixed precision (under FSDP
        its MixedPrecisionPolicy already runs the layers in bf16)."""
        mixed = "no" if self.config.fsdp else self.config.mixed_precision
        return autocast(self.accelerator.device, mixed)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def end_step(self) -> int:
        """Step (count) at which this process stops: ``total_steps``, or ``stop_after`` if earlier."""
        stop = self.config.stop_after
        end = self.total_steps if self.data_end is None else min(self.data_end, self.total_steps)
        return end if stop is None else min(stop, end)

    def steps(self) -> range:
        """0-based indices of the optimizer steps this process runs."""
        return range(self.start_step, self.end_step)

    def record(self, step_count: int, metrics: dict[str, Any]) -> None:
        """Log one metrics line for ``step_count`` completed steps (0: before training)."""
        self.log.log({"stage": self.stage, "step": step_count, **metrics})

    def optimizer_step(self, advance_schedule: bool = True) -> dict[str, float]:
        """``npr.train.update.optimizer_step`` with this run's clip and its guard against
        non-finite gradient norms (a skipped step is noted; ``max_skipped_steps`` in a row end the run)."""
        if self.skip_guard is None:
            self.skip_guard = NonFiniteGuard(self.config.max_skipped_steps)
        metrics = optimizer_step(
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            self.config.max_grad_norm,
            advance_schedule,
            self.skip_guard,
        )
        if metrics["skipped_steps"]:
            self.log.note(
                f"{self.stage}: optimizer step skipped: gradient norm {metrics['grad_norm']} "
                f"({self.skip_guard.in_a_row} in a row, {self.skip_guard.skipped} in all)"
            )
        return metrics

    def after_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Log step ``step`` (0-based) and write a checkpoint when one is due."""
        count = step + 1
        self.record(count, metrics)
        every = self.config.save_every
        if every and count % every == 0 and count < self.end_step:
            self.checkpoint(count)

    def checkpoint(self, count: int) -> Path:
        path = save_checkpoint(
            self.accelerator,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            self.run_dir,
            count,
            self.config.keep_checkpoints,
            self.progress,
        )
        self.log.note(f"checkpoint {path}")
        return path

    def finish(self) -> Path | None:
        """Checkpoint at the end; write ``final/`` when the schedule is complete (else None)."""
        count = self.end_step
        if count > self.start_step:  # (a run resumed at its end already has this checkpoint)
            self.checkpoint(count)
        final = None
        if count in (self.total_steps, self.data_end):
            final = save_final(self.accelerator, self.model, self.tokenizer, self.run_dir / "final")
            used_up = (
                f" (train_data used up after {count} of {self.total_steps} steps)" if count != self.total_steps else ""
            )
            self.log.note(f"{self.stage}: done{used_up}, model in {final}")
        else:
            self.log.note(f"{self.stage}: stopped after step {count} of {self.total_steps}; continue with --resume")
        self.log.close()
        return final


def _prepare_model(accelerator, model, config):
    """Attention layout, gradient checkpointing and (FSDP) the layer classes, before ``prepare``."""
    attention = resolve_attention(config.attention, accelerator.device)
    if attention == "flex" and accelerator.device.type == "cpu":
        raise ConfigError(
            "config field 'attention': flex on CPU cannot train (torch 2.13's flex_attention has no "
            "backward on CPU); use auto (dense on CPU, flex on CUDA) or dense"
        )
    set_attention(model, attention)
    model.config.use_cache = False
    if config.fsdp:
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = layer_classes(model, config)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return attention


def open_session(stage: str, config, options: RunOptions, total_steps: int) -> TrainSession:
    """Accelerate, the model (fresh, or from the latest checkpoint on resume), AdamW and the
    schedule, prepared for 1..N processes (DDP, or FSDP with ``config.fsdp``); ``config.yaml``
    written by the main process. Invalid setups fail before any compute."""
    from accelerate.utils import set_seed

    check_fsdp_launch(config)
    report_to, tensorboard_missing = resolve_report_to(config)  # a missing tracker package fails here, before compute
    set_cpu_threads(config.cpu_threads)
    accelerator = make_accelerator(config)
    run_dir = Path(options.out_dir)
    checkpoint = resume_checkpoint(config, options)
    set_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(
        model_source(config, options), dtype=config.dtype, device=accelerator.device
    )
    attention = _prepare_model(accelerator, model, config)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        header = f"npr {stage}: resolved config\n{options.command}".strip()
        atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(config, header))
    model.train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start, note, progress = 0, None, {}
    if checkpoint is not None:
        start, note = load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler, config.seed)
        progress = saved_progress(checkpoint)
    if accelerator.is_main_process:  # a resumed run logs its later steps again; a restarted one all of them
        truncate_jsonl(run_dir / "metrics.jsonl", start if checkpoint is not None else -1)
    accelerator.wait_for_everyone()
    trackers = (
        start_trackers(report_to, run_dir, stage, {f.name: getattr(config, f.name) for f in fields(config)})
        if accelerator.is_main_process and report_to
        else []
    )
    log = MetricsLog(run_dir, stage, total_steps, accelerator.is_main_process, options.quiet, trackers)
    if tensorboard_missing:
        log.note(f"tensorboard is not installed ({install_hint('trackers')}); metrics go to metrics.jsonl only")
    mode = (
        f"FSDP over {accelerator.num_processes} processes"
        if config.fsdp
        else f"{accelerator.num_processes} process(es)"
    )
    log.note(
        f"{stage}: {mode} on {accelerator.device.type}, attention {attention}"
        + (", gradient checkpointing" if config.gradient_checkpointing else "")
    )
    if checkpoint is not None:
        skipped = resume_point(run_dir)[1]
        log.note(
            f"{stage}: resumed from {checkpoint} (step {start} of {total_steps})"
            + "".join(f"; {n}" for n in (note, skipped) if n)
        )
    elif options.resume:
        log.note(f"{stage}: no complete checkpoint in {run_dir}/checkpoints; starting the run over")
    return TrainSession(
        stage, config, run_dir, accelerator, model, tokenizer, optimizer, scheduler, total_steps, start, log, progress
    )


class StepTimer:
    """Wall-clock seconds of named phases of a step (``time_<phase>_s`` metrics)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[f"time_{phase}_s"] = self.times.get(f"time_{phase}_s", 0.0) + now - self._start
        self._start = now
