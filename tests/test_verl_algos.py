"""npr_papo in verl: the loss and the estimator, called through verl's registries on verl's DataProto, equal npr's.

verl is the ``verl`` extra (scripts/setup.sh --dev installs it); these tests fail, not skip, without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl import DataProto
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.core_algos import agg_loss, get_adv_estimator_fn, get_policy_loss_fn
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.workers.config import FSDPActorConfig

import npr.integrations.verl  # noqa: F401  (registers npr_papo)
from npr.algos import papo_advantages, papo_loss
from npr.integrations.verl.algos import PAPO_NAME, papo_advantage, papo_policy_loss

MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def actor_config(**global_batch_info) -> FSDPActorConfig:
    config = FSDPActorConfig(strategy="fsdp", rollout_n=2, ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=1)
    config.global_batch_info.update(global_batch_info)
    return config


def rollout_batch(rewards: list[float], uids: list[str], lengths: list[int], width: int = 6) -> DataProto:
    """A verl batch as the trainer holds it before compute_advantage: outcome reward on each last token."""
    mask = torch.zeros(len(rewards), width)
    token_rewards = torch.zeros(len(rewards), width)
    for i, (r, n) in enumerate(zip(rewards, lengths)):
        mask[i, :n] = 1
        if n:
            token_rewards[i, n - 1] = r
    return DataProto.from_dict(
        tensors={"token_level_rewards": token_rewards, "response_mask": mask},
        non_tensors={"uid": np.array(uids, dtype=object)},
    )


def test_registered_under_npr_papo():
    assert get_policy_loss_fn(PAPO_NAME) is papo_policy_loss
    assert get_adv_estimator_fn(PAPO_NAME) is papo_advantage


def test_advantage_hand_computed_through_compute_advantage():
    # groups a: [1, -1], b: [1, 1]; batch std of [1, -1, 1, 1] (unbiased) = 1
    data = rollout_batch([1.0, -1.0, 1.0, 1.0], ["a", "a", "b", "b"], [3, 2, 4, 1])
    out = compute_advantage(data, adv_estimator=PAPO_NAME, config=AlgoConfig())
    expected = torch.tensor([1.0, -1.0, 0.0, 0.0]) / (1.0 + 1e-6)
    assert torch.allclose(out.batch["advantages"][:, 0], expected)
    assert torch.equal(out.batch["advantages"] != 0, (out.batch["response_mask"] > 0) & (expected != 0)[:, None])


def test_advantage_equals_npr_on_kept_rollouts_and_masks_dropped():
    gen = torch.Generator().manual_seed(3)
    n = 24
    rewards = torch.randint(-1, 2, (n,), generator=gen).float().tolist()
    uids = [f"p{i % 5}" for i in torch.randperm(n, generator=gen).tolist()]
    lengths = torch.randint(1, 7, (n,), generator=gen).tolist()
    dropped = [3, 4, 11, 20]
    for i in dropped:
        lengths[i] = 0  # the agent loop zeroes the response mask of a rollout npr would drop
    data = rollout_batch(rewards, uids, lengths)
    out = compute_advantage(data, adv_estimator=PAPO_NAME, config=AlgoConfig())
    advantages = out.batch["advantages"]

    kept = [i for i in range(n) if i not in dropped]
    groups = torch.tensor([int(uids[i][1:]) for i in kept])
    expected = papo_advantages(torch.tensor([rewards[i] for i in kept]), groups)
    mask = out.batch["response_mask"]
    assert torch.allclose(advantages[kept], expected[:, None] * mask[kept], atol=1e-6)
    assert torch.equal(advantages[dropped], torch.zeros(len(dropped), 6))
    # a dropped rollout's reward moves nothing: change it and the kept advantages stay
    rewards[dropped[0]] = 7.0
    again = compute_advantage(rollout_batch(rewards, uids, lengths), adv_estimator=PAPO_NAME, config=AlgoConfig())
    assert torch.equal(again.batch["advantages"], advantages)


def random_step(seed: int, b: int = 5, t: int = 7):
    gen = torch.Generator().manual_seed(seed)
    log_prob = (-torch.rand(b, t, generator=gen) * 3).requires_grad_()
    old = log_prob.detach() + 0.05 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, 1, generator=gen).expand(b, t).contiguous()
    mask = (torch.rand(b, t, generator=gen) > 0.3).float()
    mask[2] = 0  # an empty row
    return log_prob, old, adv * mask, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_equals_npr_on_one_rank(mode):
    log_prob, old, adv, mask = random_step(0)
    loss, metrics = get_policy_loss_fn(PAPO_NAME)(
        old_log_prob=old,
        log_prob=log_prob,
        advantages=adv,
        response_mask=mask.bool(),
        loss_agg_mode=mode,
        config=actor_config(),
        rollout_is_weights=None,
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    lp = log_prob.detach().clone().requires_grad_()
    reference, reference_metrics = papo_loss(logprobs=lp, advantages=adv, mask=mask, agg=mode, old_logprobs=old)
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-6)
    assert torch.allclose(grad, lp.grad, atol=1e-7)
    assert metrics["actor/npr_approx_kl"] == pytest.approx(reference_metrics["approx_kl"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "info",
    [
        {},
        {"dp_size": 4, "batch_num_tokens": 61, "global_batch_size": 19},
        {"dp_size": 2, "batch_num_tokens": 30, "global_batch_size": 9, "loss_scale_factor": 11},
    ],
)
def test_loss_follows_verl_aggregation_with_global_batch_info(mode, info):
    """PAPO's value is -A per token (ratio 1) with gradient -A·∇logπ: verl's own agg_loss of that matrix,
    with the same global batch information, is the reference for value and gradient."""
    log_prob, old, adv, mask = random_step(1)
    config = actor_config(**info)
    loss, _ = papo_policy_loss(old, log_prob, adv, mask.bool(), mode, config, None)
    (grad,) = torch.autograd.grad(loss, log_prob)
    lp = log_prob.detach().clone().requires_grad_()
    per_token = -adv * torch.exp(lp - lp.detach())
    reference = agg_loss(per_token, mask.bool(), mode, **config.global_batch_info)
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-6)
    assert torch.allclose(grad, lp.grad, atol=1e-7)


def test_rollout_is_weights_scale_each_token():
    log_prob, old, adv, mask = random_step(2)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(9)) + 0.5
    loss, _ = papo_policy_loss(old, log_prob, adv, mask.bool(), "token-mean", actor_config(), weights)
    reference, _ = papo_loss(logprobs=log_prob, advantages=adv * weights, mask=mask)
    assert torch.allclose(loss, reference, atol=1e-6)


def test_loss_refuses_unknown_mode_and_missing_global_counts():
    log_prob, old, adv, mask = random_step(0)
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        papo_policy_loss(old, log_prob, adv, mask, "seq-sum", actor_config(), None)
    with pytest.raises(ValueError, match="batch_num_tokens when dp_size > 1"):
        papo_policy_loss(old, log_prob, adv, mask, "token-mean", actor_config(dp_size=2), None)


def test_verl_imports_npr_in_its_processes(tmp_path):
    """The verl.plugins entry point npr's pyproject declares registers npr_papo in a fresh verl process (a
    distribution carrying the same entry point stands in for the editable install, whose metadata is older)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    target = "npr.integrations.verl"
    assert f'[project.entry-points."verl.plugins"]\nnpr = "{target}"' in pyproject
    info = tmp_path / "npr_verl_plugin-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: npr-verl-plugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[verl.plugins]\nnpr = {target}\n")
    code = (
        "import verl\nfrom verl.trainer.ppo.core_algos import get_policy_loss_fn, get_adv_estimator_fn\n"
        "print(get_policy_loss_fn('npr_papo').__module__, get_adv_estimator_fn('npr_papo').__module__)"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", ""), str(Path(__file__).parents[1])])
    env = dict(os.environ, PYTHONPATH=path, VERL_USE_EXTERNAL_PLUGINS="npr")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["npr.integrations.verl.algos"] * 2, out.stderr[-2000:]


def test_stage1_needs_nothing_new_verls_grpo_and_vanilla_loss_are_npr_dapo():
    """docs/verl.md's claim for Stage 1: verl's GRPO advantage and vanilla PPO loss (clip-higher, dual clip)
    equal npr's group_advantages and dapo_loss on the same tensors (groups of two or more)."""
    from npr.algos import dapo_loss, group_advantages

    gen = torch.Generator().manual_seed(5)
    rewards = torch.randint(-1, 2, (12,), generator=gen).float()
    uids = [f"p{i % 3}" for i in range(12)]
    out = compute_advantage(rollout_batch(rewards.tolist(), uids, [4] * 12), adv_estimator="grpo", config=AlgoConfig())
    expected = group_advantages(rewards, torch.tensor([i % 3 for i in range(12)]))
    assert torch.allclose(out.batch["advantages"][:, 0], expected, atol=1e-6)

    log_prob, old, adv, mask = random_step(4)
    old = log_prob.detach() + 0.4 * torch.randn(log_prob.shape, generator=gen)  # ratios far enough to clip
    config = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=2,
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=10.0,
    )
    loss, metrics = get_policy_loss_fn("vanilla")(old, log_prob, adv, mask.bool(), "token-mean", config, None)
    reference, reference_metrics = dapo_loss(
        logprobs=log_prob, old_logprobs=old, advantages=adv, mask=mask, clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0
    )
    assert torch.allclose(loss, reference, atol=1e-6)
    assert reference_metrics["clip_fraction"] > 0
    assert metrics["actor/pg_clipfrac"] == pytest.approx(reference_metrics["clip_fraction"], abs=1e-6)
