"""GPU check: one Stage-3 update of a random-init Qwen3-0.6B-shaped model on 16k-token tree-masked
sequences (flex_attention BlockMask, npr.train.logprobs) against the same update with plain causal
attention (SDPA's fused causal kernel, no mask). No network, no weights.

Reports, per variant: peak GPU memory of the step (above the model and optimizer), step time and
tokens/s, and the ratios tree/causal. Before that it checks the flex path against the dense one at a
short length in fp32: logits (<= 1e-4) and, on CUDA, the gradients of the policy loss (the flex
backward has no CPU kernel in torch 2.13, so only a GPU can check it).

    python benchmarks/gpu_train_check.py                 # on a CUDA device (benchmarks/gpu_train_check.sh)
    python benchmarks/gpu_train_check.py --dry           # CPU dry mode: tiny model, short rows (CI)

On CPU the tree variant runs the layout ``attention: auto`` picks there (dense), so the dry mode
exercises every line except the flex backward.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from npr.tokens import tag_token_ids
from npr.train.logprobs import (
    TokenSequence,
    causal_sequence,
    resolve_attention,
    response_logits,
    set_attention,
    structured_sequence,
)


def qwen3_0_6b_config(dry: bool):
    """Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128, MLP 3072, vocab 151936),
    or a 2-layer miniature of it for the dry mode."""
    from transformers import Qwen3Config

    if dry:
        return Qwen3Config(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        )
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    )


def long_tree_ids(
    tags: dict[str, int], length: int, branches: int, rng: random.Random, text: range
) -> tuple[list[int], list[int]]:
    """(prompt, response) token ids of about ``length`` tokens: a 128-token prompt, then one
    parallel block whose ``branches`` steps share the rest (random lengths around the mean),
    then a takeaway and a closing line. Text tokens are drawn from ``text`` (no tag ids)."""
    words = lambda n: [rng.choice(text) for _ in range(n)]  # noqa: E731
    prompt = words(128)
    response = [tags["<guideline>"]]
    for _ in range(branches):
        response += [tags["<plan>"], *words(16), tags["</plan>"]]
    response += [tags["</guideline>"]]
    body = max(branches, length - len(prompt) - len(response) - 64 - 2 * branches)
    weights = [rng.uniform(0.7, 1.3) for _ in range(branches)]
    for w in weights:
        response += [tags["<step>"], *words(int(body * w / sum(weights))), tags["</step>"]]
    response += [tags["<takeaway>"], *words(48), tags["</takeaway>"]]
    return prompt, response + words(max(1, length - len(prompt) - len(response)))


def build_model(dry: bool, device: torch.device):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(qwen3_0_6b_config(dry), dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device).train()


def causal_logits(model, seq: TokenSequence) -> list[torch.Tensor]:
    """The baseline: no mask at all (HF's causal default; SDPA's fused causal kernel)."""
    device = next(model.parameters()).device
    keep = seq.predictors(0).to(device)
    previous = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        return [model(input_ids=seq.input_ids[None].to(device), logits_to_keep=keep).logits[0]]
    finally:
        model.config._attn_implementation = previous


def papo_step(model, optimizer, logits_fn, seq: TokenSequence, advantage: float, mixed: bool) -> torch.Tensor:
    """One on-policy PAPO update on one response (the loss of npr.algos.papo_loss at ratio 1:
    -A * mean log-prob), clipped at 1.0; returns the loss."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
        (logits,) = logits_fn()
        target = seq.input_ids[seq.spans[0][0] : seq.spans[0][1]].to(device)
        logprobs = logits.float().log_softmax(-1).gather(-1, target[:, None])[:, 0]  # [T]
        loss = -advantage * logprobs.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(device: torch.device, run) -> tuple[float, float]:
    """(seconds, peak bytes above the memory in use before) of ``run()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, float(torch.cuda.max_memory_allocated() - base)
    return time.perf_counter() - start, float("nan")


def check_flex_against_dense(tags, device: torch.device, dry: bool) -> str:
    """fp32, a short tree row: flex logits vs dense logits (<= 1e-4) and, on CUDA, gradients."""
    model = build_model(True, device)  # the miniature: parity does not need the big shape
    rng = random.Random(1)
    prompt, response = long_tree_ids(tags, 384 if dry else 2048, 4, rng, range(300, 1024))
    seq = structured_sequence(prompt, response, tags)
    results = {}
    for attention in ("dense", "flex"):
        model.zero_grad(set_to_none=True)
        grad = device.type == "cuda" or attention == "dense"
        with torch.set_grad_enabled(grad):
            (logits,) = response_logits(model, [seq], 0, torch.float32, attention=attention)
            if grad:
                logits.float().log_softmax(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} if grad else {}
        results[attention] = (logits.detach(), grads)
    logit_error = float((results["flex"][0] - results["dense"][0]).abs().max())
    line = f"flex vs dense (fp32, {len(seq.input_ids)} tokens): max |logit diff| {logit_error:.2e}"
    if results["flex"][1]:
        grad_error = max(float((results["flex"][1][n] - g).abs().max()) for n, g in results["dense"][1].items())
        line += f", max |grad diff| {grad_error:.2e}"
        assert grad_error <= 1e-4, line
    else:
        line += " (no flex backward on CPU: gradients not compared)"
    assert logit_error <= 1e-4, line
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU dry mode: 2-layer miniature, short rows (CI)")
    parser.add_argument("--tokens", type=int, default=None, help="row length (default 16384; dry: 512)")
    parser.add_argument("--branches", type=int, default=8, help="parallel steps in the block")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per variant after a warm-up step")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    if not args.dry and device.type != "cuda":
        raise SystemExit("gpu_train_check: no CUDA device; run with --dry for the CPU dry mode")
    from npr.models import load_tokenizer

    tags = tag_token_ids(load_tokenizer("tiny-random-qwen3"))
    print(check_flex_against_dense(tags, device, args.dry), flush=True)
    length = args.tokens or (512 if args.dry else 16384)
    model = build_model(args.dry, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    vocab = range(300, model.config.vocab_size)
    prompt, response = long_tree_ids(tags, length, args.branches, random.Random(0), vocab)
    tree, causal = structured_sequence(prompt, response, tags), causal_sequence(prompt, response)
    attention = resolve_attention("auto", device)
    mixed = device.type == "cuda"

    def tree_step():  # set for the whole step: checkpointing recomputes attention during backward
        set_attention(model, attention)
        return papo_step(model, optimizer, lambda: response_logits(model, [tree], 0), tree, 1.0, mixed)

    def causal_step():
        model.config._attn_implementation = "sdpa"
        return papo_step(model, optimizer, lambda: causal_logits(model, causal), causal, 1.0, mixed)

    variants = {f"tree ({attention})": tree_step, "causal (no mask)": causal_step}
    results = {name: [] for name in variants}
    for run in variants.values():
        run()  # warm-up: compile, allocator
    for _ in range(args.repeats):  # alternated, so a drifting clock hits both alike
        for name, run in variants.items():
            results[name].append(measure(device, run))
    n = len(tree.input_ids)
    print(
        f"one Stage-3 update, {'dry: 2-layer miniature' if args.dry else 'Qwen3-0.6B shape, random init'}, "
        f"{n} tokens ({args.branches} branches), {device}, bf16 autocast {mixed}, gradient checkpointing"
    )
    print(f"{'variant':<22} {'seconds':>8} {'tokens/s':>10} {'peak GiB':>9}")
    best = {}
    for name, values in results.items():
        seconds = min(v[0] for v in values)
        peak = max(v[1] for v in values)
        best[name] = (seconds, peak)
        print(f"{name:<22} {seconds:8.3f} {n / seconds:10.0f} {peak / 2**30:9.2f}")
    (tree_s, tree_m), (causal_s, causal_m) = best.values()
    memory = f"{tree_m / causal_m:.2f}" if device.type == "cuda" else "n/a (CPU)"
    print(f"tree/causal at {n}: memory {memory}, time {tree_s / causal_s:.2f}")


if __name__ == "__main__":
    main()
