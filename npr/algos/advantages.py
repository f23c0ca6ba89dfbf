"""Outcome advantages for group-sampled RL: GRPO/DAPO group normalisation and NPR's PAPO.

Every estimator maps one scalar reward per sampled response to one scalar advantage per
response, given the id of the prompt group each response was sampled for. Groups need not be
contiguous and their ids may be any integers. All functions are pure and vectorised.

Std convention: *unbiased* (Bessel-corrected, ``torch.std``'s default), as verl's GRPO and
DAPO estimators use. A group of size 1 has no baseline other than itself, so its advantage is
0 (verl instead returns the raw reward for such a group; we prefer no signal to an
un-normalised one).
"""

from __future__ import annotations

import torch


def _group_index(group_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Dense group index in [0, G) per sample, and G. Checks that there is one id per reward."""
    if group_ids.dim() != 1 or group_ids.numel() != n:
        raise ValueError(
            f"group_ids must be a 1-D tensor with one id per reward ({n}), got shape {tuple(group_ids.shape)}; "
            "pass the prompt index of each sampled response"
        )
    _, dense = torch.unique(group_ids, return_inverse=True)  # [N] in [0, G)
    num_groups = int(dense.max().item()) + 1 if n else 0
    return dense, num_groups


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(
            f"rewards must be a 1-D float tensor (one scalar per response), got shape {tuple(rewards.shape)} "
            f"dtype {rewards.dtype}; sum token-level rewards per response first"
        )


def group_mean_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and unbiased std of the sample's group.

    rewards FloatTensor[N], group_ids LongTensor[N] -> (mean FloatTensor[N], std FloatTensor[N]).
    The std of a group of size 1 is 0 (its deviation from its own mean is 0 too).
    """
    _check_rewards(rewards)
    dense, num_groups = _group_index(group_ids, rewards.numel())
    counts = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, dense, torch.ones_like(rewards))  # [G]
    sums = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, dense, rewards)  # [G]
    mean = (sums / counts)[dense]  # [N]
    squared = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, dense, (rewards - mean) ** 2)  # [G]
    std = (squared / (counts - 1).clamp(min=1)).sqrt()[dense]  # [N]
    return mean, std


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO/DAPO outcome advantage: ``(r - mean_g) / (std_g + eps)`` within each prompt group.

    rewards FloatTensor[N], group_ids LongTensor[N] (any ints) -> advantages FloatTensor[N].
    std_g is the unbiased std of the group (DeepSeekMath GRPO; DAPO, arXiv 2503.14476 eq. 9).
    A group whose rewards are all equal, or of size 1, gets advantage 0.
    """
    mean, std = group_mean_std(rewards, group_ids)  # [N], [N]
    return (rewards - mean) / (std + eps)  # [N]


def papo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """NPR's PAPO advantage: ``(r - mean_g) / (std_batch + eps)`` (arXiv 2512.07461, PAPO).

    rewards FloatTensor[N], group_ids LongTensor[N] (any ints) -> advantages FloatTensor[N].
    The baseline is the group mean, but the scale is the unbiased std of the WHOLE batch's
    rewards, computed once from the raw rewards before any group is normalised, so that a
    group with a small spread is not blown up to unit scale. (NPR's released code recomputed
    the std inside its per-sample loop after overwriting earlier scores; that makes the result
    depend on sample order. ``tests/test_algos.py`` keeps that loop as a counter-example.)
    A batch of one response has std 0 and advantage 0.
    """
    mean, _ = group_mean_std(rewards, group_ids)  # [N]
    batch_std = rewards.std(correction=1) if rewards.numel() > 1 else rewards.new_zeros(())  # []
    return (rewards - mean) / (batch_std + eps)  # [N]


def dynamic_sampling_filter(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling keep-mask (arXiv 2503.14476 §3.2, eq. 11's ``0 < |correct| < G``).

    rewards FloatTensor[N], group_ids LongTensor[N] -> BoolTensor[N], False for every response
    of a group of two or more responses whose rewards are all exactly equal (such a group has
    zero advantage and only dilutes the batch). A group of size 1 is kept, as verl's DAPO recipe
    (and so NPR's code) keeps it: ``std > 0 or len(group) == 1``.
    """
    _check_rewards(rewards)
    dense, num_groups = _group_index(group_ids, rewards.numel())
    init = torch.zeros(num_groups, dtype=rewards.dtype)  # [G]
    high = init.scatter_reduce(0, dense, rewards, reduce="amax", include_self=False)  # [G]
    low = init.scatter_reduce(0, dense, rewards, reduce="amin", include_self=False)  # [G]
    size = torch.zeros(num_groups, dtype=torch.long).scatter_add(0, dense, torch.ones_like(dense))  # [G]
    return ((high > low) | (size == 1))[dense]  # [N]


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment (arXiv 2503.14476 §3.4, eq. 13), added to the reward.

    lengths LongTensor[N] (response tokens) -> FloatTensor[N]: 0 when ``len <= max_len -
    buffer_len``; falls linearly to ``-penalty_factor`` across the buffer; ``-penalty_factor``
    at and beyond ``max_len``. ``buffer_len = 0`` makes it a step at ``max_len``.
    """
    if not 0 <= buffer_len <= max_len:
        raise ValueError(
            f"overlong buffer_len must lie in [0, max_len={max_len}], got {buffer_len}; "
            "DAPO uses a buffer of a fraction of the response budget (e.g. 4096 of 20480)"
        )
    lengths = torch.as_tensor(lengths)
    excess = (lengths - (max_len - buffer_len)).to(torch.float32)  # [N]
    if buffer_len == 0:
        return torch.where(excess > 0, -penalty_factor, 0.0)  # [N]
    return (-excess / buffer_len * penalty_factor).clamp(min=-penalty_factor, max=0.0)  # [N]
