"""The prepared GPU check of the NPR engine (issue 11): one H100/H200, no network, no weights.

Random-init models of Qwen3-0.6B and Qwen3-4B shape in bf16 (the byte tokenizer of
``tiny-random-qwen3`` supplies the NPR tags; text is irrelevant). Sections, each printed with its
goal next to the result:

1. parity: engine log-probs vs one flat masked forward on forced random trees (max abs diff, fp32
   and bf16), both attention kernels; seeded sampling reproduces across batch compositions.
2. decode: decode-only tokens/s vs HF ``generate`` at batch 1/16/64 and context 1k/8k (0.6B shape),
   batch 1/16 at 1k (4B shape). Goal: >= 1.5x HF at batch 64.
3. bandwidth: (weight bytes + KV bytes read per step) / step time, as a fraction of the device's
   peak HBM bandwidth. Goal: >= 50% at batch 64, context 8k.
4. parallel: forced branches of 512 tokens, k = 2/4/8, sequential / parallel wall time vs the ideal
   (4B shape). Goal: >= 0.9 of ideal at k = 8.
5. memory: peak allocated memory of each section.

    bash benchmarks/gpu_check.sh                      # on the GPU machine (<= 8 min on one H100/H200)
    bash benchmarks/gpu_check.sh --device cpu --tiny  # dry run in seconds (CI runs it)

Sections that fail print their error and the check goes on; ``--budget-s`` skips what no longer fits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import (  # noqa: E402
    bench_parallel,
    engine_decode_only,
    hf_decode_only,
    prompts_for,
    sync,
)

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer  # noqa: E402

SHAPES = {
    "qwen3-0.6b": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
}
PEAK_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}  # HBM, TB/s (SXM parts)


def random_model(shape: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from npr.models import load_tokenizer

    tok = load_tokenizer("tiny-random-qwen3")  # ids only: the forcer needs the tags
    config = Qwen3Config(
        **SHAPES[shape],
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tok


def peak_tbps(device: str, override: float | None) -> float | None:
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TBPS.items() if k in name), None)


def verdict(value: float | None, goal: float) -> str:
    return "n/a" if value is None else ("PASS" if value >= goal else "FAIL")


# ----------------------------------------------------------------------------- sections


def check_parity(args, shape: str) -> dict:
    """Engine log-probs vs the flat masked forward; seeded sampling across batch compositions."""
    from npr.masks import attention_bias, parallel_mask_and_positions
    from npr.tokens import tag_token_ids

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        # both kernels; the CPU dry run compiles flex in fp32 only (inductor's CPU flex is what CI can afford)
        kernels = ["flex", "sdpa"] if args.device.startswith("cuda") or dtype == torch.float32 else ["sdpa"]
        model, tok = random_model(shape, dtype, args.device)
        tags = tag_token_ids(tok)
        forcer = StructureForcer(tok, [[7, 12, 3], [5, 9]], prefix_tokens=4)
        params = SamplingParams(
            max_new_tokens=400, temperature=1.0, top_p=0.9, n=2, seed=3, logits_processors=(forcer,)
        )
        prompts = prompts_for(tok, 3, 48)
        for kernel in kernels:
            engine = Engine(model, tok, EngineConfig(attention=kernel, kv_cache_tokens=16384, max_num_seqs=16))
            results = engine.generate(prompts, params)
            worst = 0.0
            for r in results:
                ids = torch.tensor(r.prompt_ids + r.token_ids, device=args.device)
                p = len(r.prompt_ids)
                allowed, positions = parallel_mask_and_positions(ids.cpu(), tags, response_start=p)
                with torch.no_grad():
                    logits = model(
                        input_ids=ids[None],
                        position_ids=positions[None].to(args.device),
                        attention_mask=attention_bias(allowed.to(args.device), dtype)[None, None],
                    ).logits[0]
                logp = torch.log_softmax(logits.float(), -1)
                flat = logp[
                    torch.arange(p - 1, p - 1 + len(r.token_ids), device=args.device),
                    torch.tensor(r.token_ids, device=args.device),
                ].tolist()
                worst = max([worst] + [abs(a - b) for a, b, s in zip(flat, r.logprobs, r.sampled) if s])
            same = None
            if dtype == torch.float32:  # bf16 batches round differently; fp32 must reproduce exactly
                solo = Engine(model, tok, EngineConfig(attention=kernel, kv_cache_tokens=16384)).generate(
                    prompts[:1], params
                )
                tight = Engine(
                    model, tok, EngineConfig(attention=kernel, kv_cache_tokens=16 * 80, max_num_seqs=4)
                ).generate(prompts, params)  # preempts and recomputes
                same = [r.token_ids for r in solo] == [r.token_ids for r in results[:2]] and [
                    r.token_ids for r in tight
                ] == [r.token_ids for r in results]
            name = f"{str(dtype).split('.')[-1]}/{kernel}"
            out[name] = {"max_abs_diff": worst, "seeded_reproduces": same}
            print(
                f"  parity {shape} {name}: max |engine - flat| = {worst:.2e}"
                + ("" if same is None else f", seeded sampling reproduces: {same}"),
                flush=True,
            )
        del model
    return out


def check_decode(args, shape: str, batches, contexts, new_tokens: int) -> list[dict]:
    """Decode-only tokens/s vs HF ``generate``, ``args.repeats`` alternated runs each (medians). Every
    engine of a shape has the same pool, sized for the largest batch and context, so flex compiles once;
    each is freed before HF runs (on an 80 GB card the two KV caches of batch 64 at 8k do not fit together)."""
    model, tok = random_model(shape, torch.bfloat16, args.device)
    config = EngineConfig(
        mode="plain",
        max_num_seqs=max(batches),
        max_num_batched_tokens=None,
        kv_cache_tokens=max(batches) * (max(contexts) + new_tokens + 64),
    )

    def free():
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    engine = Engine(model, tok, config)
    for batch in batches:  # warm-up at the measured batch sizes: compiles outside the clock
        engine_decode_only(engine, tok, args.device, prompts_for(tok, batch, 32), 4, False)
    del engine
    rows = []
    for context in contexts:
        for batch in batches:
            prompts = prompts_for(tok, batch, context)
            hf, ours = [], []
            for _ in range(args.repeats):
                engine = Engine(model, tok, config)
                ours.append(engine_decode_only(engine, tok, args.device, prompts, new_tokens, False))
                del engine
                free()
                hf.append(hf_decode_only(model, tok, args.device, prompts, new_tokens, False))
                free()
            ours, hf = statistics.median(ours), statistics.median(hf)
            steps = new_tokens - 1
            row = dict(
                shape=shape,
                batch=batch,
                context=context,
                hf_tok_s=batch * steps / hf,
                npr_tok_s=batch * steps / ours,
                ratio=hf / ours,
                step_ms=ours / steps * 1e3,
                repeats=args.repeats,
            )
            row["bandwidth_fraction"] = bandwidth(model, row, args)
            rows.append(row)
            goal = "  goal >= 1.50 at batch 64: " + verdict(row["ratio"], 1.5) if batch == 64 else ""
            print(
                f"  decode {shape} batch {batch:3d} ctx {context:5d}: HF {row['hf_tok_s']:9.1f} tok/s, "
                f"npr {row['npr_tok_s']:9.1f} tok/s, npr/HF {row['ratio']:.2f} (median of {args.repeats}){goal}",
                flush=True,
            )
            fraction = row["bandwidth_fraction"]
            if fraction is not None:
                goal = (
                    "  goal >= 0.50 at batch 64, ctx 8k: " + verdict(fraction, 0.5)
                    if (batch, context) == (64, 8192)
                    else ""
                )
                print(
                    f"    bandwidth: {row['step_ms']:.2f} ms/step, {fraction:.2f} of peak HBM bandwidth{goal}",
                    flush=True,
                )
    return rows


def bandwidth(model, row: dict, args) -> float | None:
    """Fraction of peak HBM bandwidth: (weights + KV read per step) / step time / peak."""
    peak = peak_tbps(args.device, args.peak_tbps)
    if peak is None:
        return None
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = row["batch"] * row["context"] * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 2
    return (weights + kv) / (row["step_ms"] / 1e3) / (peak * 1e12)


def check_parallel(args, shape: str, ks, branch_len: int) -> list[dict]:
    model, tok = random_model(shape, torch.bfloat16, args.device)
    rows = []
    for k, total, critical, ideal, speedup, fraction, _same in bench_parallel(
        model, tok, args.device, ks, branch_len, 64, repeats=1
    ):
        rows.append(dict(k=k, tokens=total, critical_path=critical, ideal=ideal, speedup=speedup, of_ideal=fraction))
        goal = "  goal >= 0.90 at k = 8: " + verdict(fraction, 0.9) if k == 8 else ""
        print(
            f"  parallel {shape} k={k}: speedup {speedup:.2f} vs ideal {ideal:.2f} ({fraction:.2f} of ideal){goal}",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------- main


def plan(args) -> list[tuple[str, callable]]:
    if args.tiny:
        return [
            ("parity", lambda: check_parity(args, "tiny")),
            ("decode", lambda: check_decode(args, "tiny", [1, 4], [64, 128], 8)),
            ("parallel", lambda: check_parallel(args, "tiny", [2], 16)),
        ]
    return [
        ("parity", lambda: check_parity(args, "qwen3-0.6b")),
        (
            "decode",
            lambda: (
                check_decode(args, "qwen3-0.6b", [1, 16, 64], [1024, 8192], 64)
                + check_decode(args, "qwen3-4b", [1, 16], [1024], 64)
            ),
        ),
        ("parallel", lambda: check_parallel(args, "qwen3-4b", [2, 4, 8], 512)),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and sizes: the CPU dry run")
    ap.add_argument("--sections", default="parity,decode,parallel", help="comma list of sections to run")
    ap.add_argument("--budget-s", type=float, default=450, help="skip sections that start after this many seconds")
    ap.add_argument("--peak-tbps", type=float, default=None, help="peak HBM bandwidth (default: from the device name)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs per decode ratio (medians)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --device cpu --tiny for the dry run", file=sys.stderr)
        return 2
    wanted = set(args.sections.split(","))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"# gpu_check: {where}, torch {torch.__version__}, peak {peak_tbps(args.device, args.peak_tbps)} TB/s",
        flush=True,
    )
    start, report, failed = time.perf_counter(), {"device": where}, []
    for name, run in plan(args):
        if name not in wanted:
            continue
        if time.perf_counter() - start > args.budget_s:
            print(f"## {name}: skipped (time budget of {args.budget_s:.0f} s spent)", flush=True)
            continue
        print(f"## {name}", flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            report[name] = run()
        except Exception:  # one broken section must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            report[name] = {"error": traceback.format_exc(limit=3)}
        sync(args.device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        report[f"{name}_seconds"], report[f"{name}_peak_gib"] = time.perf_counter() - t0, peak
        print(
            f"  ({time.perf_counter() - t0:.0f} s" + ("" if peak is None else f", peak memory {peak:.1f} GiB") + ")",
            flush=True,
        )
    failures = f"; failed sections: {', '.join(failed)}" if failed else ""
    print(f"# done in {time.perf_counter() - start:.0f} s{failures}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
