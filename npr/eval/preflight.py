"""Checks an evaluation makes before it writes anything: its settings, then every problem.

``check_settings`` refuses a bad setting by its flag (``--top-p must be in (0, 1]``) as the
``EvalConfig`` is built, before the model loads. ``plan_problems`` runs once the model and
the engine exist, still before any file is written: it encodes every prompt and finds the
problems that cannot run (``FAILURE_REASONS``). Those are recorded, one line each, in
``samples.jsonl`` with their reason and where they came from, and the run goes on without them;
only when no problem at all can run is it a setting's fault (``--max-new-tokens`` too large
for the model's context, ``--kv-cache-gib`` too small), and ``EvalError`` says which.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from npr.data.problems import Problem
from npr.engine import MODES, EngineConfig, EngineInputError, SamplingParams
from npr.engine.scheduler import Scheduler
from npr.errors import NprError
from npr.prompts import STYLES, encode_prompt
from npr.validate import check_kv_cache_gib, seed_problem

FAILURE_REASONS = {
    "prompt_too_long": "the prompt and --max-new-tokens exceed the model's context",
    "kv_cache_too_small": "the problem's k samples cannot fit in the KV pool (--kv-cache-gib)",
    "empty_problem": "the problem text is empty",
    "empty_answer": "the reference answer is empty, so no sample could be graded",
}


class EvalError(NprError):
    """Bad evaluation input, found before any compute."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise EvalError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_settings(c) -> None:
    """Every field of an ``EvalConfig``, named by its ``npr eval`` flag."""
    from npr.data.benchmarks import resolve_data_dir
    from npr.models import DTYPES, resolve_device

    _require(bool(c.benchmarks), "--benchmarks is empty; name at least one (e.g. math500 or rg:chain_sum)")
    twice = [b for b, n in Counter(c.benchmarks).items() if n > 1]
    _require(not twice, f"--benchmarks names {', '.join(twice)} twice; list each benchmark once")
    _require(_is_int(c.k) and c.k >= 1, f"--k must be >= 1, got {c.k!r}")
    _require(c.limit is None or (_is_int(c.limit) and c.limit >= 1), f"--limit must be >= 1, got {c.limit!r}")
    _require(c.mode in MODES, f"--mode {c.mode!r} is not one of {', '.join(MODES)}")
    _require(
        c.baseline_mode is None or c.baseline_mode in MODES,
        f"--baseline-mode {c.baseline_mode!r} is not one of {', '.join(MODES)}",
    )
    _require(
        _is_int(c.max_new_tokens) and c.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {c.max_new_tokens!r}"
    )
    _require(
        _is_number(c.temperature) and c.temperature >= 0,
        f"--temperature must be a finite number >= 0 (0 = greedy), got {c.temperature!r}",
    )
    _require(_is_number(c.top_p) and 0 < c.top_p <= 1, f"--top-p must be in (0, 1], got {c.top_p!r}")
    _require(_is_int(c.top_k) and c.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {c.top_k!r}")
    _require(seed_problem(c.seed) is None, f"--seed {seed_problem(c.seed)}")
    _require(c.style in STYLES, f"--style {c.style!r} is not one of {', '.join(STYLES)}")
    _require(c.dtype in DTYPES, f"--dtype {c.dtype!r} is not one of {', '.join(DTYPES)}")
    _require(_is_int(c.max_branches) and c.max_branches >= 1, f"max_branches must be >= 1, got {c.max_branches!r}")
    _require(_is_int(c.max_num_seqs) and c.max_num_seqs >= 1, f"--max-num-seqs must be >= 1, got {c.max_num_seqs!r}")
    _require(
        c.kv_cache_gib is None or (_is_number(c.kv_cache_gib) and c.kv_cache_gib > 0),
        f"--kv-cache-gib must be > 0, got {c.kv_cache_gib!r}",
    )
    _require(
        _is_number(c.gpu_memory_utilization) and 0 < c.gpu_memory_utilization <= 1,
        f"--gpu-memory-utilization must be in (0, 1], got {c.gpu_memory_utilization!r}",
    )
    from npr.backends import BACKENDS

    _require(c.backend in BACKENDS, f"--backend {c.backend!r} is not one of {', '.join(BACKENDS)}")
    try:
        engine_config(c, c.mode)
    except TypeError as e:
        raise EvalError(f"engine_options: {e}; see npr.engine.EngineConfig for the fields") from e
    if c.data_dir is not None:
        resolve_data_dir(c.data_dir)  # a given --data-dir must exist even when no benchmark reads it
    resolve_device(c.device)
    if c.kv_cache_gib is not None:
        check_kv_cache_gib(c.kv_cache_gib, c.device)


def engine_config(c, mode: str) -> EngineConfig:
    """The engine settings of an ``EvalConfig`` for one mode."""
    return EngineConfig(
        mode=mode,
        max_branches=c.max_branches,
        max_num_seqs=c.max_num_seqs,
        kv_cache_gib=c.kv_cache_gib,
        gpu_memory_utilization=c.gpu_memory_utilization,
        **c.engine_options,
    )


# ----------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class ProblemFailure:
    """Why one problem cannot run: a ``FAILURE_REASONS`` key and a message naming the problem."""

    reason: str
    message: str


def where(problem: Problem) -> str:
    """The problem's file and line (or its spec) and id, for messages."""
    return f"{problem.location or problem.source}: problem {problem.id!r}"


@dataclass
class ProblemPlan:
    """Prompt ids of the problems that can run, and the failures of those that cannot."""

    prompts: dict[str, dict[int, list[int]]]  # benchmark -> prompt index -> prompt ids
    failures: dict[tuple[str, str], ProblemFailure]  # (benchmark, problem id) -> why it cannot run


def plan_problems(config, engine, tokenizer, problems: dict[str, list[Problem]]) -> ProblemPlan:
    """Encode every prompt and check it against the model's context and the KV pool in every
    mode the run uses (its baseline too); raises ``EvalError`` when no problem can run."""
    modes = [config.mode] + ([config.baseline_mode] if config.baseline_mode else [])
    schedulers = [
        engine.scheduler
        if m == engine.config.mode
        else Scheduler(engine_config(config, m), engine.pool, engine.scaffold)
        for m in modes
    ]
    params = SamplingParams(max_new_tokens=config.max_new_tokens, n=config.k)
    plan, offset, lengths = ProblemPlan({}, {}), 0, []
    for bench, items in problems.items():
        plan.prompts[bench] = {}
        for i, problem in enumerate(items):
            failure, ids = _check_problem(problem, config, engine, tokenizer, schedulers, params, offset + i)
            if failure is None:
                plan.prompts[bench][offset + i] = ids
            else:
                plan.failures[(bench, problem.id)] = failure
                if ids:
                    lengths.append((failure.reason, len(ids)))
        offset += len(items)
    if not any(plan.prompts.values()):
        raise _nothing_runs(config, engine, schedulers, params, plan, lengths)
    return plan


def _check_problem(problem, config, engine, tokenizer, schedulers, params, index):
    if not problem.problem.strip():
        return ProblemFailure("empty_problem", f"{where(problem)}: empty_problem: the problem text is empty"), []
    if not problem.answer.strip():
        return ProblemFailure(
            "empty_answer", f"{where(problem)}: empty_answer: no reference answer to grade against; fill in its answer"
        ), []
    ids = encode_prompt(
        tokenizer,
        problem.problem,
        style=config.style,
        instruction=config.system_prompt,
        placement=config.system_prompt_placement,
    )
    context = engine.context_length
    if context and len(ids) + config.max_new_tokens > context:
        return ProblemFailure(
            "prompt_too_long",
            f"{where(problem)}: prompt_too_long: {len(ids)} prompt tokens + "
            f"--max-new-tokens {config.max_new_tokens} exceed the model context of {context}",
        ), ids
    for scheduler in schedulers:
        try:
            scheduler.check_fits(index, len(ids), params)
        except EngineInputError:
            need = scheduler.start_blocks(len(ids), params)
            return ProblemFailure(
                "kv_cache_too_small",
                f"{where(problem)}: kv_cache_too_small: its {config.k} samples "
                f"need {need} KV blocks to start, the pool has "
                f"{engine.pool.num_blocks} ({_pool_words(config, engine)})",
            ), ids
    return None, ids


def _pool_gib(engine) -> float:
    """The engine's KV pool, GiB (as sized from --kv-cache-gib, or by the engine's rule when it is not given)."""
    return engine.pool.num_blocks * engine.pool.bytes_per_block() / 2**30


def _pool_words(config, engine) -> str:
    if config.kv_cache_gib is not None:
        return f"--kv-cache-gib {config.kv_cache_gib}"
    return f"the default KV pool ({_pool_gib(engine):.3g} GiB; set --kv-cache-gib)"


def _nothing_runs(config, engine, schedulers, params, plan, lengths) -> EvalError:
    reasons = Counter(f.reason for f in plan.failures.values())
    shortest = min((n for _, n in lengths), default=0)
    if reasons["prompt_too_long"] and engine.context_length:
        room = engine.context_length - shortest
        return EvalError(
            f"--max-new-tokens {config.max_new_tokens} leaves no problem room: the model context is "
            f"{engine.context_length} tokens and the shortest prompt has {shortest}; use "
            f"--max-new-tokens {max(1, room)} or less"
        )
    if reasons["kv_cache_too_small"]:
        need = max(s.start_blocks(shortest, params) for s in schedulers)
        gib = _pool_gib(engine) * need / engine.pool.num_blocks
        return EvalError(
            f"{_pool_words(config, engine)} holds {engine.pool.num_blocks} KV blocks; even the "
            f"shortest prompt's {config.k} samples need {need} to start: use --kv-cache-gib {gib:.3g} or "
            "more, or lower --k or --max-new-tokens"
        )
    listing = "; ".join(f.message for f in list(plan.failures.values())[:3])
    return EvalError(f"no problem can run ({dict(reasons)}): {listing}")


def failure_record(bench: str, problem: Problem, failure: ProblemFailure, k: int) -> dict:
    """The ``samples.jsonl`` line of a problem that did not run (no sample; metrics skip it)."""
    return {
        "benchmark": bench,
        "problem_id": problem.id,
        "sample": None,
        "problem": problem.problem,
        "answer": problem.answer,
        "output": "",
        "pred": None,
        "correct": None,
        "failure": failure.reason,
        "message": failure.message,
        "location": problem.location or problem.source,
        "finish_reason": "not_run",
        "diagnostic": {"kind": failure.reason},
        "samples_requested": k,
    }
