"""``npr eval``: run benchmarks through the NPR engine, grade, and write a self-describing run dir.

    DIR/config.json    every setting, the prompt text, the model and data hashes, package versions
    DIR/samples.jsonl  one record per sample (appended as samples finish: Ctrl-C keeps them), and
                       one record per problem that could not run (``failure``: why, with its file:line)
    DIR/progress.json  the problems done and the wall time per benchmark (npr.eval.rundir's ledger)
    DIR/results.json   metrics per benchmark and overall (npr.eval.metrics), and the failures
    DIR/report.html    results table, plots and the trajectory viewer (npr.eval.report)
    DIR/baseline/      the same files for the --baseline-mode run of the same problems

Protocol (NPR, arXiv 2512.07461 §4): k samples per problem at temperature 1.0, top-p 0.7; each
problem's samples draw from seeds derived from ``seed`` and the problem's index, so a run, its
resumption and its baseline sample the same way. Benchmarks run one after another (each with
continuous batching over all its problems) so each has its own wall time.

Order of work: settings (``EvalConfig``), output directory, problems, model, engine and every
prompt are checked before the first file is written (npr.eval.preflight); a problem that
cannot run is recorded and skipped, never aborting the run; ``--resume`` refuses a run made
with other settings, weights, data or prompt (npr.eval.rundir).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

from npr.data import load_problems
from npr.data.problems import Problem
from npr.data.zebralogic import GRID, grid_cells
from npr.engine import Engine, Result, SamplingParams
from npr.eval.preflight import EvalError, ProblemPlan, check_settings, engine_config, failure_record, plan_problems
from npr.eval.rundir import (
    Ledger,
    check_out_dir,
    prepare_out_dir,
    read_wall_times,  # noqa: F401
    write_description,
)
from npr.fsio import atomic_write_json
from npr.prompts import NPR_INSTRUCTION, PLACEMENTS, build_messages, prompt_text, read_instruction_file
from npr.rewards import final_answer, is_correct
from npr.schema import parse, validate


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run. Defaults follow NPR's protocol (k = 8, temperature 1.0, top-p 0.7).

    Every field is checked when the config is built (``npr.eval.preflight.check_settings``);
    errors name the ``npr eval`` flag.
    """

    model: str = "embedded"
    benchmarks: tuple[str, ...] = ("aime25",)
    k: int = 8
    mode: str = "parallel"
    baseline_mode: str | None = None
    limit: int | None = None
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = 0
    seed: int = 0
    style: str = "npr"
    data_dir: str | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_branches: int = 5
    max_num_seqs: int = 64
    kv_cache_gib: float | None = None
    """KV pool memory; None: on CUDA what ``gpu_memory_utilization`` leaves, on a CPU 2 GiB (the engine's rule)."""
    gpu_memory_utilization: float = 0.9
    """On CUDA with no ``kv_cache_gib``: the share of device memory the weights, a forward and the pool may use."""
    backend: str = "npr"
    """``npr``: npr's engine on ``device``; ``llamacpp``: llama.cpp on the CPU, from the model's GGUF
    (``npr.backends``: ``embedded`` runs the shipped Q4_1 file with the NPR tags)."""
    engine_options: dict = field(default_factory=dict)
    system_prompt_file: str | None = None  # replaces npr's format instruction (npr.prompts); read when built
    system_prompt_placement: str = "system"  # system message, or "user": after the problem (NPR's released code)
    system_prompt: str | None = None  # the instruction text used (from system_prompt_file; None: npr's own)
    speed_rounds: int = 3
    """With a baseline mode: rounds of timing that alternate the two modes (ABBA order) over the same
    problems and seeds; the speedup is the median over rounds, with its range. 0: only the single
    (unalternated) timing of the recorded runs."""
    speed_problems: int | None = 16
    """Problems (the first N over all benchmarks, k samples each) in each batched timing round; None: all."""
    latency_requests: int = 4
    """Single requests (batch 1, one sample each) per round, each timed alone in both modes, for the
    batch-1 latency speedup; 0 skips it."""
    baseline_eval: bool = True
    """With a baseline mode: also evaluate it in full (k samples of every problem, in ``baseline/``).
    False: the baseline mode is only timed against this mode (``speed_rounds`` >= 1), for runs that
    need the speedup but not the baseline's accuracy (the tiny pipeline, to fit its time budget)."""

    def __post_init__(self):
        if self.system_prompt_file is not None:
            if self.style != "npr":
                raise EvalError("--system-prompt-file replaces the npr style's instruction; it needs --style npr")
            if self.system_prompt is None:  # the text is part of the settings, so --resume sees a changed file
                object.__setattr__(self, "system_prompt", read_instruction_file(self.system_prompt_file))
        if self.system_prompt_placement not in PLACEMENTS:
            raise EvalError(
                f"--system-prompt-placement must be one of {', '.join(PLACEMENTS)}, "
                f"got {self.system_prompt_placement!r}"
            )
        check_settings(self)
        if self.speed_rounds < 0 or self.latency_requests < 0 or (self.speed_problems or 1) < 1:
            raise EvalError(
                "speed_rounds and latency_requests must be >= 0 and speed_problems >= 1 (or None), got "
                f"{self.speed_rounds}, {self.latency_requests}, {self.speed_problems}"
            )
        if self.baseline_mode and not self.baseline_eval and not self.speed_rounds:
            raise EvalError("baseline_eval false leaves the baseline mode only its timing; it needs speed_rounds >= 1")


