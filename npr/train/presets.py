"""Presets: named overrides of the paper defaults in ``npr.train.config``.

- ``smoke``: a tiny random model built locally; seconds on a CPU; for CI and tests. Rollouts
  of Stage 3 and ``npr sample`` are forced (``rollout_forcing``) because a random model never
  writes the NPR structure; Stage 3's forced traces end with the model's own choice between
  the right and a wrong answer (``structure-answer``), so its rewards vary within a group and
  PAPO's gradient is not zero. Stage 1's random rollouts differ in length and stray tags, which
  is enough reward variance to exercise the DAPO update.
- ``tiny``: the embedded SmolLM2-135M-Instruct on 2-term, 1-digit ``chain_sum`` from
  reasoning-gym; a few minutes per stage on a 2-core CPU. Its learning rates are tiny-preset
  choices (a 135M model over a handful of steps), far above the paper's.
- ``qwen3-4b``: the paper's settings on Qwen3-4B-Instruct-2507, for GPUs (``accelerate launch``;
  add ``--fsdp true`` to shard it over the GPUs).

Stages after the first need ``--model RUN/final`` from the previous stage (the ``smoke``
presets start from a fresh tiny random model so that each command runs on its own), and
Stage 2 needs ``--train-data`` from ``npr sample``. SmolLM2-135M never writes the NPR tags on
its own, so ``npr pipeline --preset tiny`` runs a format cold start before Stage 1 (its own
correct plain answers wrapped as parallel steps, ``npr sample --wrap``, then one short parallel
SFT); see docs/training.md.
"""

from __future__ import annotations

from typing import Any

_CHAIN_SUM = "rg:chain_sum?size=256&seed=1&terms=2&digits=1"
_CHAIN_SUM_EVAL = "rg:chain_sum?size=64&seed=2&terms=2&digits=1"
_SMOKE_DATA = "rg:chain_sum?size=16&seed=1&terms=2&digits=1"

_SMOKE_COMMON: dict[str, Any] = dict(model="tiny-random-llama", learning_rate=1e-3, warmup_steps=0, max_steps=3,
                                     micro_batch_size=4, keep_checkpoints=0)
_SMOKE_RL: dict[str, Any] = dict(_SMOKE_COMMON, train_data=_SMOKE_DATA, prompts_per_step=4, samples_per_prompt=4,
                                 kv_cache_tokens=32768, max_num_seqs=16, pack_group_tokens=1100, micro_batch_size=2)
# torch's default thread count. On a 2-core machine shared with other processes, two spinning threads
# make decoding and training many times slower (measured 5-70x); then pass --cpu-threads 1.
_TINY_THREADS = None
# 128 sequences at once: 323 vs 270 tok/s at 64 (held-out eval, 128 samples, docs/results.md)
_TINY_ENGINE: dict[str, Any] = dict(cpu_threads=_TINY_THREADS, rollout_dtype="bfloat16", kv_cache_tokens=65536,
                                    max_num_seqs=128)
_TINY_RL: dict[str, Any] = dict(_TINY_ENGINE, train_data=_CHAIN_SUM, mixed_precision="bf16", eval_data=_CHAIN_SUM_EVAL,
                                eval_limit=8, eval_samples=2, warmup_steps=0, lr_schedule="constant",
                                pack_group_tokens=2048, micro_batch_size=2, prompts_per_step=8)
# fp32 master weights, bf16 compute; checkpointing: an 8k-token rollout's activations otherwise dominate.
# Add --fsdp true on several GPUs (docs/training.md)
_QWEN_TRAIN: dict[str, Any] = dict(dtype="float32", mixed_precision="bf16", micro_batch_size=2, save_every=20,
                                   gradient_checkpointing=True)
_QWEN_GPU: dict[str, Any] = dict(_QWEN_TRAIN, rollout_dtype="bfloat16", kv_cache_gib=20.0, max_num_seqs=256)

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "stage1": {
        "smoke": dict(_SMOKE_RL, max_new_tokens=48, overlong_buffer=16),  # random tags and lengths vary the reward
        # parallel rollouts (the paper: plain): the format comes from a tree-mask cold start, whose model writes a
        # valid trace in 97% of parallel samples but 0-27% of plain ones; with plain rollouts one cold start in
        # two runs gave Stage 1 no valid rollout at all and the pipeline collapsed (docs/results.md).
        # top-p 0.7 (the evaluation protocol's; the paper trains at 1.0)
        "tiny": dict(_TINY_RL, model="embedded", samples_per_prompt=6, max_new_tokens=192, overlong_buffer=48,
                     learning_rate=2e-5, max_steps=3, top_p=0.7, rollout_mode="parallel"),
        "qwen3-4b": dict(_QWEN_GPU, model="Qwen/Qwen3-4B-Instruct-2507", max_new_tokens=8192, overlong_buffer=1024),
    },
    "sample": {
        "smoke": dict(model="tiny-random-llama", train_data=_SMOKE_DATA, train_limit=4, tries=2, max_new_tokens=96,
                      rollout_forcing="structure", require_correct=False, kv_cache_tokens=32768, max_num_seqs=16),
        # parallel mode: the tiny model's format comes from a tree-mask cold start, and plain decoding of step 2
        # after step 1 is what it was never taught (plain: 2 of 256 samples kept; parallel: 80, 77 of them
        # two-plan; docs/results.md)
        "tiny": dict(_TINY_ENGINE, train_data=_CHAIN_SUM, train_limit=64, tries=4, max_new_tokens=192,
                     prompts_per_batch=32, rollout_mode="parallel", top_p=0.7),
        "qwen3-4b": dict(rollout_dtype="bfloat16", kv_cache_gib=40.0, max_num_seqs=256, prompts_per_batch=64),
    },
    "stage2": {
        "smoke": dict(_SMOKE_COMMON, train_data="synthetic:arith?n=12&seed=0", batch_size=4, micro_batch_size=2,
                      min_learning_rate=5e-4, max_seq_len=4096),
        # one epoch at 5e-5: rejection sampling keeps ~200 traces; at 2e-4 NPR-Beta fell from NPR-Zero's 75.8% to
        # 57.8% avg@4 (66.4% with 2 epochs, which also ran the pipeline to 18.7 min); at 5e-5 it keeps 75.0%
        # (docs/results.md)
        "tiny": dict(cpu_threads=_TINY_THREADS, learning_rate=5e-5, min_learning_rate=2.5e-5, batch_size=8,
                     micro_batch_size=1, num_epochs=1, mixed_precision="bf16", max_seq_len=1024, pack_tokens=2048),
        "qwen3-4b": dict(_QWEN_TRAIN),
    },
    "stage3": {
        # structure-answer: the forced traces end with the model's choice between the right and a wrong answer,
        # so rewards vary within a group and PAPO's advantages and gradients are not zero (npr.train.smoke)
        "smoke": dict(_SMOKE_RL, max_new_tokens=96, rollout_forcing="structure-answer"),
        # temperature 0.6: at 1.0 the 135M model broke the schema in ~90% of parallel rollouts (measured
        # after an earlier Stage 2 on programmatic traces; the engine ends them as invalid_schema)
        "tiny": dict(_TINY_RL, samples_per_prompt=4, max_new_tokens=256, temperature=0.6, learning_rate=1e-5,
                     max_steps=4),
        "qwen3-4b": dict(_QWEN_GPU, max_new_tokens=8192),
    },
}
