"""From engine deltas to what a client sees: canonical text, branch text, stop strings, log-probs.

The engine reports each step's new tokens per stream (``StreamDelta``): the main line, and branch
k of block b while the branches decode side by side. A ``SampleStream`` turns one sample's deltas
into

- **content**: the flat canonical text, the same string as ``Result.text``. Main-line text is
  content as soon as it is decoded. Branch tokens wait; when the main line moves past the block
  (the join: the ``<takeaway>`` segment starts), the block's branches enter the content whole, in
  branch order 1..k, then the main line continues. A client that reads only the content therefore
  reads valid NPR text in the order a sequential decoder would have written it;
- **branch text**: each branch's own text as it decodes (``<step>\\nk: … </step>\\n``), for the
  ``npr`` extension chunks;
- **stop strings**, matched on the content: the content ends before the first match and the
  sample is finished (finish reason ``stop``). Text that could be the start of a stop string is
  held back until it is not;
- **log-probs** of the content tokens, in content order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from npr.engine import Result, StreamDelta

# engine finish reason -> OpenAI finish_reason (invalid_schema and cancelled are documented extensions)
FINISH_REASONS = {
    "eos": "stop",
    "stop": "stop",
    "length": "length",
    "invalid_schema": "invalid_schema",
    "cancelled": "cancelled",
}


class IncrementalDecoder:
    """The text of a growing token list, in pieces that never end inside a character.

    Decodes a short window (the tokens since the previous piece plus the ones before them), so a
    piece costs O(window), and holds back text that ends in U+FFFD (a multi-byte character split
    across tokens) until the next token completes it. Special tokens (the NPR tags) are kept.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text was returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is left, incomplete characters included (as a full decode would show them)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.tokens):
            return ""
        before = self._decode(self.tokens[self._prefix : self._read])
        now = self._decode(self.tokens[self._prefix :])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.tokens)
            return now[len(before) :]
        return ""


class LogprobEntry(NamedTuple):
    """One content token's log-prob entry."""

    token: int
    logprob: float | None
    """None for tokens the engine wrote itself (scaffold)."""
    offset: int
    """Where its text starts in the content."""
    top: tuple[tuple[int, float], ...] = ()
    """With ``top_logprobs``: the position's most likely (id, log-prob), best first (() for scaffold)."""


@dataclass
class Update:
    """What one batch of deltas added to a sample."""

    content: str = ""
    branches: list[tuple[int, int, str]] = field(default_factory=list)
    """(block, branch, new text) while branches decode."""
    logprobs: list[LogprobEntry] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.branches or self.logprobs)


class SampleStream:
    """One sample of one request: feed it the sample's ``StreamDelta``s in order, then its ``Result``."""

    def __init__(
        self,
        tokenizer,
        eos_ids: frozenset[int],
        stops: list[str] = (),
        skip_special: frozenset[int] = frozenset(),
        include_stop: bool = False,
    ):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stops = list(stops)
        self.skip_special = skip_special  # skip_special_tokens: these ids add no text (their log-probs stay)
        self.include_stop = include_stop  # include_stop_str_in_output: the content ends after the match
        self.generated = 0  # tokens the engine reported so far, every branch (usage before the end)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._content = IncrementalDecoder(tokenizer)
        self._decoded = ""  # all content text decoded so far
        self._emitted = 0  # characters of _decoded handed out
        self._searched = 0  # characters of _decoded already searched for stop strings
        self._held_eos: tuple | None = None  # an EOS is content only if more content follows
        self._pending: dict[int, dict[int, list[tuple]]] = {}  # block -> branch -> (token, logprob, top)
        self._branch_text: dict[tuple[int, int], IncrementalDecoder] = {}
        self.branch_text: dict[tuple[int, int], str] = {}  # (block, branch) -> its text so far, while it decodes
        self.entries: list[LogprobEntry] = []
        self.stopped = False  # a stop string matched: the content is final, the engine may still be running
        self.result: Result | None = None

    @property
    def text(self) -> str:
        """The content handed out so far; after ``finish`` the whole content."""
        return self._decoded[: self._emitted]

    @property
    def done(self) -> bool:
        return self.result is not None

    def finish_reason(self) -> str:
        return "stop" if self.stopped else FINISH_REASONS.get(self.result.finish_reason, self.result.finish_reason)

    def content_logprobs(self) -> list[LogprobEntry]:
        """Log-prob entries of the content's tokens (after a stop string: those whose text starts before it)."""
        return [e for e in self.entries if e.offset < self._emitted] if self.stopped else list(self.entries)

    def feed(self, delta: StreamDelta) -> Update:
        update = Update()
        if self.stopped or self.done:
            return update
        pairs = list(zip(delta.token_ids, delta.logprobs, delta.top_logprobs or ((),) * len(delta.token_ids)))
        self.generated += len(delta.token_ids)
        if delta.branch:
            key = (delta.block, delta.branch)
            decoder = self._branch_text.setdefault(key, IncrementalDecoder(self.tokenizer))
            text = "".join(decoder.push(t) for t in delta.token_ids)
            if text:
                update.branches.append((delta.block, delta.branch, text))
                self.branch_text[key] = self.branch_text.get(key, "") + text
            self._pending.setdefault(delta.block, {}).setdefault(delta.branch, []).extend(pairs)
        else:
            self._join(update, delta.block)
            self._commit(update, pairs)
        self._release(update, final=False)
        return update

    def finish(self, result: Result) -> Update:
        """The sample's end: branches still open enter the content in order, a final EOS is dropped
        (as ``Result.text`` drops it) and held-back text is released."""
        update = Update()
        if not self.stopped:
            for key, decoder in self._branch_text.items():
                text = decoder.flush()
                if text:
                    update.branches.append((*key, text))
            self._join(update, math.inf)
            self._held_eos = None
            self._decoded += self._content.flush()
            self._release(update, final=True)
        self.result = result
        return update

    # ------------------------------------------------------------------ internals

    def _join(self, update: Update, block: float) -> None:
        """Move the branches of every block up to ``block`` into the content, branch by branch."""
        for b in sorted(k for k in self._pending if k <= block):
            for branch in sorted(self._pending[b]):
                self._commit(update, self._pending[b][branch])
                self._branch_text.pop((b, branch), None)
                self.branch_text.pop((b, branch), None)
            del self._pending[b]

    def _commit(self, update: Update, pairs) -> None:
        for token, logprob, top in pairs:
            if self._held_eos is not None:
                self._push(update, *self._held_eos)
                self._held_eos = None
            if token in self.eos_ids:
                self._held_eos = (token, logprob, top)
            else:
                self._push(update, token, logprob, top)

    def _push(self, update: Update, token: int, logprob: float, top: tuple = ()) -> None:
        entry = LogprobEntry(token, None if math.isnan(logprob) else logprob, len(self._decoded), top)
        if token not in self.skip_special:
            self._decoded += self._content.push(token)
        self.entries.append(entry)
        update.logprobs.append(entry)

    def _release(self, update: Update, final: bool) -> None:
        upto = len(self._decoded)
        if self.stops:
            start = max(0, self._searched - self._hold)
            found = [
                (i, i + len(s) if self.include_stop else i)
                for i, s in ((self._decoded.find(s, start), s) for s in self.stops)
                if i >= 0
            ]
            self._searched = len(self._decoded)
            if found:
                upto = min(found)[1]
                self._decoded = self._decoded[:upto]
                self.stopped = True
            elif not final:
                upto = max(self._emitted, len(self._decoded) - self._hold)
        if upto > self._emitted:
            update.content += self._decoded[self._emitted : upto]
            self._emitted = upto
