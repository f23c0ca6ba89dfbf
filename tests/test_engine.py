"""The NPR engine on tiny random models: training-semantics parity, determinism, budget, guards, KV."""

from __future__ import annotations

import math

import pytest
import torch

from npr.engine import Engine, EngineConfig, EngineInputError, SamplingParams, StructureForcer
from npr.masks import attention_bias, parallel_mask_and_positions
from npr.schema import plan_label
from npr.tokens import tag_token_ids

PROMPTS = [[1, 72, 73, 74, 75, 2, 201], [1, 80, 81, 201]]


def make_engine(model_tok, mode="parallel", **kw) -> Engine:
    model, tok = model_tok
    kw.setdefault("kv_cache_tokens", 8192)
    return Engine(model, tok, EngineConfig(mode=mode, debug=True, **kw))


def forced(tok, branch_tokens=((5, 9, 3), (4, 4)), **kw) -> StructureForcer:
    return StructureForcer(tok, [list(b) for b in branch_tokens], **kw)


def flat_logprobs(model, tok, result):
    """Per-token log-probs of one training-style flat masked forward over the engine's output."""
    ids = torch.tensor(result.prompt_ids + result.token_ids)
    p = len(result.prompt_ids)
    allowed, positions = parallel_mask_and_positions(ids, tag_token_ids(tok), response_start=p)
    assert positions[p:].tolist() == result.position_ids
    with torch.no_grad():
        logits = (
            model(
                input_ids=ids[None],
                position_ids=positions[None],
                attention_mask=attention_bias(allowed, model.dtype)[None, None],
            )
            .logits[0]
            .float()
        )
    logp = torch.log_softmax(logits, -1)
    return [logp[p + i - 1, t].item() for i, t in enumerate(result.token_ids)]


# ----------------------------------------------------------------------------- parity with training


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen3"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_logprobs_equal_flat_masked_forward(which, mode, request):
    model, tok = request.getfixturevalue(which)
    engine = make_engine((model, tok), mode)
    params = SamplingParams(max_new_tokens=300, temperature=1.0, n=2, seed=3, logits_processors=(forced(tok),))
    results = engine.generate(PROMPTS, params)
    assert len(results) == 4 and all(r.finish_reason == "eos" for r in results)
    worst = 0.0
    for r in results:
        assert r.branches_per_block == [3, 2]
        flat = flat_logprobs(model, tok, r)
        worst = max(worst, max(abs(a - b) for a, b, s in zip(flat, r.logprobs, r.sampled) if s))
        assert all(math.isnan(lp) for lp, s in zip(r.logprobs, r.sampled) if not s)
    assert worst <= 1e-4, f"max abs diff {worst:.2e}"


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen3"])
def test_greedy_parallel_equals_sequential(which, request):
    model, tok = request.getfixturevalue(which)
    params = SamplingParams(max_new_tokens=300, temperature=0, logits_processors=(forced(tok),))
    par = make_engine((model, tok), "parallel").generate(PROMPTS, params)
    seq = make_engine((model, tok), "sequential").generate(PROMPTS, params)
    for a, b in zip(par, seq):
        assert a.token_ids == b.token_ids and a.position_ids == b.position_ids and a.text == b.text
        assert a.stats.generated_tokens == b.stats.generated_tokens
        assert a.stats.critical_path_tokens == b.stats.critical_path_tokens
        assert a.stats.forward_passes < b.stats.forward_passes  # branches overlap in parallel mode


def test_seeded_sampling_same_in_both_modes_and_any_batch(tiny_llama):
    model, tok = tiny_llama
    params = SamplingParams(
        max_new_tokens=300, temperature=1.0, top_p=0.9, top_k=50, seed=11, logits_processors=(forced(tok),)
    )
    par = make_engine(tiny_llama, "parallel").generate(PROMPTS, params)
    seq = make_engine(tiny_llama, "sequential").generate(PROMPTS, params)
    alone = make_engine(tiny_llama, "parallel").generate(PROMPTS[1:], params)
    assert [r.token_ids for r in par] == [r.token_ids for r in seq]
    # a prompt's samples do not depend on what else is in the batch (prompt index is part of the seed)
    again = make_engine(tiny_llama, "parallel").generate(PROMPTS, params)
    assert [r.token_ids for r in par] == [r.token_ids for r in again]
    assert alone[0].finish_reason == "eos"


