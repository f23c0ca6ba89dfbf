"""The engine's SDPA attention calls on a CPU: GQA folding and shape-bucketed calls, ratios in one run.

1. One call at decode shapes (G rows, Hkv KV heads shared by ``rep`` query heads, Q queries per row,
   K keys, an additive mask): ``enable_gqa=True`` (what the engine did before) vs the query heads
   folded into the queries (``[G, Hkv, rep*Q, D]``, no ``enable_gqa``; what ``AttentionCall.attend``
   does now), and HF-style eager attention on the folded layout (not used; for comparison). Each
   output's error is measured against the fp32 result.
2. One decode step's attention over many rows of different shapes, as the tiny pipeline's
   evaluation produces them (most rows one query, some rows with branches, a few forking rows;
   lengths spread over a range): all rows padded into one call (before) vs the calls of
   ``npr.engine.attention._buckets`` (now), each call gathering its rows' keys from a paged pool.

    python benchmarks/attention_calls.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from npr.engine.attention import _buckets


def median_ms(fns, repeats: int) -> list[float]:
    """Median wall time of each function, alternated within each round after one warm-up."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def gqa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def folded(q, k, v, bias):
    g, h, qn, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    out = F.scaled_dot_product_attention(q.reshape(g, hkv, rep * qn, d), k, v, attn_mask=bias.repeat(1, 1, rep, 1))
    return out.view(g, h, qn, d)


def eager(q, k, v, bias):
    """HF's ``eager`` attention on the folded layout: bf16 matmuls, fp32 softmax (not used by the engine)."""
    g, h, qn, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    scores = torch.matmul(q.reshape(g, hkv, rep * qn, d) * d**-0.5, k.transpose(-1, -2)).float()
    probs = (scores + bias.repeat(1, 1, rep, 1).float()).softmax(-1).to(q.dtype)
    return torch.matmul(probs, v).view(g, h, qn, d)


def section_fold(args, dtype) -> None:
    print(
        "## 1. one call: enable_gqa vs folded queries "
        f"(G {args.rows}, H {args.heads}, Hkv {args.kv_heads}, D {args.dim}, {dtype})"
    )
    print(
        "| queries | keys | enable_gqa ms | folded ms | speedup | eager ms | eager speedup over folded "
        "| max abs error vs fp32: folded, eager |\n|---|---|---|---|---|---|---|---|"
    )
    for qn, kn in ((1, 256), (1, 512), (4, 512), (13, 512), (1, 2048)):
        q = torch.randn(args.rows, args.heads, qn, args.dim, dtype=dtype)
        k, v = (torch.randn(args.rows, args.kv_heads, kn, args.dim, dtype=dtype) for _ in range(2))
        bias = torch.zeros(args.rows, 1, qn, kn, dtype=dtype)
        bias[..., kn * 3 // 4 :] = torch.finfo(dtype).min
        exact = gqa(q.float(), k.float(), v.float(), bias.float())
        err = [(fn(q, k, v, bias).float() - exact).abs().max().item() for fn in (folded, eager)]
        a, b, c = median_ms(
            [lambda: gqa(q, k, v, bias), lambda: folded(q, k, v, bias), lambda: eager(q, k, v, bias)], args.repeats
        )
        print(f"| {qn} | {kn} | {a:.2f} | {b:.2f} | {a / b:.2f} | {c:.2f} | {b / c:.2f} | {err[0]:.1e}, {err[1]:.1e} |")


def step_groups(rng: random.Random, rows: int, page: int) -> list[list[int]]:
    """[row, queries, pages, first] per row: 85 % one query, 13 % 2-5 (branches), 2 % 13 (forks);
    300-640 tokens each."""
    groups, first = [], 0
    for r in range(rows):
        x = rng.random()
        queries = 1 if x < 0.85 else (rng.randint(2, 5) if x < 0.98 else 13)
        groups.append([r, queries, -(-rng.randint(300, 640) // page), first])
        first += queries
    return groups


def step_attention(pool_k, pool_v, q, calls, page: int, dtype) -> None:
    """Each call: gather its rows' pages from the pool, pad to the call's shape, folded SDPA."""
    hkv, dim = pool_k.shape[0], pool_k.shape[2]
    for groups, slots, bias, q_index in calls:
        g = len(groups)
        qmax = max(x[1] for x in groups)
        k = pool_k.index_select(1, slots).view(hkv, g, -1, dim).transpose(0, 1)
        v = pool_v.index_select(1, slots).view(hkv, g, -1, dim).transpose(0, 1)
        qg = q.index_select(0, q_index).view(g, qmax, *q.shape[1:]).transpose(1, 2)
        folded(qg, k, v, bias)


def prepare(groups_per_call, page: int, dtype):
    calls = []
    for groups in groups_per_call:
        qmax, pmax = max(x[1] for x in groups), max(x[2] for x in groups)
        slots = torch.cat([torch.arange(x[0] * 64 * page, x[0] * 64 * page + pmax * page) for x in groups])
        bias = torch.zeros(len(groups), 1, qmax, pmax * page, dtype=dtype)
        for i, x in enumerate(groups):
            bias[i, 0, :, x[2] * page :] = torch.finfo(dtype).min
        q_index = torch.tensor([x[3] + min(j, x[1] - 1) for x in groups for j in range(qmax)])
        calls.append((groups, slots, bias, q_index))
    return calls


def section_calls(args, dtype) -> None:
    page = 16
    groups = step_groups(random.Random(0), args.rows, page)
    real = sum(x[1] * x[2] for x in groups)
    one = [groups]
    split = _buckets(groups, 32, dense=True)
    pool_k, pool_v = (torch.randn(args.kv_heads, args.rows * 64 * page, args.dim, dtype=dtype) for _ in range(2))
    q = torch.randn(sum(x[1] for x in groups), args.heads, args.dim, dtype=dtype)
    padded = [sum(len(c) * max(x[1] for x in c) * max(x[2] for x in c) for c in calls) for calls in (one, split)]
    before, after = prepare(one, page, dtype), prepare(split, page, dtype)
    a, b = median_ms(
        [
            lambda: step_attention(pool_k, pool_v, q, before, page, dtype),
            lambda: step_attention(pool_k, pool_v, q, after, page, dtype),
        ],
        args.repeats,
    )
    print(f"\n## 2. one decode step's attention (one layer), {args.rows} rows of mixed shapes ({dtype})")
    print("| calls | padded / real work | ms | speedup |\n|---|---|---|---|")
    print(f"| 1 (all rows padded together) | {padded[0] / real:.2f} | {a:.2f} | 1.00 |")
    print(f"| {len(split)} (`_buckets`, max waste 1.25) | {padded[1] / real:.2f} | {b:.2f} | {a / b:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rows", type=int, default=128, help="rows (requests) in the step")
    ap.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    ap.add_argument("--dim", type=int, default=64, help="head dim (SmolLM2-135M: 64)")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    section_fold(args, dtype)
    section_calls(args, dtype)


if __name__ == "__main__":
    main()
