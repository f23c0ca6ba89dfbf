"""npr.algos: hand-computed values, slow loop references, and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.algos import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    dapo_loss,
    dynamic_sampling_filter,
    get_advantage_estimator,
    get_aggregation,
    get_policy_loss,
    group_advantages,
    overlong_penalty,
    papo_advantages,
    papo_loss,
)

EPS = 1e-6
SQRT_HALF = math.sqrt(0.5)


# ---------------------------------------------------------------- slow references


def grpo_loop(rewards: list[float], group_ids: list[int], eps: float = EPS) -> list[float]:
    """One group at a time, in plain Python: unbiased std, size-1 group -> 0."""
    out = []
    for r, g in zip(rewards, group_ids):
        members = [x for x, h in zip(rewards, group_ids) if h == g]
        mean = sum(members) / len(members)
        if len(members) == 1:
            out.append(0.0)
            continue
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        out.append((r - mean) / (std + eps))
    return out


def papo_buggy_loop(rewards: list[float], group_ids: list[int], eps: float = EPS) -> list[float]:
    """Counter-example: NPR's released loop, which recomputes the batch std after each overwrite."""
    scores = torch.tensor(rewards, dtype=torch.float64)
    means = {g: sum(r for r, h in zip(rewards, group_ids) if h == g) / group_ids.count(g) for g in group_ids}
    for i, g in enumerate(group_ids):
        scores[i] = (scores[i] - means[g]) / (torch.std(scores) + eps)
    return scores.tolist()


