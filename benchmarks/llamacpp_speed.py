"""The llama.cpp backend against npr's engine on the embedded SmolLM2 (ratios measured in one run).

npr's engine runs the de-quantised model (``--dtype``, bf16 by default as ``npr eval``); the llama.cpp
backend runs the shipped Q4_1 GGUF with the NPR tags (``npr.backends.gguf_model``). Every timing
alternates the backends (ABBA over ``--rounds``) and reports the median ratio and its range.

1. ``eval``: an evaluation-shaped batch: ``--problems`` chat-template prompts (npr's instruction, ~230
   tokens, a shared system prefix), ``--k`` samples each, temperature 1.0, top-p 0.7, each sample
   forced (``StructureForcer``, an untrained model writes no tags) to write a parallel trace of
   ``--shape`` branches per block; wall time per backend, ``parallel`` and ``sequential`` modes.
2. ``decode``: ``plain`` mode, EOS ignored, ``--new-tokens`` per sequence; tokens/s at batch 1 and 32.
3. ``speedup``: batch-1 requests of the forced trace, ``sequential`` wall over ``parallel`` wall per
   backend, next to the ideal (generated / critical-path tokens).

    OMP_NUM_THREADS=1 python benchmarks/llamacpp_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer

QUESTIONS = [
    "What is 17 + 25?",
    "A train travels 60 km in 1.5 hours. What is its speed in km/h?",
    "How many prime numbers are there below 30?",
    "What is the remainder of 2^10 divided by 7?",
    "Solve for x: 3x + 5 = 20.",
    "What is the area of a circle of radius 3?",
    "How many ways can 3 books be arranged on a shelf?",
    "What is 12 factorial divided by 10 factorial?",
]


def timed(engine, prompts, params):
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    return time.perf_counter() - start, results


def spread(values):
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads and torch threads")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--shape", default="24,24,24/16,16", help="branch tokens: blocks split by /, branches by ,")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sections", default="eval,decode,speedup")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from npr.backends.gguf_model import tagged_embedded_gguf
    from npr.backends.llamacpp import LlamaCppEngine
    from npr.models import load_model_and_tokenizer
    from npr.prompts import encode_prompt

    model, tok = load_model_and_tokenizer("embedded", dtype=args.dtype)
    gguf = tagged_embedded_gguf(tok)
    shape = [[int(x) for x in block.split(",")] for block in args.shape.split("/")]
    forcer = StructureForcer(tok, shape)
    prompts = [encode_prompt(tok, q) for q in (QUESTIONS * 8)[: args.problems]]
    sections = args.sections.split(",")

    def engines(mode, **kw):
        config = EngineConfig(mode=mode, kv_cache_tokens=32768, **kw)
        return {"npr": Engine(model, tok, config), "llamacpp": LlamaCppEngine(gguf, tok, config, threads=args.threads)}

    print(
        f"# embedded SmolLM2-135M: npr engine {args.dtype} vs llama.cpp Q4_1; {args.threads} thread(s); "
        f"{args.rounds} rounds ABBA"
    )
    if "eval" in sections:
        params = SamplingParams(
            max_new_tokens=1024, temperature=1.0, top_p=0.7, n=args.k, seed=0, logits_processors=(forcer,)
        )
        for mode in ("parallel", "sequential"):
            pair = engines(mode)
            walls = {name: [] for name in pair}
            tokens = {}
            for r in range(args.rounds):
                for name in ("npr", "llamacpp") if r % 2 == 0 else ("llamacpp", "npr"):
                    wall, results = timed(pair[name], prompts, params)
                    walls[name].append(wall)
                    tokens[name] = sum(len(x.token_ids) for x in results)
                    assert all(x.finish_reason == "eos" for x in results), {x.finish_reason for x in results}
            ratio = [a / b for a, b in zip(walls["npr"], walls["llamacpp"])]
            print(
                f"eval {mode:10s} {args.problems} problems x k={args.k}: npr {statistics.median(walls['npr']):.2f} s,"
                f" llama.cpp {statistics.median(walls['llamacpp']):.2f} s ({tokens['llamacpp']} tokens); "
                f"llama.cpp faster by {spread(ratio)}"
            )
    if "decode" in sections:
        pair = engines("plain", max_num_seqs=64)
        short = [tok.encode("Once upon a time", add_special_tokens=False)]
        for batch in (1, 32):
            params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, n=batch, ignore_eos=True)
            rates = {name: [] for name in pair}
            for r in range(args.rounds):
                for name in ("npr", "llamacpp") if r % 2 == 0 else ("llamacpp", "npr"):
                    wall, results = timed(pair[name], short, params)
                    rates[name].append(sum(len(x.token_ids) for x in results) / wall)
            ratio = [b / a for a, b in zip(rates["npr"], rates["llamacpp"])]
            print(
                f"decode batch {batch:2d}: npr {statistics.median(rates['npr']):.0f} tok/s, llama.cpp "
                f"{statistics.median(rates['llamacpp']):.0f} tok/s; llama.cpp / npr {spread(ratio)}"
            )
    if "speedup" in sections:
        params = SamplingParams(max_new_tokens=1024, temperature=0, n=1, logits_processors=(forcer,))
        par, seq = engines("parallel"), engines("sequential")
        for name in ("npr", "llamacpp"):
            speedups, ideal = [], 0.0
            for r in range(args.rounds):
                for i, prompt in enumerate(prompts[:2]):
                    order = (par, seq) if (r + i) % 2 == 0 else (seq, par)
                    walls = {}
                    for which in order:
                        walls[id(which)], results = timed(which[name], [prompt], params)
                    speedups.append(walls[id(seq)] / walls[id(par)])
                    ideal = results[0].stats.ideal_speedup
            print(
                f"speedup {name:9s} batch 1: sequential / parallel {spread(speedups)}; ideal {ideal:.2f}x; "
                f"fraction of ideal {statistics.median(speedups) / ideal:.2f}"
            )


if __name__ == "__main__":
    main()
