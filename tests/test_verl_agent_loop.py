"""The npr_parallel agent loop against an in-process server backed by npr's engine in plain mode.

A forced structure (npr's StructureForcer) must give the same flat token ids and response mask as npr's engine
in sequential mode on the same model; the join's re-prefill is measured (rollout vs tree-attention log-probs).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer
from npr.integrations.verl.agent_loop import (
    EngineServer,
    ForkJoinLimits,
    NprParallelAgentLoop,
    Scaffold,
    Stage3Filter,
    fork_join,
    join_gap,
    stage3_drop_reason,
)
from npr.tokens import tag_token_ids
from npr.train.logprobs import response_logprobs, structured_sequence

BUDGET = 400


@pytest.fixture(scope="module")
def qwen(tiny_qwen3):
    model, tok = tiny_qwen3
    return model.eval(), tok


class ScriptAt:
    """The StructureForcer's script for the segment a server request continues: a main-line request reads
    the flat (plain-mode) script at its context's position in the flat response, a branch request (its
    context ends with ``<step>\nk:``) the script of branch k of its block, as the engine's streams do."""

    def __init__(self, forcer: StructureForcer, tok, prompt: list[int], context: list[int]) -> None:
        self.forcer, response = forcer, context[len(prompt) :]
        scaffold = Scaffold.of(tok, 8)
        block = response.count(tag_token_ids(tok)["</guideline>"])
        branch = next((k for k, ids in enumerate(scaffold.step_open, 1) if tuple(response[-len(ids) :]) == ids), 0)
        self.stream = SimpleNamespace(kind="branch" if branch else "main", block=block if branch else 0, branch=branch)
        self.offset = 0 if branch else len(response)

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        slots, _ = self.forcer.script(self.stream)
        i = self.offset + len(stream.tokens)
        return self.forcer._apply(logits, slots[i] if i < len(slots) else self.forcer.eos)


def plain_server(model, tok, prompt, forcer) -> EngineServer:
    return EngineServer(engine(model, tok, "plain"), lambda ids: [ScriptAt(forcer, tok, prompt, ids)])


def engine(model, tok, mode: str) -> Engine:
    return Engine(model, tok, EngineConfig(mode=mode, kv_cache_tokens=8192, repetition_penalty=1.0, debug=True))


def sequential_result(model, tok, prompt, forcer):
    params = SamplingParams(max_new_tokens=BUDGET, temperature=0.0, logits_processors=(forcer,))
    (result,) = engine(model, tok, "sequential").generate([prompt], params)
    return result


def loop_result(model, tok, prompt, forcer, budget=BUDGET):
    server = plain_server(model, tok, prompt, forcer)
    scaffold = Scaffold.of(tok, ForkJoinLimits().max_branches)
    return asyncio.run(fork_join(server.generate, prompt, scaffold, budget, {"temperature": 0.0}))


SHAPES = {  # name -> (branch tokens per block, StructureForcer keywords)
    # every token after the join is forced: the loop must reproduce the engine token for token
    "one_block_forced_tail": ([[5, 9, 3]], {"prefix_tokens": 4, "takeaway_tokens": 0, "final_tokens": 0}),
    # model-chosen text after the joins: same layout and mask, tokens may differ after a join
    "two_blocks": ([[4, 6], [3, 3, 3]], {"prefix_tokens": 2}),
}


@pytest.mark.parametrize("name", SHAPES)
def test_loop_matches_engine_sequential(qwen, name):
    model, tok = qwen
    branches, kw = SHAPES[name]
    prompt = tok.encode("Q: 23+34?\n", add_special_tokens=False)
    expected = sequential_result(model, tok, prompt, StructureForcer(tok, branches, **kw))
    got = loop_result(model, tok, prompt, StructureForcer(tok, branches, **kw))

    assert expected.finish_reason == got.finish_reason == "eos"
    assert got.blocks == len(branches)
    assert got.requests == 1 + sum(len(b) for b in branches) + len(branches) + sum(len(b) for b in branches)
    assert len(got.token_ids) == len(expected.token_ids)
    assert got.sampled == [int(s) for s in expected.sampled]  # the response mask: decoded 1, prefilled 0
    first_join = got.after_join.index(1) if 1 in got.after_join else len(got.token_ids)
    if name == "one_block_forced_tail":
        assert got.token_ids == expected.token_ids
    else:  # identical up to the first token decoded from a re-prefilled join, and the forced skeleton after it
        assert got.token_ids[:first_join] == expected.token_ids[:first_join]
        forced = [i for i, s in enumerate(got.sampled) if not s]
        assert [got.token_ids[i] for i in forced] == [expected.token_ids[i] for i in forced]
    assert stage3_drop_reason(prompt, got, tok.decode(got.token_ids[:-1]), Stage3Filter(tag_token_ids(tok))) is None