def unbiased_std(values: list[float]) -> float:
    """Bessel-corrected std; 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


groups_and_rewards = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0]), min_size=n, max_size=n),
        st.lists(st.integers(min_value=-3, max_value=4), min_size=n, max_size=n),
    )
)


# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    # group 3: [1, 0] -> mean 0.5, unbiased std sqrt(0.5) -> ±sqrt(0.5); group 7: all equal -> 0;
    # group -2: size 1 -> 0; group 9: [1, 0, 0] -> mean 1/3, std sqrt(1/3) -> (2/3)/sqrt(1/3), ...
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 5.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([3, 7, 3, 7, -2, 9, 9, 9])
    third = math.sqrt(1 / 3)
    expected = [SQRT_HALF, 0.0, -SQRT_HALF, 0.0, 0.0, (2 / 3) / third, (-1 / 3) / third, (-1 / 3) / third]
    assert group_advantages(rewards, groups).tolist() == pytest.approx(expected, abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(groups_and_rewards)
def test_group_advantages_match_loop_and_sum_to_zero_per_group(data):
    rewards, group_ids = data
    fast = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(group_ids))
    assert fast.tolist() == pytest.approx(grpo_loop(rewards, group_ids), abs=1e-9)
    for g in set(group_ids):
        assert sum(a for a, h in zip(fast.tolist(), group_ids) if h == g) == pytest.approx(0.0, abs=1e-9)


def test_papo_advantages_hand_computed_and_buggy_loop_differs():
    # batch [1, 1, 1, -1]: mean 0.5, squared deviations 0.25·3 + 2.25 = 3, unbiased var 3/3 = 1.
    # group 5 = [1, 1] has mean 1, group 2 = [1, -1] has mean 0 -> (r - mean_g) / 1.
    rewards, groups = [1.0, 1.0, 1.0, -1.0], [5, 5, 2, 2]
    ours = papo_advantages(torch.tensor(rewards), torch.tensor(groups))
    assert ours.tolist() == pytest.approx([0.0, 0.0, 1.0, -1.0], abs=1e-5)
    # the loop zeroes group 5 first, so the std it divides group 2 by has shrunk to sqrt(2/3)
    buggy = papo_buggy_loop(rewards, groups)
    assert buggy[2] == pytest.approx(1 / math.sqrt(2 / 3), abs=1e-5)
    assert buggy != pytest.approx(ours.tolist(), abs=1e-3)
    # GRPO would instead scale group 2 by its own std sqrt(2)
    assert group_advantages(torch.tensor(rewards), torch.tensor(groups))[2].item() == pytest.approx(SQRT_HALF, abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(groups_and_rewards)
def test_papo_advantages_are_group_centred_over_batch_std(data):
    rewards, group_ids = data
    r = torch.tensor(rewards, dtype=torch.float64)
    adv = papo_advantages(r, torch.tensor(group_ids))
    batch_std = unbiased_std(rewards)
    group_mean = {g: sum(x for x, h in zip(rewards, group_ids) if h == g) / group_ids.count(g) for g in group_ids}
    centred = [x - group_mean[g] for x, g in zip(rewards, group_ids)]
    assert adv.tolist() == pytest.approx([c / (batch_std + EPS) for c in centred], abs=1e-9)
    for g in set(group_ids):
        assert sum(a for a, h in zip(adv.tolist(), group_ids) if h == g) == pytest.approx(0.0, abs=1e-9)


def test_advantages_reject_mismatched_group_ids():
    with pytest.raises(ValueError, match="one id per reward"):
        group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="1-D float"):
        papo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]))


def test_dynamic_sampling_filter_drops_constant_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 5.0, -1.0, -1.0, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3, 1])
    keep = dynamic_sampling_filter(rewards, groups)
    assert keep.dtype == torch.bool
    # group 2 has one response: kept, as verl's filter keeps it (std > 0 or a group of size 1)
    assert keep.tolist() == [False, False, True, True, True, False, False, True]


def test_overlong_penalty_hand_computed():
    # max_len 10, buffer 4: free up to 6, then -1/4 per extra token, -1 from 10 on
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    assert overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1, -1])
    assert overlong_penalty(lengths, 10, 4, penalty_factor=2.0).tolist() == pytest.approx([0, 0, -0.5, -1, -2, -2])
    assert overlong_penalty(torch.tensor([9, 10, 11]), 10, 0).tolist() == [0.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, 10, 11)


# ---------------------------------------------------------------- aggregation


def test_aggregations_hand_computed():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # last row: no tokens at all
    assert aggregate(losses, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(losses, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(losses, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert set(AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum"}


def test_aggregation_of_empty_mask_is_zero_and_unknown_name_lists_choices():
    losses = torch.ones(2, 3, requires_grad=True)
    for name in AGGREGATIONS:
        out = aggregate(losses, torch.zeros(2, 3), name)
        assert out.item() == 0.0 and out.requires_grad
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        get_aggregation("sum")


# ---------------------------------------------------------------- losses


def test_papo_loss_value_and_gradient_hand_computed():
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, -9.0]], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = papo_loss(logprobs, advantages, mask)
    # -(1·3 + (-2)·2) / 5 tokens
    assert loss.item() == pytest.approx(0.2)
    loss.backward()
    # d loss / d logprob_{b,t} = -A_b / 5
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.2, -0.2, -0.2], [0.4, 0.4, 0.0]]))
    assert metrics == {
        "ratio_mean": 1.0,
        "approx_kl": 0.0,
        "num_tokens": 5.0,
        "clip_fraction": 0.0,
        "clip_fraction_low": 0.0,
        "clip_fraction_high": 0.0,
        "clip_fraction_dual": 0.0,
    }


def test_dapo_loss_value_gradient_and_metrics_hand_computed():
    # ratios: row 0 (A=+1) [1.5, 0.5, 1.1]; row 1 (A=-1) [0.7, 1.5, masked]
    ratios = torch.tensor([[1.5, 0.5, 1.1], [0.7, 1.5, 1.0]])
    logprobs = ratios.log().requires_grad_(True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = dapo_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask)
    # row 0: max(-1.5, -1.28) = -1.28 (clipped high), -0.5 (below 0.8 but A>0: unclipped), -1.1
    # row 1: max(0.7, 0.8) = 0.8 (clipped low), max(1.5, 1.28) = 1.5 (unclipped)
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.1 + 0.8 + 1.5) / 5)
    loss.backward()
    # unclipped tokens: d(-A·r)/d logprob = -A·r, over 5 tokens; clipped tokens: 0
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.5 / 5, -1.1 / 5], [0.0, 1.5 / 5, 0.0]]))
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)
    assert metrics["clip_fraction_high"] == pytest.approx(1 / 5)
    assert metrics["clip_fraction_low"] == pytest.approx(1 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 0.7 + 1.5) / 5)
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.7, 1.5)) / 5
    assert metrics["approx_kl"] == pytest.approx(k3)
    assert all(isinstance(v, float) for v in metrics.values())


def test_dapo_log_ratio_is_clamped_to_20_before_exp():
    """A log-ratio of +100 (exp overflows fp32 to inf) gives the loss of +20; a clamped token has no
    gradient (clamp's), so nothing non-finite reaches the weights; -100 reads as -20."""
    logprobs = torch.tensor([[100.0, 0.0], [-100.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    loss, metrics = dapo_loss(logprobs, old, torch.tensor([-1.0, 1.0]), mask, clip_low=0.2, clip_high=0.28)
    # row 0 (A=-1): max(e^20, 1.28) = e^20, then 1; row 1 (A=+1): max(-e^-20, -0.8) = -e^-20, then -1
    assert loss.item() == pytest.approx((math.exp(20) + 1 - math.exp(-20) - 1) / 4)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    # the clamped tokens get no gradient; the unclamped ratio-1 tokens get -A·1/4
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.25], [0.0, -0.25]]))
    assert math.isfinite(metrics["ratio_mean"]) and math.isfinite(metrics["approx_kl"])
    assert metrics["ratio_mean"] == pytest.approx((math.exp(20) + 1 + math.exp(-20) + 1) / 4)


