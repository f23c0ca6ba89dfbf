"""Evaluation metrics: accuracy, parallelism and speed. Pure functions, stdlib only.

Every function reads plain data: lists of booleans, counts, or *sample records* (one dict per
sampled response, the lines of ``samples.jsonl``). The record fields read here:

``benchmark``, ``problem_id``, ``size`` (int: the problem's number of independent parts, when the
task has one), ``correct`` (bool; missing = wrong), ``format_valid`` (bool),
``finish_reason`` (``"invalid_schema"`` counts as a schema failure), ``diagnostic`` (why),
``parallel_blocks`` (int), ``branches_per_block`` (list[int]), ``trace`` (``ParallelTrace.to_dict()``,
only as a stand-in when the engine fields are absent), ``tokens``, ``critical_path_tokens``,
``wall_time_s``, ``cells`` ([right, total]: grid-mode ZebraLogic only).

A record that lacks the field a rate needs is left out of that rate's denominator, and a value
that cannot be computed (no samples, no blocks, zero time) is None, never a made-up 0.

Parallel metrics (NPR, arXiv 2512.07461 §4: "parallel reasoning trigger rate"):

- A block is *executed in parallel* when the engine forked it into ≥1 branch; the record's
  ``parallel_blocks`` counts those blocks and ``branches_per_block`` lists their branch counts.
- **trigger rate**: share of samples with ``parallel_blocks ≥ 1``. A single-plan block executed
  as one branch counts: the model engaged parallel mode, even if it chose width 1.
- **multi-branch rate**: share of samples with a block of ≥ 2 branches (real parallelism).
- For records without engine fields (a trace read from text, e.g. Multiverse), the parsed
  trace's blocks stand in for executed ones.

Decomposition (our additions, not the paper's; docs/evaluation.md): plan diversity (distinct
plan texts / all plans), the off-mode plan rate (samples whose plans differ from the most common
plan set), branch redundancy (multi-branch blocks whose branches all reach the same result),
branches per block by problem ``size`` and their correlation. They read ``trace`` and ``size``.

Speed (run-level totals, because in batched decoding per-sample wall times overlap and do not
add up): tokens/s = all branch tokens / run wall time; the token-latency ratio = total tokens /
critical-path tokens is the ideal speedup of parallel decoding over sequential; the wall-clock
speedup of a run over a baseline run of the same problems = baseline wall / run wall; over
repeated, alternated timing rounds, ``speed_part`` reports its median, min and max.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

# -- accuracy -------------------------------------------------------------------------------


def avg_at_k(correct_per_problem: list[list[bool]]) -> float:
    """avg@k: the mean over problems of each problem's share of correct samples.

    With the same k for every problem this is the accuracy over all samples (the pass@1
    estimate from k samples). Raises ValueError on no problems or a problem with no samples.
    """
    if not correct_per_problem:
        raise ValueError("avg_at_k needs at least one problem")
    shares = []
    for i, samples in enumerate(correct_per_problem):
        if not samples:
            raise ValueError(f"avg_at_k: problem {i} has no samples")
        shares.append(sum(bool(c) for c in samples) / len(samples))
    return sum(shares) / len(shares)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k).

    Computed as 1 − Π_{i=n−c+1..n} (1 − k/i), which avoids huge binomials (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code", the Codex paper). Needs 0 ≤ c ≤ n, 1 ≤ k ≤ n.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def best_at_k(correct_per_problem: list[list[bool]], k: int) -> float:
    """best@k: the mean over problems of ``pass_at_k(n_i, c_i, k)`` (needs k ≤ every n_i)."""
    if not correct_per_problem:
        raise ValueError("best_at_k needs at least one problem")
    values = []
    for i, samples in enumerate(correct_per_problem):
        if k > len(samples):
            raise ValueError(f"best_at_k: problem {i} has {len(samples)} samples, fewer than k={k}")
        values.append(pass_at_k(len(samples), sum(bool(s) for s in samples), k))
    return sum(values) / len(values)


def correct_by_problem(records: list[dict]) -> dict[tuple[str, str], list[bool]]:
    """(benchmark, problem id) → the ``correct`` flags of its samples, in first-seen order.

    The problem id falls back to the problem text when ``problem_id`` is missing.
    """
    groups: dict[tuple[str, str], list[bool]] = {}
    for r in records:
        key = (str(r.get("benchmark", "")), str(r.get("problem_id", r.get("problem", ""))))
        groups.setdefault(key, []).append(bool(r.get("correct")))
    return groups


def problem_set_digest(records: list[dict]) -> str:
    """A short fingerprint of the set of (benchmark, problem id) pairs, to check that a run and
    its baseline covered the same problems."""
    keys = sorted({f"{b}\x1f{p}" for b, p in correct_by_problem(records)})
    return hashlib.sha1("\x1e".join(keys).encode()).hexdigest()[:12]


# -- parallel structure ---------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def block_branch_counts(record: dict) -> list[int] | None:
    """Branches of each block the engine executed in parallel, or None when unknown.

    ``branches_per_block`` if present; ``[]`` when ``parallel_blocks`` is 0; otherwise the
    step counts of the trace's blocks (a text-only trace) or None without a trace.
    """
    counts = record.get("branches_per_block")
    if isinstance(counts, list):
        return [int(c) for c in counts if int(c) >= 1]
    if record.get("parallel_blocks") == 0:
        return []
    trace = record.get("trace")
    if isinstance(trace, dict) and "parallel_blocks" not in record:
        return [len(b.get("steps", [])) for b in trace.get("blocks", []) if b.get("steps")]
    return None


def parallel_block_count(record: dict) -> int | None:
    """Blocks executed with ≥1 forked branch: ``parallel_blocks``, else ``block_branch_counts``'s length."""
    if isinstance(record.get("parallel_blocks"), int):
        return record["parallel_blocks"]
    counts = block_branch_counts(record)
    return None if counts is None else len(counts)


