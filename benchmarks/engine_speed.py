"""Engine speed: ratios measured in one run (docs/performance.md records the output).

1. Sequential decoding (``plain`` mode) tokens/s vs HF ``generate`` with its KV cache, same
   model and dtype, batch 1 and 32, the same number of new tokens (EOS suppressed in both).
2. Parallel speedup: wall time of ``sequential`` mode over ``parallel`` mode on the same forced
   trajectories (k branches of equal length), next to the ideal (total / critical-path tokens).
3. KV bytes held for one request with k branches vs k separate requests of the same trace.
4. Decode-only tokens/s vs HF ``generate`` at long contexts (512/2048/6144 by default), batch 1 and
   8, greedy and sampled (temperature 1.0, top-p 0.7, with per-token log-probs). Decode-only time
   is the time for N tokens minus the time for the first one, read inside one run (the first token's
   timestamp is taken right after the prefill), so the prefill cancels without a second run.
5. The engine's two attention kernels (``flex``, ``sdpa``) on the same decode work (``--sections kernels``):
   the measurement behind ``EngineConfig.attention="auto"``.
6. Shared-prefix attention (``--sections shared``): ``sdpa`` with ``shared_prefix_attention`` on vs
   off, decode-only, ``--samples`` samples per prompt (they share the prompt's pages), the prompts of
   ``--contexts`` tokens, ``--shared-prompts`` prompts; greedy, EOS suppressed; same tokens checked.

    python benchmarks/engine_speed.py --model embedded --dtype bfloat16
    python benchmarks/engine_speed.py --model embedded --dtype bfloat16 --sections decode --contexts 512,2048
    python benchmarks/engine_speed.py --model embedded --dtype bfloat16 --sections shared --contexts 256,1024
    python benchmarks/engine_speed.py --model random:qwen3-0.6b --dtype bfloat16 --device cuda --batches 1,16,64
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer

QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
)


def load(spec: str, dtype: str, device: str):
    """A model by npr spec, or ``random:qwen3-0.6b``: a random-init model of Qwen3-0.6B's shape."""
    from npr.models import load_model_and_tokenizer, load_tokenizer, resolve_dtype

    if spec == "random:qwen3-0.6b":
        from transformers import AutoModelForCausalLM, Qwen3Config

        tok = load_tokenizer("tiny-random-qwen3")  # ids only: the forcer needs the tags, text is irrelevant
        config = Qwen3Config(**QWEN3_06B, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
        return model.eval(), tok
    return load_model_and_tokenizer(spec, dtype=dtype, device=device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns, device: str, repeats: int, warmup: bool = True) -> list[float]:
    """Median wall time of each of ``fns`` over ``repeats`` rounds (after one warm-up); the
    functions alternate within a round, so a slow moment of the machine hits them alike."""
    for fn in fns if warmup else ():
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def prompts_for(tok, batch: int, length: int) -> list[list[int]]:
    """Distinct prompts of equal length (no padding in HF generate)."""
    base = tok.encode("Question: what is the sum of the numbers below? ", add_special_tokens=False)
    out = []
    for i in range(batch):
        ids = (base + tok.encode(" ".join(str(i * 7 + j) for j in range(length)), add_special_tokens=False))[:length]
        out.append(ids + [ids[-1]] * (length - len(ids)))
    return out


def bench_vs_hf(model, tok, device, batches, new_tokens, prompt_len, repeats):
    eos = tok.eos_token_id

    def no_eos(stream, logits):
        logits[eos] = float("-inf")
        return logits

    rows = []
    for batch in batches:
        prompts = prompts_for(tok, batch, prompt_len)
        ids = torch.tensor(prompts, device=device)

        def hf():
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    suppress_tokens=[eos],
                    pad_token_id=tok.pad_token_id,
                )

        engine = Engine(
            model,
            tok,
            EngineConfig(
                mode="plain", max_num_seqs=max(batch, 1), kv_cache_tokens=batch * (prompt_len + new_tokens + 64)
            ),
        )
        # HF generate returns no log-probs by default; skip them too so both do the same work
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, logprobs=False, logits_processors=(no_eos,))
        check = engine.generate(prompts[:1], params)[0].token_ids

        def ours():
            engine.generate(prompts, params)

        t_hf, t_ours = timed([hf, ours], device, repeats)
        with torch.no_grad():
            ref = model.generate(
                ids[:1],
                attention_mask=torch.ones_like(ids[:1]),
                max_new_tokens=new_tokens,
                do_sample=False,
                suppress_tokens=[eos],
                pad_token_id=tok.pad_token_id,
            )
        same = ref[0, prompt_len:].tolist() == check
        tokens = batch * new_tokens
        rows.append((batch, tokens / t_hf, tokens / t_ours, t_hf / t_ours, same))
    return rows