def test_dapo_dual_clip_caps_negative_advantage_tokens_hand_computed():
    """clip_ratio_c = 3: a negative-advantage token's loss is at most -A·3 (Ye et al. 2020, verl's dual clip);
    positive-advantage tokens and ratios below c are untouched."""
    ratios = torch.tensor([[5.0, 2.0, 0.5], [5.0, 1.0, 1.0]])
    logprobs = ratios.log().requires_grad_(True)
    advantages = torch.tensor([-2.0, 1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = dapo_loss(logprobs, torch.zeros(2, 3), advantages, mask, clip_ratio_c=3.0)
    # row 0 (A=-2): max(10, 2·1.28) = 10 -> capped at 6; max(4, 2.56) = 4 (< 6); max(1, 1.6) = 1.6 (clipped low)
    # row 1 (A=+1): max(-5, -1.28) = -1.28 (clipped high, no cap for A > 0); -1
    assert loss.item() == pytest.approx((6 + 4 + 1.6 - 1.28 - 1) / 5)
    loss.backward()
    # capped and clipped tokens: no gradient; token (0, 1): -A·r / 5 = 2·2 / 5; token (1, 1): -1·1 / 5
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.8, 0.0], [0.0, -0.2, 0.0]]))
    assert metrics["clip_fraction_dual"] == pytest.approx(1 / 5)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)  # the PPO clip, as without the dual clip
    plain, plain_metrics = dapo_loss(ratios.log(), torch.zeros(2, 3), advantages, mask)
    assert plain.item() == pytest.approx((10 + 4 + 1.6 - 1.28 - 1) / 5) and plain_metrics["clip_fraction_dual"] == 0.0
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        dapo_loss(logprobs, torch.zeros(2, 3), advantages, mask, clip_ratio_c=1.0)


def test_dapo_loss_seq_mean_token_mean_hand_computed():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    loss, _ = dapo_loss(
        logprobs,
        torch.zeros(2, 3),
        torch.tensor([1.0, -1.0]),
        torch.tensor([[1, 1, 1], [1, 0, 0]]),
        agg="seq-mean-token-mean",
    )
    assert loss.item() == pytest.approx(0.0)  # (-1 + 1) / 2
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.0, 0.0]]))


