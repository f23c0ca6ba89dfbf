"""Benchmark: memory and time of one Stage-2 step (forward + backward) with tree attention, and
Stage-2 throughput packed vs padded.

Part 1, one trace of L tokens (a prompt, one parallel block of 4 branches, a takeaway) on the
embedded model, loss on every response token as Stage 2 computes it:

- ``tree``: the layout ``attention: auto`` picks on this device (npr.train.logprobs): flex
  (BlockMask from the tree ids, O(L) mask memory) on CUDA, dense on CPU, where torch 2.13 has
  no flex_attention backward;
- ``dense``: today's path: an additive float mask [1, 1, L, L] (npr.masks.batch_inputs);
- ``causal``: the same tokens with no mask at all (SDPA's fused causal kernel).

Peak memory is measured above the memory held before the step (CUDA: the allocator's peak;
CPU: the peak resident set, sampled every 2 ms, of a fresh process per measurement). The final
line is ``tree/causal at L: memory X, time Y`` for the longest L (goal at 8192: <= 1.2, <= 1.3).

Part 2 (``--packing``), Stage-2 tokens/s over the same batches of Stage-2 data (``--data``: the
tiny pipeline's ``runs/tiny/sample/data.jsonl``, or by default synthetic:chain_sum traces; batch
8): ``padded`` (sequences right-padded into a batch) vs ``packed`` (each micro-batch laid end to
end in one row, document ids in the mask).

    python benchmarks/sft_memory.py [--device cpu|cuda] [--lengths 2048 4096 8192] [--packing]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

import torch

VARIANTS = ("tree", "dense", "causal")


class PeakRSS:
    """Peak resident set size of this process while the block runs, above its size at entry."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def used(self) -> int:
        return self.peak - self.start


def trace(tokenizer, length: int, seed: int = 0):
    """Prompt + response ids of ``length`` tokens (long_tree_ids of gpu_train_check, real text ids)."""
    from gpu_train_check import long_tree_ids

    from npr.tokens import tag_token_ids

    tags = tag_token_ids(tokenizer)
    text = range(1000, min(len(tokenizer), 40000))  # ordinary BPE tokens of the embedded vocabulary
    return long_tree_ids(tags, length, 4, random.Random(seed), text), tags


def step(model, variant: str, prompt, response, tags, mixed: bool, backward: bool = True) -> None:
    """Forward (+ backward) of Stage 2's loss (token-mean NLL of the response) for one variant:
    tree (the auto layout), flex, dense or causal."""
    from gpu_train_check import causal_logits

    from npr.train.logprobs import causal_sequence, resolve_attention, response_logits, structured_sequence

    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed), torch.set_grad_enabled(backward):
        if variant == "causal":
            seq = causal_sequence(prompt, response)
            (logits,) = causal_logits(model, seq)
        else:
            seq = structured_sequence(prompt, response, tags)
            attention = resolve_attention("auto", device) if variant == "tree" else variant
            (logits,) = response_logits(model, [seq], 0, attention=attention)
        target = seq.input_ids[seq.spans[0][0] :].to(device)
        loss = -logits.float().log_softmax(-1).gather(-1, target[:, None]).mean()
    if backward:
        loss.backward()
    model.zero_grad(set_to_none=True)


def load(device: str, checkpointing: bool):
    from npr.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("embedded", device=device)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def measure_one(
    variant: str, length: int, device: str, mixed: bool, checkpointing: bool, backward: bool = True
) -> dict:
    """Load, one warm-up step, one measured step: seconds and peak bytes of the measured step."""
    model, tokenizer = load(device, checkpointing)
    (prompt, response), tags = trace(tokenizer, length)
    run = lambda: step(model, variant, prompt, response, tags, mixed, backward)  # noqa: E731
    run()  # warm-up (allocator, compile)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start, "bytes": torch.cuda.max_memory_allocated() - base}
    with PeakRSS() as rss:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": rss.used}


