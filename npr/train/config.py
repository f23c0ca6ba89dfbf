"""Training configs: one frozen, documented dataclass per command (NPR arXiv 2512.07461 §3).

Defaults are the paper's settings for Qwen3-4B-Instruct where the paper gives them, and keep
npr's behaviour where it does not; the ``qwen3-4b`` presets in ``npr.train.presets`` hold the
values of NPR's released launch scripts (cited there), beside the ``smoke`` and ``tiny`` presets.
The object built here is the object every stage uses and the one written to ``RUN/config.yaml``:
there is no second copy of a setting.

Resolution order (``npr.train.overrides``): dataclass defaults < ``--preset`` < ``--config
x.yaml`` < ``--field value`` flags. Every field's help text below is also its ``--help`` line.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from npr.algos import AGGREGATIONS
from npr.errors import NprError
from npr.prompts import PLACEMENTS, read_instruction_file
from npr.train.trackers import parse_report_to

ATTENTION_CHOICES = ("auto", "flex", "dense")  # npr.train.logprobs.resolve_attention

RELEASE_CHOICES = ("auto", "on", "off")  # release_engine_for_update
FORCING_CHOICES = ("none", "structure", "structure-answer")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")
MIXED_PRECISION = ("no", "bf16")


CPU_THREADS_HELP = (
    "torch CPU threads per process (torch.set_num_threads); None keeps torch's default. 1 keeps "
    "decoding fast when other processes share the cores (2 spinning threads can be 30x slower then)"
)


class ConfigError(NprError, ValueError):
    """A config value, file or flag that cannot be used; the message names it and the fix."""


class RegistryNames:
    """The names in a registry (``module.attribute``, a dict filled by a ``register_*`` decorator), read when asked:
    a loss or reward registered after this module is imported is a valid choice, and a heavy registry module
    (npr.rewards imports sympy) is imported only when a config is checked."""

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute = module, attribute

    def names(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self.module), self.attribute))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()


POLICY_LOSS_NAMES = RegistryNames("npr.algos", "POLICY_LOSSES")
ADVANTAGE_NAMES = RegistryNames("npr.algos", "ADVANTAGE_ESTIMATORS")
REWARD_NAMES = RegistryNames("npr.rewards", "REWARDS")


def option(default: Any = MISSING, help: str = "", choices: tuple[str, ...] | RegistryNames | None = None) -> Any:
    """A dataclass field carrying its ``--help`` text (and allowed values) in its metadata."""
    return field(default=default, metadata={"help": help, "choices": choices})


def field_help(cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config field {name!r}: {message}")


def _check_choices(config: Any) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        _check(not choices or value in choices, f.name, f"{value!r} is not one of {', '.join(map(str, choices or ()))}")
    if hasattr(config, "seed"):  # numpy and torch take 0 <= seed < 2**32 (npr.validate)
        from npr.validate import seed_problem

        _check(seed_problem(config.seed) is None, "seed", str(seed_problem(config.seed)))


@dataclass(frozen=True)
class TrainConfig:
    """Settings every training stage shares: model, data, optimiser, schedule, checkpoints."""

    model: str = option(
        "",
        "model to train: the previous stage's RUN/final, embedded, tiny-random-llama, "
        "tiny-random-qwen3, a local HF directory or an HF hub id; required",
    )
    train_data: str = option(
        "",
        "training data: rg:<task>?… (reasoning-gym), a .jsonl file ({id, problem, answer} "
        "per line, e.g. ../shared/benchmarks/train_math.jsonl) or hf:<dataset id>; required",
    )
    train_limit: int | None = option(None, "use only the first N problems/examples of train_data (None: all)")
    seed: int = option(0, "seed of the data order, the rollout sampling and torch's RNG")
    dtype: str = option("float32", "dtype of the trained (master) weights and of checkpoints", DTYPES)
    mixed_precision: str = option(
        "no",
        "autocast the training forward/backward: no, or bf16 (fp32 master weights "
        "stay exact; bf16 is 1.5-3x faster on recent CPUs)",
        MIXED_PRECISION,
    )
    learning_rate: float = option(1e-6, "peak AdamW learning rate (NPR Stage 1: 1e-6)")
    lr_schedule: str = option("cosine", "decay after warm-up: cosine, linear or constant (NPR: cosine)", SCHEDULES)
    min_learning_rate: float = option(0.0, "learning rate at the end of the decay")
    warmup_steps: int = option(0, "linear warm-up steps; step k < warmup_steps uses lr * (k+1) / warmup_steps")
    warmup_ratio: float = option(
        0.0,
        "warm-up as a fraction of the run's optimizer steps (rounded up), used when "
        "warmup_steps is 0 (NPR Stage 2: 0.05, npr-beta/train/sft_math.sh)",
    )
    weight_decay: float = option(0.1, "AdamW decoupled weight decay on every parameter (NPR: 0.1)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (NPR: 1.0); 0 disables clipping")
    max_steps: int = option(100, "optimizer steps of the run (the schedule spans them)")
    micro_batch_size: int = option(
        4,
        "sequences per forward/backward pass; gradients accumulate over micro-batches "
        "(memory knob only: the update does not depend on it)",
    )
    micro_batch_tokens: int = option(
        0,
        "also cap the tokens of a forward/backward pass (0: no cap); under the flex "
        "attention layout a pass is one packed row of that many tokens at most (a longer "
        "sequence runs alone). Memory knob only",
    )
    logprob_chunk_size: int = option(
        1024,
        "tokens per chunk of the output head when computing log-probs: lm_head, "
        "temperature, logsumexp and the target's log-prob run on this many tokens at a "
        "time and are recomputed in the backward, so no [tokens, vocab] logits are held "
        "(npr.train.lm_head). Memory knob only: a chunk holds N x vocab fp32 (0.6 GB at "
        "1024 and Qwen3's 151,936-token vocabulary; x 1.5 under bf16)",
    )
    max_skipped_steps: int = option(
        5,
        "an optimizer step whose gradient norm is not finite is skipped (no parameter "
        "or AdamW state changes; metric skipped_steps), as the reference's verl does; "
        "this many skipped in a row end the run with an error",
    )
    attention: str = option(
        "auto",
        "tree attention layout of the training forward: flex (every micro-batch packed "
        "into one row, flex_attention BlockMask from the tree ids: O(L) mask memory, no padding), "
        "dense (padded batch, additive L x L float mask) or auto: flex on CUDA, dense on CPU "
        "(torch 2.13 has no flex_attention backward on CPU; docs/performance.md)",
        ATTENTION_CHOICES,
    )
    gradient_checkpointing: bool = option(
        False,
        "recompute each decoder layer's activations in the backward pass "
        "instead of storing them (less memory, ~30% more compute)",
    )
    fsdp: bool = option(
        False,
        "shard parameters, gradients and AdamW states over the processes with FSDP2 "
        "(accelerate's FSDP plugin): fp32 master shards, bf16 compute with mixed_precision bf16, "
        "sharded resumable checkpoints; needs >= 2 processes (docs/training.md)",
    )
    fsdp_layer_class: str | None = option(
        None,
        "decoder layer class(es) FSDP wraps as units, comma-separated (None: "
        "the model's _no_split_modules, e.g. Qwen3DecoderLayer)",
    )
    cpu_offload: bool = option(
        False,
        "with fsdp: keep the parameter shards, their gradients and AdamW's states in "
        "host memory (accelerate's FSDP2 CPUOffloadPolicy), copying each layer to the device "
        "when it runs: ~16 bytes per parameter / N off each GPU, at the cost of host-device "
        "copies and an optimizer step on the CPU (NPR's Stage 3 offloads)",
    )
    save_every: int = option(0, "write checkpoints/step-N every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "keep the newest K checkpoints/step-N directories (0: keep all)")
    stop_after: int | None = option(
        None,
        "end the process after this global step as if interrupted (a checkpoint is "
        "written); the schedule still spans max_steps. Continue with --resume",
    )
    tensorboard: bool = option(
        False,
        "also write TensorBoard events under RUN/tensorboard/<stage> when the "
        "tensorboard package is installed (older form of --report-to tensorboard, which "
        "insists on the package)",
    )
    report_to: str = option(
        "none",
        "experiment trackers that also get every metrics.jsonl line and the config, "
        "comma-separated: tensorboard, wandb, mlflow, trackio (e.g. mlflow,trackio), or none; "
        "through accelerate's trackers, configured by their own environment variables "
        "(MLFLOW_TRACKING_URI, WANDB_PROJECT, TRACKIO_DIR); needs the trackers extra",
    )
    cpu_threads: int | None = option(None, CPU_THREADS_HELP)

    def __post_init__(self):
        _check_choices(self)
        _check(
            bool(self.train_data.strip()),
            "train_data",
            "is required: pass --train-data rg:chain_sum?size=200&terms=2, a .jsonl path or hf:<dataset id>",
        )
        _check(
            bool(self.model.strip()),
            "model",
            "is required: pass --model RUN/final from the previous stage "
            "(or embedded, tiny-random-llama, a local HF directory, an HF hub id)",
        )
        _check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(
            0 <= self.min_learning_rate <= self.learning_rate,
            "min_learning_rate",
            f"must lie in [0, learning_rate={self.learning_rate}], got {self.min_learning_rate}",
        )
        self._check_steps()
        self._check_warmup_ratio()
        try:
            parse_report_to(self.report_to)
        except ValueError as e:
            raise ConfigError(f"config field 'report_to': {e}") from None
        _check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        _check(self.micro_batch_tokens >= 0, "micro_batch_tokens", "must be >= 0 (0: no cap)")
        _check(
            self.fsdp or not self.cpu_offload,
            "cpu_offload",
            "offloads FSDP's shards and needs fsdp true (launch N >= 2 processes with --fsdp true), or drop it",
        )
        _check(
            self.logprob_chunk_size >= 1,
            "logprob_chunk_size",
            f"must be >= 1 (tokens per chunk of the output head; default 1024), got {self.logprob_chunk_size}",
        )
        _check(self.max_skipped_steps >= 1, "max_skipped_steps", f"must be >= 1, got {self.max_skipped_steps}")
        _check(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay/max_grad_norm", "must be >= 0")
        _check(self.save_every >= 0 and self.keep_checkpoints >= 0, "save_every/keep_checkpoints", "must be >= 0")
        _check(self.stop_after is None or 1 <= self.stop_after, "stop_after", "must be >= 1 or None")
        _check(self.train_limit is None or self.train_limit >= 1, "train_limit", "must be >= 1 or None")
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads", "must be >= 1 or None")

    def _check_steps(self):
        _check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _check(
            0 <= self.warmup_steps <= self.max_steps,
            "warmup_steps",
            f"must lie in [0, max_steps], got {self.warmup_steps}",
        )

    def _check_warmup_ratio(self):
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must lie in [0, 1), got {self.warmup_ratio}")
        _check(
            self.warmup_ratio == 0 or self.warmup_steps == 0,
            "warmup_ratio",
            f"set either warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), not both",
        )

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a run of ``total_steps`` optimizer steps: ``warmup_steps``, else
        ``ceil(warmup_ratio * total_steps)`` (as transformers' Trainer rounds, which NPR's Stage 2 used)."""
        return self.warmup_steps or min(total_steps, math.ceil(self.warmup_ratio * total_steps))


@dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are drawn from the NPR engine (shared by Stage 1, Stage 3 and ``npr sample``)."""

    max_new_tokens: int = option(8192, "response budget per rollout, every branch and scaffold token counted")
    temperature: float = option(1.0, "sampling temperature (NPR: 1.0)")
    top_p: float = option(1.0, "nucleus sampling mass (1.0: off)")
    top_k: int = option(0, "top-k sampling (0: off)")
    rollout_dtype: str | None = option(
        None,
        "dtype of the engine's copy of the weights (None: the trained weights "
        "themselves; npr sample: float32); bfloat16 keeps a bf16 copy synced after "
        "every step",
        (None, *DTYPES),
    )
    kv_cache_tokens: int | None = option(None, "engine KV pool size in tokens (None: from kv_cache_gib)")
    kv_cache_gib: float = option(2.0, "engine KV pool memory when kv_cache_tokens is None")
    max_num_seqs: int = option(64, "most sequences the engine decodes at once")
    rollout_forcing: str = option(
        "none",
        "smoke/test only: structure makes a random model write well-formed "
        "parallel traces (npr.engine.StructureForcer) that all end in \\boxed{0}; "
        "structure-answer (RL stages) ends them with the model's own choice between the "
        "right answer and a wrong one, so rewards vary within a group "
        "(npr.train.smoke); never for real runs",
        FORCING_CHOICES,
    )

    def _check_rollout(self):
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(
            self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0,
            "temperature/top_p/top_k",
            "need temperature >= 0, 0 < top_p <= 1, top_k >= 0",
        )
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _check(self.kv_cache_gib > 0, "kv_cache_gib", f"must be > 0, got {self.kv_cache_gib}")
        _check(self.kv_cache_tokens is None or self.kv_cache_tokens >= 1, "kv_cache_tokens", "must be >= 1 or None")


@dataclass(frozen=True)
class InstructionConfig:
    """Which format instruction the NPR prompts carry (``npr.prompts``)."""

    system_prompt_file: str | None = option(
        None,
        "text file whose contents (stripped) replace npr's format "
        "instruction (npr.prompts.NPR_INSTRUCTION), e.g. the prompts/npr.txt that "
        "NPR's released checkpoints were trained with, or any other format "
        "instruction; None: npr's own. Checked when the config is built",
    )
    system_prompt_placement: str = option(
        "system",
        "where the instruction goes: system (npr: the system message) "
        "or user (after the problem and a blank line in the user message, as "
        "NPR's released code does)",
        PLACEMENTS,
    )

    def _check_instruction(self):
        if self.system_prompt_file is not None:
            _check(
                getattr(self, "prompt_style", "npr") == "npr",
                "system_prompt_file",
                "replaces the npr prompt's instruction; it needs prompt_style npr (plain takes no instruction)",
            )
            read_instruction_file(self.system_prompt_file)  # PromptError naming --system-prompt-file

    def prompt_options(self) -> dict[str, Any]:
        """Keyword arguments of ``npr.prompts.encode_prompt`` for this config's instruction."""
        text = None if self.system_prompt_file is None else read_instruction_file(self.system_prompt_file)
        return {"instruction": text, "placement": self.system_prompt_placement}