def bench_parallel(model, tok, device, ks, branch_len, prompt_len, repeats):
    rows = []
    prompt = prompts_for(tok, 1, prompt_len)
    for k in ks:
        forcer = StructureForcer(
            tok, [[branch_len] * k], prefix_tokens=0, plan_tokens=4, takeaway_tokens=8, final_tokens=8
        )
        params = SamplingParams(max_new_tokens=k * (branch_len + 16) + 256, temperature=0, logits_processors=(forcer,))
        engines, results = {}, {}
        for mode in ("sequential", "parallel"):
            engines[mode] = Engine(
                model,
                tok,
                EngineConfig(mode=mode, max_branches=max(k, 5), kv_cache_tokens=16384, repetition_penalty=1.0),
            )
            results[mode] = engines[mode].generate(prompt, params)[0]
        seq_wall, par_wall = timed(
            [
                lambda: engines["sequential"].generate(prompt, params),
                lambda: engines["parallel"].generate(prompt, params),
            ],
            device,
            repeats,
            warmup=False,
        )  # the runs above were the warm-up
        walls = {"sequential": seq_wall, "parallel": par_wall}
        par, seq = results["parallel"], results["sequential"]
        # the forcer fixes the structure and lengths, so both modes do the same work; in bf16 the
        # text tokens may differ where batched and unbatched arithmetic round differently
        assert par.position_ids == seq.position_ids, "parallel and sequential modes built different trees"
        ideal = par.stats.ideal_speedup
        speedup = walls["sequential"] / walls["parallel"]
        rows.append(
            (
                k,
                par.stats.generated_tokens,
                par.stats.critical_path_tokens,
                ideal,
                speedup,
                speedup / ideal,
                par.token_ids == seq.token_ids,
            )
        )
    return rows


def bench_kv(model, tok, device, ks, branch_len, prompt_len):
    rows = []
    prompt = prompts_for(tok, 1, prompt_len)
    for k in ks:
        forcer = StructureForcer(tok, [[branch_len] * k], prefix_tokens=0)
        params = SamplingParams(max_new_tokens=k * (branch_len + 16) + 256, temperature=0, logits_processors=(forcer,))
        engine = Engine(model, tok, EngineConfig(mode="parallel", max_branches=max(k, 5), kv_cache_tokens=65536))
        engine.submit(prompt, params)
        peak = 0
        while engine.scheduler.has_work():
            engine.step()
            peak = max(peak, engine.pool.used_blocks)
        one = peak * engine.pool.bytes_per_block()
        # k separate requests each hold the prompt and the shared guideline themselves
        result = engine.generate(prompt, params)[0]
        shared = prompt_len + result.blocks[0][0][0]
        branch = result.blocks[0][0][1] - result.blocks[0][0][0]
        per_token = engine.pool.bytes_per_block() / engine.pool.block_size
        separate = k * (shared + branch) * per_token
        rows.append((k, one / 2**20, separate / 2**20, separate / one))
    return rows


class FirstTokenClock:
    """HF logits processor: stamps the first call (the prefill is done) and, when asked, gathers the
    log-prob of every sampled token from the unwarped scores (as the engine's ``logprobs`` do)."""

    def __init__(self, device: str, logprobs: bool):
        self.device, self.logprobs = device, logprobs
        self.first: float | None = None
        self.previous: torch.Tensor | None = None  # [B, V] log-softmax of the last step
        self.gathered: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.first is None:
            sync(self.device)
            self.first = time.perf_counter()
        if self.logprobs:
            if self.previous is not None:
                self.gathered.append(self.previous.gather(1, input_ids[:, -1:]))
            self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> None:
        if self.logprobs and self.previous is not None:
            self.gathered.append(self.previous.gather(1, sequences[:, -1:]))
        sync(self.device)


def hf_decode_only(model, tok, device, prompts, new_tokens, sampled: bool) -> float:
    """HF ``generate`` decode-only seconds for ``new_tokens`` tokens per prompt: total minus first token."""
    from transformers import LogitsProcessorList

    eos = tok.eos_token_id
    ids = torch.tensor(prompts, device=device)
    clock = FirstTokenClock(device, logprobs=sampled)
    extra = dict(do_sample=True, temperature=1.0, top_p=0.7, top_k=0) if sampled else dict(do_sample=False)
    sync(device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            suppress_tokens=[eos],
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([clock]),
            **extra,
        )
    clock.finish(out)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - clock.first