def test_plain_mode_is_ordinary_decoding(tiny_llama):
    model, tok = tiny_llama

    def no_eos(stream, logits):
        logits[tok.eos_token_id] = float("-inf")
        return logits

    r = make_engine(tiny_llama, "plain").generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=0, logits_processors=(no_eos,))
    )[0]
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            suppress_tokens=[tok.eos_token_id],
        )[0, ids.shape[1] :].tolist()
    assert r.token_ids == expected
    assert r.position_ids == list(range(len(PROMPTS[0]), len(PROMPTS[0]) + 12))
    assert r.finish_reason == "length" and r.blocks == []


# ----------------------------------------------------------------------------- budget and stats


@pytest.mark.parametrize("budget", [40, 57, 58, 61, 75, 90])
def test_budget_counts_every_branch_token(tiny_llama, budget):
    _, tok = tiny_llama
    params = SamplingParams(max_new_tokens=budget, temperature=0, logits_processors=(forced(tok, [(20, 20, 20)]),))
    engine = make_engine(tiny_llama, "parallel", min_fork_budget=4)
    r = engine.generate([PROMPTS[0]], params)[0]
    assert r.stats.generated_tokens == len(r.token_ids) <= budget
    assert r.finish_reason == "length"
    assert engine.pool.used_blocks == 0


def test_stats_critical_path(tiny_llama):
    _, tok = tiny_llama
    r = make_engine(tiny_llama).generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=400, temperature=0, logits_processors=(forced(tok, [(5, 9, 3)]),))
    )[0]
    spans = r.blocks[0]
    lengths = [e - s for s, e in spans]
    assert lengths == [5 + 4 + 2, 9 + 4 + 2, 3 + 4 + 2]  # scaffold "<step>\nk:" (4) + text + "</step>\n"
    assert r.stats.critical_path_tokens == len(r.token_ids) - (sum(lengths) - max(lengths))
    assert r.stats.ideal_speedup == pytest.approx(len(r.token_ids) / r.stats.critical_path_tokens)
    assert r.stats.parallel_blocks == 1


# ----------------------------------------------------------------------------- guards


class Script:
    """Force an exact token sequence on the main line and on every branch (by block, branch)."""

    def __init__(self, main: list[int], branches: dict | None = None, eos: int | None = None):
        self.main, self.branches, self.eos = main, branches or {}, eos

    def __call__(self, stream, logits):
        if stream.kind == "branch":
            seq, skip = self.branches.get((stream.block, stream.branch), []), 4
        else:
            seq, skip = self.main, 0
        i = len(stream.tokens) - skip
        if stream.kind == "main" and stream.block > 0:
            seq, i = self.main, len(stream.request.segments[0].tokens) + len(stream.tokens) - 1
        out = torch.full_like(logits, float("-inf"))
        out[seq[i] if i < len(seq) else self.eos] = 0
        return out


def _tags(tok):
    t = tag_token_ids(tok)
    return (
        t[k]
        for k in ["<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>", "<takeaway>", "</takeaway>"]
    )


def _plan_label(tok, k: int) -> list[int]:
    return tok.encode(plan_label(k), add_special_tokens=False)


def _run_script(model_tok, script, mode="parallel", **cfg):
    engine = make_engine(model_tok, mode, **cfg)
    r = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=200, temperature=0, logits_processors=(script,)))[0]
    assert engine.pool.used_blocks == 0
    return r