def make_engine(config: EvalConfig, model, tokenizer, mode: str):
    """The engine of ``config.backend`` for one mode (``npr.backends.build_engine``)."""
    from npr.backends import build_engine

    return build_engine(config.backend, config.model, model, tokenizer, engine_config(config, mode))


def model_hash(model) -> str:
    """sha256 over the parameters (names, shapes, dtypes, bytes): which weights produced a run."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def problems_hash(problems: list[Problem]) -> str:
    """sha256 over the problems' ids, texts and answers, in order: which data a run evaluated."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.problem, p.answer]).encode())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("npr", "torch", "transformers", "accelerate", "math-verify", "reasoning-gym"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ----------------------------------------------------------------------------- records


def sample_record(benchmark: str, problem: Problem, prompt: str, result: Result) -> dict:
    """One line of samples.jsonl (the fields npr.eval.metrics and the viewer read)."""
    text = result.text
    errors = validate(text)
    executed = result.mode == "parallel"
    return {
        "benchmark": benchmark,
        "problem_id": problem.id,
        "sample": result.sample_index,
        "size": problem.size,
        "problem": problem.problem,
        "prompt": prompt,
        "answer": problem.answer,
        "output": text,
        "pred": final_answer(text),
        "correct": is_correct(text, problem),
        "mode": result.mode,
        "finish_reason": result.finish_reason,
        "diagnostic": result.diagnostic,
        "format_valid": not errors,
        "format_errors": [e.kind for e in errors],
        "trace": parse(text, strict=False).to_dict(),
        "parallel_blocks": len(result.blocks) if executed else 0,
        "tree_blocks": len(result.blocks),
        "branches_per_block": result.branches_per_block,
        "tokens": result.stats.generated_tokens,
        "critical_path_tokens": result.stats.critical_path_tokens,
        "forward_passes": result.stats.forward_passes,
        "wall_time_s": round(result.stats.wall_time_s, 4),
        **({"cells": list(grid_cells(text, problem.answer))} if problem.grader == GRID else {}),
    }


# ----------------------------------------------------------------------------- the run


