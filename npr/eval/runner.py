"""``npr eval``: run benchmarks through the NPR engine, grade, and write a self-describing run dir.

    DIR/config.json    every setting, the prompt text, the model hash, package versions
    DIR/samples.jsonl  one record per sample (appended as samples finish: Ctrl-C keeps them)
    DIR/progress.json  wall time per finished benchmark (the run-level clock for tokens/s)
    DIR/results.json   metrics per benchmark and overall (npr.eval.metrics)
    DIR/report.html    results table, plots and the trajectory viewer (npr.eval.report)
    DIR/baseline/      the same files for the --baseline-mode run of the same problems

Protocol (NPR, arXiv 2512.07461 §4): k samples per problem at temperature 1.0, top-p 0.7; each
problem's samples draw from seeds derived from ``seed`` and the problem's index, so a run, its
resumption and its baseline sample the same way. Benchmarks run one after another (each with
continuous batching over all its problems) so each has its own wall time.
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
from npr.engine import Engine, EngineConfig, Result, SamplingParams
from npr.errors import NprError
from npr.prompts import NPR_INSTRUCTION, build_messages, encode_prompt, prompt_text
from npr.rewards import final_answer, is_correct
from npr.schema import parse, validate

RUN_FILES = ("config.json", "samples.jsonl", "results.json", "report.html", "progress.json")


class EvalError(NprError):
    """Bad evaluation input, found before any compute."""


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run. Defaults follow NPR's protocol (k = 8, temperature 1.0, top-p 0.7)."""

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
    kv_cache_gib: float = 2.0
    engine_options: dict = field(default_factory=dict)
    speed_rounds: int = 3
    """With a baseline mode: rounds of timing that alternate the two modes (ABBA order) over the same
    problems and seeds; the speedup is the median over rounds, with its range. 0: only the single
    (unalternated) timing of the recorded runs."""
    speed_problems: int | None = 16
    """Problems (the first N over all benchmarks, k samples each) in each batched timing round; None: all."""
    latency_requests: int = 4
    """Single requests (batch 1, one sample each) per round, each timed alone in both modes, for the
    batch-1 latency speedup; 0 skips it."""

    def __post_init__(self):
        if self.k < 1:
            raise EvalError(f"--k must be >= 1, got {self.k}")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be >= 1, got {self.limit}")
        if not self.benchmarks:
            raise EvalError("--benchmarks is empty; name at least one (e.g. math500 or rg:chain_sum)")
        if self.speed_rounds < 0 or self.latency_requests < 0 or (self.speed_problems or 1) < 1:
            raise EvalError("speed_rounds and latency_requests must be >= 0 and speed_problems >= 1 (or None), got "
                            f"{self.speed_rounds}, {self.latency_requests}, {self.speed_problems}")


