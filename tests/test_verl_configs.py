"""verl launch settings: they compose with verl's own trainer config, reproduce the reference's run.sh values,
and docs/verl.md prints them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import verl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass

import npr.integrations.verl  # noqa: F401  (registers npr_papo: the algorithm config names it)
from npr.errors import UsageError
from npr.integrations.verl.configs import STAGES, launch_command, launch_overrides, main, settings_table

VERL_CONFIG = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")

# the reference's launch scripts (bigai-nlco/Native-Parallel-Reasoner e148ad5), written out by hand
REFERENCE = {
    "stage1": {  # npr-zero/experiments/run.sh
        "data.train_batch_size": 32,
        "actor_rollout_ref.rollout.n": 16,
        "data.max_response_length": 30000,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 1,
        "actor_rollout_ref.actor.optim.lr": 1e-6,
        "actor_rollout_ref.actor.optim.lr_warmup_steps": 10,
        "actor_rollout_ref.actor.optim.weight_decay": 0.1,
        "actor_rollout_ref.actor.clip_ratio_low": 0.2,
        "actor_rollout_ref.actor.clip_ratio_high": 0.28,
        "actor_rollout_ref.actor.clip_ratio_c": 10.0,
        "actor_rollout_ref.actor.grad_clip": 1.0,
        "algorithm.filter_groups.enable": True,
        "trainer.save_freq": 20,
        "trainer.test_freq": 10,
        "reward.reward_kwargs.overlong_buffer_cfg.len": 10,
        "actor_rollout_ref.rollout.top_k": -1,
    },
    "stage3": {  # npr-rl/experiments/run.sh
        "data.train_batch_size": 16,
        "actor_rollout_ref.rollout.n": 16,
        "data.max_response_length": 30000,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 1,
        "actor_rollout_ref.actor.optim.lr": 1e-7,
        "actor_rollout_ref.actor.optim.lr_warmup_steps": 0,
        "actor_rollout_ref.actor.optim.lr_scheduler_type": "constant",
        "algorithm.filter_groups.enable": False,
        "trainer.save_freq": 5,
        "trainer.test_freq": 5,
        "actor_rollout_ref.actor.entropy_coeff": 0,
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size": 1,
    },
}


def composed(stage: str):
    overrides = launch_overrides(
        stage,
        model="/ckpt/final",
        train_files="/d/train.parquet",
        val_files="/d/val.parquet",
        nnodes=2,
        gpus_per_node=8,
    )
    with initialize_config_dir(config_dir=VERL_CONFIG, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides), overrides


@pytest.mark.parametrize("stage", STAGES)
def test_settings_compose_with_verls_trainer_config(stage):
    """Every key exists in verl 0.9's ppo_trainer config (Hydra refuses unknown ones) and holds our value;
    verl's typed actor and algorithm configs accept them."""
    config, overrides = composed(stage)
    for override in overrides:
        key, value = override.split("=", 1)
        got = OmegaConf.select(config, key.lstrip("+"))
        assert str(got).lower() == value.lower() or got == type(got)(value), (key, got, value)
    assert config.trainer.nnodes == 2
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    algorithm = omega_conf_to_dataclass(config.algorithm)
    assert actor.policy_loss.loss_mode == ("vanilla" if stage == "stage1" else "npr_papo")
    assert algorithm.adv_estimator == ("grpo" if stage == "stage1" else "npr_papo")


@pytest.mark.parametrize("stage", STAGES)
def test_settings_reproduce_the_reference_run(stage):
    config, _ = composed(stage)
    for key, value in REFERENCE[stage].items():
        assert OmegaConf.select(config, key) == value, key


def test_stage3_uses_npr_pieces_and_the_tree_actor():
    config, _ = composed("stage3")
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == "npr_parallel"
    assert config.reward.reward_manager.name == "npr"
    assert config.reward.custom_reward_function.name == "compute_score_stage3"
    assert config.actor_rollout_ref.model.use_remove_padding is True
    assert launch_command("stage3", model="m", train_files="t", val_files="v").startswith(
        "NPR_VERL_TREE_ACTOR=1 python -m verl.trainer.main_ppo"
    )


def test_docs_print_the_settings_tables():
    docs = (Path(__file__).parents[1] / "docs" / "verl.md").read_text()
    for stage in STAGES:
        assert settings_table(stage) in docs, f"docs/verl.md: regenerate the {stage} table with --table"


def test_cli_prints_and_refuses(capsys):
    main(["stage1", "--model", "m", "--train-files", "t", "--val-files", "v", "--nnodes", "4"])
    assert "trainer.nnodes=4" in capsys.readouterr().out
    with pytest.raises(UsageError, match="Stage 2 is npr's own"):
        launch_overrides("stage2", model="m", train_files="t", val_files="v")
    with pytest.raises(UsageError, match="nnodes"):
        launch_overrides("stage1", model="m", train_files="t", val_files="v", nnodes=0)