class EvalRun:
    """Runs one mode over every benchmark into one directory, resumably (npr.eval.rundir.Ledger)."""

    def __init__(
        self,
        config: EvalConfig,
        model,
        tokenizer,
        out: Path,
        mode: str,
        problems: dict[str, list[Problem]],
        plan: ProblemPlan,
        progress=None,
        logits_processors: tuple = (),
        engine: Engine | None = None,
    ):
        self.config, self.model, self.tokenizer, self.out, self.mode = config, model, tokenizer, out, mode
        self.problems, self.plan = problems, plan
        self.progress = progress
        self.logits_processors = logits_processors
        self.engine = engine

    def params(self) -> SamplingParams:
        c = self.config
        return SamplingParams(
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            n=c.k,
            seed=c.seed,
            logits_processors=self.logits_processors,
        )

    def run(self) -> list[dict]:
        """Every record of the run: those kept from before (on resume) and the new ones."""
        ledger = Ledger.open(self.out, self.config.k)
        records = list(ledger.records)
        engine = self.engine or make_engine(self.config, self.model, self.tokenizer, self.mode)
        offset = 0
        for bench, problems in self.problems.items():
            todo = [(offset + i, p) for i, p in enumerate(problems) if not ledger.is_done(bench, p.id)]
            offset += len(problems)
            if todo:
                records += self._run_benchmark(engine, bench, todo, ledger)
        return records

    def _run_benchmark(self, engine, bench: str, todo: list[tuple[int, Problem]], ledger: Ledger) -> list[dict]:
        """Decode one benchmark's remaining problems, appending each sample as it finishes and
        committing a problem once all its k samples are written; problems that cannot run get
        their failure record instead."""
        k, failures = self.config.k, self.plan.failures
        runnable = {index: p for index, p in todo if (bench, p.id) not in failures}
        failed = [failure_record(bench, p, failures[(bench, p.id)], k) for _, p in todo if (bench, p.id) in failures]
        texts = {index: self.tokenizer.decode(self.plan.prompts[bench][index]) for index in runnable}
        records, counts, base, start = [], Counter(), ledger.wall_time_s.get(bench, 0.0), time.perf_counter()
        task = self.progress.start(f"{bench} ({self.mode})", len(runnable) * k) if self.progress else None
        with (self.out / "samples.jsonl").open("a", encoding="utf-8") as sink:
            if failed:
                sink.write("".join(json.dumps(r) + "\n" for r in failed))
                sink.flush()
                ledger.commit(bench, [r["problem_id"] for r in failed], base + time.perf_counter() - start)
            if runnable:
                engine.submit(
                    [self.plan.prompts[bench][i] for i in runnable], self.params(), prompt_indices=list(runnable)
                )
            while engine.scheduler.has_work():
                event, completed = engine.step(), []
                for result in event.finished:
                    problem = runnable[result.prompt_index]
                    record = sample_record(bench, problem, texts[result.prompt_index], result)
                    sink.write(json.dumps(record) + "\n")
                    records.append(record)
                    counts[result.prompt_index] += 1
                    if counts[result.prompt_index] == k:
                        completed.append(problem.id)
                sink.flush()
                if completed:
                    ledger.commit(bench, completed, base + time.perf_counter() - start)
                if task is not None:
                    self.progress.advance(task, event, records)
        return failed + records


def prompt_options(config: EvalConfig) -> dict:
    """``encode_prompt``'s instruction keywords for ``config``."""
    return {"instruction": config.system_prompt, "placement": config.system_prompt_placement}


# ----------------------------------------------------------------------------- speed


def _timed_run(
    engine: Engine, prompts: list[tuple[int, list[int]]], params: SamplingParams
) -> tuple[float, list[Result]]:
    """Wall seconds to decode ``prompts`` ((global index, ids): the index keys the seeds, as in the
    recorded run) to the end, and the results."""
    results: list[Result] = []
    start = time.perf_counter()
    engine.submit([ids for _, ids in prompts], params, prompt_indices=[i for i, _ in prompts])
    while engine.scheduler.has_work():
        results += engine.step().finished
    return time.perf_counter() - start, results


