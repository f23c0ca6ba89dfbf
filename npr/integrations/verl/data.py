"""npr's problems as verl's RL parquet: ``prompt`` (chat messages with npr's instruction), ``data_source``,
``reward_model.ground_truth``, ``extra_info`` (index, problem, a reasoning-gym entry as JSON).

    python -m npr.integrations.verl.data 'rg:chain_sum?size=200&terms=2' train.parquet
    python -m npr.integrations.verl.data ../shared/benchmarks/train_math.jsonl train.parquet --style npr

``npr.integrations.verl.rewards.problem_of`` turns a row back into the ``Problem`` npr grades.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from npr.data import Problem, load_problems
from npr.prompts import build_messages


def verl_rows(
    problems: Sequence[Problem], style: str = "npr", instruction: str | None = None, placement: str = "system"
) -> list[dict[str, Any]]:
    """One verl row per problem, its prompt built as npr builds it (``npr.prompts.build_messages``)."""
    return [
        {
            "data_source": p.source,
            "prompt": build_messages(p.problem, style, instruction, placement),
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {
                "index": p.id,
                "problem": p.problem,
                "rg_entry_json": json.dumps(p.rg_entry, default=str) if p.rg_entry is not None else "",
            },
        }
        for p in problems
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m npr.integrations.verl.data", description="Write npr problems as a verl RL parquet file."
    )
    parser.add_argument("spec", help="npr's problem spec: a benchmark, a .jsonl file, rg:<task>?…, gen:…, hf:…")
    parser.add_argument("out", help="the .parquet file to write")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--style", default="npr", choices=("npr", "plain"))
    args = parser.parse_args(argv)
    import pandas

    rows = verl_rows(load_problems(args.spec, limit=args.limit), args.style)
    pandas.DataFrame(rows).to_parquet(args.out)
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
