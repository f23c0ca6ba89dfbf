"""Losses and rewards by registry: a new policy loss is one decorated function whose
hyperparameters bind from the config by name and whose every metric is reduced and logged;
Stage 3's reward is the config's ``reward``, as Stage 1's."""

from __future__ import annotations

import pytest
import torch

from npr.algos import (
    POLICY_LOSSES,
    RATIO_LOSSES,
    dapo_loss,
    get_policy_loss,
    hyperparameter_names,
    metric_names,
    papo_loss,
    register_policy_loss,
)
from npr.algos.aggregation import aggregate, token_mean
from npr.rewards import REWARDS, get_reward, register_reward
from npr.train.config import ConfigError, Stage1Config, Stage3Config
from npr.train.rl import combine_step_metrics, policy_loss_fn

REQUIRED = {"model": "tiny-random-llama", "train_data": "rg:chain_sum?size=4&terms=2"}


def scaled_pg_loss(
    logprobs, old_logprobs, advantages, mask, agg="token-mean", clip_low=0.2, scale=3.0, temperature=99.0
):
    """A REINFORCE loss times ``scale``; ``clip_low`` and ``temperature`` exist only to show binding by name."""
    keep = mask.bool()  # [B, T]
    adv = advantages.detach().unsqueeze(-1).expand_as(logprobs)  # [B, T]
    per_token = torch.where(keep, -adv * logprobs * scale, torch.zeros_like(logprobs))  # [B, T]
    with torch.no_grad():
        metrics = {
            "test_scale": scale,
            "test_clip_low": clip_low,
            "test_temperature": temperature,
            "test_mean_logprob": token_mean(torch.where(keep, logprobs, 0.0), keep).item(),
            "num_test_tokens": float(keep.sum()),
        }
    return aggregate(per_token, keep, agg), metrics


@pytest.fixture
def registered():
    """``scaled_pg`` registered for one test, removed after it (the built-in tests iterate the registry)."""
    register_policy_loss("scaled_pg", uses_old_logprobs=True)(scaled_pg_loss)
    register_reward("test_half")(lambda response, problem: 0.5)
    yield
    del POLICY_LOSSES["scaled_pg"], REWARDS["test_half"]
    RATIO_LOSSES.discard("scaled_pg")


def test_builtin_losses_are_registered():
    assert POLICY_LOSSES == {"dapo": dapo_loss, "papo": papo_loss} and RATIO_LOSSES == {"dapo"}
    assert hyperparameter_names("dapo") == ("clip_low", "clip_high", "clip_ratio_c")
    assert hyperparameter_names("papo") == ()
    clip = ("clip_fraction", "clip_fraction_dual", "clip_fraction_high", "clip_fraction_low")
    assert metric_names(dapo_loss) == metric_names(papo_loss) == ("approx_kl", *clip, "num_tokens", "ratio_mean")
    assert REWARDS.keys() == {"accuracy", "stage1"}


def test_registration_checks_name_and_signature(registered):
    assert POLICY_LOSSES["scaled_pg"] is scaled_pg_loss and "scaled_pg" in RATIO_LOSSES
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("scaled_pg", uses_old_logprobs=False)(papo_loss)
    with pytest.raises(ValueError, match=r"must accept the keyword\(s\) \['agg'\]"):
        register_policy_loss("no_agg", uses_old_logprobs=False)(lambda logprobs, old_logprobs, advantages, mask: 0)
    with pytest.raises(ValueError, match=r"hyperparameter\(s\) \['beta'\] need a default"):
        register_policy_loss("no_default", uses_old_logprobs=False)(
            lambda logprobs, old_logprobs, advantages, mask, agg, beta: 0
        )
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(lambda response, problem: 1.0)
    assert "no_agg" not in POLICY_LOSSES and "no_default" not in POLICY_LOSSES


def test_config_accepts_a_loss_registered_after_import_and_binds_its_hyperparameters_by_name(registered):
    """clip_low and temperature come from the config fields of those names; scale (no such field) keeps its
    default; Stage 1's dapo still gets exactly its three clip fields."""
    config = Stage1Config(**REQUIRED, policy_loss="scaled_pg", clip_low=0.1, temperature=0.7)
    loss_fn = policy_loss_fn(config)
    assert loss_fn.func is scaled_pg_loss and loss_fn.keywords == {"clip_low": 0.1, "temperature": 0.7}
    assert policy_loss_fn(Stage1Config(**REQUIRED, clip_ratio_c=10.0)).keywords == {
        "clip_low": 0.2,
        "clip_high": 0.28,
        "clip_ratio_c": 10.0,
    }
    assert policy_loss_fn(Stage3Config(**REQUIRED)) is papo_loss
    assert Stage3Config(**REQUIRED, reward="test_half").reward == "test_half"
    with pytest.raises(ConfigError, match="'policy_loss': 'nope' is not one of dapo, papo, scaled_pg"):
        Stage1Config(**REQUIRED, policy_loss="nope")
    with pytest.raises(ConfigError, match="'reward': 'nope' is not one of accuracy, stage1, test_half"):
        Stage3Config(**REQUIRED, reward="nope")