def engine_decode_only(
    engine, tok, device, prompts, new_tokens, sampled: bool, n: int = 1, out: list | None = None
) -> float:
    """The engine's decode-only seconds, the same way: every step after the first (prefill) one."""
    params = replace(engine_decode_params(tok, new_tokens, sampled), n=n)
    engine.submit(prompts, params)
    sync(device)
    engine.step()  # the prefill and the first token of every prompt (engines here feed it in one step:
    sync(device)  # max_num_batched_tokens=None)
    if any(not r.group.started for r in engine.scheduler.running):
        raise ValueError("decode-only timing needs the whole prefill in one step: max_num_batched_tokens=None")
    first = time.perf_counter()
    results = []
    while engine.scheduler.has_work():
        results += engine.step().finished
    sync(device)
    assert len(results) == n * len(prompts) and all(len(r.token_ids) == new_tokens for r in results)
    if out is not None:
        out[:] = sorted(results, key=lambda r: (r.prompt_index, r.sample_index))
    return time.perf_counter() - first


def decode_only(model, tok, device, prompts, new_tokens, sampled: bool, engine) -> tuple[float, float]:
    """(HF, engine) decode-only seconds for ``new_tokens`` tokens per prompt."""
    return (
        hf_decode_only(model, tok, device, prompts, new_tokens, sampled),
        engine_decode_only(engine, tok, device, prompts, new_tokens, sampled),
    )


def engine_decode_params(tok, new_tokens: int, sampled: bool) -> SamplingParams:
    eos = tok.eos_token_id

    def no_eos(stream, logits):
        logits[eos] = float("-inf")
        return logits

    extra = dict(temperature=1.0, top_p=0.7, logprobs=True, seed=0) if sampled else dict(temperature=0, logprobs=False)
    return SamplingParams(max_new_tokens=new_tokens, logits_processors=(no_eos,), **extra)


def bench_decode(model, tok, device, contexts, batches, new_tokens, repeats):
    """Section 4: decode-only tokens/s of HF ``generate`` and the engine, alternating, median of repeats."""
    rows = []
    warm = Engine(model, tok, EngineConfig(mode="plain", kv_cache_tokens=1024))
    for sampled in (False, True):  # first calls pay one-time costs (allocator, kernels) on both sides
        decode_only(model, tok, device, prompts_for(tok, 2, 64), 4, sampled, warm)
    for context in contexts:
        for batch in batches:
            prompts = prompts_for(tok, batch, context)
            engine = Engine(
                model,
                tok,
                EngineConfig(
                    mode="plain",
                    max_num_seqs=max(batch, 1),
                    kv_cache_tokens=batch * (context + new_tokens + 64),
                    max_num_batched_tokens=None,
                ),
            )  # the prefill in one step
            for sampled in (False, True):
                hf, ours = [], []
                for _ in range(repeats):
                    a, b = decode_only(model, tok, device, prompts, new_tokens, sampled, engine)
                    hf.append(a)
                    ours.append(b)
                tokens = batch * (new_tokens - 1)
                t_hf, t_ours = statistics.median(hf), statistics.median(ours)
                rows.append(
                    (
                        context,
                        batch,
                        "T1.0 top-p0.7 +logprobs" if sampled else "greedy",
                        tokens / t_hf,
                        tokens / t_ours,
                        t_hf / t_ours,
                    )
                )
                print(f"  {rows[-1]}", flush=True)
    return rows


def bench_kernels(model, tok, device, contexts, batches, new_tokens, repeats):
    """Section 5: the engine's decode-only tokens/s with each attention kernel (alternating), greedy."""
    rows = []
    for context in contexts:
        for batch in batches:
            prompts = prompts_for(tok, batch, context)
            engines = [
                Engine(
                    model,
                    tok,
                    EngineConfig(
                        mode="plain",
                        attention=kernel,
                        max_num_seqs=max(batch, 1),
                        kv_cache_tokens=batch * (context + new_tokens + 64),
                        max_num_batched_tokens=None,
                    ),
                )
                for kernel in ("sdpa", "flex")
            ]
            # compile outside the clock
            engine_decode_only(engines[1], tok, device, prompts_for(tok, batch, 32), 4, False)
            times = [[], []]
            for _ in range(repeats):
                for engine, bucket in zip(engines, times):
                    bucket.append(engine_decode_only(engine, tok, device, prompts, new_tokens, False))
            tokens = batch * (new_tokens - 1)
            sdpa, flex = (statistics.median(t) for t in times)
            rows.append((context, batch, tokens / sdpa, tokens / flex, sdpa / flex))
            print(f"  {rows[-1]}", flush=True)
    return rows