def model_hash(model) -> str:
    """sha256 over the parameters (names, shapes, dtypes, bytes): which weights produced a run."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("npr", "torch", "transformers", "accelerate", "math-verify", "reasoning-gym"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ----------------------------------------------------------------------------- run directory


def prepare_out_dir(out: Path, config: dict, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a dir holding another run needs --resume (same settings) or --overwrite."""
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not (resume or overwrite):
        raise EvalError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it "
                        "or --overwrite to replace it, or choose another --out")
    if resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        if saved.get("settings") != config["settings"]:
            diff = sorted(k for k in set(saved.get("settings", {})) | set(config["settings"])
                          if saved.get("settings", {}).get(k) != config["settings"].get(k))
            raise EvalError(f"--resume: {out}/config.json was written with other settings ({', '.join(diff)}); "
                            "rerun with the same flags or use --overwrite")
    if overwrite:
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def read_samples(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: that sample is redone
    return records


# ----------------------------------------------------------------------------- records


def sample_record(benchmark: str, problem: Problem, prompt: str, result: Result) -> dict:
    """One line of samples.jsonl (the fields npr.eval.metrics and the viewer read)."""
    text = result.text
    errors = validate(text)
    executed = result.mode == "parallel"
    return {
        "benchmark": benchmark, "problem_id": problem.id, "sample": result.sample_index, "size": problem.size,
        "problem": problem.problem, "prompt": prompt, "answer": problem.answer, "output": text,
        "pred": final_answer(text), "correct": is_correct(text, problem),
        "mode": result.mode, "finish_reason": result.finish_reason, "diagnostic": result.diagnostic,
        "format_valid": not errors, "format_errors": [e.kind for e in errors],
        "trace": parse(text, strict=False).to_dict(),
        "parallel_blocks": len(result.blocks) if executed else 0,
        "tree_blocks": len(result.blocks),
        "branches_per_block": result.branches_per_block,
        "tokens": result.stats.generated_tokens, "critical_path_tokens": result.stats.critical_path_tokens,
        "forward_passes": result.stats.forward_passes, "wall_time_s": round(result.stats.wall_time_s, 4),
    }


# ----------------------------------------------------------------------------- the run


class EvalRun:
    """Runs one mode over every benchmark into one directory, resumably."""

    def __init__(self, config: EvalConfig, model, tokenizer, out: Path, mode: str, problems: dict[str, list[Problem]],
                 progress=None, logits_processors: tuple = ()):
        self.config, self.model, self.tokenizer, self.out, self.mode = config, model, tokenizer, out, mode
        self.problems = problems
        self.progress = progress
        self.logits_processors = logits_processors

    def _engine(self) -> Engine:
        c = self.config
        options = dict(mode=self.mode, max_branches=c.max_branches, max_num_seqs=c.max_num_seqs,
                       kv_cache_gib=c.kv_cache_gib, **c.engine_options)
        return Engine(self.model, self.tokenizer, EngineConfig(**options))

    def params(self) -> SamplingParams:
        c = self.config
        return SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                              top_k=c.top_k, n=c.k, seed=c.seed, logits_processors=self.logits_processors)

    def run(self) -> list[dict]:
        samples_path, progress_path = self.out / "samples.jsonl", self.out / "progress.json"
        records = read_samples(samples_path)
        walls = json.loads(progress_path.read_text()) if progress_path.exists() else {}
        counts = Counter((r["benchmark"], r["problem_id"]) for r in records)
        done = {key for key, n in counts.items() if n >= self.config.k}
        records = [r for r in records if (r["benchmark"], r["problem_id"]) in done]  # drop partial problems
        samples_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        engine = self._engine()
        offset = 0
        for bench, problems in self.problems.items():
            todo = [(offset + i, p) for i, p in enumerate(problems) if (bench, p.id) not in done]
            offset += len(problems)
            if todo:
                records += self._run_benchmark(engine, bench, todo, walls, samples_path, progress_path)
        return records

    def _run_benchmark(self, engine, bench, todo, walls, samples_path, progress_path) -> list[dict]:
        by_index = {index: p for index, p in todo}
        prompts = {index: encode_prompt(self.tokenizer, p.problem, style=self.config.style) for index, p in todo}
        texts = {index: self.tokenizer.decode(ids) for index, ids in prompts.items()}
        engine.submit(list(prompts.values()), self.params(), prompt_indices=list(prompts))
        records, start = [], time.perf_counter()
        task = self.progress.start(f"{bench} ({self.mode})", len(todo) * self.config.k) if self.progress else None
        with samples_path.open("a", encoding="utf-8") as sink:
            try:
                while engine.scheduler.has_work():
                    event = engine.step()
                    for result in event.finished:
                        record = sample_record(bench, by_index[result.prompt_index], texts[result.prompt_index], result)
                        sink.write(json.dumps(record) + "\n")
                        records.append(record)
                    sink.flush()
                    if task is not None:
                        self.progress.advance(task, event, records)
            except BaseException:
                walls[bench] = walls.get(bench, 0.0) + time.perf_counter() - start
                progress_path.write_text(json.dumps(walls, indent=1))
                raise
        walls[bench] = walls.get(bench, 0.0) + time.perf_counter() - start
        progress_path.write_text(json.dumps(walls, indent=1))
        return records


# ----------------------------------------------------------------------------- speed


def _timed_run(engine: Engine, prompts: list[tuple[int, list[int]]], params: SamplingParams) -> tuple[float, list[Result]]:
    """Wall seconds to decode ``prompts`` ((global index, ids): the index keys the seeds, as in the
    recorded run) to the end, and the results."""
    results: list[Result] = []
    start = time.perf_counter()
    engine.submit([ids for _, ids in prompts], params, prompt_indices=[i for i, _ in prompts])
    while engine.scheduler.has_work():
        results += engine.step().finished
    return time.perf_counter() - start, results