def trigger_rate(records: list[dict]) -> float | None:
    """Share of samples in which the engine executed ≥1 block as parallel branches (width 1 included)."""
    return _share([n >= 1 for r in records if (n := parallel_block_count(r)) is not None])


def multi_branch_rate(records: list[dict]) -> float | None:
    """Share of samples with at least one executed block of ≥ 2 branches."""
    return _share([any(c >= 2 for c in counts) for r in records if (counts := block_branch_counts(r)) is not None])


def blocks_per_sample(records: list[dict]) -> float | None:
    """Mean number of parallel-executed blocks per sample (samples without blocks count as 0)."""
    return _mean([n for r in records if (n := parallel_block_count(r)) is not None])


def branch_histogram(records: list[dict]) -> dict[int, int]:
    """Branch count → number of executed blocks with that many branches, sorted by branch count."""
    counts = Counter(c for r in records for c in (block_branch_counts(r) or []))
    return dict(sorted(counts.items()))


def branches_per_block(records: list[dict]) -> float | None:
    """Mean branches per executed block, pooled over all blocks of all samples."""
    histogram = branch_histogram(records)
    blocks = sum(histogram.values())
    return sum(c * n for c, n in histogram.items()) / blocks if blocks else None


def format_valid_rate(records: list[dict]) -> float | None:
    """Share of samples whose output passes ``npr.schema.validate`` (``format_valid``)."""
    return _share([bool(r["format_valid"]) for r in records if r.get("format_valid") is not None])


def diagnostic_kind(diagnostic) -> str:
    """The kind of a ``diagnostic``: a dict's ``kind``, or a string's text before the first ':'."""
    if isinstance(diagnostic, dict):
        return str(diagnostic.get("kind") or "unknown")
    if isinstance(diagnostic, str) and diagnostic.strip():
        return diagnostic.split(":", 1)[0].strip() or "unknown"
    return "unknown"


def invalid_schema_rate(records: list[dict]) -> float | None:
    """Share of samples the engine stopped with ``finish_reason == "invalid_schema"``."""
    return _share([r.get("finish_reason") == "invalid_schema" for r in records])


def invalid_schema_reasons(records: list[dict]) -> dict[str, int]:
    """Diagnostic kind → count, over the ``invalid_schema`` samples, most frequent first."""
    counts = Counter(
        diagnostic_kind(r.get("diagnostic")) for r in records if r.get("finish_reason") == "invalid_schema"
    )
    return dict(counts.most_common())


# -- decomposition (our additions; the NPR paper defines none of these) -----------------------
#
# A template can trigger parallel mode in every sample while every branch redoes the same work.
# These metrics tell decomposition from duplication; docs/evaluation.md defines them.