@pytest.mark.parametrize(
    "case, diagnostic",
    [
        ("close_without_open", "</guideline> is not allowed inside text"),
        ("step_outside_branch", "</step> is not allowed inside text"),
        ("nested_guideline", "<guideline> is not allowed inside guideline"),
        ("zero_plans", "no <plan>"),
        ("too_many_plans", "6 plans; at most max_branches=5"),
        ("eos_in_plan", "EOS inside plan"),
        ("takeaway_by_model", "<takeaway> is not allowed inside text"),
    ],
)
def test_illegal_schemas_end_cleanly(tiny_llama, case, diagnostic):
    _, tok = tiny_llama
    G, G_, P, P_, S, S_, T, T_ = _tags(tok)
    eos = tok.eos_token_id
    main = {
        "close_without_open": [70, G_],
        "step_outside_branch": [70, S_],
        "nested_guideline": [G, G],
        "zero_plans": [G, 70, G_],
        # the engine prefills plan_label(k) after the k-th <plan> (up to max_branches=5)
        "too_many_plans": [G] + sum(([P, *_plan_label(tok, k), 70, P_] for k in range(1, 6)), []) + [P, 70, P_, G_],
        "eos_in_plan": [G, P, *_plan_label(tok, 1), 70, eos],
        "takeaway_by_model": [70, T],
    }[case]
    r = _run_script(tiny_llama, Script(main, eos=eos))
    assert r.finish_reason == "invalid_schema"
    assert diagnostic in r.diagnostic


@pytest.mark.parametrize(
    "branch_seq, diagnostic",
    [
        ("eos", "EOS inside step 2 of block 1"),
        ("guideline", "<guideline> is not allowed inside step (step 2 of block 1)"),
        ("step", "<step> is not allowed inside step"),
    ],
)
def test_illegal_tokens_inside_a_branch(tiny_llama, branch_seq, diagnostic):
    _, tok = tiny_llama
    G, G_, P, P_, S, S_, T, T_ = _tags(tok)
    bad = {"eos": tok.eos_token_id, "guideline": G, "step": S}[branch_seq]
    script = Script(
        [G, P, *_plan_label(tok, 1), 70, P_, P, *_plan_label(tok, 2), 71, P_, G_],
        {(1, 1): [80, 81, S_], (1, 2): [82, bad]},
        eos=tok.eos_token_id,
    )
    r = _run_script(tiny_llama, script)
    assert r.finish_reason == "invalid_schema" and diagnostic in r.diagnostic


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_engine_prefills_plan_labels(tiny_llama, mode):
    """After the model opens its k-th plan the engine writes plan_label(k), as it writes the step
    scaffold in branch k: the labels are canonical and not the model's actions (sampled False)."""
    _, tok = tiny_llama
    G, G_, P, P_, S, S_, T, T_ = _tags(tok)
    one, two = _plan_label(tok, 1), _plan_label(tok, 2)
    main = [G, P, *one, 70, 71, P_, P, *two, 72, 73, P_, G_]
    script = Script(main, {(1, 1): [80, 81, S_], (1, 2): [82, 83, S_]}, eos=tok.eos_token_id)
    r = _run_script(tiny_llama, script, mode=mode)
    assert r.finish_reason == "invalid_schema" and "EOS inside takeaway" in r.diagnostic  # the script ends at the join
    assert r.token_ids[: len(main)] == main
    labels = [2 + i for i in range(len(one))] + [6 + len(one) + i for i in range(len(two))]
    assert [i for i, s in enumerate(r.sampled[: len(main)]) if not s] == labels
    assert r.branches_per_block == [2] and r.text.startswith("<guideline><plan>1:")


def test_min_fork_budget_and_max_depth(tiny_llama):
    _, tok = tiny_llama
    f = forced(tok, [(3, 3), (3, 3), (3, 3)])
    engine = make_engine(tiny_llama, "parallel", min_fork_budget=500)
    r = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=300, temperature=0, logits_processors=(f,)))[0]
    assert r.finish_reason == "length" and "min_fork_budget" in r.diagnostic and r.blocks == []
    engine = make_engine(tiny_llama, "parallel", max_depth=2)
    r = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=300, temperature=0, logits_processors=(f,)))[0]
    assert r.finish_reason == "length" and "max_depth=2" in r.diagnostic and len(r.blocks) == 2