def time_modes(config: EvalConfig, model, tokenizer, plan: ProblemPlan, logits_processors: tuple = ()) -> dict:
    """Speed of ``config.mode`` over ``config.baseline_mode``, the two modes timed alternately.

    ``batched``: ``speed_rounds`` rounds, each decoding the first ``speed_problems`` problems (k
    samples each, continuous batching) once per mode, in ABBA order (round r runs the baseline
    first when r is odd) so that drift in the machine's speed falls on both modes alike.
    ``batch1``: in each round, ``latency_requests`` single requests (one sample each, alone in the
    engine), each decoded in both modes back to back (order alternating per request); the round's
    latency speedup is the baseline's summed wall time over this mode's. Each part reports the
    per-round speedups, their median, min and max (``npr.eval.metrics.spread``), and its ideal
    (total / critical-path tokens of this mode's results in that part).
    Only problems that can run (``plan``) are timed. Samples use the recorded runs' seeds, so both modes decode
    the same tokens (up to bf16 noise).
    """
    from npr.eval.metrics import speed_part

    encoded = [(i, ids) for prompts in plan.prompts.values() for i, ids in sorted(prompts.items())]
    params = SamplingParams(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        n=config.k,
        seed=config.seed,
        logits_processors=logits_processors,
    )
    engines = {m: make_engine(config, model, tokenizer, m) for m in (config.mode, config.baseline_mode)}
    batch = encoded[: config.speed_problems] if config.speed_problems else encoded
    single = encoded[: config.latency_requests]
    one = replace(params, n=1)
    rounds = {"batched": [], "batch1": []}
    for r in range(config.speed_rounds):
        order = (config.mode, config.baseline_mode) if r % 2 == 0 else (config.baseline_mode, config.mode)
        walls, results = {}, {}
        for m in order:
            walls[m], results[m] = _timed_run(engines[m], batch, params)
        rounds["batched"].append(_round(walls, results, config))
        if single:
            walls = {m: 0.0 for m in order}
            results = {m: [] for m in order}
            for j, request in enumerate(single):
                for m in order if j % 2 == 0 else order[::-1]:
                    wall, out = _timed_run(engines[m], [request], one)
                    walls[m] += wall
                    results[m] += out
            rounds["batch1"].append(_round(walls, results, config))
    return {
        "rounds": config.speed_rounds,
        "batched": speed_part(rounds["batched"]) | {"problems": len(batch), "samples_per_run": len(batch) * config.k},
        "batch1": speed_part(rounds["batch1"]) | {"requests": len(single)} if single else None,
        "mode": config.mode,
        "baseline_mode": config.baseline_mode,
    }


def _round(walls: dict[str, float], results: dict[str, list[Result]], config: EvalConfig) -> dict:
    mine = results[config.mode]
    return {
        "wall_s": walls[config.mode],
        "baseline_wall_s": walls[config.baseline_mode],
        "tokens": sum(r.stats.generated_tokens for r in mine),
        "critical_path_tokens": sum(r.stats.critical_path_tokens for r in mine),
    }


def describe(config: EvalConfig, model, tokenizer, problems: dict[str, list[Problem]]) -> dict:
    """config.json: settings, the prompt, the model and data hashes (all compared on --resume), versions."""
    settings = {k: v for k, v in asdict(config).items()}
    settings["benchmarks"] = list(config.benchmarks)
    return {
        "settings": settings,
        "prompt": {
            "style": config.style,
            "instruction": (config.system_prompt or NPR_INSTRUCTION) if config.style == "npr" else None,
            "placement": config.system_prompt_placement,
            "messages_example": build_messages("<problem>", config.style, **prompt_options(config)),
            "chat_text_example": prompt_text(tokenizer, "<problem>", config.style, **prompt_options(config)),
        },
        "model_sha256": model_hash(model),
        "data_sha256": {b: problems_hash(ps) for b, ps in problems.items()},
        "problems": {b: [p.id for p in ps] for b, ps in problems.items()},
        "versions": package_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
    }


def load_benchmarks(config: EvalConfig) -> dict[str, list[Problem]]:
    out = {}
    for spec in config.benchmarks:
        problems = load_problems(spec, data_dir=config.data_dir, limit=config.limit)
        if not problems:
            raise EvalError(f"benchmark {spec!r} has no problems")
        out[spec] = problems
    return out


