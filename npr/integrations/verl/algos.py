"""PAPO in verl's registries: ``npr_papo`` as a policy loss and as an advantage estimator.

Both are thin adapters over npr's own functions (``npr.algos.papo_loss``, ``npr.algos.papo_advantages``):
there is one definition of PAPO, and these translate verl's call conventions to it.

- The loss takes verl's arguments (``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
  config, rollout_is_weights``) and returns npr's loss rescaled by a constant so that it equals what verl's
  ``agg_loss`` gives with the global batch information (``config.global_batch_info``: dp size, global token
  count, global batch size) that verl's actor sets before each micro-batch. The gradient is npr's gradient
  times that constant, which is how verl makes a micro-batch's loss sum to the global-batch mean.
- The estimator runs on verl's driver over the whole batch (as npr's Stage 3 gathers the global batch):
  group mean baseline, unbiased std of the whole batch's rewards. Rollouts whose ``response_mask`` is all
  zero are the ones npr would drop (an illegal structure or a failed schema; the ``npr_parallel`` agent loop
  zeroes their mask): they are left out of the means and the std and get advantage 0, exactly as npr's
  Stage 3 computes advantages over the kept rollouts only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

from npr.algos import papo_advantages, papo_loss

PAPO_NAME = "npr_papo"

# verl's loss_agg_mode -> the npr aggregation that, times a per-micro-batch constant, equals it
_NPR_AGGREGATION = {
    "token-mean": "token-mean",
    "token-sum": "token-mean",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum",
}


def verl_aggregation_scale(
    loss_agg_mode: str, response_mask: torch.Tensor, global_batch_info: dict[str, Any] | None
) -> tuple[str, torch.Tensor | float]:
    """npr's aggregation name and the factor that turns its local (micro-batch) value into verl's ``agg_loss``.

    response_mask [B, T]. npr divides by the micro-batch's own token (or non-empty sequence) count; verl divides
    by the global count from ``global_batch_info`` and multiplies by ``dp_size`` (data-parallel ranks average
    their gradients). Without global counts verl uses the local ones, which needs ``dp_size == 1``.
    """
    if loss_agg_mode not in _NPR_AGGREGATION:
        raise ValueError(f"npr_papo: unknown loss_agg_mode {loss_agg_mode!r}; choose one of {sorted(_NPR_AGGREGATION)}")
    info = global_batch_info or {}
    dp_size = info.get("dp_size") or 1
    keep = response_mask.bool()  # [B, T]
    if loss_agg_mode.startswith("token-"):
        local = keep.sum().clamp(min=1)  # [] npr's token-mean denominator
        if loss_agg_mode == "token-sum":
            return "token-mean", local * dp_size
        total = info.get("batch_num_tokens")
        return "token-mean", _global_ratio(local, total, dp_size, "batch_num_tokens")
    local = (keep.sum(dim=-1) > 0).sum().clamp(min=1)  # [] npr's non-empty sequence count
    scale = _global_ratio(local, info.get("global_batch_size"), dp_size, "global_batch_size")
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = scale / (info.get("loss_scale_factor") or response_mask.shape[-1])
    return _NPR_AGGREGATION[loss_agg_mode], scale


def _global_ratio(local: torch.Tensor, total: Any, dp_size: int, name: str) -> torch.Tensor | float:
    if total is None:
        if dp_size > 1:
            raise ValueError(f"npr_papo: global_batch_info needs {name} when dp_size > 1 (verl's actor sets it)")
        return 1.0
    return local / total * dp_size


@register_policy_loss(PAPO_NAME)
def papo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``npr_papo``: ``npr.algos.papo_loss`` under verl's aggregation.

    old_log_prob, log_prob (grad), advantages, response_mask, rollout_is_weights: [B, T] -> (loss [], metrics).
    Per token the objective is ``-w·A·exp(logπ - sg(logπ))`` (value ``-w·A``, gradient ``-w·A·∇logπ``) with
    ``w`` verl's rollout importance-sampling weight (1 without it): the correction verl's rollout_correction
    computes for the gap between the rollout engine's and the actor's log-probs (docs/verl.md, the join).
    ``old_log_prob`` is not part of the objective; ``actor/npr_approx_kl`` reports its drift from ``log_prob``.
    """
    if rollout_is_weights is not None:
        advantages = advantages * rollout_is_weights.detach()  # [B, T]: -A·w·ratio == -(A·w)·ratio
    info = getattr(config, "global_batch_info", None) if config is not None else None
    aggregation, scale = verl_aggregation_scale(loss_agg_mode, response_mask, info)
    loss, metrics = papo_loss(
        logprobs=log_prob, advantages=advantages, mask=response_mask, agg=aggregation, old_logprobs=old_log_prob
    )
    return loss * scale, {
        "actor/pg_clipfrac": 0.0,
        "actor/pg_clipfrac_lower": 0.0,
        "actor/npr_approx_kl": metrics["approx_kl"],
        "actor/npr_ratio_mean": metrics["ratio_mean"],
    }


@register_adv_est(PAPO_NAME)
def papo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``npr_papo``: ``npr.algos.papo_advantages`` over the batch's kept rollouts.

    token_level_rewards [B, T] (one outcome reward per row, summed), response_mask [B, T], index [B] (verl's
    prompt ``uid``s, any hashable) -> (advantages [B, T], returns [B, T]), both the per-response advantage
    broadcast over its response tokens. Rows with an all-zero response_mask are dropped rollouts: excluded
    from every statistic, advantage 0.
    """
    scores = token_level_rewards.sum(dim=-1).float()  # [B]
    kept = response_mask.bool().any(dim=-1)  # [B]
    _, dense = np.unique(np.asarray(index), return_inverse=True)
    groups = torch.as_tensor(dense.reshape(-1), dtype=torch.long, device=scores.device)  # [B]
    advantages = torch.zeros_like(scores)  # [B]
    # once per step on the driver, over B scalars: the boolean index is the plain way to say "kept only"
    advantages[kept] = papo_advantages(scores[kept], groups[kept], eps=epsilon)
    per_token = advantages.unsqueeze(-1) * response_mask  # [B, T]
    return per_token, per_token