def test_stage3_reward_defaults_to_accuracy():
    assert Stage3Config(**REQUIRED).reward == "accuracy" and Stage1Config(**REQUIRED).reward == "stage1"
    assert get_reward("accuracy") is REWARDS["accuracy"]


def test_every_loss_metric_is_reduced_and_logged(registered):
    """policy_backward on a tiny model: the new loss's metrics come back without any trainer change, means
    unit-weighted over the batch (hand-computed from the same log-probs) and num_* counts summed."""
    from npr.models import load_model_and_tokenizer
    from npr.train.logprobs import causal_sequence, response_logprobs
    from npr.train.session import make_accelerator
    from npr.train.update import PolicyBatch, policy_backward

    model, tok = load_model_and_tokenizer("tiny-random-llama")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    seqs = [
        causal_sequence(enc("Q: 2+2?\n"), enc("It is \\boxed{4}.")),
        causal_sequence(enc("Q: 1+2?\n"), enc("3, so \\boxed{3} it is")),
    ]
    masks = [torch.ones(s.response_length, dtype=torch.bool) for s in seqs]
    batch = PolicyBatch(seqs, masks, torch.tensor([1.0, -0.5]), [torch.zeros(s.response_length) for s in seqs])
    loss_fn = get_policy_loss("scaled_pg", scale=2.0)
    metrics = policy_backward(make_accelerator(), model.train(), batch, loss_fn, "token-mean", tok.pad_token_id, 1)
    with torch.no_grad():
        logprobs, mask = response_logprobs(model, seqs, tok.pad_token_id)  # [2, T] each
    tokens = sum(s.response_length for s in seqs)
    assert metrics["num_test_tokens"] == tokens and metrics["loss_units"] == tokens
    assert metrics["test_scale"] == pytest.approx(2.0) and metrics["test_temperature"] == pytest.approx(99.0)
    assert metrics["test_mean_logprob"] == pytest.approx(float(logprobs[mask].mean()), rel=1e-5)
    step = combine_step_metrics([{**metrics, "grad_norm": 1.0, "lr": 0.1}, {**metrics, "grad_norm": 3.0, "lr": 0.1}])
    assert step["num_test_tokens"] == 2 * tokens and step["test_mean_logprob"] == pytest.approx(
        metrics["test_mean_logprob"]
    )
    model.zero_grad()


def test_a_loss_metric_named_like_a_trainer_metric_is_refused():
    from npr.train.update import TRAINER_POLICY_METRICS

    def clashing(logprobs, old_logprobs, advantages, mask, agg="token-mean"):
        return logprobs.sum() * 0, {"loss": 1.0}

    assert "loss" in TRAINER_POLICY_METRICS
    register_policy_loss("test_clashing", uses_old_logprobs=False)(clashing)
    try:
        assert metric_names(POLICY_LOSSES["test_clashing"]) == ("loss",)
        from npr.train.update import policy_backward

        with pytest.raises(ValueError, match=r"clash with the trainer's own"):
            policy_backward(None, None, None, clashing, "token-mean", 0, 1)
    finally:
        del POLICY_LOSSES["test_clashing"]


@pytest.mark.slow
def test_stage3_trains_with_a_registered_loss_and_reward(registered, tmp_path):
    """End to end: ``--policy-loss scaled_pg --reward test_half`` reach Stage 3's update and scoring, and the
    loss's own metrics land in metrics.jsonl."""
    import json

    from npr.cli.main import main
    from npr.train.tracking import read_metrics

    run = tmp_path / "s3"
    assert (
        main(
            [
                "train",
                "stage3",
                "--preset",
                "smoke",
                "--out",
                str(run),
                "--quiet",
                "--max-steps",
                "1",
                "--policy-loss",
                "scaled_pg",
                "--reward",
                "test_half",
                "--temperature",
                "0.9",
            ]
        )
        == 0
    )
    (step,) = [m for m in read_metrics(run / "metrics.jsonl") if "kept_rate" in m]
    assert step["reward"] == pytest.approx(0.5) and step["test_temperature"] == pytest.approx(0.9)
    assert step["test_scale"] == pytest.approx(3.0) and step["num_test_tokens"] == step["loss_units"] > 0
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert rows and all(r["reward"] == 0.5 for r in rows)
