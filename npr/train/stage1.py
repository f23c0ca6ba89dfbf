"""Stage 1, NPR-Zero (arXiv 2512.07461 §3.1): DAPO teaches the instruct model the NPR format.

One step::

    rollouts = collect_rollouts(...)        # engine, plain mode (rollout_mode), NPR prompt, G samples per prompt
    kept     = dynamic sampling             # drop groups whose stage rewards (before the overlong penalty)
                                            # are all equal (DAPO §3.2); in parallel mode first drop rollouts
                                            # without complete blocks (cut or ended by an illegal tag: no tree
                                            # mask describes them); refill with further generation rounds until
                                            # prompts_per_step groups are kept (max_gen_batches), then trim
    rewards  = stage-1 reward + overlong    # format penalty or ±1 accuracy; DAPO eq. 13
    batch    = causal sequences (tree mask in parallel mode), group advantages, loss on sampled tokens
    update   = DAPO clipped surrogate, token-mean over each mini-batch of mini_batch_size groups (global
               counts), one optimizer step per mini-batch, old log-probs computed once per step
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from npr.algos import dynamic_sampling_filter, overlong_penalty
from npr.masks import has_complete_blocks
from npr.rewards import get_reward
from npr.train.config import Stage1Config
from npr.train.rl import (
    apply_update,
    generate_round,
    global_advantages,
    rollout_step_metrics,
    run_eval_if_due,
    start_rl_run,
    tag_ids_of,
)
from npr.train.rollout import ROLLOUT_SUMS, Rollout
from npr.train.session import RunOptions, StepTimer
from npr.train.update import gather_floats, global_sum


def shaped_rewards(rollouts: Sequence[Rollout], config: Stage1Config) -> torch.Tensor:
    """Stage-1 reward plus DAPO's soft overlong penalty on the response length. -> FloatTensor[N]."""
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)  # [N]
    if config.overlong_penalty > 0 and rollouts:
        lengths = torch.tensor([len(r.result.token_ids) for r in rollouts])  # [N]
        rewards = rewards + overlong_penalty(
            lengths, config.max_new_tokens, config.overlong_buffer, config.overlong_penalty
        )
    return rewards


def dapo_round(
    accelerator, rollouts: Sequence[Rollout], structured: bool, tags: dict[str, int], config: Stage1Config, wanted: int
) -> tuple[list[Rollout], dict[str, float]]:
    """One generation round's contribution to the step: this rank's rollouts of the groups kept
    by dynamic sampling, at most ``wanted`` groups over all ranks (in rank order, as verl's
    refill concatenates and trims); every rank must call it.

    The filter reads the stage reward BEFORE the overlong penalty (``Rollout.reward``: ±1
    accuracy, or the format penalty; with reward accuracy, DAPO's ``acc``), as NPR's code filters
    on its ``score``; a group of size 1 is kept (verl). In parallel mode rollouts without
    complete blocks are dropped first (no tree mask describes them). Returns the kept rollouts
    and global counts: groups kept, rollouts dropped for structure."""
    trainable = [
        r for r in rollouts if not structured or has_complete_blocks(r.result.prompt_ids, r.result.token_ids, tags)
    ]
    scores = torch.tensor([r.reward for r in trainable], dtype=torch.float32)  # [N]
    groups = torch.tensor([r.group for r in trainable], dtype=torch.long)  # [N]
    keep = (
        dynamic_sampling_filter(scores, groups)
        if config.dynamic_sampling and trainable
        else torch.ones(len(trainable), dtype=torch.bool)
    )  # [N]
    kept = [r for r, k in zip(trainable, keep.tolist()) if k]
    mine = list(dict.fromkeys(r.group for r in kept))
    counts, rank = gather_floats(accelerator, [len(mine)])
    allowed = set(mine[: max(0, min(len(mine), wanted - int(sum(counts[:rank]))))])
    (unstructured,) = global_sum(accelerator, [float(len(rollouts) - len(trainable))])
    return (
        [r for r in kept if r.group in allowed],
        {"groups": float(min(sum(counts), wanted)), "unstructured": unstructured},
    )


def refill_done(run, config: Stage1Config, rounds: int, groups: float) -> bool:
    """Whether a step stops drawing generation rounds (DAPO §3.2 with verl's refill): it has
    ``prompts_per_step`` groups, or dynamic sampling is off, or ``max_gen_batches`` rounds are
    drawn (0: no limit), or the data of ``num_epochs`` is used up. Unlike verl, which raises
    when the limit is hit, the step then trains on the groups it has (or skips the update)."""
    limit = config.max_gen_batches
    return (
        groups >= config.prompts_per_step
        or not config.dynamic_sampling
        or (limit and rounds >= limit)
        or not run.data_left()
    )


def train_stage1(config: Stage1Config, options: RunOptions) -> Path | None:
    """Run (or resume) Stage 1; returns ``RUN/final`` or None when stopped early by ``stop_after``."""
    run = start_rl_run("stage1", config, options, mode=config.rollout_mode)
    session, acc = run.session, run.session.accelerator
    tags = tag_ids_of(run)
    structured = config.rollout_mode != "plain"  # forked rollouts: tree-mask log-probs
    reward = get_reward(config.reward)
    run_eval_if_due(run, "before")
    for step in session.steps():
        if not run.data_left():
            session.data_end = step
            break
        timer = StepTimer()
        kept: list[Rollout] = []
        totals, wall, rounds, groups, unstructured, shaped_sum = [0.0] * len(ROLLOUT_SUMS), 0.0, 0, 0.0, 0.0, 0.0
        while True:
            rollouts, round_totals, seconds = generate_round(run, step, reward)
            rounds, wall = rounds + 1, wall + seconds
            totals = [a + b for a, b in zip(totals, round_totals)]
            shaped_sum += global_sum(acc, [float(shaped_rewards(rollouts, config).sum())])[0]
            more, counts = dapo_round(acc, rollouts, structured, tags, config, config.prompts_per_step - int(groups))
            kept, groups, unstructured = kept + more, groups + counts["groups"], unstructured + counts["unstructured"]
            if refill_done(run, config, rounds, groups):
                break
        timer.lap("rollout")
        rewards = shaped_rewards(kept, config)  # [K]
        groups_of = torch.tensor([r.group for r in kept], dtype=torch.long)  # [K]
        advantages = global_advantages(acc, config.advantage, rewards, groups_of)  # [K]
        (kept_count,) = global_sum(acc, [float(len(kept))])
        update = apply_update(run, kept, advantages, structured)
        timer.lap("update")
        metrics = rollout_step_metrics(totals, wall, rounds)
        metrics.update(
            shaped_reward=shaped_sum / max(metrics["rollouts"], 1.0),
            dropped_structure=unstructured,
            kept_rate=kept_count / max(metrics["rollouts"], 1.0),
            kept_groups=groups,
            **update,
            **timer.times,
        )
        session.after_step(step, metrics)
    run_eval_if_due(run, "after")
    return session.finish()