def test_stop_tokens(tiny_llama):
    _, tok = tiny_llama
    script = Script([70, 71, 72, 73], eos=tok.eos_token_id)
    engine = make_engine(tiny_llama, "plain")
    r = engine.generate(
        [PROMPTS[0]],
        SamplingParams(max_new_tokens=50, temperature=0, stop_token_ids=(72,), logits_processors=(script,)),
    )[0]
    assert r.finish_reason == "stop" and r.token_ids == [70, 71, 72]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda e: e.generate([[]], SamplingParams()), "prompt 0 is empty"),
        (lambda e: e.generate([[1] * 5000], SamplingParams(max_new_tokens=10)), "exceeds the model context"),
        (lambda e: e.generate([[1, 2]], SamplingParams(max_new_tokens=0)), "max_new_tokens must be > 0"),
        (lambda e: EngineConfig(mode="turbo"), "unknown mode 'turbo'"),
        (lambda e: e.generate([[1] * 2100], SamplingParams(max_new_tokens=10)), "needs 133 KV pages to start"),
        (lambda e: e.generate([[1, 2]], SamplingParams(n=80)), "n=80 samples exceed max_num_seqs=64"),
    ],
)
def test_bad_input_fails_before_work(tiny_llama, make, message):
    engine = make_engine(tiny_llama, kv_cache_tokens=2048)
    with pytest.raises(EngineInputError, match=message):
        make(engine)
    assert not engine.scheduler.has_work() and engine.pool.used_blocks == 0


# ----------------------------------------------------------------------------- KV pool and batching


def test_prompt_and_prefix_stored_once(tiny_llama):
    """n samples share the prompt blocks; k branches share the prefix: peak blocks stay far below copies."""
    _, tok = tiny_llama
    long_prompt = [1] + [70 + i % 50 for i in range(800)]
    engine = make_engine(tiny_llama, block_size=16)
    params = SamplingParams(max_new_tokens=200, temperature=0, n=4, logits_processors=(forced(tok, [(6, 6, 6, 6)]),))
    engine.submit([long_prompt], params)
    peak = 0
    while engine.scheduler.has_work():
        engine.step()
        peak = max(peak, engine.pool.used_blocks)
    prompt_blocks = math.ceil(len(long_prompt) / 16)
    # the prompt once (51 blocks), then per sample: main (2 blocks), 4 branches (1 each), takeaway + final (2)
    assert prompt_blocks < peak <= prompt_blocks + 4 * 8
    assert peak < 2 * prompt_blocks  # four private copies of the prompt alone would need 4x
    assert engine.pool.used_blocks == 0


def test_pool_smaller_than_worst_case_serves_the_request(tiny_llama):
    """Admission goes by use: a budget far larger than the pool is fine when the request ends early."""
    _, tok = tiny_llama
    engine = make_engine(tiny_llama, kv_cache_tokens=16 * 12, block_size=16)
    params = SamplingParams(max_new_tokens=4000, temperature=0, logits_processors=(forced(tok, [(4, 4)]),))
    r = engine.generate([PROMPTS[0]], params)[0]
    assert r.finish_reason == "eos" and r.stats.preemptions == 0
    assert len(r.token_ids) > 16 * 2  # more than one page per segment: the pool really was used
    assert engine.pool.used_blocks == 0


def test_requests_join_between_steps(tiny_llama):
    _, tok = tiny_llama
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_new_tokens=200, temperature=0, logits_processors=(forced(tok),))
    engine.submit([PROMPTS[0]], params)
    results = []
    for _ in range(5):
        results += engine.step().finished
    engine.submit([PROMPTS[1]], params, first_index=1)
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.waiting) == 1
    while engine.scheduler.has_work():
        results += engine.step().finished
    alone = make_engine(tiny_llama).generate(PROMPTS, params)
    assert sorted(r.token_ids for r in results) == sorted(r.token_ids for r in alone)


