"""npr's rewards for verl: ``compute_score_stage1`` / ``compute_score_stage3`` and the ``npr`` reward manager.

The scores are npr's functions (``npr.rewards.stage1_reward``, ``npr.rewards.accuracy_reward``) on the same
response text npr grades. verl's stock reward managers decode responses with ``skip_special_tokens=True``,
which deletes NPR's eight tags (they are special tokens, ``npr.tokens``), so the schema check would see a
response without structure. The ``npr`` reward manager (``reward.reward_manager.name=npr``) decodes as npr's
engine does instead: the final EOS dropped, every other token kept.

verl configuration (docs/verl.md)::

    reward.reward_manager.name=npr
    reward.custom_reward_function.path=pkg://npr.integrations.verl.rewards   # pkg://: imported, not re-run
    reward.custom_reward_function.name=compute_score_stage1     # or compute_score_stage3
"""

from __future__ import annotations

import json
from typing import Any

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

from npr.algos import overlong_penalty
from npr.data.problems import Problem
from npr.errors import NprError
from npr.rewards import accuracy_reward, stage1_reward
from npr.tokens import tag_token_ids

REWARD_MANAGER_NAME = "npr"


def problem_of(data_source: str, ground_truth: Any, extra_info: dict[str, Any] | None) -> Problem:
    """The ``Problem`` npr grades against, from verl's per-sample fields.

    ``ground_truth`` is the reference answer; a reasoning-gym problem carries its dataset entry as
    ``extra_info["rg_entry"]`` (or as JSON in ``rg_entry_json``, as ``npr.integrations.verl.data`` writes it)
    so that reasoning-gym's own scorer grades it, as in npr.
    """
    extra = extra_info or {}
    rg_entry = extra.get("rg_entry")
    if rg_entry is None and extra.get("rg_entry_json"):
        rg_entry = json.loads(extra["rg_entry_json"])
    return Problem(
        id=str(extra.get("index", "")),
        problem=str(extra.get("problem", "")),
        answer=str(ground_truth),
        source=str(data_source),
        rg_entry=rg_entry,
    )


def compute_score_stage1(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None, **unused: Any
) -> dict[str, float]:
    """NPR Stage-1 reward (format penalty in [-2, 0), else ±1 accuracy) -> ``{"score", "acc"}``."""
    score = stage1_reward(solution_str, problem_of(data_source, ground_truth, extra_info))
    return {"score": score, "acc": float(score == 1.0)}


def compute_score_stage3(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None, **unused: Any
) -> dict[str, float]:
    """NPR Stage-3 accuracy reward (+1 correct, -1 wrong, 0 empty) -> ``{"score", "acc"}``."""
    score = accuracy_reward(solution_str, problem_of(data_source, ground_truth, extra_info))
    return {"score": score, "acc": float(score == 1.0)}


class TagKeepingDecoder:
    """A tokenizer whose ``decode`` gives the text npr's engine gives (``Result.text``): a final EOS dropped,
    all other tokens (NPR's tags included) kept, whatever ``skip_special_tokens`` asks. Everything else is
    the wrapped tokenizer's."""

    def __init__(self, tokenizer, eos_ids: frozenset[int] | None = None) -> None:
        tag_token_ids(tokenizer)  # raises with advice when the tags are not single tokens
        self._tokenizer = tokenizer
        eos = tokenizer.eos_token_id if eos_ids is None else eos_ids
        self.eos_ids = frozenset(eos if isinstance(eos, (set, frozenset, list, tuple)) else [eos]) - {None}

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        ids = [int(t) for t in token_ids]
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self._tokenizer.decode(ids, skip_special_tokens=False, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@register(REWARD_MANAGER_NAME)
class NprRewardManager(NaiveRewardManager):
    """verl's naive reward manager with npr's decoding (``TagKeepingDecoder``); needs npr's compute_score.

    With verl's DAPO reward settings (``reward.reward_kwargs.overlong_buffer_cfg`` {enable, len, penalty_factor}
    and ``reward.reward_kwargs.max_resp_len``) it adds npr's soft overlong penalty
    (``npr.algos.overlong_penalty`` on the response length, as npr's Stage 1). ``npr_reward`` in the extra info
    is the reward before that penalty: npr's dynamic-sampling metric (``algorithm.filter_groups.metric``).
    """

    def __init__(self, config, tokenizer, compute_score, reward_router_address=None, reward_model_tokenizer=None):
        if compute_score is None:
            raise NprError(
                "reward.reward_manager.name=npr needs reward.custom_reward_function.path=pkg://npr.integrations.verl."
                "rewards and .name=compute_score_stage1 or compute_score_stage3 (docs/verl.md)"
            )
        super().__init__(
            config, TagKeepingDecoder(tokenizer), compute_score, reward_router_address, reward_model_tokenizer
        )
        kwargs = (config.reward.get("reward_kwargs") or {}) if config is not None else {}
        buffer = kwargs.get("overlong_buffer_cfg") or {}
        self.overlong = None
        if buffer.get("enable", False):
            max_len = kwargs.get("max_resp_len")
            if max_len is None:
                raise NprError(
                    "reward.reward_kwargs.overlong_buffer_cfg.enable needs "
                    "reward.reward_kwargs.max_resp_len (the rollout's response_length)"
                )
            self.overlong = (int(max_len), int(buffer.get("len", 0)), float(buffer.get("penalty_factor", 1.0)))

    async def run_single(self, data: DataProto) -> dict:
        out = await super().run_single(data)
        out["reward_extra_info"]["npr_reward"] = out["reward_score"]
        if self.overlong is not None:
            item = data[-1]
            width = item.batch["responses"].shape[-1]
            length = item.batch["attention_mask"][-width:].sum()  # [] response tokens, EOS included
            max_len, buffer_len, factor = self.overlong
            penalty = float(overlong_penalty(length[None], max_len, buffer_len, factor)[0])
            out["reward_score"] += penalty
            out["reward_extra_info"]["overlong_reward"] = penalty
        return out
