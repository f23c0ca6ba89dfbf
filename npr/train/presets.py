"""Presets: named overrides of the paper defaults in ``npr.train.config``.

- ``smoke``: a tiny random model built locally; seconds on a CPU; for CI and tests. Rollouts
  of Stage 3 and ``npr sample`` are forced (``rollout_forcing``) because a random model never
  writes the NPR structure; Stage 3's forced traces end with the model's own choice between
  the right and a wrong answer (``structure-answer``), so its rewards vary within a group and
  PAPO's gradient is not zero. Stage 1's random rollouts differ in length and stray tags, which
  is enough reward variance to exercise the DAPO update.
- ``tiny``: the embedded SmolLM2-135M-Instruct on ``gen:expressions`` (2-4 independent one-digit
  sums and differences per problem); a few minutes per stage on a 2-core CPU. Its learning rates are tiny-preset
  choices (a 135M model over a handful of steps), far above the paper's.
- ``qwen3-4b``: NPR-4B's settings on Qwen3-4B-Instruct-2507, for GPUs (``accelerate launch``; add
  ``--fsdp true`` to shard it over the GPUs): the values of the authors' released launch scripts
  (bigai-nlco/Native-Parallel-Reasoner), cited per value below as ``file:line``, except where the paper's
  text disagrees (then the paper, marked);
  docs/training.md has the full table "npr vs paper vs reference code".

Stages after the first need ``--model RUN/final`` from the previous stage (the ``smoke``
presets start from a fresh tiny random model so that each command runs on its own), and
Stage 2 needs ``--train-data`` from ``npr sample``. SmolLM2-135M never writes the NPR tags on
its own, so ``npr pipeline --preset tiny`` runs a format cold start before Stage 1 (its own
correct plain answers wrapped as parallel steps, ``npr sample --wrap``, then one short parallel
SFT); see docs/training.md.
"""

from __future__ import annotations

from typing import Any

# tiny: 2-4 independent one-digit expressions per problem (npr.data.generated); held-out problems use another seed
_EXPRESSIONS = "gen:expressions?size=256&seed=1&parts=2-4"
_EXPRESSIONS_EVAL = "gen:expressions?size=64&seed=2&parts=2-4"
_SMOKE_DATA = "rg:chain_sum?size=16&seed=1&terms=2&digits=1"