class EndAt:
    """With probability ``p`` per position, EOS instead of the script's token (legal as the final answer's
    end, illegal inside a block: npr's engine then ends the sample as invalid_schema). Keyed by the engine's
    stream position (kind, block, branch, offset in the segment), which ``segment_key`` recovers for a server
    request, so the engine and the loop draw the same."""

    def __init__(self, script, seed: int, p: float, eos: int, key: Callable[[Any], tuple]) -> None:
        self.script, self.seed, self.p, self.eos, self.key = script, seed, p, eos, key

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        if random.Random(f"{self.seed}/{self.key(stream)}").random() < self.p:
            forced = torch.full_like(logits, float("-inf"))
            forced[self.eos] = 0.0
            return forced
        return self.script(stream, logits)


def engine_key(stream) -> tuple:
    return str(stream.kind), stream.block, stream.branch, len(stream.tokens)


def segment_key(tok, prompt: list[int], context: list[int]) -> tuple:
    """The engine stream a server request continues, as (kind, block, branch, offset of its first new token)."""
    response, tags, opens = context[len(prompt) :], tag_token_ids(tok), Scaffold.of(tok, 8).step_open
    branch = next((k for k, ids in enumerate(opens, 1) if tuple(response[-len(ids) :]) == ids), 0)
    if branch:
        return "branch", response.count(tags["</guideline>"]), branch, len(opens[branch - 1])
    joins = [i for i, t in enumerate(response) if t == tags["<takeaway>"]]  # main: segments restart at joins
    return "main", len(joins), 0, len(response) - (joins[-1] if joins else 0)


@pytest.mark.parametrize("seed", range(12))
def test_random_structures_and_ends_match_the_engine(qwen, seed):
    """Random shapes (blocks, branches, lengths, budgets) with random EOS anywhere: the loop ends each sample
    where npr's engine in sequential mode ends it, with the same finish reason, length and response mask,
    the same tokens up to the first join (after it only the model's text choices may differ) and at every
    prefilled position."""
    model, tok = qwen
    rng = random.Random(seed)
    shape = [[rng.randint(1, 8) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))]
    kw = dict(prefix_tokens=rng.randint(0, 3), plan_tokens=rng.randint(1, 3), takeaway_tokens=rng.randint(1, 4))
    budget, p_eos = rng.choice([60, 120, 400]), rng.choice([0.0, 0.01, 0.03])
    prompt = tok.encode("Q: 1?\n", add_special_tokens=False)

    sequential = EndAt(StructureForcer(tok, shape, **kw), seed, p_eos, tok.eos_token_id, engine_key)
    params = SamplingParams(max_new_tokens=budget, temperature=0.0, logits_processors=(sequential,))
    (expected,) = engine(model, tok, "sequential").generate([prompt], params)

    forcer = StructureForcer(tok, shape, **kw)

    def processors(ids):
        kind, block, branch, offset = segment_key(tok, prompt, ids)
        return [
            EndAt(
                ScriptAt(forcer, tok, prompt, ids),
                seed,
                p_eos,
                tok.eos_token_id,
                lambda stream: (kind, block, branch, offset + len(stream.tokens)),
            )
        ]

    server = EngineServer(engine(model, tok, "plain"), processors)
    got = asyncio.run(fork_join(server.generate, prompt, Scaffold.of(tok, 5), budget, {"temperature": 0.0}))
    assert got.finish_reason == expected.finish_reason, (got.diagnostic, expected.diagnostic)
    assert got.sampled == [int(s) for s in expected.sampled]
    first_join = got.after_join.index(1) if 1 in got.after_join else len(got.token_ids)
    assert got.token_ids[:first_join] == expected.token_ids[:first_join]
    assert all(got.token_ids[i] == expected.token_ids[i] for i, s in enumerate(got.sampled) if not s)


def test_join_gap_measured_against_the_tree_actor(qwen):
    """Before the join the server's log-probs are the tree actor's (same context, same positions); after it
    the re-prefilled context differs: the gap is what verl's rollout correction has to absorb."""
    model, tok = qwen
    prompt = tok.encode("Q: 23+34?\n", add_special_tokens=False)
    got = loop_result(model, tok, prompt, StructureForcer(tok, [[4, 6], [3, 3, 3]], prefix_tokens=2))
    with torch.no_grad():
        actor, mask = response_logprobs(
            model, [structured_sequence(prompt, got.token_ids, tag_token_ids(tok))], 0, attention="dense"
        )
    rollout = torch.tensor(got.logprobs)[None]
    sampled = torch.tensor(got.sampled)[None] * mask
    gap = join_gap(rollout, actor, sampled, torch.tensor(got.after_join)[None])
    assert gap["npr/join_gap_before"] < 1e-4
    assert gap["npr/join_gap_after"] > 10 * max(gap["npr/join_gap_before"], 1e-6)
    assert 0 < gap["npr/after_join_fraction"] < 1


