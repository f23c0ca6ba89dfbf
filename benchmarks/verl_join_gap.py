"""The join gap of the npr_parallel agent loop: rollout vs tree-attention actor log-probs, before and after joins.

The loop drives npr's engine in plain mode (a stock server in miniature: causal, sequential positions) and
re-prefills each join; the actor scores the same tokens with npr's tree mask and positions. Forced structures
(npr's StructureForcer), greedy, fp32, tiny random models built locally.

    PYTHONPATH=. python benchmarks/verl_join_gap.py
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer
from npr.integrations.verl.agent_loop import EngineServer, ForkJoinLimits, Scaffold, fork_join, join_gap
from npr.models import load_model_and_tokenizer
from npr.tokens import tag_token_ids
from npr.train.logprobs import response_logprobs, structured_sequence

SHAPES = {"2 blocks (2, 3 branches)": [[4, 6], [3, 3, 3]], "1 block, 3 branches": [[8, 8, 8]]}


class ScriptAt:
    """StructureForcer's script for the segment a server request continues (see tests/test_verl_agent_loop.py)."""

    def __init__(self, forcer, tok, prompt, context):
        self.forcer, response = forcer, context[len(prompt) :]
        block = response.count(tag_token_ids(tok)["</guideline>"])
        opens = Scaffold.of(tok, 8).step_open
        branch = next((k for k, ids in enumerate(opens, 1) if tuple(response[-len(ids) :]) == ids), 0)
        self.stream = SimpleNamespace(kind="branch" if branch else "main", block=block if branch else 0, branch=branch)
        self.offset = 0 if branch else len(response)

    def __call__(self, stream, logits):
        slots, _ = self.forcer.script(self.stream)
        i = self.offset + len(stream.tokens)
        return self.forcer._apply(logits, slots[i] if i < len(slots) else self.forcer.eos)


def main() -> None:
    torch.manual_seed(0)
    print("| model | structure | tokens | decoded after a join | gap before | gap after | same tokens as the engine |")
    print("|---|---|---|---|---|---|---|")
    for spec in ("tiny-random-qwen3", "tiny-random-llama"):
        model, tok = load_model_and_tokenizer(spec)
        model.eval()
        prompt = tok.encode("Q: 23+34?\n", add_special_tokens=False)
        for name, shape in SHAPES.items():
            engine = Engine(model, tok, EngineConfig(mode="plain", kv_cache_tokens=8192, repetition_penalty=1.0))
            forcer = StructureForcer(tok, shape, prefix_tokens=2)
            server = EngineServer(engine, lambda ids, f=forcer, t=tok, p=prompt: [ScriptAt(f, t, p, ids)])
            got = asyncio.run(
                fork_join(
                    server.generate, prompt, Scaffold.of(tok, ForkJoinLimits().max_branches), 400, {"temperature": 0.0}
                )
            )
            sequential = Engine(
                model, tok, EngineConfig(mode="sequential", kv_cache_tokens=8192, repetition_penalty=1.0)
            )
            (expected,) = sequential.generate(
                [prompt],
                SamplingParams(
                    max_new_tokens=400,
                    temperature=0.0,
                    logits_processors=(StructureForcer(tok, shape, prefix_tokens=2),),
                ),
            )
            with torch.no_grad():
                actor, mask = response_logprobs(
                    model, [structured_sequence(prompt, got.token_ids, tag_token_ids(tok))], 0, attention="dense"
                )
            gap = join_gap(
                torch.tensor(got.logprobs)[None],
                actor,
                torch.tensor(got.sampled)[None] * mask,
                torch.tensor(got.after_join)[None],
            )
            print(
                f"| {spec} | {name} | {len(got.token_ids)} | {gap['npr/after_join_fraction']:.0%} | "
                f"{gap['npr/join_gap_before']:.2g} | {gap['npr/join_gap_after']:.2g} | "
                f"{got.token_ids == expected.token_ids} |"
            )


if __name__ == "__main__":
    main()