def test_per_token_advantages_are_accepted():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = papo_loss(logprobs, torch.tensor([[2.0, -4.0]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, T\]"):
        papo_loss(logprobs, torch.tensor([1.0, 2.0, 3.0]), torch.ones(1, 2))


def _random_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    b, t = 3, 5
    logprobs = -torch.rand(b, t, generator=gen) * 3
    old = logprobs + 0.3 * torch.randn(b, t, generator=gen)
    advantages = torch.randn(b, generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.6
    mask[:, 0] = True
    return logprobs, old, advantages, mask


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_masked_tokens_change_neither_loss_nor_gradient(name, agg):
    loss_fn = get_policy_loss(name)
    for seed in range(5):
        logprobs, old, advantages, mask = _random_batch(seed)
        results = []
        for junk in (0.0, float("nan"), float("-inf"), 123.0):
            lp = torch.where(mask, logprobs, junk).requires_grad_(True)
            old_junk = torch.where(mask, old, -junk)
            loss, _ = loss_fn(logprobs=lp, old_logprobs=old_junk, advantages=advantages, mask=mask, agg=agg)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
            assert (lp.grad[~mask] == 0).all()
            results.append((loss.detach(), lp.grad))
        for loss, grad in results[1:]:
            torch.testing.assert_close(loss, results[0][0])
            torch.testing.assert_close(grad, results[0][1])


def test_papo_loss_is_minus_mean_token_advantage_and_dapo_on_policy_agrees():
    for seed in range(10):
        logprobs, _, advantages, mask = _random_batch(seed)
        token_adv = advantages[:, None].expand_as(mask)[mask]
        lp_papo = logprobs.clone().requires_grad_(True)
        papo, _ = papo_loss(lp_papo, advantages, mask)
        torch.testing.assert_close(papo, -token_adv.mean())
        # DAPO with old == new: ratio 1, no clipping -> same value and same gradient
        lp_dapo = logprobs.clone().requires_grad_(True)
        dapo, metrics = dapo_loss(lp_dapo, logprobs, advantages, mask)
        torch.testing.assert_close(dapo, papo)
        papo.backward()
        dapo.backward()
        torch.testing.assert_close(lp_dapo.grad, lp_papo.grad)
        assert metrics["clip_fraction"] == 0.0 and metrics["approx_kl"] == pytest.approx(0.0, abs=1e-7)


def test_papo_metrics_report_drift_from_old_logprobs():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    old = torch.tensor([[0.0, -math.log(2.0)]])  # ratio [1, 2]
    loss, metrics = papo_loss(logprobs, torch.tensor([1.0]), torch.ones(1, 2), old_logprobs=old)
    assert loss.item() == pytest.approx(-1.0)  # the objective ignores old_logprobs
    assert metrics["ratio_mean"] == pytest.approx(1.5)
    assert metrics["approx_kl"] == pytest.approx((1 - math.log(2)) / 2)


# ---------------------------------------------------------------- registries


def test_registries_pick_by_name_and_reject_unknown_names():
    assert get_advantage_estimator("grpo") is group_advantages
    assert get_advantage_estimator("papo") is papo_advantages
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "papo"}
    with pytest.raises(ValueError, match=r"'grpo', 'papo'"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match=r"'dapo', 'papo'"):
        get_policy_loss("grpo")
    with pytest.raises(ValueError, match="clip_high"):
        get_policy_loss("papo", clip_high=0.28)


def test_policy_losses_share_one_call_with_bound_hyperparameters():
    logprobs = torch.log(torch.tensor([[2.0, 1.0]]))
    kwargs = dict(
        logprobs=logprobs,
        old_logprobs=torch.zeros(1, 2),
        advantages=torch.tensor([1.0]),
        mask=torch.ones(1, 2),
        agg="token-mean",
    )
    wide, _ = get_policy_loss("dapo", clip_low=0.2, clip_high=2.0)(**kwargs)
    default, _ = get_policy_loss("dapo")(**kwargs)
    papo, _ = get_policy_loss("papo")(**kwargs)
    assert wide.item() == pytest.approx(-(2.0 + 1.0) / 2)  # ratio 2 inside [0.8, 3]
    assert default.item() == pytest.approx(-(1.28 + 1.0) / 2)  # ratio 2 clipped to 1.28
    assert papo.item() == pytest.approx(-1.0)