_SMOKE_COMMON: dict[str, Any] = dict(
    model="tiny-random-llama", learning_rate=1e-3, warmup_steps=0, max_steps=3, micro_batch_size=4, keep_checkpoints=0
)
_SMOKE_RL: dict[str, Any] = dict(
    _SMOKE_COMMON,
    train_data=_SMOKE_DATA,
    prompts_per_step=4,
    samples_per_prompt=4,
    kv_cache_tokens=32768,
    max_num_seqs=16,
    pack_group_tokens=1100,
    micro_batch_size=2,
)
# torch's default thread count. On a 2-core machine shared with other processes, two spinning threads
# make decoding and training many times slower (measured 5-70x); then pass --cpu-threads 1.
_TINY_THREADS = None
# 128 sequences at once: 323 vs 270 tok/s at 64 (held-out eval, 128 samples, docs/results.md)
_TINY_ENGINE: dict[str, Any] = dict(
    cpu_threads=_TINY_THREADS, rollout_dtype="bfloat16", kv_cache_tokens=65536, max_num_seqs=128
)
# memory (issue 26, docs/performance.md): one pack of a prompt's responses per forward (two made the update's
# activations 4-7 GiB of a 10.6 GB Stage-3 peak) and the engine's KV pool and bf16 copy freed for the update
_TINY_RL: dict[str, Any] = dict(
    _TINY_ENGINE,
    train_data=_EXPRESSIONS,
    mixed_precision="bf16",
    eval_data=_EXPRESSIONS_EVAL,
    eval_limit=8,
    eval_samples=2,
    warmup_steps=0,
    lr_schedule="constant",
    pack_group_tokens=2048,
    micro_batch_size=1,
    prompts_per_step=8,
    release_engine_for_update="on",
)
# fp32 master weights, bf16 compute; checkpointing: an 8k-token rollout's activations otherwise dominate.
# FSDP: `npr memory --preset qwen3-4b --gpus 8 --gpu-memory 80` puts every stage above 80 GiB per GPU without it
# (Stage 1 and 3: 121.9 GiB, Stage 2: 103.8) and within it with it (docs/training.md); it needs >= 2 processes
_QWEN_TRAIN: dict[str, Any] = dict(
    dtype="float32", mixed_precision="bf16", micro_batch_size=2, save_every=20, gradient_checkpointing=True, fsdp=True
)
_QWEN_GPU: dict[str, Any] = dict(_QWEN_TRAIN, rollout_dtype="bfloat16", kv_cache_gib=20.0, max_num_seqs=256)
# NPR's launch scripts (reference repo bigai-nlco/Native-Parallel-Reasoner at e148ad5): Stage 1
# npr-zero/experiments/run.sh (Z), Stage 3 npr-rl/experiments/run.sh (R), Stage 2 npr-beta/train/sft_math.sh (B),
# sampling npr-beta/scripts/sampling.sh (S)
_QWEN_RL: dict[str, Any] = dict(
    _QWEN_GPU,
    max_new_tokens=30000,  # Z:25, R:25 max_response_length
    mini_batch_size=1,  # Z:39, R:39 ppo_mini_batch_size=1 prompt group: one Adam step per group
    ppo_epochs=1,  # verl's default (npr-zero/verl/trainer/config/_generated_ppo_trainer.yaml:31)
    num_epochs=1,  # Z:148, R:155 total_epochs=1: one pass over the training problems
    weight_decay=0.1,
    max_grad_norm=1.0,  # Z:110,116; R:115,121
    temperature=1.0,
    top_p=1.0,
    top_k=0,  # Z:55-57, R:55-57 (top_k -1: off)
    # the paper keeps gradients on the tags that control branching (<step>, <takeaway> are prefilled by the engine);
    # the reference trains every token of the re-tokenized response (npr-rl/.../sglang_rollout.py:985)
    loss_on_prefilled=True,
)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "stage1": {
        # dynamic sampling reads the reward before the overlong penalty, which a random model's text never varies:
        # forced parallel traces ending with the model's choice between the right and a wrong answer vary it
        "smoke": dict(
            _SMOKE_RL,
            max_new_tokens=96,
            overlong_buffer=16,
            rollout_mode="parallel",
            rollout_forcing="structure-answer",
        ),
        # parallel rollouts (the paper: plain): the format comes from a tree-mask cold start, whose model writes a
        # valid trace in 97% of parallel samples but 0-27% of plain ones; with plain rollouts one cold start in
        # two runs gave Stage 1 no valid rollout at all and the pipeline collapsed (docs/results.md).
        # top-p 0.7 (the evaluation protocol's; the paper trains at 1.0)
        "tiny": dict(
            _TINY_RL,
            model="embedded",
            samples_per_prompt=6,
            max_new_tokens=320,
            overlong_buffer=64,
            learning_rate=2e-5,
            max_steps=2,
            top_p=0.7,
            rollout_mode="parallel",
        ),
        "qwen3-4b": dict(
            _QWEN_RL,
            model="Qwen/Qwen3-4B-Instruct-2507",  # README.md, Stage 1
            prompts_per_step=32,
            samples_per_prompt=16,  # Z:36,38
            learning_rate=1e-6,
            lr_schedule="cosine",
            warmup_steps=10,  # Z:107,109,111
            min_learning_rate=0.0,  # Z:108 min_lr_ratio=1e-8 (1e-14)
            clip_low=0.2,
            clip_high=0.28,  # Z:21-22
            clip_ratio_c=10.0,  # Z:93 dual clip
            dynamic_sampling=True,
            max_gen_batches=0,  # Z:33-35: filter groups, refill with no limit
            overlong_buffer=10,
            overlong_penalty=1.0,  # Z:26-28 (DAPO's own recipe: 4096 of 20480)
            # reward: the paper's (format penalty, else ±1); the released code comments the format term out and
            # rewards ±1 accuracy only (npr-zero/verl/utils/reward_score/math_dapo.py:406-430)
            reward="stage1",
            rollout_mode="plain",
        ),
    },
    "sample": {
        "smoke": dict(
            model="tiny-random-llama",
            train_data=_SMOKE_DATA,
            train_limit=4,
            tries=2,
            max_new_tokens=96,
            rollout_forcing="structure",
            require_correct=False,
            kv_cache_tokens=32768,
            max_num_seqs=16,
        ),
        # parallel mode: the tiny model's format comes from a tree-mask cold start, and plain decoding of step 2
        # after step 1 is what it was never taught (plain: 2 of 256 samples kept; parallel: 80, 77 of them
        # two-plan; docs/results.md)
        "tiny": dict(
            _TINY_ENGINE,
            train_data=_EXPRESSIONS,
            train_limit=64,
            tries=4,
            max_new_tokens=320,
            prompts_per_batch=32,
            rollout_mode="parallel",
            top_p=0.7,
        ),
        # prompts_per_batch: open problems at once, a throughput knob (S:19 batches 1024 on SGLang)
        "qwen3-4b": dict(
            rollout_dtype="bfloat16",
            kv_cache_gib=40.0,
            max_num_seqs=256,
            prompts_per_batch=64,
            tries=8,
            max_kept_per_problem=1,
            stop_when_kept=True,  # S:21-23: stop at 1 of up to 8
            max_new_tokens=32768,  # S:24
            temperature=1.0,
            top_p=1.0,
            top_k=0,  # S:25-27
            rollout_mode="plain",
            require_correct=True,
            min_branches=1,
        ),  # correct + format (S:32)
    },
    "stage2": {
        "smoke": dict(
            _SMOKE_COMMON,
            train_data="synthetic:arith?n=12&seed=0",
            batch_size=4,
            micro_batch_size=2,
            min_learning_rate=5e-4,
            max_seq_len=4096,
        ),
        # one epoch at 5e-5: rejection sampling keeps ~200 traces; at 2e-4 NPR-Beta fell from NPR-Zero's 75.8% to
        # 57.8% avg@4 (66.4% with 2 epochs, which also ran the pipeline to 18.7 min); at 5e-5 it keeps 75.0%
        # (docs/results.md)
        "tiny": dict(
            cpu_threads=_TINY_THREADS,
            learning_rate=5e-5,
            min_learning_rate=2.5e-5,
            batch_size=8,
            micro_batch_size=1,
            num_epochs=1,
            mixed_precision="bf16",
            max_seq_len=1024,
            pack_tokens=2048,
        ),
        "qwen3-4b": dict(
            _QWEN_TRAIN,
            learning_rate=1e-6,  # B:18
            # the paper: 1e-6 decaying to 5e-7. B:19 sets min_lr=5e-7 but never passes it, so the reference's
            # cosine (B:65) ends at 0; we follow the paper
            min_learning_rate=5e-7,
            lr_schedule="cosine",
            warmup_ratio=0.05,  # B:65, B:47
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,  # B:20, B:68-69
            max_grad_norm=1.0,  # transformers' default (B sets none)
            batch_size=8,
            micro_batch_size=1,  # B:21-26: 1 per device x 8 GPUs x accumulation 1
            num_epochs=1,
            max_steps=0,  # B:23
            max_seq_len=32768,  # B:31-32 (the reference truncates longer examples; npr drops and counts them)
            seed=521,  # B:45
        ),
    },
    "stage3": {
        # structure-answer: the forced traces end with the model's choice between the right and a wrong answer,
        # so rewards vary within a group and PAPO's advantages and gradients are not zero (npr.train.smoke)
        "smoke": dict(_SMOKE_RL, max_new_tokens=96, rollout_forcing="structure-answer"),
        # temperature 0.6: at 1.0 the 135M model broke the schema in ~90% of parallel rollouts (measured
        # after an earlier Stage 2 on programmatic traces; the engine ends them as invalid_schema)
        "tiny": dict(
            _TINY_RL, samples_per_prompt=4, max_new_tokens=320, temperature=0.6, learning_rate=1e-5, max_steps=3
        ),
        "qwen3-4b": dict(
            _QWEN_RL,
            prompts_per_step=16,
            samples_per_prompt=16,  # R:36,38
            learning_rate=1e-7,
            lr_schedule="constant",
            warmup_steps=0,  # R:112,114,116
            save_every=5,  # R:154
            # the reference's filter keeps rollouts without a block and cut rollouts whose tags still form the tree;
            # it drops only broken structure or > 30000 tokens (npr-rl/.../sglang_rollout.py:301-331)
            require_parallel=False,
            drop_truncated=False,
        ),
    },
}
