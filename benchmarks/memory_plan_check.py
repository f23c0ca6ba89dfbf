"""Benchmark: ``npr memory``'s plan (npr.train.memory_plan) against the measured peak of the real update step.

Each case is a shallow Qwen3-shaped model with Qwen3's real vocabulary (151,936 tokens), small hidden size,
1-4 layers, built locally at random (no download), trained by the code Stage 3 runs: ``policy_backward``
(PAPO, token-mean) over one prompt + response, then ``optimizer_step`` (AdamW, clipping), twice, so the
second update runs with AdamW's states already allocated, as every step of a real run after the first. bf16
autocast over fp32 weights and gradient checkpointing, as the qwen3-4b preset; one process, the CPU's
``dense`` attention layout.

Peak: ``ru_maxrss`` of a fresh process per measurement, minus the resident size just before the model is
built (python, torch and transformers imported). The resident set is what the operating system gives the
process, so it counts everything the update holds, allocator slack included; tracemalloc sees only Python's
own allocations, not torch's tensors, and torch has no CPU allocator statistics, so the resident set is the
measure. The plan predicts the same quantity: the bytes live at the update's peak, above that baseline.

    python benchmarks/memory_plan_check.py [--lengths 1024 2048 4096] [--layers 1 4] [--hidden 256] [--chunk 1024]
        [--no-checkpointing] [--code DIR]

Prints per case the plan's peak, the measured peak and measured/predicted; the goal is within +-20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

VOCAB = 151936
PROMPT_TOKENS = 64


def shape(layers: int, hidden: int, vocab: int = VOCAB) -> dict:
    """A Qwen3-shaped model config: Qwen3's vocabulary, head_dim 64, GQA 2:1, MLP 3x hidden."""
    heads = max(2, hidden // 64)
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(layers: int, hidden: int, response: int, chunk: int, checkpointing: bool, vocab: int = VOCAB) -> dict:
    """One case in this process: the peak resident bytes of two update steps above the baseline."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, Qwen3Config

    from npr.algos import get_policy_loss
    from npr.train.logprobs import causal_sequence, set_attention
    from npr.train.session import autocast
    from npr.train.update import PolicyBatch, optimizer_step, policy_backward

    torch.set_num_threads(1)
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    baseline = rss_bytes()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**shape(layers, hidden, vocab)), dtype=torch.float32)
    set_attention(model, "dense")
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,), generator=generator).tolist()
    tokens = torch.randint(0, vocab, (response,), generator=generator).tolist()
    batch = PolicyBatch(
        sequences=[causal_sequence(prompt, tokens)],
        loss_masks=[torch.ones(response, dtype=torch.bool)],
        advantages=torch.tensor([1.0]),
        sampler_logprobs=[torch.full((response,), float("nan"))],
    )
    extra = {"logprob_chunk_size": chunk} if chunk else {}
    loss_fn = get_policy_loss("papo")
    for _ in range(2):
        policy_backward(
            accelerator,
            model,
            batch,
            loss_fn,
            "token-mean",
            0,
            micro_batch_size=1,
            forward_context=lambda: autocast(torch.device("cpu"), "bf16"),
            **extra,
        )
        optimizer_step(accelerator, model, optimizer, scheduler, 1.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak": peak - baseline, "baseline": baseline}


def run_case(
    layers: int, hidden: int, response: int, chunk: int, checkpointing: bool, code: str | None, vocab: int = VOCAB
) -> dict:
    """``measure`` in a fresh process (peak resident size is per process), importing npr from ``code``."""
    argv = [sys.executable, __file__, "--child", json.dumps([layers, hidden, response, chunk, checkpointing, vocab])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if code:
        env["PYTHONPATH"] = code
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"case {layers} layers, {response} tokens failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted(layers: int, hidden: int, response: int, chunk: int, checkpointing: bool = True, vocab: int = VOCAB):
    """The plan of one case: one process on the CPU (dense layout), fp32 weights, bf16 autocast."""
    from npr.train.memory_plan import PlanInputs, plan_memory, shape_from_config

    model = shape_from_config(dict(shape(layers, hidden, vocab), model_type="qwen3"), "benchmark")
    inputs = PlanInputs(
        stage="stage3",
        gpus=1,
        fsdp=False,
        device="cpu",
        master_bytes=4,
        autocast_bf16=True,
        gradient_checkpointing=checkpointing,
        unit_tokens=PROMPT_TOKENS + response,
        predicted_per_unit=response,
        units_per_pass=1,
        passes_per_step=1,
        logprob_chunk_tokens=chunk,
    )
    return plan_memory(model, inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024], help="response tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument(
        "--chunk",
        type=int,
        default=1024,
        help="logprob_chunk_size (0: the [T, V] path of npr "
        "before chunked log-probs, whose policy_backward takes no chunk size)",
    )
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    parser.add_argument(
        "--vocab",
        type=int,
        default=VOCAB,
        help="vocabulary (default: Qwen3's); a small one leaves the activations as what grows with the length",
    )
    parser.add_argument(
        "--code",
        default=None,
        metavar="DIR",
        help="measure the npr package under DIR (e.g. an "
        "older commit's tree from `git archive`) against this checkout's plan",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    mib = 1 << 20
    checkpointing = "no checkpointing" if args.no_checkpointing else "gradient checkpointing"
    print(
        f"update step (PAPO, bf16 autocast, {checkpointing}, AdamW, 2 steps), Qwen3-shaped, vocab {args.vocab}, "
        f"hidden {args.hidden}, prompt {PROMPT_TOKENS}, logprob chunk {args.chunk or 'none ([T, V])'}; cpu, 1 thread"
        + (f"; npr from {args.code}" if args.code else "")
    )
    print(
        f"{'layers':>6} {'tokens':>7} {'predicted MiB':>14} {'measured MiB':>13} {'measured/predicted':>19}  "
        "largest line of the plan"
    )
    worst = 0.0
    for layers in args.layers:
        points = []
        for length in args.lengths:
            plan = predicted(layers, args.hidden, length, args.chunk, not args.no_checkpointing, args.vocab)
            measured = run_case(
                layers, args.hidden, length, args.chunk, not args.no_checkpointing, args.code, args.vocab
            )["peak"]
            ratio = measured / plan.peak
            worst = max(worst, abs(ratio - 1))
            print(
                f"{layers:>6} {length:>7} {plan.peak / mib:>14.0f} {measured / mib:>13.0f} {ratio:>19.2f}  "
                f"{plan.dominant.name} ({plan.dominant.at(plan.peak_phase) / mib:.0f} MiB)",
                flush=True,
            )
            points.append((length, plan.peak, measured))
        (a, plan_a, measured_a), (b, plan_b, measured_b) = points[-2:] if len(points) > 1 else (points[0],) * 2
        if b > a:
            print(
                f"{'':>6} growth per token from {a} to {b}: plan {(plan_b - plan_a) / (b - a) / 1024:.0f} KiB, "
                f"measured {(measured_b - measured_a) / (b - a) / 1024:.0f} KiB"
            )
    print(f"largest deviation: {worst * 100:.0f} % (goal: within 20 %)")


if __name__ == "__main__":
    main()
