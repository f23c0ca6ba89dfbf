"""The reasoning split (vLLM's ``--reasoning-parser``): the NPR trace in ``reasoning_content``, the answer after.

Where the trace ends is read by ``npr.schema.parse``, the parser training and evaluation use:

- the **reasoning** is the text up to the end of the last complete block (``</takeaway>``) that
  follows the previous one with nothing but whitespace between them, plus the whitespace after it;
- the **content** is the rest: the final text with the answer;
- a block still open at the end (the budget ran out inside it) is reasoning, as vLLM's parsers
  treat an unclosed ``<think>``; text that only starts like ``<guideline>`` waits to be decided;
- a response with no block has no reasoning (``reasoning_content: null``), all of it is content.

Text that is not whitespace ends the reasoning for good: a block written after the final text
(malformed) stays in the content, so the split only moves forward and the streamed pieces
(``ReasoningSplitter``) concatenate to the same two strings as ``split_reasoning`` of the whole text.
"""

from __future__ import annotations

from npr.schema import parse

GUIDELINE = "<guideline>"


def _reasoning_end(text: str, start: int) -> tuple[int, int, bool]:
    """Parse ``text[start:]`` (``start``: 0 or a block end already passed) and return (reasoning end,
    last complete block end, decided). Not decided while what follows the blocks could still open one
    (whitespace, a prefix of ``<guideline>``, or a block still open: that is reasoning so far)."""
    end = start
    for block in parse(text, start=start, strict=False).blocks:
        if block.preamble.strip():  # text before this block: the final text came first
            break
        end = block.span.end
    rest = text[end:]
    body = rest.lstrip()
    if not body or (GUIDELINE.startswith(body) and body != GUIDELINE):  # a partial tag may still become one
        return end, end, False
    if body.startswith(GUIDELINE) and "</takeaway>" not in body:
        return len(text), end, False
    return (end + len(rest) - len(body) if end > 0 else 0), end, True


class ReasoningSplitter:
    """The split of a response fed in pieces: ``feed`` each new piece of content, then ``finish``;
    each returns (new reasoning, new content). It parses only from the last block end passed."""

    def __init__(self):
        self.text = ""
        self._sent = 0  # characters handed out: reasoning up to _reasoning_end, content after
        self._reasoning_end = 0
        self._base = 0
        self._decided = False
        self._in_block = False  # inside an open block: only a new tag (a ">") can change the split

    def feed(self, piece: str) -> tuple[str, str]:
        self.text += piece
        if not self._decided:
            if self._in_block and ">" not in piece:  # no re-parse of a long block at every piece
                self._reasoning_end = len(self.text)
                return self._take(self._reasoning_end)
            end, self._base, self._decided = _reasoning_end(self.text, self._base)
            self._in_block = not self._decided and end == len(self.text) > self._base
            self._reasoning_end = max(self._reasoning_end, end)
            if not self._decided:
                return self._take(self._reasoning_end)
        return self._take(len(self.text))

    def finish(self) -> tuple[str, str]:
        """The end: undecided text (whitespace, a lone ``<guid``) is reasoning after a block, content without one."""
        if not self._decided and self._reasoning_end > 0:
            self._reasoning_end = len(self.text)
        self._decided = True
        return self._take(len(self.text))

    def _take(self, upto: int) -> tuple[str, str]:
        """Hand out ``text[_sent:upto]``: the part before the reasoning end as reasoning, the rest as content."""
        cut = min(max(self._sent, self._reasoning_end), upto)
        reasoning, content = self.text[self._sent : cut], self.text[cut:upto] if upto > cut else ""
        self._sent = max(self._sent, upto)
        return reasoning, content


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning_content, content) of a whole response; reasoning None when it has no block."""
    splitter = ReasoningSplitter()
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.finish()
    return (r1 + r2) or None, c1 + c2


__all__ = ["ReasoningSplitter", "split_reasoning"]
