"""Stage 3, NPR (arXiv 2512.07461 §3.3): PAPO on rollouts decoded in parallel by the engine.

One step::

    rollouts = collect_rollouts(...)   # engine, parallel mode: branches forked at </guideline>
    kept     = schema filter           # drop rollouts whose structure fails, counted by reason
    rewards  = config.reward           # accuracy only (±1) by default: the filter replaces a format reward
    advs     = papo_advantages         # group mean baseline, batch-level std
    update   = papo_loss on flat tree-masked forwards, no KL; one step per batch (strictly on-policy)
               or, with mini_batch_size, one per mini-batch as NPR's code (then not strictly on-policy)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from npr.masks import has_complete_blocks
from npr.rewards import get_reward
from npr.schema import validate
from npr.train.config import Stage3Config
from npr.train.rl import apply_update, collect_rollouts, global_advantages, run_eval_if_due, start_rl_run, tag_ids_of
from npr.train.rollout import Rollout
from npr.train.session import RunOptions, StepTimer
from npr.train.update import global_sum

# Why a rollout is dropped, in the order checked (a fixed list: every rank reports every key).
DROP_REASONS = (
    "finish_length",
    "finish_invalid_schema",
    "finish_stop",
    "structure",
    "schema_structural",
    "schema_no_block",
    "schema_other",
)


def drop_reason(rollout: Rollout, tag_ids: dict[str, int], config: Stage3Config) -> str | None:
    """None when the rollout trains, else the first reason in ``DROP_REASONS`` that applies."""
    result = rollout.result
    cut_kept = result.finish_reason == "length" and not config.drop_truncated  # then judged by its blocks
    if result.finish_reason != "eos" and not cut_kept:
        return f"finish_{result.finish_reason}"
    if not has_complete_blocks(result.prompt_ids, result.token_ids, tag_ids):
        return "structure"
    errors = validate(result.text)
    if any(e.structural for e in errors):
        return "schema_structural"
    if config.require_parallel and any(e.kind == "no_block" for e in errors):
        return "schema_no_block"
    if config.drop_any_schema_error and errors:
        return "schema_other"
    return None


def select_papo(
    rollouts: Sequence[Rollout], tag_ids: dict[str, int], config: Stage3Config
) -> tuple[list[Rollout], dict[str, int]]:
    """Schema-level filter: the kept rollouts and the count of dropped ones by reason."""
    drops = dict.fromkeys(DROP_REASONS, 0)
    kept = []
    for r in rollouts:
        reason = drop_reason(r, tag_ids, config)
        if reason is None:
            kept.append(r)
        else:
            drops[reason] += 1
    return kept, drops


def papo_advantages_of(accelerator, kept: Sequence[Rollout], config: Stage3Config) -> torch.Tensor:
    """PAPO advantages of the kept rollouts' accuracy rewards over the global batch. -> FloatTensor[K]"""
    rewards = torch.tensor([r.reward for r in kept], dtype=torch.float32)  # [K]
    groups = torch.tensor([r.group for r in kept], dtype=torch.long)  # [K]
    return global_advantages(accelerator, config.advantage, rewards, groups)


def train_stage3(config: Stage3Config, options: RunOptions) -> Path | None:
    """Run (or resume) Stage 3; returns ``RUN/final`` or None when stopped early by ``stop_after``."""
    run = start_rl_run("stage3", config, options, mode="parallel")
    session, acc = run.session, run.session.accelerator
    tags = tag_ids_of(run)
    reward = get_reward(config.reward)
    run_eval_if_due(run, "before")
    for step in session.steps():
        if not run.data_left():
            session.data_end = step
            break
        timer = StepTimer()
        rollouts, metrics = collect_rollouts(run, step, reward)
        timer.lap("rollout")
        kept, drops = select_papo(rollouts, tags, config)
        advantages = papo_advantages_of(acc, kept, config)
        totals = global_sum(acc, [float(len(kept)), *(float(drops[k]) for k in DROP_REASONS)])
        update = apply_update(run, kept, advantages, structured=True)
        timer.lap("update")
        metrics["kept_rate"] = totals[0] / max(metrics["rollouts"], 1.0)
        metrics.update({f"dropped_{k}": v for k, v in zip(DROP_REASONS, totals[1:])})
        metrics.update(**update, **timer.times)
        session.after_step(step, metrics)
    run_eval_if_due(run, "after")
    return session.finish()
