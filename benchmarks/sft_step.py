"""Benchmark: one parallel-SFT step (tree attention mask) vs one causal SFT step on the same tokens.

Both steps run forward + backward + AdamW on the same batch of NPR traces (prompt with the NPR
instruction, canonical parallel response) and put the loss on the same response tokens. The
parallel step builds the tree mask and position ids (npr.masks) and hands the model an
additive 4D mask; the causal step gives the model no mask at all (its fastest path: SDPA's
built-in causal kernel). A third row, causal through an explicit 4D mask, separates the price
of the mask's shape from the price of passing a mask. Goal: parallel / causal <= 1.3x.

    python benchmarks/sft_step.py [--model embedded] [--batch 4] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from npr.models import load_model_and_tokenizer
from npr.tokens import tag_token_ids
from npr.train.logprobs import causal_sequence, response_logprobs, structured_sequence
from npr.train.sft_data import synthetic_examples, tokenize_examples


def batch_of_traces(tokenizer, batch: int, repeat_steps: int):
    """``batch`` synthetic canonical traces; each step's text repeated to make longer branches."""
    examples = synthetic_examples(f"synthetic:arith?n={batch}&seed=1")
    widened = []
    for ex in examples:
        body = ex.response
        for k in (1, 2):
            line = body.split(f"<step>\n{k}: ")[1].split("\n</step>")[0]
            body = body.replace(f"{k}: {line}\n</step>", f"{k}: " + " ".join([line] * repeat_steps) + "\n</step>")
        widened.append(ex.__class__(ex.id, ex.problem, ex.answer, body))
    kept, dropped = tokenize_examples(widened, tokenizer, tag_token_ids(tokenizer), 100_000)
    assert not dropped, dropped
    return kept


def sft_step(model, optimizer, sequences, pad_id) -> float:
    """One SFT step as Stage 2 runs it: npr.train.logprobs with each sequence's own 4D mask."""
    start = time.perf_counter()
    logprobs, mask = response_logprobs(model, sequences, pad_id)
    loss = -torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum() / mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def causal_fast_step(model, optimizer, sequences, pad_id) -> float:
    """The same loss with no attention mask passed: right-padded ids, HF's own causal path."""
    start = time.perf_counter()
    length = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, : len(s.input_ids)] = s.input_ids
    first = min(s.response_start for s in sequences) - 1  # logits only from the first response on, as Stage 2
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=length - first).logits  # [B, L - first, V]
    nll, count = 0.0, 0
    for b, s in enumerate(sequences):
        n, r = len(s.input_ids), s.response_start
        logp = logits[b, r - 1 - first : n - 1 - first].float().log_softmax(-1).gather(-1, s.input_ids[r:, None])
        nll, count = nll - logp.sum(), count + n - r
    (nll / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat-steps", type=int, default=12, help="repeat each step's text to lengthen branches")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights (the tiny preset)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    tags = tag_token_ids(tok)
    traces = batch_of_traces(tok, args.batch, args.repeat_steps)
    tree = [structured_sequence(t.prompt_ids, t.response_ids, tags) for t in traces]
    causal = [causal_sequence(t.prompt_ids, t.response_ids) for t in traces]
    pad = tok.pad_token_id
    runs = {
        "parallel SFT (tree mask, 4D additive)": lambda: sft_step(model, optimizer, tree, pad),
        "causal SFT (no mask: SDPA causal path)": lambda: causal_fast_step(model, optimizer, causal, pad),
        "causal SFT (explicit 4D causal mask)": lambda: sft_step(model, optimizer, causal, pad),
    }
    times = {name: [] for name in runs}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    with autocast:
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits every row alike
            for name, run in runs.items():
                times[name].append(run())
    tokens = sum(len(s.input_ids) for s in tree)
    response = sum(s.response_length for s in tree)
    baseline = statistics.median(times["causal SFT (no mask: SDPA causal path)"])
    print(
        f"model {args.model}, batch {args.batch}, {tokens} tokens ({response} response), "
        f"{torch.get_num_threads()} threads, {'bf16 autocast' if args.bf16 else 'fp32'}, median of {args.repeats}"
    )
    print(f"{'step':<42} {'ms':>9} {'vs causal':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<42} {median * 1e3:9.1f} {median / baseline:9.2f}x")


if __name__ == "__main__":
    main()
