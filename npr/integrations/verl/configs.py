"""verl launch settings for NPR's Stage 1 (DAPO) and Stage 3 (PAPO) on Qwen3-4B, from npr's ``qwen3-4b`` presets.

Each setting is a verl Hydra override with its source: the npr preset field it comes from (so that npr's
trainer and verl train with one set of values) and the line of the reference's launch script
(bigai-nlco/Native-Parallel-Reasoner at e148ad5: Stage 1 ``npr-zero/experiments/run.sh`` = Z, Stage 3
``npr-rl/experiments/run.sh`` = R). docs/verl.md prints the table (``settings_table``)::

    python -m npr.integrations.verl.configs stage3 --model RUN/final --train-files train.parquet \\
        --val-files val.parquet --nnodes 1 --gpus-per-node 8          # prints the command line
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from typing import Any

from npr.errors import UsageError
from npr.train.presets import PRESETS

STAGES = ("stage1", "stage3")


@dataclass(frozen=True)
class Setting:
    """One verl override: ``key=value``, where the value comes from (``source``) and why (``note``)."""

    key: str
    value: Any
    source: str
    note: str = ""

    def override(self) -> str:
        value = self.value
        if isinstance(value, bool):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = "[" + ",".join(str(v) for v in value) + "]"
        return f"{self.key}={value}"


def _preset(stage: str, field: str) -> Any:
    return PRESETS[stage]["qwen3-4b"][field]


def _common(stage: str, z_or_r: str) -> list[Setting]:
    """Settings the two stages share, with the stage's own preset values."""
    p = lambda field: _preset(stage, field)  # noqa: E731
    lr_schedule = p("lr_schedule")
    return [
        Setting("data.max_prompt_length", 2048, f"{z_or_r}:24", "npr sets no prompt limit"),
        Setting("data.filter_overlong_prompts", True, "Z:79" if z_or_r == "Z" else "R:85"),
        Setting(
            "data.max_response_length",
            p("max_new_tokens"),
            f"preset max_new_tokens; {z_or_r}:25",
            "npr's budget counts every branch and prefilled token",
        ),
        Setting("data.train_batch_size", p("prompts_per_step"), f"preset prompts_per_step; {z_or_r}:36"),
        Setting("actor_rollout_ref.rollout.n", p("samples_per_prompt"), f"preset samples_per_prompt; {z_or_r}:38"),
        Setting(
            "actor_rollout_ref.actor.ppo_mini_batch_size",
            p("mini_batch_size"),
            f"preset mini_batch_size; {z_or_r}:39",
            "prompt groups per Adam step",
        ),
        Setting("actor_rollout_ref.actor.ppo_epochs", p("ppo_epochs"), "preset ppo_epochs; verl default"),
        Setting("actor_rollout_ref.actor.loss_agg_mode", "token-mean", f"{z_or_r}:31", "npr's loss_agg default"),
        Setting(
            "actor_rollout_ref.actor.optim.lr",
            p("learning_rate"),
            f"preset learning_rate; {z_or_r}:107" if z_or_r == "Z" else "preset learning_rate; R:112",
        ),
        Setting(
            "actor_rollout_ref.actor.optim.lr_scheduler_type",
            lr_schedule,
            "preset lr_schedule; Z:111 / R:116 (warmup_style)",
        ),
        Setting(
            "actor_rollout_ref.actor.optim.lr_warmup_steps", p("warmup_steps"), "preset warmup_steps; Z:109 / R:114"
        ),
        Setting("actor_rollout_ref.actor.optim.min_lr_ratio", 0.0, "preset min_learning_rate 0; Z:108 / R:113 (1e-8)"),
        Setting("actor_rollout_ref.actor.optim.weight_decay", p("weight_decay"), "preset weight_decay; Z:110 / R:115"),
        Setting("actor_rollout_ref.actor.grad_clip", p("max_grad_norm"), "preset max_grad_norm; Z:116 / R:121"),
        Setting("actor_rollout_ref.actor.use_kl_loss", False, f"{z_or_r}:18"),
        Setting("actor_rollout_ref.actor.kl_loss_coef", 0.0, f"{z_or_r}:19"),
        Setting("algorithm.use_kl_in_reward", False, f"{z_or_r}:16"),
        Setting("actor_rollout_ref.actor.entropy_coeff", 0, "Z:115 / R:120"),
        Setting(
            "actor_rollout_ref.model.enable_gradient_checkpointing",
            p("gradient_checkpointing"),
            "preset gradient_checkpointing; Z:105 / R:108",
        ),
        Setting("actor_rollout_ref.rollout.temperature", p("temperature"), "preset temperature; Z/R:55"),
        Setting("actor_rollout_ref.rollout.top_p", p("top_p"), "preset top_p; Z/R:56"),
        Setting("actor_rollout_ref.rollout.top_k", p("top_k") or -1, "preset top_k 0 (off); Z/R:57 (-1: off)"),
        Setting("actor_rollout_ref.rollout.val_kwargs.temperature", 1.0, "Z/R:59"),
        Setting("actor_rollout_ref.rollout.val_kwargs.top_p", 0.7, "Z/R:58", "npr evaluates at the rollout's top-p"),
        Setting("actor_rollout_ref.rollout.val_kwargs.n", 8, "Z:130 / R:136"),
        Setting("actor_rollout_ref.rollout.val_kwargs.do_sample", True, "Z:129 / R:135"),
        Setting("actor_rollout_ref.rollout.name", "sglang", "Z:131 / R:137", "vllm works the same"),
        Setting(
            "reward.reward_manager.name",
            "npr",
            "npr.integrations.verl.rewards",
            "verl's stock managers decode with skip_special_tokens, deleting NPR's tags",
        ),
        Setting("reward.custom_reward_function.path", "pkg://npr.integrations.verl.rewards", "npr"),
        Setting("trainer.total_epochs", p("num_epochs"), "preset num_epochs; Z:148 / R:155"),
        Setting("trainer.save_freq", p("save_every"), "preset save_every; Z:147 / R:154"),
        Setting("trainer.val_before_train", True, "Z:145 / R:151"),
    ]


