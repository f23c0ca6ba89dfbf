"""``npr pipeline``: all of NPR end to end, resumably, into one run directory.

    base_eval   the seed model, plain decoding, on the held-out split
    coldstart   (tiny only) format cold start: plans read from the problem's parts, the model's own
                correct answers to each part as the parallel steps, one short parallel SFT;
                SmolLM2-135M never writes the tags on its own
    stage1      DAPO with the format + accuracy reward -> NPR-Zero
    zero_eval   NPR-Zero through the engine
    sample      rejection sampling: correct and format-valid traces, canonical form
    stage2      parallel SFT (tree mask) on them -> NPR-Beta
    beta_eval   NPR-Beta through the engine
    stage3      PAPO with the engine's parallel rollouts -> NPR
    npr_eval    NPR in parallel mode, with a sequential-mode baseline run (tiny: timed only), then both modes timed
                alternately (batched, and single requests for the batch-1 latency speedup)
    sr, sr_eval (--baseline) sequential RL: DAPO with the plain prompt and accuracy reward, same data
    report      DIR/report.html and DIR/results.json: the table, training curves, trajectories

A finished step is not redone; a step cut short is redone from its start; ``--from STEP`` redoes
that step and every later one. The run directory's ``pipeline.json`` is its manifest: the pipeline
deletes only step directories that manifest says it created, and refuses a non-empty directory it
does not own (``--overwrite`` takes it over). Each step's files live in ``DIR/<step>/``; a finished training step
keeps its ``final/`` model and drops its resumable ``checkpoints/``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from npr.errors import NprError
from npr.fsio import atomic_write_json

STATE_FILE = "pipeline.json"


class PipelineError(NprError):
    """Bad pipeline input (preset, --from step, run directory)."""


@dataclass(frozen=True)
class PipelinePreset:
    """What the pipeline runs: the seed model, the training presets, the held-out evaluation."""

    model: str
    train_preset: str  # preset name of npr train / npr sample
    held_out: str  # eval spec(s), comma-separated; generated with another seed than the training data
    eval_k: int
    eval_max_new_tokens: int
    eval_temperature: float = 1.0  # NPR's protocol
    eval_top_p: float = 0.7
    eval_dtype: str = "bfloat16"
    coldstart: bool = False
    coldstart_sample: dict | None = None  # npr sample overrides of the cold start
    coldstart_sft: dict | None = None  # npr train stage2 overrides of the cold start
    eval_engine: dict | None = None  # EvalConfig overrides (kv cache, batch)


PRESETS: dict[str, PipelinePreset] = {
    # tiny random model, seconds per step: checks that every step runs and writes loadable artefacts
    "smoke": PipelinePreset(
        model="tiny-random-llama",
        train_preset="smoke",
        held_out="rg:chain_sum?size=3&seed=99&terms=2&digits=1",
        eval_k=2,
        eval_max_new_tokens=48,
        eval_dtype="float32",
        eval_engine={"kv_cache_gib": 0.1, "speed_rounds": 2, "speed_problems": 2, "latency_requests": 1},
    ),
    # the embedded SmolLM2-135M-Instruct on 2-4 independent one-digit expressions per problem (training split seed 1,
    # held-out seed 2). Decomposing cold start: each distinct part asked alone ("What is 3 + 4?"), 6 tries; the
    # model's own correct answers become the steps under plans read from the problem ("compute 3 + 4").
    # Timing: 2 rounds, one ABBA cycle (round 2 runs the sequential baseline first), so drift falls on both modes.
    "tiny": PipelinePreset(
        model="embedded",
        train_preset="tiny",
        held_out="gen:expressions?size=32&seed=2&parts=2-4",
        eval_k=4,
        eval_max_new_tokens=320,
        coldstart=True,
        coldstart_sample={
            "prompt_style": "plain",
            "wrap": True,
            "wrap_mode": "decompose",
            "tries": 6,
            "train_limit": 256,
            "max_new_tokens": 80,
            "temperature": 0.7,
            "prompts_per_batch": 21,
        },
        coldstart_sft={"num_epochs": 2, "learning_rate": 1e-4, "min_learning_rate": 5e-5},
        eval_engine={
            "kv_cache_gib": 1.0,
            "max_num_seqs": 128,
            "speed_rounds": 2,
            "speed_problems": 2,
            "latency_requests": 2,
            "baseline_eval": False,
        },
    ),
    # the paper's setting on GPUs: Qwen3-4B-Instruct, NPR's benchmarks (NPR_DATA_DIR or the hub)
    "qwen3-4b": PipelinePreset(
        model="Qwen/Qwen3-4B-Instruct-2507",
        train_preset="qwen3-4b",
        held_out="aime25,hmmt25,amc23,math500",
        eval_k=8,
        eval_max_new_tokens=32768,
        eval_dtype="bfloat16",
        eval_engine={"kv_cache_gib": 20.0, "max_num_seqs": 256},
    ),
}

STEPS = (
    "base_eval",
    "coldstart",
    "stage1",
    "zero_eval",
    "sample",
    "stage2",
    "beta_eval",
    "stage3",
    "npr_eval",
    "sr",
    "sr_eval",
    "report",
)


@dataclass
class PipelineRun:
    """The state the steps share: settings, paths, the progress display."""

    preset_name: str
    preset: PipelinePreset
    out: Path
    baseline: bool
    data_dir: str | None
    device: str
    quiet: bool
    log: Callable[[str], None] = print

    def step_dir(self, step: str) -> Path:
        return self.out / step

    def final(self, step: str) -> str:
        return str(self.step_dir(step) / "final")

    def seed_model(self) -> str:
        return self.final("coldstart") if self.preset.coldstart else self.preset.model


# ----------------------------------------------------------------------------- steps


def _train(run: PipelineRun, stage: str, step: str, overrides: dict) -> None:
    from npr.train.config import STAGE_CONFIGS
    from npr.train.overrides import resolve_config
    from npr.train.session import RunOptions
    from npr.train.stage1 import train_stage1
    from npr.train.stage2 import train_stage2
    from npr.train.stage3 import train_stage3

    config = resolve_config(stage, STAGE_CONFIGS[stage], run.preset.train_preset, None, overrides)
    trainer = {"stage1": train_stage1, "stage2": train_stage2, "stage3": train_stage3}[stage]
    final = trainer(config, RunOptions(run.step_dir(step), quiet=run.quiet, command=f"npr pipeline: {step}"))
    if final is not None and Path(final).is_dir():
        # a step cut short is redone from its start, so its resumable checkpoints (weights and optimizer
        # state, 1.6 GB per step for the embedded model) are never read again; final/ stays
        shutil.rmtree(run.step_dir(step) / "checkpoints", ignore_errors=True)


def _sample(run: PipelineRun, out: Path, overrides: dict) -> dict:
    from npr.train.config import SampleConfig
    from npr.train.overrides import resolve_config
    from npr.train.sample import run_sample

    config = resolve_config("sample", SampleConfig, run.preset.train_preset, None, overrides)
    summary = run_sample(config, out, command="npr pipeline: sample")
    run.log(
        f"  kept {summary['kept']} of {summary['samples']} samples ({summary['problems_with_kept']} problems); "
        f"dropped {summary['dropped']}"
    )
    if summary["kept"] == 0:
        raise PipelineError(f"{out}: no sample kept, so the next SFT has no data; see {out}/summary.json")
    return summary


def _evaluate(
    run: PipelineRun, step: str, model: str, mode: str, baseline_mode: str | None = None, style: str = "npr"
) -> None:
    from npr.data import split_specs
    from npr.eval.runner import EvalConfig, evaluate

    p = run.preset
    config = EvalConfig(
        model=model,
        benchmarks=tuple(split_specs(p.held_out)),
        k=p.eval_k,
        mode=mode,
        baseline_mode=baseline_mode,
        max_new_tokens=p.eval_max_new_tokens,
        temperature=p.eval_temperature,
        top_p=p.eval_top_p,
        style=style,
        data_dir=run.data_dir,
        dtype=p.eval_dtype,
        device=run.device,
        **(p.eval_engine or {}),
    )
    results = evaluate(config, run.step_dir(step), overwrite=True)
    o = results["overall"]
    run.log(
        f"  avg@k {o['avg_at_k']:.3f}  format-valid {o['format_valid_rate'] or 0:.3f}  "
        f"trigger {o['trigger_rate'] or 0:.3f}"
    )


def step_base_eval(run):
    _evaluate(run, "base_eval", run.preset.model, "plain")


def step_coldstart(run):
    p = run.preset
    _sample(run, run.step_dir("coldstart") / "data", {"model": p.model, **(p.coldstart_sample or {})})
    _train(
        run,
        "stage2",
        "coldstart",
        {"model": p.model, "train_data": str(run.step_dir("coldstart") / "data"), **(p.coldstart_sft or {})},
    )
    # the SFT run writes DIR/coldstart/final beside DIR/coldstart/data


# RL stages skip their own before/after evaluation: the pipeline's eval steps measure every model.
NO_STAGE_EVAL = {"eval_data": None}


def step_stage1(run):
    _train(run, "stage1", "stage1", {"model": run.seed_model(), **NO_STAGE_EVAL})


def step_zero_eval(run):
    _evaluate(run, "zero_eval", run.final("stage1"), "parallel")


def step_sample(run):
    _sample(run, run.step_dir("sample"), {"model": run.final("stage1")})


def step_stage2(run):
    _train(run, "stage2", "stage2", {"model": run.final("stage1"), "train_data": str(run.step_dir("sample"))})


def step_beta_eval(run):
    _evaluate(run, "beta_eval", run.final("stage2"), "parallel")


def step_stage3(run):
    _train(run, "stage3", "stage3", {"model": run.final("stage2"), **NO_STAGE_EVAL})


def step_npr_eval(run):
    _evaluate(run, "npr_eval", run.final("stage3"), "parallel", baseline_mode="sequential")


def step_sr(run):
    """NPR's SR baseline: sequential RL from the seed model on the same data with the same budget
    (Stage 1's and Stage 3's steps), plain prompt, accuracy reward."""
    from npr.train.config import Stage1Config, Stage3Config
    from npr.train.overrides import resolve_config

    stage1 = resolve_config("stage1", Stage1Config, run.preset.train_preset)
    stage3 = resolve_config("stage3", Stage3Config, run.preset.train_preset)
    _train(
        run,
        "stage1",
        "sr",
        {
            "model": run.preset.model,
            "reward": "accuracy",
            "prompt_style": "plain",
            "rollout_mode": "plain",
            "max_steps": stage1.max_steps + stage3.max_steps,
            **NO_STAGE_EVAL,
        },
    )


def step_sr_eval(run):
    _evaluate(run, "sr_eval", run.final("sr"), "plain", style="plain")


def step_report(run):
    from npr.pipeline_report import write_pipeline_report

    path = write_pipeline_report(run)
    run.log(f"  {path}")


STEP_FUNCTIONS = {name: globals()[f"step_{name}"] for name in STEPS}
DESCRIPTIONS = {
    "base_eval": "evaluate the seed model (plain decoding)",
    "coldstart": "format cold start: plans from the problem's parts, own answers as steps + short parallel SFT",
    "stage1": "Stage 1: DAPO, format + accuracy reward -> NPR-Zero",
    "zero_eval": "evaluate NPR-Zero (engine, parallel)",
    "sample": "rejection sampling: correct, format-valid traces",
    "stage2": "Stage 2: parallel SFT -> NPR-Beta",
    "beta_eval": "evaluate NPR-Beta (engine, parallel)",
    "stage3": "Stage 3: PAPO with parallel rollouts -> NPR",
    "npr_eval": "evaluate NPR in parallel mode, then time it against sequential mode, alternately",
    "sr": "baseline: sequential RL (plain prompt, accuracy reward)",
    "sr_eval": "evaluate the sequential-RL baseline",
    "report": "write report.html and results.json",
}


# ----------------------------------------------------------------------------- orchestration


def planned_steps(run: PipelineRun) -> list[str]:
    skip = set()
    if not run.preset.coldstart:
        skip.add("coldstart")
    if not run.baseline:
        skip |= {"sr", "sr_eval"}
    return [s for s in STEPS if s not in skip]


MANIFEST_FORMAT = 2  # pipeline.json with "owner" and "created"; earlier runs wrote none


def load_state(out: Path) -> dict:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"done": [], "seconds": {}}


def save_state(out: Path, state: dict) -> None:
    atomic_write_json(out / STATE_FILE, state)


def claim_run_dir(out: Path, preset: str, overwrite: bool) -> dict:
    """The run manifest of ``out``, creating it for a new or empty directory.

    The pipeline deletes only what its manifest says it created (``created``: step directories), so
    a directory it does not own (no manifest, or one from before manifests) is refused rather than
    cleaned. ``overwrite`` takes such a directory over: the entries the pipeline would write (step
    directories, its state, results and report) are deleted, anything else is left alone.
    """
    fresh = {
        "format": MANIFEST_FORMAT,
        "owner": "npr pipeline",
        "preset": preset,
        "created": [],
        "done": [],
        "seconds": {},
    }
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file, not a directory; use another --out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    state = load_state(out) if STATE_FILE in entries else None
    owned = state is not None and state.get("format") == MANIFEST_FORMAT and state.get("owner") == "npr pipeline"
    if owned and state.get("preset") != preset and not overwrite:
        raise PipelineError(
            f"{out} holds a pipeline run with preset {state['preset']!r}; use another --out, or "
            f"--overwrite to start a {preset!r} run there (its step directories are deleted)"
        )
    if owned and not overwrite:
        return state
    if entries and not overwrite:
        what = (
            "a pipeline run from an npr without run manifests"
            if state is not None
            else f"files npr pipeline did not create ({', '.join(entries[:5])}{', …' if len(entries) > 5 else ''})"
        )
        raise PipelineError(
            f"{out} holds {what}; the pipeline only deletes what it created, so use another --out, "
            f"or --overwrite to let it delete its step directories there ({', '.join(STEPS)})"
        )
    for name in entries:
        if name in STEPS or name in (STATE_FILE, "results.json", "report.html"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_state(out, fresh)
    return fresh


def run_pipeline(
    preset: str,
    out: str | Path,
    from_step: str | None = None,
    baseline: bool = False,
    data_dir: str | None = None,
    device: str = "cpu",
    quiet: bool = False,
    log: Callable[[str], None] = print,
    overrides: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Run (or continue) the pipeline; returns the state (steps done, seconds per step)."""
    if preset not in PRESETS:
        raise PipelineError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    chosen = replace(PRESETS[preset], **(overrides or {}))
    run = PipelineRun(preset, chosen, Path(out), baseline, data_dir, device, quiet, log)
    steps = planned_steps(run)
    if from_step is not None and from_step not in steps:
        raise PipelineError(f"--from {from_step!r} is not a step of this pipeline; steps: {', '.join(steps)}")
    state = claim_run_dir(run.out, preset, overwrite)
    if from_step is not None:
        later = steps[steps.index(from_step) :]
        state["done"] = [s for s in state["done"] if s not in later]
    start = time.perf_counter()
    for index, step in enumerate(steps, 1):
        if step in state["done"]:
            continue
        remaining = [s for s in steps[index - 1 :] if s not in state["done"]]
        log(f"[{index}/{len(steps)}] {step}: {DESCRIPTIONS[step]}{eta_text(remaining, state, preset)}")
        step_dir = run.step_dir(step)
        if step in state["created"]:
            shutil.rmtree(step_dir, ignore_errors=True)  # a step cut short is redone from its start
        elif step_dir.exists():
            raise PipelineError(
                f"{step_dir} exists but this pipeline run did not create it; move it away, or use another --out"
            )
        if step not in state["created"]:
            state["created"].append(step)
        save_state(run.out, state)  # recorded before the step writes anything, so a kill leaves it owned
        t0 = time.perf_counter()
        STEP_FUNCTIONS[step](run)
        from npr.train.freed_memory import return_freed_memory

        # every step runs in this one process: without this, pages a finished step freed stayed in the tuned heap
        # and fragments later steps could not reuse added up to a pipeline peak far above any one step's
        return_freed_memory()
        state["seconds"][step] = round(time.perf_counter() - t0, 1)
        state["done"].append(step)
        save_state(run.out, state)
    state["total_seconds_this_call"] = round(time.perf_counter() - start, 1)
    save_state(run.out, state)
    return state


# Seconds per step of the tiny preset (gen:expressions) for the ETA: base_eval to npr_eval as measured from a fresh
# clone on the idle 2-core development CPU, torch's default threads (docs/results.md, 2026-12-06, commit 6a75ef6);
# sr and sr_eval (--baseline, not measured) guessed from stage1's per-step time and an evaluation's. A shared
# machine is slower, and a run's Stage 1 takes longer the more of its rollouts it keeps.
TINY_SECONDS = {
    "base_eval": 41,
    "coldstart": 286,
    "stage1": 103,
    "zero_eval": 83,
    "sample": 156,
    "stage2": 52,
    "beta_eval": 92,
    "stage3": 143,
    "npr_eval": 182,
    "sr": 400,
    "sr_eval": 100,
    "report": 1,
}


def eta_text(remaining: list[str], state: dict, preset: str) -> str:
    if preset != "tiny":
        return ""
    seconds = sum(state["seconds"].get(s, TINY_SECONDS.get(s, 60)) for s in remaining)
    return f"  (ETA for the rest: ~{seconds / 60:.0f} min)"
