"""Batched device-side sampling (npr.engine.sampling) against slow references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from npr.engine.sampling import CANDIDATES, RowParams, redraw_wide, row_uniform, row_uniforms, sample


def reference_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """Slow reference: softmax(logits / T), top-k, then the nucleus of the renormalised top-k mass
    (keep a token while the mass strictly before it is below top_p), renormalised."""
    z = [x / temperature for x in logits]
    top = max(z)
    weights = [math.exp(x - top) for x in z]
    probs = [w / sum(weights) for w in weights]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k > 0:
        order = order[:top_k]
    mass = sum(probs[i] for i in order)
    kept, before = [], 0.0
    for i in order:
        if before / mass < top_p:
            kept.append(i)
        before += probs[i]
    total = sum(probs[i] for i in kept)
    return {i: probs[i] / total for i in kept}


def draw(logits: torch.Tensor, params: RowParams) -> list[int]:
    tokens, wide = sample(logits.clone(), params)
    tokens = tokens.tolist()
    redo = [i for i, w in enumerate(wide.tolist()) if w]
    for i, t in zip(redo, redraw_wide(logits, params, redo) if redo else []):
        tokens[i] = t
    return tokens


CASES = [  # (temperature, top_k, top_p, logit scale): scale 0.01 makes a flat distribution whose nucleus
    (1.0, 0, 0.7, 3.0),  # holds more than CANDIDATES tokens (the wide redraw)
    (0.7, 20, 1.0, 3.0),
    (1.3, 5, 0.5, 3.0),
    (1.0, 0, 1.0, 3.0),  # plain categorical
    (1.0, 0, 0.9, 0.01),
    (1.0, 300, 0.95, 0.01),  # top_k above CANDIDATES
]


@pytest.mark.parametrize("temperature, top_k, top_p, scale", CASES)
def test_quantiles_match_the_reference_distribution(temperature, top_k, top_p, scale):
    """Sweeping the row's uniform number over a fine grid draws every token of the reference support
    in proportion to its reference probability, and nothing outside it."""
    vocab, grid = 400, 4000
    assert vocab > CANDIDATES
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * scale
    reference = reference_distribution(logits.tolist(), temperature, top_k, top_p)
    uniforms = [(i + 0.5) / grid for i in range(grid)]
    params = RowParams([temperature] * grid, [top_p] * grid, [top_k] * grid, uniforms)
    tokens = draw(logits.expand(grid, vocab), params)
    counts: dict[int, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    assert set(counts) <= set(reference)
    for token, p in reference.items():
        assert abs(counts.get(token, 0) / grid - p) <= 2 / grid + 1e-6, (token, counts.get(token, 0) / grid, p)
    if scale < 1 and top_k == 0:
        assert len(reference) > CANDIDATES  # the case really needed the wide redraw


def test_a_row_draws_the_same_whatever_shares_its_batch():
    rng = random.Random(3)
    vocab, rows = 300, 24
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)) * 2
    params = RowParams(
        [rng.choice([0.0, 0.8, 1.0]) for _ in range(rows)],
        [rng.choice([1.0, 0.7, 0.95]) for _ in range(rows)],
        [rng.choice([0, 5, 50]) for _ in range(rows)],
        [rng.random() for _ in range(rows)],
    )
    together = draw(logits, params)
    for i in range(rows):
        alone = RowParams([params.temperature[i]], [params.top_p[i]], [params.top_k[i]], [params.uniform[i]])
        assert draw(logits[i : i + 1], alone) == [together[i]]
    greedy = [i for i in range(rows) if params.temperature[i] == 0]
    assert greedy and all(together[i] == int(logits[i].argmax()) for i in greedy)


def test_row_uniforms_are_row_uniform_per_key():
    keys = [(0, 0, 0, 0, 0), (11, 2, 1, 3, 19), (-5, 0, 0, 0, 0), (2**63 - 1, 1, 1, 1, 1)]
    assert row_uniforms(keys) == [row_uniform(*k) for k in keys] and row_uniforms([]) == []


def test_row_uniform_is_a_deterministic_counter_hash():
    keys = [(11, s, b, k, o) for s in range(3) for b in range(2) for k in range(3) for o in range(20)]
    values = [row_uniform(*key) for key in keys]
    assert values == [row_uniform(*key) for key in keys]
    assert len(set(values)) == len(values) and all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.05
    assert row_uniform(-5, 0, 0, 0, 0) != row_uniform(5, 0, 0, 0, 0)