def stage1_settings() -> list[Setting]:
    """Stage 1 (NPR-Zero): DAPO with plain rollouts: verl's own GRPO advantage, vanilla PPO loss with clip-higher
    and dual clip, dynamic sampling, npr's Stage-1 reward with the soft overlong penalty."""
    p = lambda field: _preset("stage1", field)  # noqa: E731
    return [
        *_common("stage1", "Z"),
        Setting("algorithm.adv_estimator", "grpo", "Z:14", "npr's group_advantages: unbiased group std"),
        Setting("actor_rollout_ref.actor.policy_loss.loss_mode", "vanilla", "verl's PPO clip = npr's dapo_loss"),
        Setting("actor_rollout_ref.actor.clip_ratio_low", p("clip_low"), "preset clip_low; Z:21"),
        Setting("actor_rollout_ref.actor.clip_ratio_high", p("clip_high"), "preset clip_high; Z:22"),
        Setting("actor_rollout_ref.actor.clip_ratio_c", p("clip_ratio_c"), "preset clip_ratio_c; Z:93"),
        Setting("algorithm.filter_groups.enable", p("dynamic_sampling"), "preset dynamic_sampling; Z:33"),
        Setting(
            "algorithm.filter_groups.metric",
            "npr_reward",
            "npr's filter reads the reward before the overlong penalty; Z:34 (score)",
        ),
        Setting("algorithm.filter_groups.max_num_gen_batches", p("max_gen_batches"), "preset max_gen_batches; Z:35"),
        Setting("trainer.use_v1", True, "verl 0.9: dynamic sampling lives in the V1 trainer's replay buffer"),
        Setting(
            "reward.custom_reward_function.name",
            "compute_score_stage1",
            "preset reward stage1",
            "the paper's format reward (the reference comments it out)",
        ),
        Setting("+reward.reward_kwargs.max_resp_len", p("max_new_tokens"), "preset max_new_tokens; Z:25"),
        Setting("+reward.reward_kwargs.overlong_buffer_cfg.enable", True, "Z:26"),
        Setting("+reward.reward_kwargs.overlong_buffer_cfg.len", p("overlong_buffer"), "preset overlong_buffer; Z:27"),
        Setting(
            "+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor",
            p("overlong_penalty"),
            "preset overlong_penalty; Z:28",
        ),
        Setting(
            "actor_rollout_ref.rollout.agent.default_agent_loop",
            "single_turn_agent",
            "preset rollout_mode plain",
            "plain decoding: verl's stock loop",
        ),
        Setting("actor_rollout_ref.model.use_remove_padding", True, "Z:97"),
        Setting("actor_rollout_ref.actor.use_dynamic_bsz", True, "Z:65"),
        Setting("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", 2048 + p("max_new_tokens"), "Z:66"),
        Setting("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 8, "Z:64 (sp_size = GPU_NUM)"),
        Setting("actor_rollout_ref.rollout.tensor_model_parallel_size", 8, "Z:69 (gen_tp = GPU_NUM)"),
        Setting("actor_rollout_ref.rollout.gpu_memory_utilization", 0.5, "Z:119"),
        Setting("trainer.test_freq", 10, "Z:146"),
    ]


def stage3_settings() -> list[Setting]:
    """Stage 3 (NPR): PAPO on npr_parallel rollouts, scored by the tree-attention actor (``NPR_VERL_TREE_ACTOR=1``)."""
    return [
        *_common("stage3", "R"),
        Setting(
            "algorithm.adv_estimator",
            "npr_papo",
            "preset advantage papo",
            "group mean, batch std, dropped rollouts masked (R:14 grpo is patched to PAPO in the reference)",
        ),
        Setting(
            "actor_rollout_ref.actor.policy_loss.loss_mode",
            "npr_papo",
            "npr's papo_loss",
            "on-policy sg-ratio, no clip (R's clip 0.2/0.2 never binds at ratio 1)",
        ),
        Setting("algorithm.filter_groups.enable", False, "R:33"),
        Setting("reward.custom_reward_function.name", "compute_score_stage3", "preset reward accuracy"),
        Setting(
            "actor_rollout_ref.rollout.agent.default_agent_loop",
            "npr_parallel",
            "preset rollout_mode parallel",
            "fork at </guideline>, join at <takeaway>; the join is re-prefilled (docs/verl.md)",
        ),
        Setting(
            "actor_rollout_ref.model.use_remove_padding",
            True,
            "npr's tree actor reads the no-padding layout",
            "R:103 has False",
        ),
        Setting("actor_rollout_ref.actor.use_dynamic_bsz", False, "R:65 (commented out)"),
        Setting("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", 1, "R:68"),
        Setting("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", 1, "R:69"),
        Setting("actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1, "R:64", "the tree actor requires 1"),
        Setting("actor_rollout_ref.actor.strategy", "fsdp2", "R:110"),
        Setting("actor_rollout_ref.rollout.tensor_model_parallel_size", 4, "R:71 (gen_tp)"),
        Setting("actor_rollout_ref.rollout.gpu_memory_utilization", 0.6, "R:125"),
        Setting("trainer.balance_batch", False, "R:152"),
        Setting("trainer.test_freq", 5, "R:153"),
    ]


SETTINGS = {"stage1": stage1_settings, "stage3": stage3_settings}
ENVIRONMENT = {"stage1": {}, "stage3": {"NPR_VERL_TREE_ACTOR": "1"}}


def launch_overrides(
    stage: str,
    model: str,
    train_files: str,
    val_files: str,
    nnodes: int = 1,
    gpus_per_node: int = 8,
    checkpoint_dir: str | None = None,
) -> list[str]:
    """verl's overrides for ``stage`` on ``nnodes`` x ``gpus_per_node`` GPUs (UsageError for a bad stage/size)."""
    if stage not in SETTINGS:
        raise UsageError(
            f"--stage must be one of {', '.join(STAGES)} (Stage 2 is npr's own `npr train stage2`), got {stage!r}"
        )
    if nnodes < 1 or gpus_per_node < 1:
        raise UsageError(f"--nnodes and --gpus-per-node must be >= 1, got {nnodes} and {gpus_per_node}")
    run = [
        Setting("actor_rollout_ref.model.path", model, "--model"),
        Setting("data.train_files", train_files, "--train-files"),
        Setting("data.val_files", val_files, "--val-files"),
        Setting("trainer.nnodes", nnodes, "--nnodes"),
        Setting("trainer.n_gpus_per_node", gpus_per_node, "--gpus-per-node"),
    ]
    if checkpoint_dir:
        run.append(Setting("trainer.default_local_dir", checkpoint_dir, "--checkpoint-dir"))
    return [s.override() for s in [*SETTINGS[stage](), *run]]


def launch_command(stage: str, **kwargs: Any) -> str:
    """The shell command that starts ``stage`` in verl (environment, ``python -m verl.trainer.main_ppo``, overrides)."""
    overrides = launch_overrides(stage, **kwargs)
    env = " ".join(f"{k}={v}" for k, v in ENVIRONMENT[stage].items())
    head = f"{env} python -m verl.trainer.main_ppo".strip()
    return " \\\n    ".join([head, *(shlex.quote(o) for o in overrides)])


def settings_table(stage: str) -> str:
    """docs/verl.md's markdown table of ``stage``'s settings."""
    rows = ["| verl setting | value | source | note |", "|---|---|---|---|"]
    for s in SETTINGS[stage]():
        rows.append(f"| `{s.key}` | `{s.override().split('=', 1)[1]}` | {s.source} | {s.note} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m npr.integrations.verl.configs",
        description="Print verl's launch command for NPR's Stage 1 or Stage 3.",
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--model", required=True, help="the HF directory to start from (npr's RUN/final)")
    parser.add_argument("--train-files", required=True, help="verl parquet with prompt, data_source, reward_model")
    parser.add_argument("--val-files", required=True)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--table", action="store_true", help="print the settings table instead")
    args = parser.parse_args(argv)
    if args.table:
        print(settings_table(args.stage))
        return
    print(
        launch_command(
            args.stage,
            model=args.model,
            train_files=args.train_files,
            val_files=args.val_files,
            nnodes=args.nnodes,
            gpus_per_node=args.gpus_per_node,
            checkpoint_dir=args.checkpoint_dir,
        )
    )


if __name__ == "__main__":
    main()
