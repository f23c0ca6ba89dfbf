"""Stage 1, NPR-Zero (arXiv 2512.07461 §3.1): DAPO teaches the instruct model the NPR format.

One step::

    rollouts = collect_rollouts(...)        # engine, plain mode (rollout_mode), NPR prompt, G samples per prompt
    rewards  = stage-1 reward + overlong    # format penalty or ±1 accuracy; DAPO eq. 13
    kept     = dynamic sampling             # drop groups whose rewards are all equal (DAPO §3.2); in
                                            # parallel mode first drop rollouts without complete blocks
                                            # (cut or ended by an illegal tag: no tree mask describes them)
    batch    = causal sequences (tree mask in parallel mode), group advantages, loss on sampled tokens
    update   = DAPO clipped surrogate, token-mean over the global batch, one optimizer step
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from npr.algos import dynamic_sampling_filter, overlong_penalty
from npr.masks import has_complete_blocks
from npr.rewards import get_reward
from npr.train.config import Stage1Config
from npr.train.rl import apply_update, collect_rollouts, global_advantages, run_eval_if_due, start_rl_run, tag_ids_of
from npr.train.rollout import Rollout
from npr.train.session import RunOptions, StepTimer
from npr.train.update import global_sum


def shaped_rewards(rollouts: Sequence[Rollout], config: Stage1Config) -> torch.Tensor:
    """Stage-1 reward plus DAPO's soft overlong penalty on the response length. -> FloatTensor[N]."""
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)  # [N]
    if config.overlong_penalty > 0 and rollouts:
        lengths = torch.tensor([len(r.result.token_ids) for r in rollouts])  # [N]
        rewards = rewards + overlong_penalty(lengths, config.max_new_tokens, config.overlong_buffer,
                                             config.overlong_penalty)
    return rewards


def select_dapo(accelerator, rollouts: Sequence[Rollout], rewards: torch.Tensor, config: Stage1Config
                ) -> tuple[list[Rollout], torch.Tensor]:
    """Dynamic sampling (when on; a group lives on one process, so the filter is local) and the
    advantages of the kept rollouts over the global batch (every process must call it)."""
    groups = torch.tensor([r.group for r in rollouts], dtype=torch.long)  # [N]
    keep = (dynamic_sampling_filter(rewards, groups) if config.dynamic_sampling and rollouts
            else torch.ones(len(rollouts), dtype=torch.bool))  # [N]
    kept = [r for r, k in zip(rollouts, keep.tolist()) if k]
    return kept, global_advantages(accelerator, config.advantage, rewards[keep], groups[keep])  # [K]


def train_stage1(config: Stage1Config, options: RunOptions) -> Path | None:
    """Run (or resume) Stage 1; returns ``RUN/final`` or None when stopped early by ``stop_after``."""
    run = start_rl_run("stage1", config, options, mode=config.rollout_mode)
    session, acc = run.session, run.session.accelerator
    tags = tag_ids_of(run)
    structured = config.rollout_mode != "plain"  # forked rollouts: tree-mask log-probs
    run_eval_if_due(run, "before")
    for step in session.steps():
        timer = StepTimer()
        rollouts, metrics = collect_rollouts(run, step, get_reward(config.reward))
        timer.lap("rollout")
        rewards = shaped_rewards(rollouts, config)
        trainable = [not structured or has_complete_blocks(r.result.prompt_ids, r.result.token_ids, tags)
                     for r in rollouts]
        kept, advantages = select_dapo(acc, [r for r, t in zip(rollouts, trainable) if t],
                                       rewards[torch.tensor(trainable, dtype=torch.bool)], config)
        shaped_sum, kept_count, unstructured = global_sum(
            acc, [float(rewards.sum()), float(len(kept)), float(len(trainable) - sum(trainable))])
        update = apply_update(run, kept, advantages, structured)
        timer.lap("update")
        metrics.update(shaped_reward=shaped_sum / max(metrics["rollouts"], 1.0), dropped_structure=unstructured,
                       kept_rate=kept_count / max(metrics["rollouts"], 1.0), **update, **timer.times)
        session.after_step(step, metrics)
    run_eval_if_due(run, "after")
    return session.finish()
