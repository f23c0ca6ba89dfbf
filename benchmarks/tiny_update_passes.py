"""Time of the tiny preset's RL update at two micro-batch sizes, and of the engine release around it.

The tiny preset's Stage 1 and Stage 3 used two packs (a prompt's responses behind one copy of it)
per forward/backward; one pack per pass halves the update's activations (issue 26: they were most
of a 10.6 GB Stage-3 peak). This times ``policy_backward`` on the same rollouts at
``micro_batch_size`` A and B, alternated ABBA in one process, and the cost of freeing and
rebuilding the engine's KV pool and bf16 copy (``release_engine_for_update``) against a plain
weight sync. The rollouts come from a tiny Stage-3 run's ``rollouts.jsonl`` (their text
re-tokenised; those the engine ended with EOS).

    python benchmarks/tiny_update_passes.py --model RUN/stage2/final --rollouts RUN3/rollouts.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def policy_batch_from(rollouts_path: str, tok, config):
    """The tiny Stage-3 update's PolicyBatch from a rollouts.jsonl: structured sequences packed per prompt."""
    from npr.data import load_problems
    from npr.prompts import encode_prompt
    from npr.tokens import tag_token_ids
    from npr.train.logprobs import pack_in_budget, structured_sequence
    from npr.train.update import PolicyBatch

    problems = {p.id: p for p in load_problems(config.train_data)}
    tags = tag_token_ids(tok)
    sequences = []
    for line in open(rollouts_path):
        row = json.loads(line)
        if row["finish_reason"] != "eos" or row["problem_id"] not in problems:
            continue
        prompt = encode_prompt(tok, problems[row["problem_id"]].problem, config.prompt_style, **config.prompt_options())
        response = tok.encode(row["output"], add_special_tokens=False) + [tok.eos_token_id]
        try:
            sequences.append(structured_sequence(prompt, response, tags))
        except Exception:  # noqa: BLE001 - a text whose re-tokenisation breaks the tree: not an update's input
            continue
    n = len(sequences)
    g = torch.Generator().manual_seed(0)
    masks = [torch.ones(s.response_length, dtype=torch.bool) for s in sequences]
    return PolicyBatch(
        pack_in_budget(sequences, config.pack_group_tokens),
        masks,
        torch.randn(n, generator=g),
        [torch.full((s.response_length,), float("nan")) for s in sequences],
    )


def main() -> None:
    from npr.algos import get_policy_loss
    from npr.models import load_model_and_tokenizer
    from npr.train.config import Stage3Config
    from npr.train.overrides import resolve_config
    from npr.train.rollout import RolloutWorker
    from npr.train.session import autocast, make_accelerator
    from npr.train.update import policy_backward

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rollouts", required=True)
    parser.add_argument("--sizes", default="2,1", help="micro_batch_size A,B")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA cycles")
    parser.add_argument("--packs", type=int, default=0, help="time only the first N packs (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = resolve_config("stage3", Stage3Config, "tiny", None, {"model": args.model})
    model, tok = load_model_and_tokenizer(config.model)
    model = model.float().train()
    acc = make_accelerator()
    batch = policy_batch_from(args.rollouts, tok, config)
    if args.packs:
        rows = batch.response_rows(range(args.packs))
        batch = type(batch)(
            batch.sequences[: args.packs],
            batch.loss_masks[: len(rows)],
            batch.advantages[: len(rows)],
            batch.sampler_logprobs[: len(rows)],
        )
    loss_fn = get_policy_loss("papo")
    sizes = [int(x) for x in args.sizes.split(",")]
    times: dict[int, list[float]] = {s: [] for s in sizes}
    losses: dict[int, float] = {}
    print(
        f"{len(batch.sequences)} packs, {len(batch.loss_masks)} responses, "
        f"{sum(len(s.input_ids) for s in batch.sequences)} tokens"
    )
    for _ in range(args.rounds):
        for size in sizes + sizes[::-1]:
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            metrics = policy_backward(
                acc,
                model,
                batch,
                loss_fn,
                config.loss_agg,
                tok.pad_token_id,
                size,
                forward_context=lambda: autocast(torch.device("cpu"), "bf16"),
                temperature=config.temperature,
                logprob_chunk_size=config.logprob_chunk_size,
            )
            times[size].append(time.perf_counter() - start)
            losses[size] = metrics["loss"]
    print("| micro_batch_size | update seconds (each) | median | loss |")
    print("|---|---|---|---|")
    for size in sizes:
        print(
            f"| {size} | {', '.join(f'{t:.1f}' for t in times[size])} | {statistics.median(times[size]):.1f} | "
            f"{losses[size]:.6g} |"
        )
    a, b = sizes
    print(f"median {b} / {a} = {statistics.median(times[b]) / statistics.median(times[a]):.2f}")

    worker = RolloutWorker(model, tok, config, mode="parallel")
    cost = {"sync": [], "release + sync": []}
    for _ in range(args.rounds):
        for label in ("sync", "release + sync", "release + sync", "sync"):
            start = time.perf_counter()
            if label != "sync":
                worker.release_memory()
            worker.sync()
            cost[label].append(time.perf_counter() - start)
    pool_gib = worker.engine.pool.keys.numel() * worker.engine.pool.keys.element_size() * 2 / 2**30
    print(
        f"engine: KV pool {pool_gib:.2f} GiB + bf16 copy; "
        + ", ".join(f"{k} median {statistics.median(v):.2f} s" for k, v in cost.items())
    )


if __name__ == "__main__":
    main()
