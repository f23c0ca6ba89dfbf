"""Pure RL algorithms: advantage estimators, policy losses, loss aggregation (torch only).

Each family is a registry by name so that a config picks the variant and the trainer never
branches on it: ``get_advantage_estimator("papo")``, ``get_policy_loss("dapo", clip_high=0.28)``,
``get_aggregation("token-mean")``. A new policy loss is one function decorated with
``@register_policy_loss(name, uses_old_logprobs=...)`` (docs/training.md shows one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from npr.algos.advantages import (
    dynamic_sampling_filter,
    group_advantages,
    group_mean_std,
    overlong_penalty,
    papo_advantages,
)
from npr.algos.aggregation import (
    AGGREGATIONS,
    aggregate,
    get_aggregation,
    seq_mean_token_mean,
    seq_mean_token_sum,
    token_mean,
)
from npr.algos.losses import (
    CALL_ARGUMENTS,
    POLICY_LOSSES,
    RATIO_LOSSES,
    PolicyLoss,
    dapo_loss,
    get_policy_loss,
    hyperparameter_names,
    metric_names,
    papo_loss,
    register_policy_loss,
)

AdvantageEstimator = Callable[..., torch.Tensor]

# name -> fn(rewards FloatTensor[N], group_ids LongTensor[N], eps=1e-6) -> FloatTensor[N]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": group_advantages,
    "papo": papo_advantages,
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The advantage estimator registered as ``name``; ValueError listing the names otherwise."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; choose one of {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "CALL_ARGUMENTS",
    "POLICY_LOSSES",
    "RATIO_LOSSES",
    "AdvantageEstimator",
    "PolicyLoss",
    "aggregate",
    "dapo_loss",
    "dynamic_sampling_filter",
    "get_advantage_estimator",
    "get_aggregation",
    "get_policy_loss",
    "group_advantages",
    "group_mean_std",
    "hyperparameter_names",
    "metric_names",
    "overlong_penalty",
    "papo_advantages",
    "papo_loss",
    "register_policy_loss",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "token_mean",
]