def time_modes(config: EvalConfig, model, tokenizer, problems: dict[str, list[Problem]],
               logits_processors: tuple = ()) -> dict:
    """Speed of ``config.mode`` over ``config.baseline_mode``, the two modes timed alternately.

    ``batched``: ``speed_rounds`` rounds, each decoding the first ``speed_problems`` problems (k
    samples each, continuous batching) once per mode, in ABBA order (round r runs the baseline
    first when r is odd) so that drift in the machine's speed falls on both modes alike.
    ``batch1``: in each round, ``latency_requests`` single requests (one sample each, alone in the
    engine), each decoded in both modes back to back (order alternating per request); the round's
    latency speedup is the baseline's summed wall time over this mode's. Each part reports the
    per-round speedups, their median, min and max (``npr.eval.metrics.spread``), and its ideal
    (total / critical-path tokens of this mode's results in that part).
    Samples use the recorded runs' seeds, so both modes decode the same tokens (up to bf16 noise).
    """
    from npr.eval.metrics import speed_part

    indexed, offset = [], 0
    for bench_problems in problems.values():
        indexed += [(offset + i, p) for i, p in enumerate(bench_problems)]
        offset += len(bench_problems)
    encoded = [(i, encode_prompt(tokenizer, p.problem, style=config.style)) for i, p in indexed]
    base = EvalRun(config, model, tokenizer, Path("."), config.mode, problems, logits_processors=logits_processors)
    params = base.params()
    engines = {m: EvalRun(config, model, tokenizer, Path("."), m, problems)._engine()
               for m in (config.mode, config.baseline_mode)}
    batch = encoded[:config.speed_problems] if config.speed_problems else encoded
    single = encoded[:config.latency_requests]
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
                for m in (order if j % 2 == 0 else order[::-1]):
                    wall, out = _timed_run(engines[m], [request], one)
                    walls[m] += wall
                    results[m] += out
            rounds["batch1"].append(_round(walls, results, config))
    return {"rounds": config.speed_rounds, "batched": speed_part(rounds["batched"]) | {
                "problems": len(batch), "samples_per_run": len(batch) * config.k},
            "batch1": speed_part(rounds["batch1"]) | {"requests": len(single)} if single else None,
            "mode": config.mode, "baseline_mode": config.baseline_mode}


def _round(walls: dict[str, float], results: dict[str, list[Result]], config: EvalConfig) -> dict:
    mine = results[config.mode]
    return {"wall_s": walls[config.mode], "baseline_wall_s": walls[config.baseline_mode],
            "tokens": sum(r.stats.generated_tokens for r in mine),
            "critical_path_tokens": sum(r.stats.critical_path_tokens for r in mine)}


def describe(config: EvalConfig, model, tokenizer, problems: dict[str, list[Problem]]) -> dict:
    """config.json: settings (compared on --resume), the prompt, the model hash, versions."""
    settings = {k: v for k, v in asdict(config).items()}
    settings["benchmarks"] = list(config.benchmarks)
    return {
        "settings": settings,
        "prompt": {"style": config.style, "instruction": NPR_INSTRUCTION if config.style == "npr" else None,
                   "messages_example": build_messages("<problem>", config.style),
                   "chat_text_example": prompt_text(tokenizer, "<problem>", config.style)},
        "model_sha256": model_hash(model),
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


def evaluate(config: EvalConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
             progress=None, model_and_tokenizer=None, logits_processors: tuple = ()) -> dict:
    """Run the evaluation (and its baseline) and write the run dir; returns results.json's content.

    Every input is checked (benchmarks, model, output dir) before any sample is drawn.
    ``model_and_tokenizer`` skips loading ``config.model``; ``logits_processors`` (e.g. a
    ``StructureForcer``) are for tests and benchmarks with untrained models.
    """
    from npr.eval.metrics import summarize
    from npr.eval.report import write_report
    from npr.models import load_model_and_tokenizer

    out = Path(out_dir)
    problems = load_benchmarks(config)
    model, tokenizer = model_and_tokenizer or load_model_and_tokenizer(config.model, dtype=config.dtype,
                                                                       device=config.device)
    description = describe(config, model, tokenizer, problems)
    prepare_out_dir(out, description, resume, overwrite)
    if config.baseline_mode:
        prepare_out_dir(out / "baseline", description, resume, overwrite)
    (out / "config.json").write_text(json.dumps(description, indent=1, default=str))
    records = EvalRun(config, model, tokenizer, out, config.mode, problems, progress, logits_processors).run()
    walls = json.loads((out / "progress.json").read_text())
    baseline_records = baseline_walls = baseline = None
    if config.baseline_mode:
        (out / "baseline" / "config.json").write_text(json.dumps(description, indent=1, default=str))
        baseline_records = EvalRun(config, model, tokenizer, out / "baseline", config.baseline_mode, problems,
                                   progress, logits_processors).run()
        baseline_walls = json.loads((out / "baseline" / "progress.json").read_text())
        baseline = summarize(baseline_records, baseline_walls)
        (out / "baseline" / "results.json").write_text(json.dumps(baseline, indent=1))
    results = summarize(records, walls, baseline)
    results["mode"], results["baseline_mode"] = config.mode, config.baseline_mode
    if config.baseline_mode and config.speed_rounds:
        results["speed"] = time_modes(config, model, tokenizer, problems, logits_processors)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out, records, wall_time_s=walls, baseline_records=baseline_records,
                 baseline_wall_time_s=baseline_walls, speed=results.get("speed"), title=f"npr eval: {config.model} ({config.mode})")
    return results