def split_failures(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(sample records, failure records) of a run's samples.jsonl lines."""
    return [r for r in records if not r.get("failure")], [r for r in records if r.get("failure")]


def failure_summary(failures: list[dict]) -> dict:
    """results.json's ``failures``: problems that did not run, by reason and benchmark, and each one."""
    return {
        "problems": len(failures),
        "by_reason": dict(Counter(r["failure"] for r in failures).most_common()),
        "by_benchmark": dict(Counter(r["benchmark"] for r in failures)),
        "list": [
            {k: r.get(k) for k in ("benchmark", "problem_id", "failure", "location", "message")} for r in failures
        ],
    }


def evaluate(
    config: EvalConfig,
    out_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress=None,
    model_and_tokenizer=None,
    logits_processors: tuple = (),
) -> dict:
    """Run the evaluation (and its baseline) and write the run dir; returns results.json's content.

    Every input is checked (output dir, benchmarks, model, engine, every prompt, and on
    ``resume`` the saved run) before the first file is written. ``model_and_tokenizer`` skips
    loading ``config.model``; ``logits_processors`` (e.g. a ``StructureForcer``) are for tests
    and benchmarks with untrained models.
    """
    from npr.models import load_model_and_tokenizer

    out = Path(out_dir)
    dirs = [out] + ([out / "baseline"] if config.baseline_mode and config.baseline_eval else [])
    for run_dir in dirs:
        check_out_dir(run_dir, resume, overwrite)
    problems = load_benchmarks(config)
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(
        config.model, dtype=config.dtype, device=config.device
    )
    engine = make_engine(config, model, tokenizer, config.mode)
    plan = plan_problems(config, engine, tokenizer, problems)
    description = describe(config, model, tokenizer, problems)
    for run_dir in dirs:
        prepare_out_dir(run_dir, description, resume, overwrite)
    for run_dir in dirs:  # nothing is written before every check above has passed
        write_description(run_dir, description, resume)
    records = EvalRun(
        config, model, tokenizer, out, config.mode, problems, plan, progress, logits_processors, engine
    ).run()
    del engine  # the baseline builds an engine of its own mode; let this KV pool go first
    baseline_records = None
    if config.baseline_mode and config.baseline_eval:
        baseline_records = EvalRun(
            config,
            model,
            tokenizer,
            out / "baseline",
            config.baseline_mode,
            problems,
            plan,
            progress,
            logits_processors,
        ).run()
    speed = None
    if config.baseline_mode and config.speed_rounds:
        speed = time_modes(config, model, tokenizer, plan, logits_processors)
    return write_results(config, out, records, baseline_records, speed)


def write_results(
    config: EvalConfig, out: Path, records: list[dict], baseline_records: list[dict] | None, speed: dict | None = None
) -> dict:
    """results.json (and the baseline's) and report.html, from the run's records."""
    from npr.eval.metrics import summarize
    from npr.eval.report import write_report

    samples, failures = split_failures(records)
    walls = read_wall_times(out)
    baseline = baseline_samples = baseline_walls = None
    if baseline_records is not None:
        baseline_samples = split_failures(baseline_records)[0]
        baseline_walls = read_wall_times(out / "baseline")
        baseline = summarize(baseline_samples, baseline_walls)
        baseline["failures"] = failure_summary(split_failures(baseline_records)[1])
        atomic_write_json(out / "baseline" / "results.json", baseline)
    results = summarize(samples, walls, baseline)
    results["mode"], results["baseline_mode"] = config.mode, config.baseline_mode
    results["failures"] = failure_summary(failures)
    if speed is not None:
        results["speed"] = speed
    atomic_write_json(out / "results.json", results)
    write_report(
        out,
        samples,
        wall_time_s=walls,
        baseline_records=baseline_samples,
        baseline_wall_time_s=baseline_walls,
        failures=failures,
        speed=speed,
        title=f"npr eval: {config.model} ({config.mode})",
    )
    return results
