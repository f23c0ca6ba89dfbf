"""Numerical guards of the update: a step whose gradient norm is not finite is skipped (no
parameter or AdamW state changes), counted, and fatal after ``max_skipped_steps`` in a row."""

from __future__ import annotations

import math

import pytest
import torch

from npr.errors import NprError
from npr.train.session import make_accelerator
from npr.train.update import NonFiniteGuard, TrainingDiverged, optimizer_step


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def _backward(model, value: float):
    (model(torch.ones(1, 3)).sum() * value).backward()


def test_a_non_finite_gradient_norm_skips_the_step_and_keeps_the_schedule():
    model, optimizer, scheduler = _setup()
    acc = make_accelerator()
    guard = NonFiniteGuard(limit=3)
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (float("nan"), float("inf")):
        _backward(model, bad)
        metrics = optimizer_step(acc, model, optimizer, scheduler, 1.0, guard=guard)
        assert metrics["skipped_steps"] == 1.0 and not math.isfinite(metrics["grad_norm"])
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert not optimizer.state  # AdamW never saw the gradient: no NaN moments
        assert all(p.grad is None for p in model.parameters())
    assert scheduler.last_epoch == 2 and guard.in_a_row == 2  # the schedule advanced through the skips
    _backward(model, 1.0)
    metrics = optimizer_step(acc, model, optimizer, scheduler, 1.0, guard=guard)
    assert metrics["skipped_steps"] == 0.0 and math.isfinite(metrics["grad_norm"])
    assert not torch.equal(model.weight, before[0]) and torch.isfinite(model.weight).all()
    assert (guard.in_a_row, guard.skipped) == (0, 2)  # a good step resets the run of skips, not the count


def test_too_many_skips_in_a_row_end_the_run_with_one_clear_message():
    model, optimizer, scheduler = _setup()
    acc = make_accelerator()
    guard = NonFiniteGuard(limit=2)
    _backward(model, float("nan"))
    optimizer_step(acc, model, optimizer, scheduler, 1.0, guard=guard)
    _backward(model, float("nan"))
    with pytest.raises(TrainingDiverged, match="gradient norm was nan in 2 optimizer steps in a row") as err:
        optimizer_step(acc, model, optimizer, scheduler, 1.0, guard=guard)
    assert isinstance(err.value, NprError) and "max_skipped_steps" in str(err.value) and "\n" not in str(err.value)


def test_without_a_guard_a_skip_is_never_fatal():
    model, optimizer, scheduler = _setup()
    acc = make_accelerator()
    for _ in range(10):
        _backward(model, float("nan"))
        assert optimizer_step(acc, model, optimizer, scheduler, 0.0)["skipped_steps"] == 1.0