def bench_shared(model, tok, device, contexts, prompts_n, samples, new_tokens, repeats):
    """Section 6: decode-only tokens/s of ``sdpa`` with and without shared-prefix attention (alternating)."""
    rows = []
    for context in contexts:
        prompts = prompts_for(tok, prompts_n, context)
        rows_n = prompts_n * samples
        engines = [
            Engine(
                model,
                tok,
                EngineConfig(
                    mode="plain",
                    attention="sdpa",
                    max_num_seqs=rows_n,
                    shared_prefix_attention=shared,
                    max_num_batched_tokens=None,
                    kv_cache_tokens=prompts_n * context + rows_n * (new_tokens + 64),
                ),
            )
            for shared in (False, True)
        ]
        outs = [[], []]
        for engine, out in zip(engines, outs):  # warm-up, and the tokens compared
            engine_decode_only(engine, tok, device, prompts, new_tokens, False, samples, out)
        times = [[], []]
        for _ in range(repeats):
            for engine, bucket in zip(engines, times):
                bucket.append(engine_decode_only(engine, tok, device, prompts, new_tokens, False, samples))
        tokens = rows_n * (new_tokens - 1)
        gather, shared = (statistics.median(t) for t in times)
        same = [r.token_ids for r in outs[0]] == [r.token_ids for r in outs[1]]
        rows.append((context, prompts_n, samples, tokens / gather, tokens / shared, gather / shared, same))
        print(f"  {rows[-1]}", flush=True)
    return rows


def table(title: str, header: list[str], rows) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"\n{title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--branches", default="2,4,8")
    ap.add_argument("--branch-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument(
        "--sections",
        default="hf,parallel,kv,decode",
        help="comma list of sections to run: hf (1), parallel (2), kv (3), decode (4), kernels (5), shared (6)",
    )
    ap.add_argument("--contexts", default="512,2048,6144", help="section 4: prompt lengths")
    ap.add_argument("--decode-batches", default="1,8", help="section 4: batch sizes")
    ap.add_argument("--decode-tokens", type=int, default=64, help="section 4: new tokens per prompt")
    ap.add_argument("--shared-prompts", type=int, default=32, help="section 6: prompts")
    ap.add_argument("--samples", type=int, default=4, help="section 6: samples per prompt")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, args.dtype, args.device)
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.branches.split(",")]
    where = f"{args.model}, {args.dtype}, {args.device}, torch threads {torch.get_num_threads()}"
    print(f"# engine_speed: {where}")
    if "hf" in sections:
        rows = bench_vs_hf(model, tok, args.device, batches, args.new_tokens, args.prompt_len, args.repeats)
        print(
            table(
                f"1. plain decoding vs HF generate ({args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
                "greedy, median of repeats)",
                ["batch", "HF tok/s", "npr tok/s", "npr / HF", "same tokens"],
                rows,
            )
        )
    if "parallel" in sections:
        rows = bench_parallel(model, tok, args.device, ks, args.branch_len, args.prompt_len, args.repeats)
        print(
            table(
                f"2. parallel vs sequential mode, same forced trajectory (branches of {args.branch_len} text tokens)",
                ["k", "tokens", "critical path", "ideal", "speedup", "speedup / ideal", "same tokens"],
                rows,
            )
        )
    if "kv" in sections:
        rows = bench_kv(model, tok, args.device, ks, args.branch_len, args.prompt_len)
        print(
            table(
                "3. KV held: one request with k branches vs k separate requests",
                ["k", "one request MiB", "k requests MiB", "saving"],
                rows,
            )
        )
    if "decode" in sections:
        contexts = [int(c) for c in args.contexts.split(",")]
        decode_batches = [int(b) for b in args.decode_batches.split(",")]
        rows = bench_decode(model, tok, args.device, contexts, decode_batches, args.decode_tokens, args.repeats)
        print(
            table(
                f"4. decode-only tokens/s vs HF generate ({args.decode_tokens} new tokens: time for all minus "
                "time for the first; EOS suppressed in both; median of repeats)",
                ["context", "batch", "sampling", "HF tok/s", "npr tok/s", "npr / HF"],
                rows,
            )
        )
    if "kernels" in sections:
        contexts = [int(c) for c in args.contexts.split(",")]
        decode_batches = [int(b) for b in args.decode_batches.split(",")]
        rows = bench_kernels(model, tok, args.device, contexts, decode_batches, args.decode_tokens, args.repeats)
        print(
            table(
                f"5. attention kernels: engine decode-only tokens/s, greedy ({args.decode_tokens} new tokens)",
                ["context", "batch", "sdpa tok/s", "flex tok/s", "flex speedup"],
                rows,
            )
        )
    if "shared" in sections:
        contexts = [int(c) for c in args.contexts.split(",")]
        rows = bench_shared(
            model, tok, args.device, contexts, args.shared_prompts, args.samples, args.decode_tokens, args.repeats
        )
        print(
            table(
                f"6. sdpa decode-only tokens/s, shared-prefix attention off vs on ({args.decode_tokens} new tokens "
                "per sample, greedy, EOS suppressed; median of repeats)",
                ["prompt tokens", "prompts", "samples each", "gather tok/s", "shared tok/s", "speedup", "same tokens"],
                rows,
            )
        )


if __name__ == "__main__":
    main()
