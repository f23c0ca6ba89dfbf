"""Policy-gradient losses: DAPO's clipped surrogate and NPR's on-policy PAPO objective.

Shapes: B responses, T response token positions. ``logprobs`` [B, T] are the current policy's
log-probabilities of the sampled tokens (with grad), ``mask`` [B, T] is 1 on response tokens
that carry loss, ``advantages`` are per response [B] or per token [B, T].

Every loss shares one keyword call, so that a trainer never branches on the loss name::

    loss, metrics = loss_fn(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, agg=agg)

with hyperparameters bound in advance by ``get_policy_loss(name, **hyperparameters)``. A loss
joins by registration, as verl's ``register_policy_loss``::

    @register_policy_loss("my_loss", uses_old_logprobs=True)
    def my_loss(logprobs, old_logprobs, advantages, mask, agg="token-mean", my_coef=0.1): ...

Its parameters beyond the call's are its hyperparameters: a trainer binds each from the config
field of the same name (``npr.train.rl.policy_loss_fn``). Every metric it returns (a float per
name, the same names on every call) is reduced over the global batch and logged by the trainer:
a name starting with ``num_`` is a count (summed), any other a unit-weighted mean.
Masked positions are replaced by zeros *before* any arithmetic, so whatever they hold
(padding, -inf, nan) changes neither the loss nor its gradient.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TypeVar

import torch

from npr.algos.aggregation import aggregate, token_mean

PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, float]]]
_Loss = TypeVar("_Loss", bound=PolicyLoss)

# name -> loss function, filled by @register_policy_loss (a live view: configs read it for their choices)
POLICY_LOSSES: dict[str, PolicyLoss] = {}

# Losses whose objective reads old_logprobs (an importance ratio against the sampling policy). With
# several updates per rollout batch a trainer computes the old log-probs once for these; PAPO's sg-ratio
# is the current policy's own, so it needs none (NPR's code: on_policy=True, no recompute).
RATIO_LOSSES: set[str] = set()

# The keyword arguments a trainer passes on every call; a loss's other parameters are hyperparameters.
CALL_ARGUMENTS = ("logprobs", "old_logprobs", "advantages", "mask", "agg")


def register_policy_loss(name: str, *, uses_old_logprobs: bool) -> Callable[[_Loss], _Loss]:
    """Decorator adding a loss to ``POLICY_LOSSES`` as ``name`` (and to ``RATIO_LOSSES`` when its
    objective reads ``old_logprobs``). The loss must accept the keywords of ``CALL_ARGUMENTS``
    (``old_logprobs`` may be keyword-only and unused) and give every other parameter a default;
    ValueError for a taken name or a signature a trainer cannot call."""

    def register(loss_fn: _Loss) -> _Loss:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered ({POLICY_LOSSES[name].__qualname__})")
        parameters = inspect.signature(loss_fn).parameters
        missing = [a for a in CALL_ARGUMENTS if a not in parameters]
        if missing:
            raise ValueError(f"policy loss {name!r} must accept the keyword(s) {missing} (npr.algos.CALL_ARGUMENTS)")
        no_default = [k for k, p in parameters.items() if k not in CALL_ARGUMENTS and p.default is p.empty]
        if no_default:
            raise ValueError(f"policy loss {name!r}: hyperparameter(s) {no_default} need a default")
        POLICY_LOSSES[name] = loss_fn
        if uses_old_logprobs:
            RATIO_LOSSES.add(name)
        return loss_fn

    return register


def hyperparameter_names(name: str) -> tuple[str, ...]:
    """The hyperparameters of the loss registered as ``name``: its parameters beyond ``CALL_ARGUMENTS``."""
    return tuple(k for k in inspect.signature(_registered(name)).parameters if k not in CALL_ARGUMENTS)


def _registered(name: str) -> PolicyLoss:
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; choose one of {sorted(POLICY_LOSSES)}") from None


def metric_names(loss_fn: PolicyLoss) -> tuple[str, ...]:
    """The sorted metric names ``loss_fn`` (registered or bound) returns, read from one call on a
    single masked-out token: what a trainer reduces over ranks even where a rank has no tokens."""
    zeros = torch.zeros(1, 1)  # [1, 1]
    _, metrics = loss_fn(
        logprobs=zeros,
        old_logprobs=zeros,
        advantages=torch.zeros(1),
        mask=torch.zeros(1, 1, dtype=torch.bool),
        agg="token-mean",
    )
    return tuple(sorted(metrics))


# log-ratios are clamped to [-20, 20] before exp, as the reference (verl's compute_policy_loss): a policy that
# drifted far from the old one gives a finite loss (exp(20) ~ 4.9e8) instead of inf and NaN weights after AdamW
MAX_LOG_RATIO = 20.0


def _token_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-sequence advantages [B] broadcast to tokens [B, T]; [B, T] passes through (detached)."""
    advantages = advantages.detach()
    if advantages.shape == shape:
        return advantages  # [B, T]
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages.unsqueeze(-1).expand(shape)  # [B] -> [B, T]
    raise ValueError(
        f"advantages must be [B] or [B, T] = {tuple(shape)}, got {tuple(advantages.shape)}; "
        "compute one advantage per response (npr.algos.group_advantages) or per token"
    )


def _zero_masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, values, torch.zeros_like(values))  # [B, T]


def _check_shapes(logprobs: torch.Tensor, mask: torch.Tensor, old_logprobs: torch.Tensor | None) -> torch.Tensor:
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    if old_logprobs is not None and old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}")
    return mask.bool()  # [B, T]


