"""Loss aggregation: how a [B, T] matrix of per-token losses becomes one scalar.

The choice is a named switch (``AGGREGATIONS``) because it changes what an RL objective
optimises: ``token-mean`` weighs every token equally across the batch (DAPO's token-level
loss, arXiv 2503.14476 §3.3, and NPR's PAPO ``1 / Σ|y|``), ``seq-mean-token-mean`` weighs every
sequence equally (the original GRPO objective), ``seq-mean-token-sum`` sums each sequence and
averages over sequences (no length normalisation, as in Dr. GRPO, arXiv 2503.20783).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Aggregation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _masked(token_losses: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the masked entries with ``where`` (not a product) so inf/nan there cannot leak."""
    if token_losses.shape != mask.shape:
        raise ValueError(
            f"token losses {tuple(token_losses.shape)} and mask {tuple(mask.shape)} must have the same [B, T] shape"
        )
    keep = mask.bool()  # [B, T]
    return torch.where(keep, token_losses, torch.zeros_like(token_losses)), keep.to(token_losses.dtype)


def token_mean(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over unmasked tokens / number of unmasked tokens in the batch. [B, T], [B, T] -> [].

    An all-masked batch gives 0 (still attached to the graph)."""
    losses, weights = _masked(token_losses, mask)  # [B, T], [B, T]
    return losses.sum() / weights.sum().clamp(min=1.0)  # []


def seq_mean_token_mean(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean. [B, T], [B, T] -> [].

    Sequences with no unmasked token are left out of the mean (they carry no loss)."""
    losses, weights = _masked(token_losses, mask)  # [B, T], [B, T]
    tokens = weights.sum(dim=-1)  # [B]
    seq_means = losses.sum(dim=-1) / tokens.clamp(min=1.0)  # [B]
    return seq_means.sum() / (tokens > 0).sum().clamp(min=1)  # []


def seq_mean_token_sum(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's token sum. [B, T], [B, T] -> [].

    Sequences with no unmasked token are left out of the mean."""
    losses, weights = _masked(token_losses, mask)  # [B, T], [B, T]
    tokens = weights.sum(dim=-1)  # [B]
    return losses.sum() / (tokens > 0).sum().clamp(min=1)  # []


AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
}


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, name: str = "token-mean") -> torch.Tensor:
    """Reduce per-token losses [B, T] under ``mask`` [B, T] to a scalar by the named aggregation."""
    return get_aggregation(name)(token_losses, mask)


def get_aggregation(name: str) -> Aggregation:
    """The aggregation registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return AGGREGATIONS[name]
    except KeyError:
        raise ValueError(f"unknown loss aggregation {name!r}; choose one of {sorted(AGGREGATIONS)}") from None
