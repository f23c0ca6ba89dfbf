"""Optimiser and learning-rate schedule (pure functions of the config and the step)."""

from __future__ import annotations

import math

import torch

from npr.train.config import TrainConfig


def learning_rate_at(step: int, total_steps: int, peak: float, final: float, warmup: int, schedule: str) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Warm-up: ``peak * (step + 1) / warmup`` for ``step < warmup`` (the first step already moves).
    Then ``constant`` stays at ``peak``; ``linear`` and ``cosine`` go from ``peak`` at the first
    step after warm-up to ``final`` at the last step.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return peak + (final - peak) * progress
    if schedule == "cosine":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; use cosine, linear or constant")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every trainable parameter with decoupled weight decay (NPR: 0.1 on all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """A ``LambdaLR`` following ``learning_rate_at``; ``scheduler.step()`` once per optimizer step."""
    peak = config.learning_rate
    warmup = config.warmup_for(total_steps)  # warmup_steps, or warmup_ratio of the run

    def factor(step: int) -> float:
        return learning_rate_at(step, total_steps, peak, config.min_learning_rate, warmup, config.lr_schedule) / peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