def test_budget_counts_every_branch_and_scaffold(qwen):
    model, tok = qwen
    prompt = tok.encode("Q: 1?\n", add_special_tokens=False)
    budget = 60
    got = loop_result(model, tok, prompt, StructureForcer(tok, [[30, 30]], prefix_tokens=2), budget=budget)
    expected = sequential_result(model, tok, prompt, StructureForcer(tok, [[30, 30]], prefix_tokens=2))
    assert got.finish_reason == "length" and len(got.token_ids) <= budget
    assert got.token_ids == expected.token_ids[: len(got.token_ids)]


def agent(server, tok, budget: int = BUDGET, **fields) -> NprParallelAgentLoop:
    loop = object.__new__(NprParallelAgentLoop)  # verl builds it inside a Ray worker; run_tokens needs these
    loop.server_manager, loop.response_length = server, budget
    loop.configure(tok, **fields)
    return loop


def test_illegal_structure_ends_the_sample_and_masks_it(qwen):
    """More plans than max_branches: npr's engine ends the request as invalid_schema; the agent loop too,
    and its AgentLoopOutput masks the whole response (npr_papo's estimator drops it)."""
    model, tok = qwen
    prompt = tok.encode("Q: 1?\n", add_special_tokens=False)
    forcer = StructureForcer(tok, [[2] * 6], prefix_tokens=1)
    out = asyncio.run(agent(plain_server(model, tok, prompt, forcer), tok).run_tokens(prompt, {"temperature": 0.0}))
    expected = sequential_result(model, tok, prompt, StructureForcer(tok, [[2] * 6], prefix_tokens=1))
    assert expected.finish_reason == out.extra_fields["npr_finish_reason"] == "invalid_schema"
    assert out.response_ids == expected.token_ids
    assert out.response_mask == [0] * len(out.response_ids)
    assert out.extra_fields["npr_drop_reason"] == "finish_invalid_schema"


@pytest.mark.parametrize("loss_on_prefilled", [True, False])
def test_kept_rollout_mask_follows_loss_on_prefilled(qwen, loss_on_prefilled):
    model, tok = qwen
    prompt = tok.encode("Q: 1?\n", add_special_tokens=False)
    forcer = StructureForcer(tok, [[3, 4]], prefix_tokens=1)
    loop = agent(plain_server(model, tok, prompt, forcer), tok, loss_on_prefilled=loss_on_prefilled)
    out = asyncio.run(loop.run_tokens(prompt, {"temperature": 0.0}))
    assert out.extra_fields["npr_drop_reason"] is None and out.extra_fields["npr_finish_reason"] == "eos"
    sampled = out.extra_fields["npr_sampled"]
    assert 0 in sampled and out.response_mask == ([1] * len(sampled) if loss_on_prefilled else sampled)


def test_cut_rollout_kept_only_when_its_blocks_are_complete(qwen):
    """The qwen3-4b preset keeps a cut rollout (drop_truncated false) whose tokens form complete blocks."""
    model, tok = qwen
    prompt = tok.encode("Q: 1?\n", add_special_tokens=False)
    forcer = StructureForcer(tok, [[3, 4]], prefix_tokens=1, final_tokens=200)
    loose = agent(plain_server(model, tok, prompt, forcer), tok, 100)
    out = asyncio.run(loose.run_tokens(prompt, {"temperature": 0.0}))
    assert out.extra_fields["npr_finish_reason"] == "length" and out.extra_fields["npr_drop_reason"] is None
    strict = agent(plain_server(model, tok, prompt, forcer), tok, 100, drop_truncated=True)
    out = asyncio.run(strict.run_tokens(prompt, {"temperature": 0.0}))
    assert out.extra_fields["npr_drop_reason"] == "finish_length" and set(out.response_mask) == {0}


def test_plain_server_refuses_parallel_engine(qwen):
    model, tok = qwen
    with pytest.raises(ValueError, match="mode plain"):
        EngineServer(engine(model, tok, "parallel"))


def test_registered_as_npr_parallel():
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    import npr.integrations.verl  # noqa: F401

    assert _agent_loop_registry["npr_parallel"]["_target_"] == ("npr.integrations.verl.agent_loop.NprParallelAgentLoop")
