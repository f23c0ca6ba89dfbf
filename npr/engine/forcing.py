"""Logits processors that force a parallel structure on any model (tests and benchmarks).

A random or untrained model never writes ``</guideline>`` on its own; ``StructureForcer``
makes it write a chosen structure (so many blocks, plans, tokens per branch) while every text
token is still the model's own choice among ordinary tokens. ``TokenFuzzer`` drives the engine
with random and adversarial tag streams.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from npr.tokens import tag_token_ids

TEXT = None  # a script slot the model fills with any ordinary token


class _Forcing:
    def __init__(self, tokenizer):
        self.tags = tag_token_ids(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.special = sorted({*tokenizer.all_special_ids, *self.tags.values()})
        self.scaffold = {
            "step": len(tokenizer.encode("<step>\n1:", add_special_tokens=False)),
            "takeaway": len(tokenizer.encode("<takeaway>", add_special_tokens=False)),
        }

    def _apply(self, logits: torch.Tensor, slot: int | None) -> torch.Tensor:
        if slot is TEXT:
            logits[self.special] = float("-inf")
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[slot] = 0.0
        return forced


class StructureForcer(_Forcing):
    """Force ``len(branch_tokens)`` blocks; block b has ``len(branch_tokens[b])`` plans and branch
    k of it writes ``branch_tokens[b][k]`` text tokens before ``</step>``.

    Main line: ``prefix_tokens`` text, then per block ``<guideline>``, each plan as ``<plan>`` +
    ``plan_tokens`` text + ``</plan>``, ``</guideline>``; after each join ``takeaway_tokens`` text
    and ``</takeaway>``; finally ``final_tokens`` text and EOS.
    """

    def __init__(self, tokenizer, branch_tokens: Sequence[Sequence[int]], prefix_tokens: int = 2,
                 plan_tokens: int = 3, takeaway_tokens: int = 4, final_tokens: int = 4):
        super().__init__(tokenizer)
        self.branch_tokens = [list(b) for b in branch_tokens]
        self.prefix_tokens, self.plan_tokens = prefix_tokens, plan_tokens
        self.takeaway_tokens, self.final_tokens = takeaway_tokens, final_tokens

    def _guideline(self, block: int) -> list[int | None]:
        if block >= len(self.branch_tokens):
            return [TEXT] * self.final_tokens + [self.eos]
        t = self.tags
        plan = [t["<plan>"], *[TEXT] * self.plan_tokens, t["</plan>"]]
        return [t["<guideline>"], *plan * len(self.branch_tokens[block]), t["</guideline>"]]

    def script(self, stream) -> tuple[list[int | None], int]:
        """The slots of the stream's current segment and how many scaffold tokens precede them."""
        if stream.kind == "branch":
            n = self.branch_tokens[stream.block - 1][stream.branch - 1]
            return [*[TEXT] * n, self.tags["</step>"]], self.scaffold["step"]
        if stream.block == 0:
            return [*[TEXT] * self.prefix_tokens, *self._guideline(0)], 0
        takeaway = [*[TEXT] * self.takeaway_tokens, self.tags["</takeaway>"]]
        return [*takeaway, *self._guideline(stream.block)], self.scaffold["takeaway"]

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        slots, skip = self.script(stream)
        i = len(stream.tokens) - skip
        return self._apply(logits, slots[i] if i < len(slots) else self.eos)


class TokenFuzzer(_Forcing):
    """Random and adversarial streams: at each step force a tag (any of the 8, in any order) or EOS
    with probability ``p_tag``/``p_eos``, else let the model write ordinary text. Deterministic
    per (seed, prompt, sample, stream, length)."""

    def __init__(self, tokenizer, seed: int, p_tag: float = 0.25, p_eos: float = 0.02,
                 plan_bias: float = 0.0):
        super().__init__(tokenizer)
        self.seed, self.p_tag, self.p_eos, self.plan_bias = seed, p_tag, p_eos, plan_bias

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        # a string seed is hashed with sha512 by random.Random: the same in every process
        rng = random.Random(f"{self.seed}/{stream.prompt_index}/{stream.sample_index}/{stream.kind}/"
                            f"{stream.block}/{stream.branch}/{len(stream.tokens)}")
        roll = rng.random()
        if roll < self.p_eos:
            return self._apply(logits, self.eos)
        if roll < self.p_eos + self.p_tag:
            if rng.random() < self.plan_bias:  # many plans in a row: stress max_branches
                return self._apply(logits, self.tags[rng.choice(["<plan>", "</plan>"])])
            return self._apply(logits, rng.choice(list(self.tags.values())))
        return self._apply(logits, TEXT)