def measure(variant: str, length: int, args) -> dict:
    """On CPU in a fresh process (so that the resident-set peak is this step's alone)."""
    if args.device == "cuda":
        return measure_one(variant, length, "cuda", args.bf16, args.checkpointing, not args.forward_only)
    command = [sys.executable, __file__, "--one", variant, str(length), "--device", "cpu"]
    command += [
        "--bf16" if args.bf16 else "--no-bf16",
        "--checkpointing" if args.checkpointing else "--no-checkpointing",
    ]
    command += ["--forward-only"] * args.forward_only
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(args) -> None:
    variants = (
        tuple(args.variants) if args.variants else (("flex", "dense", "causal") if args.forward_only else VARIANTS)
    )
    results: dict[tuple[str, int], dict] = {}
    for i, length in enumerate(args.lengths):
        order = list(variants) if i % 2 else list(reversed(variants))  # alternate the order per length
        for variant in order:
            results[(variant, length)] = measure(variant, length, args)
            print(f"  measured {variant} at {length}: {results[(variant, length)]}", file=sys.stderr, flush=True)
    from npr.train.logprobs import resolve_attention

    tree = resolve_attention("auto", torch.device(args.device))
    what = "forward only, no grad" if args.forward_only else "forward + backward"
    print(
        f"one Stage-2 step ({what}), embedded SmolLM2-135M, {args.device}, {torch.get_num_threads()} threads, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}{', gradient checkpointing' if args.checkpointing else ''}; "
        f"tree = the {tree} layout (attention auto on {args.device})"
    )
    print(f"{'L':>6} {'variant':<8} {'peak MiB':>9} {'seconds':>8} {'mem/causal':>10} {'time/causal':>11}")
    for length in args.lengths:
        causal = results[("causal", length)]
        for variant in variants:
            r = results[(variant, length)]
            print(
                f"{length:6d} {variant:<8} {r['bytes'] / 2**20:9.0f} {r['seconds']:8.2f} "
                f"{r['bytes'] / causal['bytes']:10.2f} {r['seconds'] / causal['seconds']:11.2f}"
            )
    longest = max(args.lengths)
    tree_name = variants[0]
    t, c = results[(tree_name, longest)], results[("causal", longest)]
    print(
        f"{tree_name}/causal at {longest}: memory {t['bytes'] / c['bytes']:.2f}, time {t['seconds'] / c['seconds']:.2f}"
    )


def packing_table(args) -> None:
    """Stage-2 tokens/s on ``args.data``: padded batches vs one packed row per micro-batch."""
    from npr.tokens import tag_token_ids
    from npr.train.logprobs import concat_documents, structured_sequence
    from npr.train.session import make_accelerator
    from npr.train.sft_data import load_sft_examples, tokenize_examples
    from npr.train.update import sft_backward

    model, tokenizer = load(args.device, args.checkpointing)
    tags = tag_token_ids(tokenizer)
    kept, _ = tokenize_examples(load_sft_examples(args.data), tokenizer, tags, 1024)
    sequences = [structured_sequence(k.prompt_ids, k.response_ids, tags) for k in kept]
    batches = [sequences[i : i + args.micro_batch] for i in range(0, len(sequences), args.micro_batch)][: args.batches]
    accelerator = make_accelerator()
    attention = "flex" if args.device == "cuda" else "dense"
    runs = {
        "padded": lambda batch: sft_backward(accelerator, model, batch, tokenizer.pad_token_id, len(batch)),
        # one row per micro-batch: on CUDA the flex layout does this itself; on CPU a dense mask over the row
        "packed": (lambda batch: sft_backward(accelerator, model, batch, tokenizer.pad_token_id, len(batch)))
        if attention == "flex"
        else (lambda batch: sft_backward(accelerator, model, [concat_documents(batch)], tokenizer.pad_token_id, 1)),
    }
    from npr.train.logprobs import set_attention

    set_attention(model, attention if attention == "flex" else "dense")
    if attention == "flex":  # the padded baseline on CUDA is today's dense path
        runs["padded"] = lambda batch: _dense_sft(accelerator, model, batch, tokenizer.pad_token_id)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
    times = {name: [] for name in runs}
    tokens = sum(len(s.input_ids) for b in batches for s in b)
    with autocast:
        for run in runs.values():
            run(batches[0])  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():  # alternated
                start = time.perf_counter()
                for batch in batches:
                    run(batch)
                model.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - start)
    padded_tokens = sum(len(b) * max(len(s.input_ids) for s in b) for b in batches)
    print(
        f"Stage-2 throughput, data {args.data}, {len(batches)} micro-batches of "
        f"{args.micro_batch}, {tokens} tokens ({padded_tokens} when padded), {args.device}, median of {args.repeats}"
    )
    for name, values in times.items():
        print(f"  {name:<7} {tokens / statistics.median(values):9.0f} tokens/s")
    print(f"packed/padded tokens/s: {statistics.median(times['padded']) / statistics.median(times['packed']):.2f}")


def _dense_sft(accelerator, model, batch, pad):
    from npr.train.logprobs import attention_layout
    from npr.train.update import sft_backward

    with attention_layout(model, "dense"):
        return sft_backward(accelerator, model, batch, pad, len(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gradient checkpointing (default on: what a long-trace run uses)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=("tree", "flex", "dense", "causal"),
        default=None,
        help="measure only these (the first is compared with causal in the final line)",
    )
    parser.add_argument("--packing", action="store_true", help="only part 2: packed vs padded tokens/s")
    parser.add_argument(
        "--forward-only",
        action="store_true",
        help="no-grad forwards of flex vs dense vs causal (where the layouts compare on CPU)",
    )
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument(
        "--data",
        default="synthetic:chain_sum?size=64&seed=3&terms=2&digits=1",
        help="Stage-2 data of --packing: a spec or a data.jsonl, e.g. the tiny pipeline's "
        "runs/tiny/sample/data.jsonl (default: synthetic chain-sum traces)",
    )
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(
            json.dumps(
                measure_one(
                    args.one[0], int(args.one[1]), args.device, args.bf16, args.checkpointing, not args.forward_only
                )
            )
        )
    elif args.packing:
        packing_table(args)
    else:
        memory_table(args)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
