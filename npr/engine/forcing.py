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

from npr.schema import GUIDELINE_SEPARATOR, STEP_SEPARATOR, TAKEAWAY_OPEN, plan_label, step_open
from npr.tokens import tag_token_ids

TEXT = None  # a script slot the model fills with any ordinary token


class _Forcing:
    def __init__(self, tokenizer):
        self.tags = tag_token_ids(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.special = sorted({*tokenizer.all_special_ids, *self.tags.values()})
        self.scaffold = {  # tokens the engine prefills before a branch's / a takeaway's own text
            "step": len(tokenizer.encode(step_open(1), add_special_tokens=False)),
            "takeaway": len(tokenizer.encode(TAKEAWAY_OPEN, add_special_tokens=False)),
        }
        self.tokenizer = tokenizer
        self._text_mask: torch.Tensor | None = None
        self._blocked: dict = {}  # (vocab, device) -> ~text_mask there

    def text_mask(self, vocab: int) -> torch.Tensor:
        """BoolTensor[vocab]: tokens a TEXT slot may take: visible, tag-free, brace-free text
        (so that forced traces pass the schema's length checks and never open a box or a tag)."""
        if self._text_mask is None or len(self._text_mask) != vocab:
            mask = torch.zeros(vocab, dtype=torch.bool)
            special = set(self.special)
            for i in range(min(vocab, len(self.tokenizer))):
                text = self.tokenizer.decode([i])
                mask[i] = (
                    i not in special
                    and text.strip() == text
                    and text.isascii()
                    and text.isprintable()
                    and bool(text)
                    and not any(c in text for c in "<>{}\\")
                )
            self._text_mask = mask
        return self._text_mask

    def _apply(self, logits: torch.Tensor, slot: int | None) -> torch.Tensor:
        if slot is TEXT:
            key = (logits.shape[0], logits.device)
            if self._blocked.get(key) is None:  # one copy per device, not a transfer per row
                self._blocked = {key: ~self.text_mask(logits.shape[0]).to(logits.device)}
            return logits.masked_fill_(self._blocked[key], float("-inf"))
        forced = torch.full_like(logits, float("-inf"))
        forced[slot] = 0.0
        return forced


class StructureForcer(_Forcing):
    """Force ``len(branch_tokens)`` blocks; block b has ``len(branch_tokens[b])`` plans and branch
    k of it writes ``branch_tokens[b][k]`` text tokens before ``</step>``.

    Main line: ``prefix_tokens`` text, then per block ``<guideline>``, each plan as ``<plan>k:`` +
    ``plan_tokens`` text + ``</plan>``, ``</guideline>``; after each join ``takeaway_tokens`` text
    and ``</takeaway>``; finally ``final_tokens`` text, `` \\boxed{answer}`` (unless ``answer`` is
    None) and EOS. Text tokens are visible, so with the defaults the trace passes ``validate``.
    """

    def __init__(
        self,
        tokenizer,
        branch_tokens: Sequence[Sequence[int]],
        prefix_tokens: int = 0,
        plan_tokens: int = 3,
        takeaway_tokens: int = 6,
        final_tokens: int = 4,
        answer: str | None = "0",
    ):
        super().__init__(tokenizer)
        self.branch_tokens = [list(b) for b in branch_tokens]
        self.prefix_tokens, self.plan_tokens = prefix_tokens, plan_tokens
        self.takeaway_tokens, self.final_tokens = takeaway_tokens, final_tokens
        enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        self.answer_ids = [] if answer is None else enc(f" \\boxed{{{answer}}}")
        self.separator, self.step_separator = enc(GUIDELINE_SEPARATOR), enc(STEP_SEPARATOR)
        widest = max((len(b) for b in self.branch_tokens), default=1)
        self.plan_label = [enc(plan_label(k)) for k in range(1, 1 + widest)]
        self.step_open = [enc(step_open(k)) for k in range(1, 1 + widest)]
        self.takeaway_open = enc(TAKEAWAY_OPEN)

    def _block(self, block: int) -> list[int | None]:
        """Block ``block`` written flat, up to and including ``<takeaway>``: the guideline, then
        every branch, with the labels and scaffolds the engine would prefill (so that ``plain``
        mode, which forks nothing, writes the same layout)."""
        t = self.tags
        plans = [
            [t["<plan>"], *self.plan_label[k], *[TEXT] * self.plan_tokens, t["</plan>"]]
            for k in range(len(self.branch_tokens[block]))
        ]
        out = [t["<guideline>"], *[i for plan in plans for i in plan], t["</guideline>"], *self.separator]
        for k, n in enumerate(self.branch_tokens[block], 1):
            out += [*self.step_open[k - 1], *[TEXT] * n, t["</step>"], *self.step_separator]
        return out + self.takeaway_open

    def _after_takeaway(self, block: int) -> list[int | None]:
        """From the takeaway text of ``block`` to the end of the trace."""
        rest = [*[TEXT] * self.takeaway_tokens, self.tags["</takeaway>"]]
        if block + 1 < len(self.branch_tokens):
            return rest + self._block(block + 1) + self._after_takeaway(block + 1)
        return rest + self._final()

    def _final(self) -> list[int | None]:
        return [*[TEXT] * self.final_tokens, *self.answer_ids, self.eos]

    def script(self, stream) -> tuple[list[int | None], int]:
        """The slots of the stream's current segment and how many scaffold tokens precede them.

        In ``parallel``/``sequential`` mode the main line stops at each ``</guideline>`` (the
        engine forks there); in ``plain`` mode it writes the whole flat trace."""
        if stream.kind == "branch":
            n = self.branch_tokens[stream.block - 1][stream.branch - 1]
            return [*[TEXT] * n, self.tags["</step>"]], self.scaffold["step"]
        if stream.block == 0:
            if not self.branch_tokens:
                return [*[TEXT] * self.prefix_tokens, *self._final()], 0
            return [*[TEXT] * self.prefix_tokens, *self._block(0), *self._after_takeaway(0)], 0
        return self._after_takeaway(stream.block - 1), self.scaffold["takeaway"]

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        slots, skip = self.script(stream)
        i = len(stream.tokens) - skip
        return self._apply(logits, slots[i] if i < len(slots) else self.eos)


class TokenFuzzer(_Forcing):
    """Random and adversarial streams: at each step force a tag (any of the 8, in any order) or EOS
    with probability ``p_tag``/``p_eos``, else let the model write ordinary text. Deterministic
    per (seed, prompt, sample, stream, length)."""

    def __init__(self, tokenizer, seed: int, p_tag: float = 0.25, p_eos: float = 0.02, plan_bias: float = 0.0):
        super().__init__(tokenizer)
        self.seed, self.p_tag, self.p_eos, self.plan_bias = seed, p_tag, p_eos, plan_bias

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        # a string seed is hashed with sha512 by random.Random: the same in every process
        rng = random.Random(
            f"{self.seed}/{stream.prompt_index}/{stream.sample_index}/{stream.kind}/"
            f"{stream.block}/{stream.branch}/{len(stream.tokens)}"
        )
        roll = rng.random()
        if roll < self.p_eos:
            return self._apply(logits, self.eos)
        if roll < self.p_eos + self.p_tag:
            if rng.random() < self.plan_bias:  # many plans in a row: stress max_branches
                return self._apply(logits, self.tags[rng.choice(["<plan>", "</plan>"])])
            return self._apply(logits, rng.choice(list(self.tags.values())))
        return self._apply(logits, TEXT)
