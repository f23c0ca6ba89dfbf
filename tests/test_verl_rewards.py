"""npr's rewards through verl's reward manager machinery equal npr's rewards on the same samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
from verl.trainer.ppo.reward import load_reward_manager

import npr.integrations.verl  # noqa: F401  (registers the npr reward manager)
from npr.data.problems import Problem
from npr.errors import NprError
from npr.integrations.verl.rewards import NprRewardManager, TagKeepingDecoder
from npr.rewards import accuracy_reward, stage1_reward

BLOCK = "<guideline><plan>1: add</plan></guideline><step>1: two and two</step><takeaway>four it is</takeaway>"
SAMPLES = {  # name -> (response text, gold answer)
    "valid_correct": (BLOCK + " so \\boxed{4}", "4"),
    "valid_wrong": (BLOCK + " so \\boxed{5}", "4"),
    "invalid_correct": ("<guideline><plan>1: add</plan> so \\boxed{4}", "4"),
    "plain_correct": ("two and two make \\boxed{4}", "4"),
    "empty": ("", "4"),
}


def reward_config(name: str):
    return OmegaConf.create(
        {
            "reward": {
                "reward_manager": {"source": "register", "name": "npr"},
                "custom_reward_function": {"path": "pkg://npr.integrations.verl.rewards", "name": name},
            }
        }
    )


def sample_batch(tokenizer, text: str, gold: str, prompt_width: int = 4, width: int = 96) -> DataProto:
    """One verl sample as the agent loop hands it over: left-padded prompt, right-padded response + EOS."""
    response = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(response) <= width
    prompt = torch.tensor([[0] * (prompt_width - 2) + [5, 6]])
    responses = torch.full((1, width), tokenizer.pad_token_id or 0)
    responses[0, : len(response)] = torch.tensor(response)
    attention = torch.zeros(1, prompt_width + width, dtype=torch.long)
    attention[0, prompt_width - 2 : prompt_width + len(response)] = 1
    return DataProto.from_dict(
        tensors={"prompts": prompt, "responses": responses, "attention_mask": attention},
        non_tensors={
            "data_source": np.array(["math"], dtype=object),
            "reward_model": np.array([{"ground_truth": gold}], dtype=object),
            "extra_info": np.array([{}], dtype=object),
        },
    )


@pytest.mark.parametrize(
    "stage, npr_reward", [("compute_score_stage1", stage1_reward), ("compute_score_stage3", accuracy_reward)]
)
def test_reward_manager_equals_npr(tiny_qwen3, stage, npr_reward):
    _, tokenizer = tiny_qwen3
    manager = load_reward_manager(reward_config(stage), tokenizer)
    assert isinstance(manager, NprRewardManager)
    got = {}
    for name, (text, gold) in SAMPLES.items():
        out = manager.loop.run_until_complete(manager.run_single(sample_batch(tokenizer, text, gold)))
        expected = npr_reward(text, Problem(id="0", problem="", answer=gold, source="math"))
        assert out["reward_score"] == expected, name
        got[name] = expected
    # the samples span what the rewards distinguish
    if stage.endswith("stage1"):
        assert got["valid_correct"] == 1.0 and got["valid_wrong"] == -1.0 and got["invalid_correct"] < 0
    else:
        assert got["valid_correct"] == got["invalid_correct"] == 1.0 and got["valid_wrong"] == -1.0
    assert got["empty"] <= 0.0


def test_stock_decoding_would_lose_the_tags(tiny_qwen3):
    """Why the npr manager exists: verl's naive manager decodes with skip_special_tokens=True."""
    _, tokenizer = tiny_qwen3
    ids = tokenizer.encode(BLOCK, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "<guideline>" not in tokenizer.decode(ids, skip_special_tokens=True)
    assert TagKeepingDecoder(tokenizer).decode(ids, skip_special_tokens=True) == BLOCK
    naive = load_reward_manager(
        OmegaConf.merge(reward_config("compute_score_stage1"), {"reward": {"reward_manager": {"name": "naive"}}}),
        tokenizer,
    )
    out = naive.loop.run_until_complete(naive.run_single(sample_batch(tokenizer, *SAMPLES["valid_correct"])))
    assert out["reward_score"] < 0  # the tags were stripped, so the format check failed


def test_npr_manager_refuses_missing_compute_score(tiny_qwen3):
    _, tokenizer = tiny_qwen3
    with pytest.raises(NprError, match="custom_reward_function"):
        get_reward_manager_cls("npr")(config=None, tokenizer=tokenizer, compute_score=None)


def test_overlong_penalty_is_npr_stage1s(tiny_qwen3):
    """verl's DAPO reward settings switch on npr's soft overlong penalty, on the response length as npr's Stage 1."""
    import torch as _torch

    from npr.algos import overlong_penalty

    _, tokenizer = tiny_qwen3
    text, gold = SAMPLES["valid_correct"]
    length = len(tokenizer.encode(text, add_special_tokens=False)) + 1  # + EOS
    config = OmegaConf.merge(
        reward_config("compute_score_stage1"),
        {
            "reward": {
                "reward_kwargs": {
                    "max_resp_len": length + 3,
                    "overlong_buffer_cfg": {"enable": True, "len": 10, "penalty_factor": 1.0},
                }
            }
        },
    )
    manager = load_reward_manager(config, tokenizer)
    out = manager.loop.run_until_complete(manager.run_single(sample_batch(tokenizer, text, gold)))
    expected = float(overlong_penalty(_torch.tensor([length]), length + 3, 10, 1.0)[0])
    assert expected == pytest.approx(-0.7)  # 7 tokens into the last 10
    assert out["reward_extra_info"]["npr_reward"] == 1.0
    assert out["reward_score"] == pytest.approx(1.0 + expected)


def test_parquet_rows_grade_as_npr(tmp_path):
    """npr's problems written as verl's parquet come back as the same Problem: the scores equal npr's."""
    import pandas

    from npr.data import load_problems
    from npr.integrations.verl.data import main
    from npr.integrations.verl.rewards import compute_score_stage3

    spec = "rg:chain_sum?size=3&seed=7&terms=2"
    main([spec, str(tmp_path / "train.parquet")])
    rows = pandas.read_parquet(tmp_path / "train.parquet").to_dict("records")
    problems = load_problems(spec)
    assert [r["prompt"][-1]["content"] for r in rows] == [p.problem for p in problems]
    for row, problem in zip(rows, problems):
        for answer in (problem.answer, problem.answer + "1"):
            text = BLOCK + f" so \\boxed{{{answer}}}"
            got = compute_score_stage3(row["data_source"], text, row["reward_model"]["ground_truth"], row["extra_info"])
            assert got["score"] == accuracy_reward(text, problem)
