"""One engine setting off vs on over the tiny pipeline's evaluation workload: ratios measured in one run.

The workload is what ``npr pipeline --preset tiny`` evaluates: the held-out ``gen:expressions`` problems
(32 x k=4 samples), max 320 new tokens, temperature 1.0, top-p 0.7, bf16, a 1 GiB KV pool and 128
live streams, through ``npr.eval.runner.evaluate`` (prompt building, engine, scoring). Each round runs
the setting off, then on (odd rounds) or on, then off (even rounds), so drift falls on both; the
table gives every run's wall time, the tokens it generated and its avg@k, and the median ratio.

    python benchmarks/eval_speed.py --model embedded --mode plain --option share_prompt_prefix
    python benchmarks/eval_speed.py --model runs/tiny/stage3/final --mode parallel --option share_prompt_prefix

Outputs can differ between the settings where a change rounds differently in bf16 (near-ties flip);
the engine's tests check parity in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import fields

from npr.engine import EngineConfig
from npr.eval.runner import EvalConfig, evaluate

HELD_OUT = "gen:expressions?size=32&seed=2&parts=2-4"  # the tiny preset's held-out set (npr/pipeline.py)


def run_once(args, setting: bool, out: str) -> dict:
    config = EvalConfig(
        model=args.model,
        benchmarks=(args.benchmark,),
        k=args.k,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        top_p=0.7,
        dtype=args.dtype,
        device=args.device,
        kv_cache_gib=1.0,
        max_num_seqs=128,
        speed_rounds=0,
        engine_options={args.option: setting},
    )
    start = time.perf_counter()
    results = evaluate(config, out, overwrite=True)
    seconds = time.perf_counter() - start
    overall = results["overall"]
    return {"seconds": seconds, "tokens": overall["tokens"], "avg_at_k": overall["avg_at_k"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--mode", default="plain", choices=["plain", "parallel", "sequential"])
    ap.add_argument(
        "--option",
        required=True,
        choices=[f.name for f in fields(EngineConfig) if f.type in ("bool", bool) and f.name != "debug"],
        help="the boolean EngineConfig field to compare off vs on",
    )
    ap.add_argument("--benchmark", default=HELD_OUT)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows, times = [], {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for setting in (False, True) if r % 2 == 0 else (True, False):
                got = run_once(args, setting, f"{tmp}/{r}-{setting}")
                times[setting].append(got["seconds"])
                rows.append(
                    (
                        r + 1,
                        "on" if setting else "off",
                        f"{got['seconds']:.1f}",
                        got["tokens"],
                        f"{got['avg_at_k']:.3f}",
                    )
                )
                print(f"round {r + 1} {args.option}={setting}: {got['seconds']:.1f} s", flush=True)
    print(
        f"\n# eval_speed: {args.model}, {args.mode}, {args.dtype}, {args.device}, torch threads "
        f"{__import__('torch').get_num_threads()}, option {args.option}"
    )
    print("| round | setting | seconds | generated tokens | avg@k |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"\nmedian seconds: off {off:.1f}, on {on:.1f}; off / on = {off / on:.2f}")


if __name__ == "__main__":
    main()