_PLAN_LABEL = re.compile(r"^\s*\d+\s*[:.]\s*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_plan(text: str) -> str:
    """A plan's text for comparison: numbering (``2:``) stripped, lower case, whitespace collapsed."""
    return " ".join(_PLAN_LABEL.sub("", str(text)).lower().split())


def _trace_blocks(record: dict) -> list[dict]:
    trace = record.get("trace")
    return [b for b in trace.get("blocks", []) if isinstance(b, dict)] if isinstance(trace, dict) else []


def sample_plans(record: dict) -> tuple[str, ...]:
    """Every plan of a sample's parsed trace, in order, normalised (``normalize_plan``); () without plans."""
    return tuple(normalize_plan(p.get("text", "")) for b in _trace_blocks(record) for p in b.get("plans", []))


def distinct_plan_count(records: list[dict]) -> int:
    """How many different plan texts (normalised) the samples wrote, over all their plans."""
    return len({plan for r in records for plan in sample_plans(r)})


def plan_diversity(records: list[dict]) -> float | None:
    """Distinct plan texts / all plans, over every plan of every sample (numbering stripped).

    1.0: no plan text ever repeats; 1/N: one text written N times. None without plans.
    """
    plans = [plan for r in records for plan in sample_plans(r)]
    return len(set(plans)) / len(plans) if plans else None


def off_mode_plan_rate(records: list[dict]) -> float | None:
    """Share of samples (with plans) whose plan set differs from the most common plan set.

    A sample's plan set is the ordered tuple of its normalised plans. 0.0: every sample writes
    the same plans (a template); near 1.0: plans follow the problem. None without plans.
    """
    sets = [plans for r in records if (plans := sample_plans(r))]
    if not sets:
        return None
    most_common = Counter(sets).most_common(1)[0][1]
    return (len(sets) - most_common) / len(sets)


def branch_result(text: str) -> str:
    """What a branch reached: its last number (``-3``, ``2.5``; ``4.0`` reads as ``4``), else its
    last non-empty line, lower case with whitespace collapsed."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    if numbers:
        value = float(numbers[-1])
        return str(int(value)) if value.is_integer() else repr(value)
    lines = [" ".join(line.lower().split()) for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def redundant_block_counts(records: list[dict]) -> tuple[int, int]:
    """(blocks whose branches all reach the same result, blocks with ≥ 2 branches), over the
    parsed traces' blocks; a branch's result is ``branch_result`` of its step text."""
    redundant = multi = 0
    for r in records:
        for block in _trace_blocks(r):
            results = [branch_result(s.get("text", "")) for s in block.get("steps", [])]
            if len(results) >= 2:
                multi += 1
                redundant += len(set(results)) == 1
    return redundant, multi


def branch_redundancy(records: list[dict]) -> float | None:
    """Share of blocks with ≥ 2 branches whose branches all reach the same final number or line.

    1.0: every branch duplicates its siblings (e.g. solving the whole problem twice); 0.0: in
    every block the branches produce different intermediate results. None without such blocks.
    """
    redundant, multi = redundant_block_counts(records)
    return redundant / multi if multi else None


def sample_size(record: dict) -> int | None:
    """The problem's size (``size``: its number of independent sub-problems), when the task has one."""
    size = record.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def branches_by_size(records: list[dict]) -> dict[int, float]:
    """Problem size → mean branches per executed block over the samples of that size, sorted by size."""
    pooled: dict[int, list[int]] = {}
    for r in records:
        size, counts = sample_size(r), block_branch_counts(r)
        if size is not None and counts:
            pooled.setdefault(size, []).extend(counts)
    return {size: sum(c) / len(c) for size, c in sorted(pooled.items())}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's correlation coefficient; None for fewer than 2 pairs or a constant side."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson needs equal lengths, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def size_branch_correlation(records: list[dict]) -> float | None:
    """Pearson's r between a sample's problem size and its mean branches per executed block, over
    samples with both. 1.0: the model opens more branches for bigger problems. None when the task
    has no size, fewer than 2 samples qualify, or either side is constant (e.g. always 2 branches)."""
    pairs = [
        (size, sum(c) / len(c))
        for r in records
        if (size := sample_size(r)) is not None and (c := block_branch_counts(r))
    ]
    return pearson([float(s) for s, _ in pairs], [b for _, b in pairs])


def branch_count_spread(records: list[dict]) -> float | None:
    """Population standard deviation of branches per executed block: 0.0 when every block has the
    same width (a fixed template); None without blocks."""
    histogram = branch_histogram(records)
    blocks = sum(histogram.values())
    if not blocks:
        return None
    mean = sum(c * n for c, n in histogram.items()) / blocks
    return math.sqrt(sum(n * (c - mean) ** 2 for c, n in histogram.items()) / blocks)


# -- speed ----------------------------------------------------------------------------------


def tokens_per_second(tokens: float | None, wall_time_s: float | None) -> float | None:
    """Decoding throughput: all generated tokens (every branch) / run wall time."""
    if tokens is None or not wall_time_s or wall_time_s <= 0:
        return None
    return tokens / wall_time_s


def token_latency_ratio(tokens: float | None, critical_path_tokens: float | None) -> float | None:
    """Total tokens / critical-path tokens: the speedup an ideal parallel decoder would get."""
    if tokens is None or not critical_path_tokens:
        return None
    return tokens / critical_path_tokens


def speedup(baseline_wall_s: float | None, run_wall_s: float | None) -> float | None:
    """Wall-clock speedup of a run over a baseline on the same problems: baseline wall / run wall."""
    if not baseline_wall_s or not run_wall_s or run_wall_s <= 0:
        return None
    return baseline_wall_s / run_wall_s


def tps_ratio(run_tps: float | None, baseline_tps: float | None) -> float | None:
    """Throughput of a run relative to its baseline: run tokens/s ÷ baseline tokens/s."""
    if run_tps is None or not baseline_tps:
        return None
    return run_tps / baseline_tps


def median(values: list[float]) -> float | None:
    """The median (the mean of the two middle values for an even count); None for no values."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return None
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def speed_part(rounds: list[dict]) -> dict:
    """Speedup over repeated, alternated timing rounds of a run and its baseline.

    Each round: ``wall_s`` (this mode), ``baseline_wall_s``, ``tokens`` and
    ``critical_path_tokens`` (this mode's results). Returns the per-round ``speedups``
    (baseline wall / wall), their ``speedup_median``, ``speedup_min`` and ``speedup_max``, and
    the ``ideal`` speedup (total / critical-path tokens, pooled over rounds).
    """
    speedups = [v for r in rounds if (v := speedup(r.get("baseline_wall_s"), r.get("wall_s"))) is not None]
    return {
        "speedups": speedups,
        "speedup_median": median(speedups),
        "speedup_min": min(speedups) if speedups else None,
        "speedup_max": max(speedups) if speedups else None,
        "ideal": token_latency_ratio(
            sum(r.get("tokens") or 0 for r in rounds) or None, sum(r.get("critical_path_tokens") or 0 for r in rounds)
        ),
        "wall_s": [r.get("wall_s") for r in rounds],
        "baseline_wall_s": [r.get("baseline_wall_s") for r in rounds],
    }


def _number(record: dict, key: str) -> float | None:
    value = record.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _total(records: list[dict], key: str) -> float | None:
    values = [v for r in records if (v := _number(r, key)) is not None]
    return sum(values) if values else None


# -- aggregation ----------------------------------------------------------------------------


def cell_accuracy(records: list[dict]) -> float | None:
    """ZeroEval's cell accuracy of grid-mode ZebraLogic samples (records with ``cells`` = [right, total]): right
    cells over all cells, every sample counted; None when no record has cells. Puzzle accuracy is ``avg_at_k``."""
    cells = [r["cells"] for r in records if isinstance(r.get("cells"), list) and len(r["cells"]) == 2]
    total = sum(c[1] for c in cells)
    return sum(c[0] for c in cells) / total if total else None


def summarize_group(records: list[dict], wall_time_s: float | None = None) -> dict:
    """The metrics of one group of samples (a benchmark, or all of them) as a JSON-ready dict.

    ``wall_time_s`` is the group's run-level wall time from the runner; without it the sum of
    the samples' ``wall_time_s`` stands in (exact only for unbatched runs; ``wall_source`` says
    which was used).
    """
    groups = list(correct_by_problem(records).values())
    k = min(len(g) for g in groups) if groups else 0
    with_both = [r for r in records if _number(r, "tokens") is not None and _number(r, "critical_path_tokens")]
    wall_source = "runner"
    if wall_time_s is None:
        wall_time_s, wall_source = _total(records, "wall_time_s"), "sum_of_samples"
    tokens = _total(records, "tokens")
    return {
        "samples": len(records),
        "problems": len(groups),
        "k": k,
        "avg_at_k": avg_at_k(groups) if groups else None,
        "cell_accuracy": cell_accuracy(records),
        "best_at_k": best_at_k(groups, k) if groups else None,
        "format_valid_rate": format_valid_rate(records),
        "trigger_rate": trigger_rate(records),
        "multi_branch_rate": multi_branch_rate(records),
        "blocks_per_sample": blocks_per_sample(records),
        "branches_per_block": branches_per_block(records),
        "branch_histogram": branch_histogram(records),
        "plan_diversity": plan_diversity(records),
        "distinct_plans": distinct_plan_count(records),
        "off_mode_plan_rate": off_mode_plan_rate(records),
        "branch_redundancy": branch_redundancy(records),
        "branch_count_spread": branch_count_spread(records),
        "branches_by_size": branches_by_size(records),
        "size_branch_correlation": size_branch_correlation(records),
        "invalid_schema_rate": invalid_schema_rate(records),
        "invalid_schema_reasons": invalid_schema_reasons(records),
        "finish_reasons": dict(Counter(str(r.get("finish_reason")) for r in records).most_common()),
        "tokens": tokens,
        "critical_path_tokens": _total(records, "critical_path_tokens"),
        "token_latency_ratio": token_latency_ratio(
            _total(with_both, "tokens"), _total(with_both, "critical_path_tokens")
        ),
        "wall_time_s": wall_time_s,
        "wall_source": wall_source if wall_time_s is not None else None,
        "tokens_per_second": tokens_per_second(tokens, wall_time_s),
        "problem_set": problem_set_digest(records),
    }


def compare_to_baseline(group: dict, baseline_group: dict | None) -> dict:
    """``speedup`` and ``tps_ratio`` of a summarised group over the baseline's same group.

    Both are None when there is no baseline or it covered a different problem set.
    """
    same = baseline_group is not None and baseline_group.get("problem_set") == group.get("problem_set")
    return {
        "speedup": speedup(baseline_group.get("wall_time_s"), group.get("wall_time_s")) if same else None,
        "tps_ratio": tps_ratio(group.get("tokens_per_second"), baseline_group.get("tokens_per_second"))
        if same
        else None,
        "baseline_matches": same if baseline_group is not None else None,
    }


def _macro(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) / len(known) if known else None


def summarize(records: list[dict], wall_time_s: dict[str, float] | None = None, baseline: dict | None = None) -> dict:
    """Results per benchmark and overall: ``{"benchmarks": {name: group}, "overall": group}``.

    ``wall_time_s`` maps a benchmark name (and optionally ``"overall"``) to the runner's wall
    time. ``baseline`` is the ``summarize`` result of a baseline run (e.g. sequential decoding);
    each group then gains ``speedup`` and ``tps_ratio`` (None where the problem sets differ).
    Overall accuracy (``avg_at_k``, ``best_at_k``) is the mean over benchmarks, as papers report
    an "Avg." column; overall rates and token counts are pooled over all samples.
    """
    wall_time_s = wall_time_s or {}
    by_bench: dict[str, list[dict]] = {}
    for r in records:
        by_bench.setdefault(str(r.get("benchmark", "")), []).append(r)
    benchmarks = {name: summarize_group(rs, wall_time_s.get(name)) for name, rs in by_bench.items()}
    overall_wall = wall_time_s.get("overall")
    if overall_wall is None and benchmarks and all(g["wall_source"] == "runner" for g in benchmarks.values()):
        overall_wall = sum(g["wall_time_s"] for g in benchmarks.values())
    overall = summarize_group(records, overall_wall)
    overall["avg_at_k"] = _macro([g["avg_at_k"] for g in benchmarks.values()])
    overall["best_at_k"] = _macro([g["best_at_k"] for g in benchmarks.values()])
    base_benchmarks = (baseline or {}).get("benchmarks", {})
    for name, group in benchmarks.items():
        group.update(compare_to_baseline(group, base_benchmarks.get(name) if baseline else None))
    overall.update(compare_to_baseline(overall, baseline.get("overall") if baseline else None))
    return {"benchmarks": benchmarks, "overall": overall}
