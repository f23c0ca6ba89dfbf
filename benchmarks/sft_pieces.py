"""The dense training layout by pieces vs one full L x L mask, ratios measured in one run.

SFT examples packed behind their shared prefix (``pack_in_budget``, as Stage 2 and the cold start
pack them; RL packs a group's responses behind their prompt the same way) are one row in which
each member sees the prefix and itself. The dense layout used to run that row as one SDPA call
under its full L x L mask; it now runs the prefix and each member as its own piece
(``npr.train.logprobs.segment_pieces``), skipping the member x member blocks that are all masked.
Both sides: forward + backward of the response log-probs, bf16 autocast over fp32 weights (the
tiny preset's setting), the same packed rows; runs alternate.

    python benchmarks/sft_pieces.py --data runs/tiny/coldstart/data/data.jsonl [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from npr.masks import attention_bias
from npr.models import load_model_and_tokenizer
from npr.tokens import tag_token_ids
from npr.train.logprobs import pack_in_budget, response_logprobs, set_attention, structured_sequence
from npr.train.sft_data import load_sft_examples, synthetic_examples, tokenize_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default=None, help="SFT data (npr sample's data.jsonl); default: synthetic traces")
    ap.add_argument("--batch", type=int, default=8, help="examples per step (Stage 2's batch_size)")
    ap.add_argument("--pack-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model, dtype="float32")
    model.train()
    set_attention(model, "dense")
    tags = tag_token_ids(tok)
    examples = (
        load_sft_examples(args.data) if args.data else synthetic_examples(f"synthetic:arith?n={args.batch}&seed=1")
    )
    kept, _ = tokenize_examples(examples[: args.batch], tok, tags, 4096)
    rows = pack_in_budget([structured_sequence(k.prompt_ids, k.response_ids, tags) for k in kept], args.pack_tokens)

    def pieces():
        for s in rows:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logprobs, mask = response_logprobs(model, [s], tok.pad_token_id)
            (-logprobs[mask].sum()).backward()
        model.zero_grad()

    def full():
        for s in rows:
            bias = attention_bias(s.allowed, torch.float32)[None, None]  # [1, 1, L, L]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(
                    input_ids=s.input_ids[None],
                    position_ids=s.position_ids[None],
                    attention_mask=bias,
                    logits_to_keep=len(s.input_ids) - s.context_end + 1,
                ).logits[0]
            index = torch.cat([s.predictors(j) for j in range(len(s.spans))]) - (s.context_end - 1)
            targets = torch.cat([s.input_ids[a:b] for a, b in s.spans])
            (-logits[index].float().log_softmax(-1).gather(-1, targets[:, None]).sum()).backward()
        model.zero_grad()

    fns = {"full mask": full, "pieces": pieces}
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(
        f"model {args.model}, {torch.get_num_threads()} threads, {len(kept)} examples in {len(rows)} packed rows "
        f"of {[len(s.input_ids) for s in rows]} tokens (shared prefix {[s.context_end for s in rows]})"
    )
    print("| layout | s per step (median) | speedup |\n|---|---|---|")
    base = statistics.median(times["full mask"])
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} | {base / statistics.median(t):.2f} |")


if __name__ == "__main__":
    main()
