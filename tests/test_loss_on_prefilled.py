"""Which tokens of an engine rollout carry RL loss under each ``loss_on_prefilled`` setting.

The paper keeps gradients on the special tokens that control branching. The engine prefills the
scaffold (``k:`` after ``<plan>``, the newline after ``</guideline>``, ``<step>\\nk:``, the
newline after ``</step>``, ``<takeaway>``), so with ``loss_on_prefilled`` false ``<step>`` and
``<takeaway>`` never carry loss; the qwen3-4b presets set it true.
"""

from __future__ import annotations

import pytest
import torch

from npr.data import Problem
from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer
from npr.tokens import tag_token_ids
from npr.train.config import STAGE_CONFIGS
from npr.train.overrides import resolve_config
from npr.train.rl import policy_batch
from npr.train.rollout import Rollout

SAMPLED_TAGS = [
    "<guideline>",
    "<plan>",
    "</plan>",
    "<plan>",
    "</plan>",
    "</guideline>",
    "</step>",
    "</step>",
    "</takeaway>",
]
ALL_TAGS = [
    "<guideline>",
    "<plan>",
    "</plan>",
    "<plan>",
    "</plan>",
    "</guideline>",
    "<step>",
    "</step>",
    "<step>",
    "</step>",
    "<takeaway>",
    "</takeaway>",
]


@pytest.fixture(scope="module")
def rollout(tiny_llama):
    """One forced trace: a block of two plans, branches of 3 and 2 text tokens, a takeaway, an answer."""
    model, tok = tiny_llama
    engine = Engine(model, tok, EngineConfig(mode="parallel", kv_cache_tokens=4096))
    params = SamplingParams(
        max_new_tokens=200,
        temperature=1.0,
        seed=0,
        logits_processors=(StructureForcer(tok, [[3, 2]], plan_tokens=2, takeaway_tokens=2, final_tokens=1),),
    )
    result = engine.generate([tok.encode("What is 1 + 1?", add_special_tokens=False)], params)[0]
    assert result.finish_reason == "eos" and result.branches_per_block == [2]
    return Rollout(Problem("p", "What is 1 + 1?", "0", "test"), result, 1.0, True, True, 1)


def _loss_tokens(tok, rollout, loss_on_prefilled: bool) -> tuple[list[str], list[str]]:
    """(tags with loss, other tokens with loss that the engine prefilled), in trace order."""
    tags = tag_token_ids(tok)
    batch = policy_batch(
        [rollout], torch.tensor([1.0]), structured=True, tag_ids=tags, loss_on_prefilled=loss_on_prefilled
    )
    result, mask = rollout.result, batch.loss_masks[0].tolist()
    tag_names = {i: t for t, i in tags.items()}
    with_loss = [tag_names[t] for t, m in zip(result.token_ids, mask) if m and t in tag_names]
    prefilled = [
        tok.decode([t]) for t, m, s in zip(result.token_ids, mask, result.sampled) if m and not s and t not in tag_names
    ]
    return with_loss, prefilled


def test_tags_with_loss_under_each_setting(tiny_llama, rollout):
    tok = tiny_llama[1]
    result = rollout.result
    # what the engine prefilled, in order: the plan labels, then the scaffold of the fork and of the join
    prefilled = tok.decode([t for t, s in zip(result.token_ids, result.sampled) if not s])
    assert prefilled == "1:2:\n<step>\n1:\n<step>\n2:\n<takeaway>"

    tags, others = _loss_tokens(tok, rollout, loss_on_prefilled=False)
    assert tags == SAMPLED_TAGS  # <step> and <takeaway> are the engine's: no loss, no gradient
    assert others == []

    tags, others = _loss_tokens(tok, rollout, loss_on_prefilled=True)
    assert tags == ALL_TAGS  # every tag, as the paper asks
    assert "".join(others) == "1:2:\n\n1:\n\n2:\n"  # labels and separators too (as NPR's code trains them)


def test_qwen3_4b_presets_train_the_prefilled_tags():
    for stage in ("stage1", "stage3"):
        config = resolve_config(stage, STAGE_CONFIGS[stage], "qwen3-4b", flags={"model": "m", "train_data": "x"})
        assert config.loss_on_prefilled