def test_streaming_yields_progress(tiny_llama):
    _, tok = tiny_llama
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_new_tokens=200, temperature=0, logits_processors=(forced(tok),))
    events = list(engine.generate_stream(PROMPTS, params))
    results = sorted((r for e in events for r in e.finished), key=lambda r: r.prompt_index)
    assert [r.prompt_index for r in results] == [0, 1] and all(r.finish_reason == "eos" for r in results)
    # every prompt and response token is fed exactly once, except each response's final EOS
    assert sum(e.tokens for e in events) == sum(len(p) + len(r.token_ids) - 1 for p, r in zip(PROMPTS, results))
    assert [e.live_requests for e in events][:1] == [2] and events[-1].live_requests == 0
    assert [r.token_ids for r in results] == [r.token_ids for r in make_engine(tiny_llama).generate(PROMPTS, params)]


def test_repetition_penalty_only_inside_steps(tiny_llama, monkeypatch):
    """The penalty applies to branch rows only, and each row's seen set is exactly the tokens that
    branch sampled before (not the prefix, not a sibling's)."""
    import npr.engine.engine as engine_module

    calls = []
    real = engine_module.apply_repetition_penalty

    def spy(logits, seen, penalty, rows=None):
        calls.append((seen.clone(), penalty.clone()))
        return real(logits, seen, penalty, rows)

    monkeypatch.setattr(engine_module, "apply_repetition_penalty", spy)
    _, tok = tiny_llama
    r = make_engine(tiny_llama, "parallel").generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=300, temperature=0, logits_processors=(forced(tok, [(5, 5)]),))
    )[0]
    # a row's seen ids (pads repeat its first id); a row with factor 1 has seen nothing yet
    rows = [
        set(ids.tolist()) if p != 1.0 else set() for seen, penalty in calls for ids, p in zip(seen, penalty.tolist())
    ]
    sampled_in_branches = [[t for t, s in zip(r.token_ids[a:b], r.sampled[a:b]) if s] for a, b in r.blocks[0]]
    assert len(rows) == sum(len(b) for b in sampled_in_branches) == 2 * (5 + 1)  # 5 text tokens + </step> each
    expected = sorted([set(b[:i]) for b in sampled_in_branches for i in range(len(b))], key=sorted)
    assert sorted(rows, key=sorted) == expected
    assert all(p == pytest.approx(1.02) or p == 1.0 for _, penalty in calls for p in penalty.tolist())


def test_repetition_penalty_rule():
    from npr.engine.sampling import apply_repetition_penalty

    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    seen = torch.tensor([[0, 1], [2, 2]])  # row 1 saw one token: its pad repeats it
    apply_repetition_penalty(logits, seen, torch.tensor([2.0, 4.0]))
    assert logits.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 0.25]]
    # seen rows that describe other rows of the logits (the branch rows of a step); factor 1: nothing seen
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0], [3.0, 3.0, -3.0]])
    apply_repetition_penalty(
        logits, torch.tensor([[2, 2], [0, 2], [1, 0]]), torch.tensor([2.0, 3.0, 1.0]), rows=torch.tensor([2, 0, 1])
    )
    assert logits.tolist() == [
        [pytest.approx(2.0 / 3.0), -2.0, pytest.approx(1.0 / 3.0)],
        [2.0, -2.0, 1.0],
        [3.0, 3.0, -6.0],
    ]


def test_logprobs_can_be_skipped(tiny_llama):
    _, tok = tiny_llama
    f = (forced(tok, [(4, 4)]),)
    with_lp = make_engine(tiny_llama).generate(
        PROMPTS, SamplingParams(max_new_tokens=200, temperature=0, logits_processors=f)
    )
    without = make_engine(tiny_llama).generate(
        PROMPTS, SamplingParams(max_new_tokens=200, temperature=0, logprobs=False, logits_processors=f)
    )
    assert [r.token_ids for r in with_lp] == [r.token_ids for r in without]
    assert all(math.isnan(lp) for r in without for lp in r.logprobs)
    assert not any(math.isnan(lp) for r in with_lp for lp, s in zip(r.logprobs, r.sampled) if s)