@dataclass(frozen=True)
class RLConfig(InstructionConfig, RolloutConfig, TrainConfig):
    """Settings shared by the two RL stages: batch shape, loss and evaluation."""

    prompts_per_step: int = option(32, "prompts per optimizer step, across all processes (NPR Stage 1: 32)")
    samples_per_prompt: int = option(16, "rollouts per prompt, the group size G (NPR: 16)")
    policy_loss: str = option("dapo", "policy loss from npr.algos.POLICY_LOSSES", POLICY_LOSS_NAMES)
    advantage: str = option("grpo", "advantage estimator from npr.algos.ADVANTAGE_ESTIMATORS", ADVANTAGE_NAMES)
    loss_agg: str = option(
        "token-mean",
        "loss aggregation over the GLOBAL batch: token-mean (DAPO §3.3, PAPO's "
        "1/Σ|y|), seq-mean-token-mean or seq-mean-token-sum",
        tuple(AGGREGATIONS),
    )
    loss_on_prefilled: bool = option(
        False,
        "also put loss on the scaffold tokens the engine prefilled (the label "
        "'k:' after each <plan>, the newline after </guideline>, '<step>\\nk:', the "
        "newline after </step>, <takeaway>); false: only tokens the model sampled carry "
        "loss, so <step> and <takeaway> never do. The paper keeps gradients on the tags "
        "that control branching and NPR's code trains every response token: the "
        "qwen3-4b presets set true",
    )
    mini_batch_size: int | None = option(
        None,
        "prompt groups per optimizer step: ceil(kept groups / this) Adam "
        "steps, each taking a share of every process's rollouts (the global order "
        "dealt out in turn) and its own global loss normaliser (PPO's "
        "ppo_mini_batch_size); the old "
        "log-probs are computed once per rollout batch, so DAPO's clip binds from the "
        "2nd step; the lr schedule advances once per rollout batch. None: the whole "
        "batch, one on-policy step (NPR code: 1)",
    )
    ppo_epochs: int = option(
        1, "passes over a rollout batch's mini-batches, each mini-batch one Adam step (NPR code: 1)"
    )
    num_epochs: int = option(
        0,
        "passes over train_data's problems; > 0 replaces max_steps (the run ends when the "
        "data is used up, refill rounds included); 0: max_steps decides (NPR code: 1)",
    )
    pack_group_tokens: int = option(
        0,
        "pack the responses to one prompt behind a single copy of the prompt, in "
        "sequences of at most N tokens (0: one sequence per response). The update is "
        "unchanged (each response sees only the prompt and itself); the prompt is "
        "computed once per pack. micro_batch_size then counts packs",
    )
    prompt_style: str = option(
        "npr",
        "prompt: npr (the format instruction, npr.prompts) or plain (step by step; the sequential-RL baseline)",
        ("npr", "plain"),
    )
    eval_data: str | None = option(
        None,
        "held-out problems evaluated before the first and after the last step "
        "(eval_* metrics in metrics.jsonl); None skips evaluation",
    )
    eval_limit: int = option(32, "evaluate only the first N eval_data problems")
    eval_samples: int = option(1, "samples per eval problem (at the rollout temperature)")
    release_engine_for_update: str = option(
        "auto",
        "free the engine's KV pool and its own copy of the weights "
        "during the update and rebuild them at the weight sync after it, as "
        "NPR's code sleeps its rollout engine: on, off, or auto (on for a CUDA "
        "device; a CPU keeps them, saving the reallocation)",
        RELEASE_CHOICES,
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_rollout()
        _check(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        _check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        _check(self.eval_limit >= 1 and self.eval_samples >= 1, "eval_limit/eval_samples", "must be >= 1")
        _check(self.pack_group_tokens >= 0, "pack_group_tokens", "must be >= 0 (0: no packing)")
        _check(self.mini_batch_size is None or self.mini_batch_size >= 1, "mini_batch_size", "must be >= 1 or None")
        _check(
            self.ppo_epochs >= 1 and self.num_epochs >= 0,
            "ppo_epochs/num_epochs",
            "need ppo_epochs >= 1 and num_epochs >= 0",
        )
        _check(
            self.micro_batch_tokens == 0 or self.micro_batch_tokens >= self.max_new_tokens,
            "micro_batch_tokens",
            f"{self.micro_batch_tokens} is smaller than one response of max_new_tokens={self.max_new_tokens}: a "
            "forward holds at least one whole response; raise it or set 0 (no cap)",
        )
        self._check_instruction()


@dataclass(frozen=True)
class Stage1Config(RLConfig):
    """Stage 1, NPR-Zero (arXiv 2512.07461 §3.1): DAPO on the instruct model with the NPR instruction.

    Rollouts in the engine's ``plain`` mode (``rollout_mode``); reward = format penalty when the format is invalid,
    else ±1 accuracy (``npr.rewards.stage1_reward``), plus DAPO's soft overlong penalty; dynamic
    sampling drops groups with equal rewards; clip-higher; token-mean; no KL, no reference model.
    """

    model: str = option(
        "Qwen/Qwen3-4B-Instruct-2507",
        "seed instruct model (NPR: Qwen3-4B-Instruct-2507); any spec as for the other stages",
    )
    learning_rate: float = option(1e-6, "peak learning rate (NPR Stage 1: 1e-6, cosine, warm-up)")
    warmup_steps: int = option(10, "linear warm-up steps (NPR code: 10, npr-zero/experiments/run.sh)")
    policy_loss: str = option("dapo", "DAPO clipped surrogate (arXiv 2503.14476 eq. 10)", POLICY_LOSS_NAMES)
    advantage: str = option("grpo", "group-normalised advantage (DAPO eq. 9)", ADVANTAGE_NAMES)
    clip_low: float = option(0.2, "DAPO lower clip epsilon (eq. 10)")
    clip_high: float = option(0.28, "DAPO clip-higher epsilon (eq. 10, §3.1)")
    clip_ratio_c: float | None = option(
        None,
        "dual-clip PPO (Ye et al. 2020): a negative-advantage token's loss is "
        "capped at -A x c, so a ratio far above 1 cannot blow it up; > 1 or None "
        "(off). The reference's DAPO run: 10 (qwen3-4b preset)",
    )
    dynamic_sampling: bool = option(
        True,
        "drop prompt groups of 2+ rollouts whose stage rewards before the overlong "
        "penalty are all equal (DAPO §3.2; NPR code: filter_groups on its score, ±1 "
        "accuracy); groups of 1 are kept, as verl keeps them. With max_gen_batches 1 the "
        "batch is not refilled, so a step may train on fewer groups or skip the update",
    )
    max_gen_batches: int = option(
        1,
        "most generation rounds of prompts_per_step prompts one step may draw to refill "
        "the batch with groups that pass dynamic sampling, trimmed to prompts_per_step "
        "groups (DAPO's max_num_gen_batches; metric gen_rounds); 1: no refill; 0: no limit "
        "but the data (NPR code: 0). At the limit the step trains on what it has (verl "
        "raises)",
    )
    overlong_buffer: int = option(
        1024,
        "DAPO soft overlong punishment (§3.4, eq. 13): the reward falls linearly "
        "over the last N tokens of max_new_tokens; 0 makes it a step at the budget",
    )
    overlong_penalty: float = option(1.0, "most penalty of the overlong punishment (DAPO: 1.0); 0 disables it")
    reward: str = option(
        "stage1",
        "stage1: format penalty, else ±1 accuracy (NPR-Zero); accuracy: ±1 only (with "
        "prompt_style plain: the sequential-RL baseline, NPR's SR); any name in npr.rewards.REWARDS",
        REWARD_NAMES,
    )
    rollout_mode: str = option(
        "plain",
        "engine mode of the rollouts: plain (NPR: the instruct model writes the whole "
        "trace itself; causal log-probs) or parallel (NOT the paper's Stage 1: the engine forks "
        "at </guideline> and log-probs use the tree mask, as in Stage 3; for a model whose "
        "format came from a tree-mask cold start, as in the tiny pipeline)",
        ("plain", "parallel"),
    )

    def __post_init__(self):
        super().__post_init__()
        _check(
            0 <= self.clip_low < 1 and self.clip_high >= 0,
            "clip_low/clip_high",
            "need 0 <= clip_low < 1, clip_high >= 0",
        )
        _check(
            self.clip_ratio_c is None or self.clip_ratio_c > 1,
            "clip_ratio_c",
            f"must be > 1 (dual-clip PPO's bound) or None, got {self.clip_ratio_c}",
        )
        _check(
            0 <= self.overlong_buffer <= self.max_new_tokens,
            "overlong_buffer",
            f"must lie in [0, max_new_tokens={self.max_new_tokens}], got {self.overlong_buffer}",
        )
        _check(self.overlong_penalty >= 0, "overlong_penalty", "must be >= 0")
        _check(self.max_gen_batches >= 0, "max_gen_batches", "must be >= 0 (0: no limit)")


@dataclass(frozen=True)
class Stage2Config(InstructionConfig, TrainConfig):
    """Stage 2, NPR-Beta (arXiv 2512.07461 §3.2): parallel SFT on the self-distilled dataset.

    Each example's prompt + canonical response gets the tree attention mask and position ids
    of ``npr.masks.parallel_mask_and_positions``; the loss is the token-mean negative
    log-likelihood of every response token (plans, steps, takeaways, tags and the scaffold:
    the data is text) and never of prompt tokens. Examples whose structure fails are dropped
    and counted.
    """

    learning_rate: float = option(1e-6, "peak learning rate (NPR Stage 2: 1e-6, decaying to 5e-7)")
    min_learning_rate: float = option(5e-7, "final learning rate (NPR Stage 2: 5e-7)")
    lr_schedule: str = option(
        "linear", "decay from learning_rate to min_learning_rate (NPR code: cosine, the qwen3-4b preset)", SCHEDULES
    )
    warmup_steps: int = option(0, "linear warm-up steps")
    batch_size: int = option(64, "examples per optimizer step, across all processes (NPR code: 8, the qwen3-4b preset)")
    num_epochs: int = option(2, "passes over the dataset when max_steps is 0 (NPR code: 1, the qwen3-4b preset)")
    max_steps: int = option(0, "optimizer steps; 0 derives them from num_epochs and batch_size")
    max_seq_len: int = option(
        16384,
        "longest prompt + response kept; longer examples are dropped and counted (NPR "
        "code: 32768, truncating longer ones; the qwen3-4b preset)",
    )
    pack_tokens: int = option(
        0,
        "pack each micro-batch's examples behind one copy of their common prompt prefix (the "
        "chat template and the NPR instruction), in sequences of at most N tokens (0: no "
        "packing). Same loss and gradient (each example sees the prefix and itself); the "
        "prefix is computed once per pack. micro_batch_size then counts packs",
    )
    primer_data: str | None = option(
        None,
        "extra examples mixed into train_data, e.g. synthetic:chain_sum?size=64&"
        "seed=3&terms=2&digits=1 (programmatic NPR traces). NOT the paper: NPR-Beta is "
        "purely self-distilled. For a model that does not discover the format in Stage 1, "
        "so that rejection sampling keeps next to nothing",
    )

    def _check_steps(self):
        _check(self.max_steps >= 0, "max_steps", f"must be >= 0 (0: from num_epochs), got {self.max_steps}")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")

    def __post_init__(self):
        super().__post_init__()
        _check(
            self.batch_size >= 1 and self.num_epochs >= 1 and self.max_seq_len >= 8,
            "batch_size/num_epochs/max_seq_len",
            "must be >= 1 (max_seq_len >= 8)",
        )
        _check(
            self.micro_batch_tokens == 0 or self.micro_batch_tokens >= self.max_seq_len,
            "micro_batch_tokens",
            f"{self.micro_batch_tokens} is smaller than one example of max_seq_len={self.max_seq_len}: a forward "
            "holds at least one whole example; raise it or set 0 (no cap)",
        )
        self._check_instruction()


@dataclass(frozen=True)
class Stage3Config(RLConfig):
    """Stage 3, NPR (arXiv 2512.07461 §3.3): PAPO with rollouts from the engine's ``parallel`` mode.

    Schema-level filtering instead of a format reward: rollouts that do not end with EOS
    (``drop_truncated``), whose tokens do not form the parallel structure, or whose text breaks
    the schema's structure are dropped and counted by reason. Accuracy-only reward (±1),
    ``papo_advantages`` (group mean, batch std), log-probs recomputed by flat tree-masked
    forwards, ``papo_loss`` (sg-ratio, no clip): strictly on-policy with one update per batch
    (the default), or one update per mini-batch of ``mini_batch_size`` groups as NPR's code does,
    where later mini-batches are no longer strictly on-policy; no reference model, no KL.
    """

    learning_rate: float = option(1e-7, "peak learning rate (NPR Stage 3: 1e-7)")
    lr_schedule: str = option("constant", "schedule after warm-up (NPR code: constant, no warm-up)", SCHEDULES)
    prompts_per_step: int = option(16, "prompts per optimizer step (NPR Stage 3: 16)")
    samples_per_prompt: int = option(16, "rollouts per prompt (NPR Stage 3: 16)")
    policy_loss: str = option("papo", "PAPO on-policy objective (npr.algos.papo_loss)", POLICY_LOSS_NAMES)
    advantage: str = option("papo", "PAPO advantage: group mean, batch-level std", ADVANTAGE_NAMES)
    reward: str = option(
        "accuracy",
        "reward of each rollout the schema filter keeps, from npr.rewards.REWARDS (NPR "
        "Stage 3: accuracy, ±1; the filter replaces a format reward)",
        REWARD_NAMES,
    )
    require_parallel: bool = option(
        True,
        "drop rollouts with no parallel block at all (schema kind no_block). The "
        "paper replaces Stage 3's format reward by schema-level filtering of rollouts "
        "that break the parallel format; true (npr's reading) counts a trace without any "
        "block as breaking it. NPR's code keeps such traces: its filter drops only "
        "rollouts whose tags do not parse into the tree, or longer than the budget "
        "(npr-rl sglang_rollout.py:301-331). False trains on them, as it does (qwen3-4b)",
    )
    drop_truncated: bool = option(
        True,
        "drop every rollout cut by max_new_tokens (dropped_finish_length); False "
        "keeps a cut rollout whose tokens still form complete blocks and pass the schema "
        "checks (its reward is its accuracy), as NPR's code does (qwen3-4b)",
    )
    drop_any_schema_error: bool = option(
        False,
        "drop rollouts with any npr.schema.validate error, not only those that "
        "break the structure (short steps, a missing answer, … then also drop)",
    )


@dataclass(frozen=True)
class SampleConfig(InstructionConfig, RolloutConfig):
    """``npr sample``: rejection sampling for Stage 2 (arXiv 2512.07461 §3.2).

    From the NPR-Zero checkpoint draw ``tries`` samples per problem (plain mode by default, NPR prompt);
    keep those that are correct AND format-valid (``format_score == 0``), render them in the
    canonical form and write a JSONL dataset with provenance; every other sample is counted
    under the reason it was dropped.
    """

    model: str = option("", "model to sample from: the Stage-1 run's RUN/final (or any spec); required")
    train_data: str = option("", "problems: rg:<task>?…, a .jsonl file or hf:<dataset id>; required")
    train_limit: int | None = option(None, "sample only the first N problems (None: all)")
    seed: int = option(0, "sampling seed (sample t of problem i is reproducible)")
    tries: int = option(8, "samples drawn per problem (NPR's max_sample_trial: 8)")
    min_branches: int = option(
        1,
        "keep only traces whose every block has at least N plans (1: NPR's filter); 2 "
        "keeps a model whose kept traces are mostly one-plan blocks from unlearning branching",
    )
    max_kept_per_problem: int | None = option(None, "keep at most K accepted samples per problem (None: all)")
    stop_when_kept: bool = option(
        False,
        "draw a problem's tries one at a time and stop once it has "
        "max_kept_per_problem accepted samples (NPR code: 1 of up to 8 tries): the same kind "
        "of dataset for a fraction of the samples. Needs max_kept_per_problem; not with wrap",
    )
    require_correct: bool = option(
        True,
        "keep only correct samples; smoke/test presets turn it off so that a random "
        "model's format-valid traces can exercise the pipeline",
    )
    prompts_per_batch: int = option(16, "problems submitted to the engine at once")
    rollout_mode: str = option(
        "plain",
        "engine mode of the samples: plain (NPR: the NPR-Zero model writes the whole "
        "trace itself) or parallel (the engine forks at </guideline>; for a model whose format "
        "came from a tree-mask cold start, as in the tiny pipeline). Kept samples are "
        "canonical either way",
        ("plain", "parallel"),
    )
    prompt_style: str = option(
        "npr",
        "sampling prompt: npr (the format instruction, NPR's rejection sampling) or "
        "plain (step by step; for the wrap cold start)",
        ("npr", "plain"),
    )
    wrap: bool = option(
        False,
        "format cold start, NOT the paper: keep correct samples whatever their format and write "
        "per problem one canonical trace whose parallel steps are up to wrap_branches of the model's "
        "own correct answers (plans, takeaway and final line from a fixed template). For models that "
        "never write the NPR tags (SmolLM2-135M: 0 of 512 samples), so that Stage 1 has a format to "
        "reinforce; the reasoning stays self-generated, no teacher",
    )
    wrap_branches: int = option(2, "most correct answers wrapped as parallel steps of one trace (wrap only)")
    wrap_mode: str = option(
        "repeat",
        "wrap only: repeat (each problem's own correct answers as parallel steps under "
        "fixed plan strings, every step solving the whole problem) or decompose (plans name the "
        "problem's parts, read from its text, e.g. 'compute 3 + 4'; step k is the model's own "
        "correct answer to part k asked alone; needs a gen:expressions task)",
        ("repeat", "decompose"),
    )
    wrap_min_branches: int = option(
        1,
        "fewest correct answers a problem needs to be wrapped (wrap only); 2 makes "
        "every cold-start trace genuinely parallel",
    )
    cpu_threads: int | None = option(None, CPU_THREADS_HELP)

    def __post_init__(self):
        _check_choices(self)
        self._check_rollout()
        _check(
            self.rollout_forcing != "structure-answer",
            "rollout_forcing",
            "structure-answer is for the RL stages (it needs the answers at rollout time); use structure",
        )
        _check(
            1 <= self.wrap_min_branches <= self.wrap_branches <= 5,
            "wrap_branches/wrap_min_branches",
            "need 1 <= wrap_min_branches <= wrap_branches <= 5",
        )
        _check(self.wrap or self.wrap_mode == "repeat", "wrap_mode", "decompose is a cold start: pass --wrap true too")
        _check(bool(self.model.strip()), "model", "is required: pass --model RUN/final from `npr train stage1`")
        _check(bool(self.train_data.strip()), "train_data", "is required: pass --train-data (a spec or .jsonl path)")
        _check(self.tries >= 1 and self.prompts_per_batch >= 1, "tries/prompts_per_batch", "must be >= 1")
        _check(1 <= self.min_branches <= 5, "min_branches", f"must lie in [1, 5], got {self.min_branches}")
        _check(
            self.max_kept_per_problem is None or self.max_kept_per_problem >= 1,
            "max_kept_per_problem",
            "must be >= 1 or None",
        )
        _check(self.train_limit is None or self.train_limit >= 1, "train_limit", "must be >= 1 or None")
        _check(
            not self.stop_when_kept or (self.max_kept_per_problem is not None and not self.wrap),
            "stop_when_kept",
            "needs max_kept_per_problem (how many accepted samples end a problem) and no wrap",
        )
        self._check_instruction()


STAGE_CONFIGS: dict[str, type] = {
    "stage1": Stage1Config,
    "stage2": Stage2Config,
    "stage3": Stage3Config,
    "sample": SampleConfig,
}

# Fields that may change when a run is resumed: they do not change what is computed.
RESUMABLE_FIELDS = frozenset({"stop_after", "save_every", "keep_checkpoints", "tensorboard", "report_to"})
