"""Rejection sampling for Stage 2 (arXiv 2512.07461 §3.2): ``npr sample``.

From the NPR-Zero model, draw ``tries`` samples per problem (engine ``plain`` mode, or
``parallel`` with ``rollout_mode``; NPR prompt), all at once, or with ``stop_when_kept`` one
try at a time until the problem has ``max_kept_per_problem`` accepted samples (NPR's code:
``--max_trajectory_per_problem 1 --max_sample_trial 8``). A sample is kept when it is correct AND
format-valid (``format_score == 0``); it is rendered in the canonical form (``npr.schema.render``) and written
with its provenance. Every
other sample is counted under the first reason that applies: ``truncated`` (hit the token
budget), ``format_invalid``, ``wrong``, ``too_few_branches`` (a block with fewer plans than
``min_branches``), ``over_quota`` (``max_kept_per_problem`` or
``wrap_branches`` reached), ``unwrapped`` (wrap: fewer than ``wrap_min_branches`` correct answers).

With ``wrap`` (a format cold start, not the paper), correct samples are kept whatever their
format. ``wrap_mode repeat``: each problem's correct answers become the parallel steps of one
templated trace (``wrap_trace``; every plan is a fixed string, every step solves the whole
problem). ``wrap_mode decompose``: the problem's own parts (``npr.data.generated.decompose``)
become the plans, ``compute 3 + 4``, one per part; the model answers each part alone, and a
correct answer to part k becomes step k (``decomposed_trace``, ``decompose_wrap``).

Output directory: ``data.jsonl`` (Stage 2's ``--train-data``), ``summary.json`` (counts),
``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npr.data import Problem
from npr.engine import Result
from npr.fsio import atomic_write_text
from npr.models import load_model_and_tokenizer
from npr.prompts import encode_prompt
from npr.rewards import final_answer, is_correct
from npr.schema import Block, ParallelTrace, Plan, Span, Step, parse, render, validate
from npr.train.config import SampleConfig
from npr.train.data import load_train_problems
from npr.train.overrides import config_to_yaml
from npr.train.rollout import RolloutWorker
from npr.train.sft_data import SAMPLE_FILE
from npr.train.update import global_sum

DROP_REASONS = ("truncated", "format_invalid", "wrong", "too_few_branches", "over_quota", "unwrapped")
SUMMARY_FILE = "summary.json"


WRAP_PLANS = (
    "solve the problem directly",
    "solve it again on its own, as a check",
    "work it out a third way",
    "recompute it step by step",
    "verify the result independently",
)


def wrap_trace(answers: Sequence[str], final: str) -> str:
    """A canonical NPR trace whose parallel steps are ``answers`` (the model's own, independently
    sampled correct responses); the plans, the takeaway and the final line are templated."""
    zero = Span(0, 0)
    k = len(answers)
    agree = "Both steps give" if k == 2 else ("All steps give" if k > 2 else "The step gives")
    block = Block(
        plans=tuple(Plan(i + 1, WRAP_PLANS[i], zero) for i in range(k)),
        steps=tuple(Step(i + 1, text.strip(), zero) for i, text in enumerate(answers)),
        takeaway=f"{agree} {final}.",
        span=zero,
    )
    return render(
        ParallelTrace(blocks=(block,), final=f"The answer is \\boxed{{{final}}}.", answer=final, final_span=zero)
    )


def decomposed_trace(plans: Sequence[str], steps: Sequence[str], results: Sequence[str]) -> str:
    """A canonical NPR trace of one block: plan k is ``plans[k]`` (a part of the problem); step k
    restates plan k on its first line, then holds ``steps[k]`` (the model's own answer to that part
    alone), and ``results[k]`` is what it found; the takeaway lists the results in order and the
    final line boxes them as a tuple.

    The restated plan is what lets branch k know its part: the engine opens it with only its label
    ``k:``, so the model learns to copy plan k after it (measured: without it, 43 cold-start traces
    left the model's branches computing other plans' parts, and Stage 1's rollouts were 0 % correct).
    """
    zero = Span(0, 0)
    listed = ", ".join(results[:-1]) + f" and {results[-1]}" if len(results) > 1 else results[0]
    block = Block(
        plans=tuple(Plan(i + 1, text, zero) for i, text in enumerate(plans)),
        steps=tuple(Step(i + 1, f"{plans[i]}\n{text.strip()}", zero) for i, text in enumerate(steps)),
        takeaway=f"In order, the parts give {listed}.",
        span=zero,
    )
    answer = "(" + ", ".join(results) + ")"
    return render(
        ParallelTrace(blocks=(block,), final=f"The answer is \\boxed{{{answer}}}.", answer=answer, final_span=zero)
    )


def judge(
    result: Result, problem: Problem, require_correct: bool, wrap: bool = False, min_branches: int = 1
) -> tuple[str | None, str | None, bool, bool]:
    """(drop reason or None, first format-error kind or None, correct, format-valid) of one sample."""
    correct = is_correct(result.text, problem)
    errors = validate(result.text)
    if result.finish_reason == "length":
        return "truncated", None, correct, not errors
    if wrap:  # the format comes from the template; the content must be right and tag-free
        usable = correct and not any(tag in result.text for tag in ("<guideline>", "<step>", "<plan>", "<takeaway>"))
        return (None if usable else "wrong"), None, correct, not errors
    if errors:
        return "format_invalid", errors[0].kind, correct, False
    if require_correct and not correct:
        return "wrong", None, correct, True
    if min_branches > 1 and any(len(block.plans) < min_branches for block in parse(result.text).blocks):
        return "too_few_branches", None, correct, True
    return None, None, correct, True


def sample_record(result: Result, problem: Problem, config: SampleConfig, correct: bool) -> dict[str, Any]:
    """One line of data.jsonl: the canonical response and where it came from."""
    return {
        "id": f"{problem.id}/try{result.sample_index}",
        "problem_id": problem.id,
        "try": result.sample_index,
        "problem": problem.problem,
        "answer": problem.answer,
        "response": render(parse(result.text)),
        "reward": 1.0 if correct else -1.0,
        "source": problem.source,
        "model": config.model,
        "seed": config.seed,
    }


def select(
    results: Sequence[Result],
    problems: Sequence[Problem],
    first: int,
    config: SampleConfig,
    counts: Counter,
    format_errors: Counter,
    per_problem: Counter | None = None,
) -> list[dict]:
    """Kept records of one batch of results (ordered by problem, then try); updates the counts.

    ``per_problem`` (problem id -> samples kept so far) carries the quota across calls (the
    rounds of ``stop_when_kept``); the caller then counts ``problems_with_kept`` itself.
    """
    kept: list[dict] = []
    rounds = per_problem is not None
    per_problem = Counter() if per_problem is None else per_problem
    wrapped: dict[str, list[Result]] = {}
    for r in results:
        problem = problems[r.prompt_index - first]
        reason, error_kind, correct, valid = judge(r, problem, config.require_correct, config.wrap, config.min_branches)
        counts["samples"] += 1
        counts["correct"] += correct
        counts["format_valid"] += valid
        if (
            reason is None
            and config.max_kept_per_problem is not None
            and per_problem[problem.id] >= config.max_kept_per_problem
        ):
            reason = "over_quota"
        if reason is not None:
            counts[reason] += 1
            if error_kind:
                format_errors[error_kind] += 1
            continue
        per_problem[problem.id] += 1
        if config.wrap:
            wrapped.setdefault(problem.id, []).append(r)
        else:
            kept.append(sample_record(r, problem, config, correct))
    if config.wrap:
        by_id = {p.id: p for p in problems}
        for problem_id, rs in wrapped.items():
            if len(rs) < config.wrap_min_branches:  # too few correct answers for a parallel block
                counts["unwrapped"] += len(rs)
                per_problem.pop(problem_id)
                continue
            chosen = rs[: config.wrap_branches]
            counts["over_quota"] += len(rs) - len(chosen)
            record = sample_record(chosen[0], by_id[problem_id], config, True)
            record.update(
                id=f"{problem_id}/wrap",
                tries=[r.sample_index for r in chosen],
                kind="wrapped",
                response=wrap_trace([r.text for r in chosen], final_answer(chosen[0].text)),
            )
            kept.append(record)
    if not rounds:
        counts["problems_with_kept"] += len(per_problem)
    return kept


def shorter_half(texts: Sequence[str]) -> list[str]:
    """The shorter half (rounded up) of ``texts`` by length, shortest first, ties in their order.

    The cold start's steps are the model's own answers, chatty ones included (a median of 57
    tokens per step for SmolLM2-135M, many restating the question); taking them from the shorter
    half keeps every step the model's own words while the traces it learns from, and so every
    later rollout, get ~1/3 shorter (docs/results.md)."""
    ordered = sorted(texts, key=len)
    return ordered[: max(1, (len(ordered) + 1) // 2)]


def decompose_wrap(
    worker: RolloutWorker, tokenizer, problems: Sequence[Problem], first: int, config: SampleConfig, counts: Counter
) -> list[dict]:
    """The decomposing cold start (``wrap_mode decompose``, not the paper) over ``problems``.

    Every distinct part of the problems (``decompose``: ``3 + 4`` of ``Work out …: 3 + 4, 9 - 5``)
    is asked alone (``What is 3 + 4?``, ``config.prompt_style``), ``tries`` times; a finished,
    correct, tag-free answer is usable. A problem all of whose parts have a usable answer gives
    one trace (``decomposed_trace``): plan k names part k, step k is a usable answer to part k
    from the shorter half of them (``shorter_half``; the ``(first + i)``-th, cycling, so problems
    sharing a part use different answers), the
    takeaway and final line list the steps' own answers (``final_answer``). Counts: ``samples``,
    ``correct``, ``truncated`` and ``wrong`` over part answers; ``unwrapped`` and
    ``problems_with_kept`` over problems.
    """
    from npr.data.generated import decompose

    parts = {p.id: decompose(p) for p in problems}
    distinct = sorted(
        {part.expression: part for ps in parts.values() for part in ps}.values(), key=lambda part: part.expression
    )
    usable: dict[str, list[str]] = {}
    params = worker.sampling_params(config.tries, config.seed)
    for lo in range(0, len(distinct), config.prompts_per_batch):
        batch = distinct[lo : lo + config.prompts_per_batch]
        prompts = [encode_prompt(tokenizer, part.question, config.prompt_style) for part in batch]
        # parts are keyed after the problems' own indices, so their seeds never collide across ranks
        for r in worker.generate(prompts, first * 8 + lo, params):
            part = batch[r.prompt_index - first * 8 - lo]
            question = Problem(f"part:{part.expression}", part.question, part.answer, "decompose")
            reason, _, correct, _ = judge(r, question, True, wrap=True)
            counts["samples"] += 1
            counts["correct"] += correct
            if reason is not None:
                counts[reason] += 1
            else:
                usable.setdefault(part.expression, []).append(r.text)
    kept = []
    for i, problem in enumerate(problems):
        answers = [usable.get(part.expression, []) for part in parts[problem.id]]
        if not all(answers):
            counts["unwrapped"] += 1
            continue
        steps = [pool[(first + i) % len(pool)] for pool in map(shorter_half, answers)]
        response = decomposed_trace(
            [part.plan for part in parts[problem.id]], steps, [final_answer(text) for text in steps]
        )
        kept.append(
            {
                "id": f"{problem.id}/decomposed",
                "problem_id": problem.id,
                "problem": problem.problem,
                "answer": problem.answer,
                "response": response,
                "reward": 1.0,
                "kind": "decomposed",
                "source": problem.source,
                "model": config.model,
                "seed": config.seed,
            }
        )
    counts["problems_with_kept"] += len(kept)
    counts["traces"] += len(kept)
    return kept


def run_sample(config: SampleConfig, out_dir: Path, command: str = "", progress=None) -> dict[str, Any]:
    """Sample, filter, write ``out_dir/data.jsonl`` and ``summary.json``; returns the summary.

    ``progress(done, total)`` is called after each batch with this process's problem counts.
    """
    from npr.train.session import make_accelerator, set_cpu_threads

    problems = load_train_problems(config.train_data, config.train_limit)
    set_cpu_threads(config.cpu_threads)
    accelerator = make_accelerator()
    model, tokenizer = load_model_and_tokenizer(
        config.model, dtype=config.rollout_dtype or "float32", device=accelerator.device
    )
    worker = RolloutWorker(model, tokenizer, config, mode=config.rollout_mode)
    per_rank = -(-len(problems) // accelerator.num_processes)
    start = accelerator.process_index * per_rank
    mine = problems[start : start + per_rank]
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / f".{SAMPLE_FILE}.rank{accelerator.process_index}"
    counts, format_errors = Counter(), Counter()
    decompose = config.wrap and config.wrap_mode == "decompose"
    try:
        with part.open("w", encoding="utf-8") as f:
            if decompose:
                for record in decompose_wrap(worker, tokenizer, mine, start, config, counts):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                sample = _sample_until_kept if config.stop_when_kept else _sample_all_tries
                sample(worker, tokenizer, mine, start, config, counts, format_errors, f, progress)
    except BaseException:  # a full disk or Ctrl-C: a part is of no use to a later run (it starts afresh)
        part.unlink(missing_ok=True)
        raise
    keys = ["samples", "correct", "format_valid", "problems_with_kept", "traces", *DROP_REASONS]
    totals = dict(zip(keys, global_sum(accelerator, [float(counts[k]) for k in keys])))
    accelerator.wait_for_everyone()
    summary = _summary(totals, format_errors, len(problems), config)
    if accelerator.is_main_process:
        _merge_parts(out_dir, accelerator.num_processes)
        atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        atomic_write_text(out_dir / "config.yaml", config_to_yaml(config, f"npr sample: resolved config\n{command}"))
    accelerator.wait_for_everyone()
    return summary


def _sample_all_tries(
    worker: RolloutWorker,
    tokenizer,
    problems: Sequence[Problem],
    first: int,
    config: SampleConfig,
    counts: Counter,
    format_errors: Counter,
    sink,
    progress,
) -> None:
    """All ``tries`` of ``prompts_per_batch`` problems at a time; kept records go to ``sink``."""
    options = config.prompt_options()
    for lo in range(0, len(problems), config.prompts_per_batch):
        batch = problems[lo : lo + config.prompts_per_batch]
        prompts = [encode_prompt(tokenizer, p.problem, config.prompt_style, **options) for p in batch]
        results = worker.generate(prompts, first + lo, worker.sampling_params(config.tries, config.seed))
        for record in select(results, batch, first + lo, config, counts, format_errors):
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        if progress is not None:
            progress(len(batch), len(problems))


# Seeds of try t of problem i in stop_when_kept rounds: the engine seeds a prompt from seed + its index, so
# the index i + t * TRY_STRIDE gives every (problem, try) its own draw, whatever the round it runs in.
TRY_STRIDE = 1 << 24


def _generate_indexed(
    worker: RolloutWorker, prompts: Sequence[Sequence[int]], indices: Sequence[int], params
) -> list[Result]:
    """``worker.generate`` with explicit prompt indices (which key the results and the seeds)."""
    model = worker.model
    was_training = model.training
    model.eval()
    try:
        worker.engine.submit([list(p) for p in prompts], params, prompt_indices=list(indices))
        results: list[Result] = []
        while worker.engine.scheduler.has_work():
            results += worker.engine.step().finished
    finally:
        model.train(was_training)
    return results


def _sample_until_kept(
    worker: RolloutWorker,
    tokenizer,
    problems: Sequence[Problem],
    first: int,
    config: SampleConfig,
    counts: Counter,
    format_errors: Counter,
    sink,
    progress,
) -> None:
    """Rounds of one try per open problem (at most ``prompts_per_batch`` open at once, refilled as
    problems close); a problem closes with ``max_kept_per_problem`` accepted samples or after
    ``tries`` tries. Writes kept records to ``sink`` as they come (NPR's rejection_sampling.py loop)."""
    if len(problems) >= TRY_STRIDE:
        raise ValueError(f"stop_when_kept samples at most {TRY_STRIDE - 1} problems per process")
    options = config.prompt_options()
    encoded = [encode_prompt(tokenizer, p.problem, config.prompt_style, **options) for p in problems]
    params = worker.sampling_params(1, config.seed)
    kept, waiting, tries = Counter(), list(range(len(problems)))[::-1], {}  # tries: open problem -> tries drawn
    while waiting or tries:
        while waiting and len(tries) < config.prompts_per_batch:
            tries[waiting.pop()] = 0
        open_now = sorted(tries)
        key = {first + j + tries[j] * TRY_STRIDE: j for j in open_now}
        results = _generate_indexed(worker, [encoded[j] for j in open_now], list(key), params)
        decoded = sorted(
            (
                dataclasses.replace(
                    r, prompt_index=first + key[r.prompt_index], sample_index=tries[key[r.prompt_index]]
                )
                for r in results
            ),
            key=lambda r: r.prompt_index,
        )
        for record in select(decoded, problems, first, config, counts, format_errors, per_problem=kept):
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        closed = 0
        for j in open_now:
            tries[j] += 1
            if kept[problems[j].id] >= config.max_kept_per_problem or tries[j] >= config.tries:
                del tries[j]
                closed += 1
        if progress is not None and closed:
            progress(closed, len(problems))
    counts["problems_with_kept"] += sum(1 for n in kept.values() if n)


def _summary(totals: dict[str, float], format_errors: Counter, num_problems: int, config: SampleConfig) -> dict:
    samples = max(totals["samples"], 1.0)
    dropped = {k: int(totals[k]) for k in DROP_REASONS}
    decomposed = config.wrap and config.wrap_mode == "decompose"  # kept counts traces, samples count part answers
    kept = int(totals["traces"]) if decomposed else int(totals["samples"]) - sum(dropped.values())
    return {
        "problems": num_problems,
        "samples": int(totals["samples"]),
        "kept": kept,
        "dropped": dropped,
        "problems_with_kept": int(totals["problems_with_kept"]),
        "format_valid_rate": totals["format_valid"] / samples,
        "accuracy": totals["correct"] / samples,
        "format_errors_main_process": dict(format_errors.most_common()),
        "tries": config.tries,
        "model": config.model,
        **({"wrap_mode": "decompose"} if decomposed else {}),
    }


def _merge_parts(out_dir: Path, num_processes: int) -> None:
    """Concatenate the per-process parts, in process (= problem) order, into data.jsonl (atomically:
    a kill leaves the previous data.jsonl or the complete new one, never a part of it)."""
    parts = [out_dir / f".{SAMPLE_FILE}.rank{rank}" for rank in range(num_processes)]
    try:
        atomic_write_text(out_dir / SAMPLE_FILE, "".join(part.read_text(encoding="utf-8") for part in parts))
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
