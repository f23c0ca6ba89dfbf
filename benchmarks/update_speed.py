"""Benchmark: CPU time of a Stage-2 step and a Stage-3 update on the tiny preset's shapes, the
full-logits log-prob path vs the chunked one (npr.train.lm_head), alternated in one process.

- Stage 2: ``sft_backward`` + ``optimizer_step`` on 8 canonical traces packed behind their
  common prefix in rows of <= 2048 tokens, one row per micro-batch (tiny: batch 8,
  micro_batch_size 1, pack_tokens 2048);
- Stage 3: ``policy_backward`` (PAPO, token-mean, untempered log-probs for the drift metric,
  temperature 0.6) + ``optimizer_step`` on ``--prompts`` prompts x 4 responses (tiny: 8), each
  prompt's responses packed behind it (tiny: pack_group_tokens 2048, micro_batch_size 2).

The embedded model (SmolLM2-135M, vocabulary 49,152), bf16 autocast over fp32 weights as the tiny
presets run. ``full`` is the path npr trained with before this change (``response_logits``: [T, V]
logits, fp32 copy, ``log_softmax``), swapped in for ``response_logprobs``; ``chunked`` is today's
(``--chunk`` tokens per chunk, the config default 1024). Steps alternate full, chunked, full, ...
so that machine load hits both alike; medians and the ratio chunked / full are printed.

    OMP_NUM_THREADS=1 python benchmarks/update_speed.py [--repeats 5] [--chunk 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch
from sft_step import batch_of_traces  # benchmarks/sft_step.py: a script's folder is on sys.path

import npr.train.update as update
from npr.algos import get_policy_loss
from npr.models import load_model_and_tokenizer
from npr.tokens import tag_token_ids
from npr.train.logprobs import pack_in_budget, response_logits, response_logprobs, structured_sequence
from npr.train.session import make_accelerator
from npr.train.update import PolicyBatch, optimizer_step, policy_backward, sft_backward


def full_logits_logprobs(
    model, sequences, pad_token_id, mask_dtype=None, attention=None, temperature=1.0, untempered=False, chunk_size=None
):
    """``response_logprobs`` as it was before the chunked head: full [T_r, V] logits per response."""
    per_response = response_logits(model, sequences, pad_token_id, mask_dtype, attention)
    targets = [s.input_ids[a:b] for s in sequences for a, b in s.spans]
    longest = max(len(t) for t in targets)
    scale = temperature if temperature > 0 else 1.0
    rows, plain_rows = [], []
    for predicting, target in zip(per_response, targets):
        logits = predicting.float()
        index = target.to(logits.device)[:, None]
        token = (logits / scale if scale != 1.0 else logits).log_softmax(-1).gather(-1, index)[:, 0]
        rows.append(torch.nn.functional.pad(token, (0, longest - len(target))))
        if untempered:
            with torch.no_grad():
                plain = logits.log_softmax(-1).gather(-1, index)[:, 0] if scale != 1.0 else token.detach()
            plain_rows.append(torch.nn.functional.pad(plain, (0, longest - len(target))))
    logprobs = torch.stack(rows)
    mask = (torch.arange(longest)[None, :] < torch.tensor([len(t) for t in targets])[:, None]).to(logprobs.device)
    return (logprobs, mask, torch.stack(plain_rows)) if untempered else (logprobs, mask)


@contextlib.contextmanager
def log_prob_path(path: str):
    update.response_logprobs = full_logits_logprobs if path == "full" else response_logprobs
    try:
        yield
    finally:
        update.response_logprobs = response_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8, help="Stage-3 prompts (x 4 responses); tiny: 8")
    parser.add_argument("--stages", nargs="+", default=["stage2", "stage3"], choices=["stage2", "stage3"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    acc = make_accelerator()
    tags, pad = tag_token_ids(tok), tok.pad_token_id
    traces = batch_of_traces(tok, 8, 6)
    sft_rows = pack_in_budget([structured_sequence(t.prompt_ids, t.response_ids, tags) for t in traces], 2048)
    group_rows, masks = [], []
    for t in traces[: args.prompts]:  # 4 responses per prompt (the trace itself: only lengths matter here), packed
        group = [structured_sequence(t.prompt_ids, t.response_ids, tags) for _ in range(4)]
        group_rows += pack_in_budget(group, 2048)
        masks += [torch.ones(len(t.response_ids), dtype=torch.bool) for _ in range(4)]
    n = len(masks)
    policy = PolicyBatch(group_rows, masks, torch.linspace(-1, 1, n), [torch.zeros(len(m)) for m in masks])
    loss_fn = get_policy_loss("papo")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def stage2() -> float:
        start = time.perf_counter()
        with autocast:
            sft_backward(acc, model, sft_rows, pad, 1, logprob_chunk_size=args.chunk)
        optimizer_step(acc, model, optimizer, scheduler, 1.0)
        return time.perf_counter() - start

    def stage3() -> float:
        start = time.perf_counter()
        with autocast:
            policy_backward(
                acc, model, policy, loss_fn, "token-mean", pad, 2, temperature=0.6, logprob_chunk_size=args.chunk
            )
        optimizer_step(acc, model, optimizer, scheduler, 1.0)
        return time.perf_counter() - start

    times = {(stage, path): [] for stage in args.stages for path in ("full", "chunked")}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for stage, run in [
            (name, step) for name, step in (("stage2", stage2), ("stage3", stage3)) if name in args.stages
        ]:
            for path in ("full", "chunked") if repeat % 2 else ("chunked", "full"):
                with log_prob_path(path):
                    elapsed = run()
                if repeat:
                    times[(stage, path)].append(elapsed)
                print(f"round {repeat} {stage} {path} {elapsed:.2f} s", file=sys.stderr, flush=True)
    sft_tokens = sum(len(s.input_ids) for s in sft_rows)
    rl_tokens = sum(len(s.input_ids) for s in group_rows)
    print(
        f"model {args.model} (V={model.config.vocab_size}), bf16 autocast, {args.threads} thread(s), chunk "
        f"{args.chunk}, median of {args.repeats} alternated"
    )
    print(
        f"stage2: {len(sft_rows)} rows, {sft_tokens} tokens; stage3: {n} responses in {len(group_rows)} rows, "
        f"{rl_tokens} tokens"
    )
    print(f"{'update':<8} {'full ms':>9} {'chunked ms':>11} {'chunked/full':>13}")
    for stage in args.stages:
        full = statistics.median(times[(stage, "full")])
        chunked = statistics.median(times[(stage, "chunked")])
        rounds = " ".join(f"{c / f:.2f}" for f, c in zip(times[(stage, "full")], times[(stage, "chunked")]))
        print(f"{stage:<8} {full * 1e3:9.0f} {chunked * 1e3:11.0f} {chunked / full:12.2f}x   per round: {rounds}")


if __name__ == "__main__":
    main()
