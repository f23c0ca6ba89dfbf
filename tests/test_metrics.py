"""npr.eval.metrics: every value below is computed by hand in the comment beside it."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npr.eval import metrics as m

T, F = True, False


# -- accuracy ---------------------------------------------------------------------------------


def test_avg_at_k():
    assert m.avg_at_k([[T, F], [T, T]]) == 0.75  # (1/2 + 2/2) / 2
    assert m.avg_at_k([[T], [F, F, F, T]]) == 0.625  # per-problem first: (1 + 1/4) / 2, not pooled 2/5
    with pytest.raises(ValueError):
        m.avg_at_k([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        m.avg_at_k([[T], []])


def test_pass_at_k_hand_values():
    assert m.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert m.pass_at_k(4, 1, 1) == pytest.approx(0.25)  # 1 - C(3,1)/C(4,1)
    assert m.pass_at_k(4, 0, 2) == 0.0
    assert m.pass_at_k(3, 2, 2) == 1.0  # n - c = 1 < k = 2: every pair holds a correct one
    assert m.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(ValueError):
            m.pass_at_k(*bad)


@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_the_binomial_formula(nck):
    n, c, k = nck
    assert m.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_best_at_k():
    # problem 1: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; problem 2: 0 → mean 0.25
    assert m.best_at_k([[T, F, F, F], [F, F, F, F]], 2) == pytest.approx(0.25)
    assert m.best_at_k([[T, F], [F, F]], 1) == pytest.approx(m.avg_at_k([[T, F], [F, F]]))  # best@1 = avg
    with pytest.raises(ValueError, match="fewer than k=3"):
        m.best_at_k([[T, F]], 3)


# -- parallel structure -----------------------------------------------------------------------

ENGINE = [
    {"parallel_blocks": 1, "branches_per_block": [2]},
    {"parallel_blocks": 2, "branches_per_block": [1, 3]},
    {"parallel_blocks": 1, "branches_per_block": [1]},  # one plan, one branch: triggered, not multi
    {"parallel_blocks": 0, "branches_per_block": []},
]


def test_trigger_and_branch_metrics_on_engine_records():
    assert m.trigger_rate(ENGINE) == 0.75  # 3 of 4 have ≥1 parallel block
    assert m.multi_branch_rate(ENGINE) == 0.5  # 2 of 4 have a block of ≥2 branches
    assert m.blocks_per_sample(ENGINE) == 1.0  # (1 + 2 + 1 + 0) / 4
    assert m.branch_histogram(ENGINE) == {1: 2, 2: 1, 3: 1}
    assert m.branches_per_block(ENGINE) == 1.75  # (2 + 1 + 3 + 1) / 4 blocks


def test_trace_stands_in_without_engine_fields_and_unknowns_leave_the_denominator():
    text_only = {"trace": {"blocks": [{"steps": [{}, {}, {}]}, {"steps": []}]}}  # one 3-step block
    assert m.block_branch_counts(text_only) == [3]
    records = [text_only, {"parallel_blocks": 0}, {"output": "no trace, no engine fields"}]
    assert m.trigger_rate(records) == 0.5  # the third record is unknown: 1 of 2
    assert m.multi_branch_rate(records) == 0.5
    assert m.branches_per_block([{"parallel_blocks": 0}]) is None  # no blocks: undefined, not 0
    assert m.parallel_block_count({"parallel_blocks": 2}) == 2 and m.block_branch_counts({"parallel_blocks": 2}) is None
    assert m.trigger_rate([]) is None


def test_format_and_invalid_schema_rates():
    records = [
        {"format_valid": T, "finish_reason": "eos"},
        {"format_valid": F, "finish_reason": "invalid_schema", "diagnostic": {"kind": "too_many_plans"}},
        {"format_valid": T, "finish_reason": "invalid_schema", "diagnostic": "plan_step_mismatch: 2 plans, 1 step"},
        {"finish_reason": "invalid_schema", "diagnostic": None},
    ]
    assert m.format_valid_rate(records) == pytest.approx(2 / 3)  # the 4th has no format_valid
    assert m.invalid_schema_rate(records) == 0.75
    assert m.invalid_schema_reasons(records) == {"too_many_plans": 1, "plan_step_mismatch": 1, "unknown": 1}


# -- decomposition --------------------------------------------------------------------------------


def traced(plans: list[str], steps: list[str], size: int | None = None, **extra) -> dict:
    """A record with one parsed block (the layout of ParallelTrace.to_dict) and its engine counts."""
    block = {
        "plans": [{"label": i + 1, "text": t} for i, t in enumerate(plans)],
        "steps": [{"label": i + 1, "text": t} for i, t in enumerate(steps)],
        "takeaway": "t",
    }
    return {
        "trace": {"blocks": [block]},
        "parallel_blocks": 1,
        "branches_per_block": [len(steps)],
        "size": size,
        **extra,
    }


TEMPLATE = [
    traced(["solve the problem directly", "solve it again on its own, as a check"], ["5 - 9 = -4", "So 5 - 9 is -4"])
    for _ in range(4)
]
DECOMPOSED = [
    traced(["compute 3 + 4", "compute 9 - 5"], ["3 + 4 = 7", "9 - 5 = 4"], size=2),
    traced(["compute 3 + 4", "compute 9 - 5"], ["3 + 4 = 7", "9 - 5 = 7"], size=2),  # same result: redundant
    traced(["Compute  2 + 6", "compute 1 + 1", "compute 8 - 8"], ["8", "2", "it is zero"], size=3),
    traced(["2: compute 5 + 5"], ["10"], size=1),  # one branch: no redundancy question
]


def test_plan_diversity_and_off_mode_share_by_hand():
    assert m.normalize_plan("2:  Compute 3 +  4 ") == "compute 3 + 4"
    # the template: 2 distinct texts over 8 plans; every sample writes the most common set
    assert m.plan_diversity(TEMPLATE) == 2 / 8 and m.off_mode_plan_rate(TEMPLATE) == 0.0
    assert m.distinct_plan_count(TEMPLATE) == 2
    # decomposed: plans {3+4, 9-5, 2+6, 1+1, 8-8, 5+5} = 6 distinct over 2+2+3+1 = 8 plans; the most common set
    # ("compute 3 + 4", "compute 9 - 5") is written by 2 of 4 samples, so 2 of 4 differ from it
    assert m.plan_diversity(DECOMPOSED) == 6 / 8 and m.off_mode_plan_rate(DECOMPOSED) == 0.5
    assert m.distinct_plan_count(DECOMPOSED) == 6
    assert m.plan_diversity([{"parallel_blocks": 0}]) is None and m.off_mode_plan_rate([]) is None


def test_branch_redundancy_by_hand():
    assert m.branch_result("so 5 - 9 is -4.") == "-4" and m.branch_result("a total of 1,200") == "1200"
    assert m.branch_result("4.0") == "4" and m.branch_result("It is Zero\n\n") == "it is zero"
    assert m.branch_redundancy(TEMPLATE) == 1.0  # both branches reach -4 in all 4 blocks
    # blocks with ≥2 branches: sample 1 (7 vs 4), 2 (7 vs 7: redundant), 3 (8, 2, "it is zero"); sample 4 has one
    assert m.redundant_block_counts(DECOMPOSED) == (1, 3) and m.branch_redundancy(DECOMPOSED) == pytest.approx(1 / 3)
    assert m.branch_redundancy(DECOMPOSED[3:]) is None


def test_adaptivity_by_hand():
    # size → branches: 2 → [2, 2], 3 → [3], 1 → [1]
    assert m.branches_by_size(DECOMPOSED) == {1: 1.0, 2: 2.0, 3: 3.0}
    assert m.size_branch_correlation(DECOMPOSED) == pytest.approx(1.0)  # branches = size exactly
    # sizes (2, 2, 3, 3) against widths (2, 3, 2, 3): no linear relation
    mixed = [traced(["a"] * w, [str(i) for i in range(w)], size=s) for s, w in [(2, 2), (2, 3), (3, 2), (3, 3)]]
    assert m.size_branch_correlation(mixed) == pytest.approx(0.0)
    assert m.size_branch_correlation(TEMPLATE) is None  # no sizes
    assert (
        m.size_branch_correlation([traced(["a", "b"], ["1", "2"], size=s) for s in (2, 3, 4)]) is None
    )  # width constant
    # widths 2, 2, 3, 1: mean 2, variance (0 + 0 + 1 + 1) / 4 = 0.5
    assert m.branch_count_spread(DECOMPOSED) == pytest.approx(math.sqrt(0.5))
    assert m.branch_count_spread(TEMPLATE) == 0.0 and m.branch_count_spread([]) is None
    assert m.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)  # by hand: 5 / sqrt(2 * 12.667)
    with pytest.raises(ValueError):
        m.pearson([1, 2], [1])


def test_summary_carries_the_decomposition_metrics():
    group = m.summarize(DECOMPOSED)["overall"]
    assert group["plan_diversity"] == 6 / 8 and group["branch_redundancy"] == pytest.approx(1 / 3)
    assert group["distinct_plans"] == 6 and group["off_mode_plan_rate"] == 0.5
    assert group["branches_by_size"] == {1: 1.0, 2: 2.0, 3: 3.0} and group["size_branch_correlation"] == pytest.approx(
        1
    )


# -- speed ----------------------------------------------------------------------------------------


def test_speed_functions():
    assert m.tokens_per_second(600, 4.0) == 150.0
    assert m.tokens_per_second(600, 0) is None and m.tokens_per_second(None, 3) is None
    assert m.token_latency_ratio(600, 200) == 3.0 and m.token_latency_ratio(600, 0) is None
    assert m.speedup(30.0, 12.0) == 2.5 and m.speedup(None, 12.0) is None
    assert m.tps_ratio(150.0, 100.0) == 1.5 and m.tps_ratio(150.0, None) is None


def test_median_and_speed_part_by_hand():
    assert m.median([3.0, 1.0, 2.0]) == 2.0 and m.median([4.0, 1.0, 2.0, 3.0]) == 2.5 and m.median([]) is None
    rounds = [
        {"wall_s": 10.0, "baseline_wall_s": 13.0, "tokens": 300, "critical_path_tokens": 200},
        {"wall_s": 10.0, "baseline_wall_s": 11.0, "tokens": 300, "critical_path_tokens": 200},
        {"wall_s": 8.0, "baseline_wall_s": 12.0, "tokens": 300, "critical_path_tokens": 200},
    ]
    part = m.speed_part(rounds)
    assert part["speedups"] == pytest.approx([1.3, 1.1, 1.5])  # 13/10, 11/10, 12/8
    assert part["speedup_median"] == pytest.approx(1.3)
    assert (part["speedup_min"], part["speedup_max"]) == pytest.approx((1.1, 1.5))
    assert part["ideal"] == 1.5  # 900 / 600
    empty = m.speed_part([])
    assert empty["speedup_median"] is None and empty["ideal"] is None


# -- aggregation ----------------------------------------------------------------------------------


def rec(bench, pid, correct, tokens, critical, wall, **extra):
    return {
        "benchmark": bench,
        "problem_id": pid,
        "correct": correct,
        "tokens": tokens,
        "critical_path_tokens": critical,
        "wall_time_s": wall,
        "format_valid": True,
        "finish_reason": "eos",
        "parallel_blocks": 1,
        "branches_per_block": [2],
        **extra,
    }


RUN = [
    rec("a", "1", T, 100, 50, 1.0),
    rec("a", "1", F, 200, 100, 1.0),
    rec("a", "2", F, 300, 100, 1.0),
    rec("a", "2", F, 100, 50, 1.0),
    rec("b", "1", T, 400, 200, 2.0),
    rec("b", "1", T, 0, 0, 2.0),
]


def test_summarize_per_benchmark_and_overall():
    result = m.summarize(RUN, wall_time_s={"a": 2.0, "b": 4.0})
    a, b, overall = result["benchmarks"]["a"], result["benchmarks"]["b"], result["overall"]
    assert (a["samples"], a["problems"], a["k"]) == (4, 2, 2)
    assert a["avg_at_k"] == 0.25  # (1/2 + 0/2) / 2
    assert a["best_at_k"] == 0.5  # pass@2: problem 1 → 1, problem 2 → 0
    assert b["avg_at_k"] == 1.0
    assert a["tokens"] == 700 and a["critical_path_tokens"] == 300
    assert a["token_latency_ratio"] == pytest.approx(700 / 300)
    assert b["token_latency_ratio"] == 2.0  # the 0-critical-path record is left out: 400 / 200
    assert a["tokens_per_second"] == 350.0 and a["wall_source"] == "runner"  # 700 tokens / 2 s
    assert overall["avg_at_k"] == 0.625  # mean over benchmarks: (0.25 + 1.0) / 2
    assert overall["best_at_k"] == 0.75  # (0.5 + 1.0) / 2
    assert overall["wall_time_s"] == 6.0 and overall["tokens_per_second"] == pytest.approx(1100 / 6)
    assert overall["trigger_rate"] == 1.0 and overall["branch_histogram"] == {2: 6}
    assert a["speedup"] is None and a["baseline_matches"] is None


def test_summarize_without_runner_wall_time_sums_the_samples():
    group = m.summarize(RUN)["benchmarks"]["a"]
    assert group["wall_time_s"] == 4.0 and group["wall_source"] == "sum_of_samples"


def test_summarize_against_a_baseline():
    baseline = m.summarize([dict(r, tokens=r["tokens"] // 2) for r in RUN], wall_time_s={"a": 5.0, "b": 4.0})
    result = m.summarize(RUN, wall_time_s={"a": 2.0, "b": 4.0}, baseline=baseline)
    a, b = result["benchmarks"]["a"], result["benchmarks"]["b"]
    assert a["speedup"] == 2.5  # 5 s / 2 s
    assert a["tps_ratio"] == pytest.approx(350 / 70)  # run 700/2 tok/s vs baseline 350/5 tok/s
    assert b["speedup"] == 1.0
    assert result["overall"]["speedup"] == pytest.approx(9.0 / 6.0)
    other = m.summarize([r for r in RUN if r["problem_id"] == "1"], wall_time_s={"a": 1.0, "b": 4.0}, baseline=baseline)
    assert other["benchmarks"]["a"]["speedup"] is None and other["benchmarks"]["a"]["baseline_matches"] is False


def test_problem_set_digest_ignores_order_and_repeats():
    assert m.problem_set_digest(RUN) == m.problem_set_digest(list(reversed(RUN)) + RUN[:1])
    assert m.problem_set_digest(RUN) != m.problem_set_digest(RUN[:4])