@torch.no_grad()
def _ratio_metrics(log_ratio: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
    """Token-mean importance ratio and k3 KL estimate ``(r - 1) - log r`` (>= 0) of old vs new,
    from the log-ratio clamped to ``±MAX_LOG_RATIO`` (finite whatever the drift)."""
    log_ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
    ratio = log_ratio.exp()  # [B, T]
    return {
        "ratio_mean": token_mean(ratio, keep).item(),
        "approx_kl": token_mean(ratio - 1 - log_ratio, keep).item(),
        "num_tokens": float(keep.sum().item()),
    }


@register_policy_loss("dapo", uses_old_logprobs=True)
def dapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    agg: str = "token-mean",
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with DAPO's clip-higher (arXiv 2503.14476 eq. 10), optionally dual-clipped.

    Per token: ``max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))`` with
    ``r = exp(clamp(logprobs - old_logprobs, ±MAX_LOG_RATIO))``; with ``clip_ratio_c`` (> 1,
    dual-clip PPO, Ye et al. 2020 arXiv 1912.09729) a negative-advantage token's loss is
    capped at ``-A·c``, so a ratio far above 1 cannot make it unbounded; reduced by the
    aggregation named ``agg`` (DAPO's token-level mean by default). No KL or entropy term
    (DAPO drops the KL penalty). Clamp and dual clip follow the reference's verl
    (``compute_policy_loss``; NPR's runs: c = 10).

    logprobs [B, T] (grad), old_logprobs [B, T] (treated as constants), advantages [B] or
    [B, T], mask [B, T] -> (loss [], metrics) where metrics (floats, computed without grad)
    hold ``clip_fraction`` (tokens where the clipped branch is active) split into
    ``clip_fraction_low`` / ``clip_fraction_high``, ``clip_fraction_dual`` (tokens capped by
    the dual clip; 0 without it), ``ratio_mean``, ``approx_kl`` (k3) and ``num_tokens``.
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO's lower bound), got {clip_ratio_c}")
    keep = _check_shapes(logprobs, mask, old_logprobs)  # [B, T]
    adv = _zero_masked(_token_advantages(advantages, logprobs.shape), keep)  # [B, T]
    log_ratio = _zero_masked(logprobs, keep) - _zero_masked(old_logprobs.detach(), keep)  # [B, T]
    ratio = log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()  # [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    dual = torch.zeros_like(keep)  # [B, T]
    if clip_ratio_c is not None:
        cap = -adv * clip_ratio_c  # [B, T]
        dual = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    loss = aggregate(per_token, keep, agg)  # []

    with torch.no_grad():
        active = clipped > unclipped  # [B, T]
        metrics = _ratio_metrics(log_ratio, keep)
        metrics["clip_fraction_low"] = token_mean((active & (adv < 0)).float(), keep).item()
        metrics["clip_fraction_high"] = token_mean((active & (adv > 0)).float(), keep).item()
        metrics["clip_fraction"] = token_mean(active.float(), keep).item()
        metrics["clip_fraction_dual"] = token_mean(dual.float(), keep).item()
    return loss, metrics


@register_policy_loss("papo", uses_old_logprobs=False)
def papo_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    old_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """NPR's on-policy PAPO objective (arXiv 2512.07461, Stage 3 PAPO).

    ``ratio = exp(logπ - sg(logπ))`` is exactly 1 in value with gradient ∇logπ, so with
    ``token-mean`` the loss is ``-Σ_b Σ_t A_b / Σ_b |y_b|`` over every unmasked response token,
    tag tokens included (NPR keeps gradients on its special tokens), and
    ``∂loss/∂logprob_{b,t} = -A_b / Σ|y|``. No clipping, no KL, no entropy: PAPO updates
    strictly on-policy, one step per batch.

    logprobs [B, T] (grad), advantages [B] or [B, T], mask [B, T] -> (loss [], metrics).
    ``old_logprobs`` [B, T] is not part of the objective; when given, the metrics report the
    drift between it and ``logprobs`` (e.g. engine vs trainer numerics) as ``ratio_mean`` and
    ``approx_kl``; without it they read 1 and 0. ``clip_fraction`` is always 0.
    """
    keep = _check_shapes(logprobs, mask, old_logprobs)  # [B, T]
    adv = _zero_masked(_token_advantages(advantages, logprobs.shape), keep)  # [B, T]
    logprobs = _zero_masked(logprobs, keep)  # [B, T]
    ratio = (logprobs - logprobs.detach()).exp()  # [B, T], value 1, grad ∇logπ
    loss = aggregate(-adv * ratio, keep, agg)  # []

    with torch.no_grad():
        reference = logprobs if old_logprobs is None else _zero_masked(old_logprobs, keep)  # [B, T]
        metrics = _ratio_metrics(logprobs - reference, keep)
        metrics.update(clip_fraction=0.0, clip_fraction_low=0.0, clip_fraction_high=0.0, clip_fraction_dual=0.0)
    return loss, metrics


def get_policy_loss(name: str, **hyperparameters: float) -> PolicyLoss:
    """The loss registered as ``name`` with its ``hyperparameters`` (e.g. ``clip_high``) bound.

    The result is called as ``fn(logprobs=, old_logprobs=, advantages=, mask=, agg=)``.
    Unknown names, and hyperparameters the loss does not take, raise ValueError.
    """
    loss_fn = _registered(name)
    accepted = set(hyperparameter_names(name))
    unknown = sorted(set(hyperparameters) - accepted)
    if unknown:
        raise ValueError(
            f"policy loss {name!r} takes no hyperparameter(s) {unknown}; it accepts {sorted(accepted) or 'none'}"
        )
    return functools.partial(loss_fn, **hyperparameters) if hyperparameters else loss_fn
