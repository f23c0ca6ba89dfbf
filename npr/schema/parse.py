"""Parse and check NPR traces.

One lenient scanner finds the blocks of a response text and records every violation it
meets. ``validate`` returns those violations, ``format_score`` turns them into NPR's Stage-1
format penalty, and ``parse`` builds the ``ParallelTrace`` (strictly by default: a
structural violation raises ``SchemaParseError``). Because all three read the same scan,
``format_score(t) == 0.0`` exactly when ``validate(t) == []``.

Blocks are matched the way NPR's reward matches them (arXiv 2512.07461, Stage 1), but on
tag positions rather than a whitespace-stripped string: ``<guideline>`` up to the first
``</guideline>``, then the steps region up to the first ``<takeaway>`` (a ``<guideline>``
inside it breaks the block), then the takeaway up to the first ``</takeaway>``. Plans and
steps are the non-overlapping ``<plan>…</plan>`` / ``<step>…</step>`` pairs inside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from npr.errors import NprError
from npr.schema.answer import find_boxed
from npr.schema.canonical import MAX_PLANS
from npr.schema.trace import Block, ParallelTrace, Plan, Span, Step

_TAG_RE = re.compile(r"</?(?:guideline|plan|step|takeaway)>")
_LABEL_RE = re.compile(r"^\s*(?:(\d+)\s*[:.]|:)\s?")  # "2:", "2." or a bare ":" (label left out)

MIN_PLAN_CHARS = 3
MIN_STEP_CHARS = 6
MIN_TAKEAWAY_CHARS = 6


@dataclass(frozen=True)
class SchemaError:
    """One violation: ``kind`` (a key of ``PENALTIES``), a message for a user, and the
    character offset in the parsed text where it was found. ``structural`` is True when the
    tags themselves are out of place, so that no tree can be built."""

    kind: str
    message: str
    offset: int
    structural: bool = False

    def __str__(self) -> str:
        return f"{self.kind} at offset {self.offset}: {self.message}"


class SchemaParseError(NprError, ValueError):
    """A trace whose tags do not form the NPR structure. ``errors`` lists every violation."""

    def __init__(self, errors: list[SchemaError], source: str = "trace"):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors if e.structural)
        super().__init__(
            f"{source} is not a well-formed NPR trace:\n{lines}\n"
            "Fix the tags (see docs/schema.md), or call parse(..., strict=False) for a best-effort tree."
        )


# kind -> (penalty, stops the scoring). NPR Stage-1 format reward, arXiv 2512.07461 §3.1 and
# its released reward code, with two fixes (the step/takeaway checks test their own text, and
# the answer check also runs when nothing follows the last block) and two additions marked *.
PENALTIES: dict[str, tuple[float, bool]] = {
    "no_block": (-1.5, True),
    "stray_tag": (-1.5, True),  # a tag before the first block
    "text_between_blocks": (-1.5, True),
    "text_before_first_block": (-0.4, False),  # * tagless preamble
    "no_plans": (-1.0, True),
    "too_many_plans": (-1.0, True),  # * more than MAX_PLANS branches
    "plan_step_mismatch": (-1.0, True),
    "text_in_guideline": (-0.4, False),
    "text_between_plans": (-0.2, False),
    "text_between_steps": (-0.2, False),
    "short_plan": (-0.4, False),
    "short_step": (-0.4, False),
    "short_takeaway": (-0.4, False),
    "tag_in_plan": (-0.4, False),
    "tag_in_step": (-0.4, False),
    "tag_in_takeaway": (-0.4, False),
    "tag_in_final": (-1.0, False),
    "missing_answer": (-1.0, False),
}
MIN_FORMAT_SCORE = -2.0


@dataclass
class _Tag:
    name: str  # e.g. "plan"
    closing: bool
    start: int
    end: int

    @property
    def text(self) -> str:
        return f"</{self.name}>" if self.closing else f"<{self.name}>"


@dataclass
class _Pair:
    """An element ``<name>content</name>``: content is text[content_start:content_end]."""

    open: _Tag
    close: _Tag

    @property
    def content_start(self) -> int:
        return self.open.end

    @property
    def content_end(self) -> int:
        return self.close.start


@dataclass
class _RawBlock:
    guideline: _Pair
    takeaway: _Pair


def _tags(text: str, start: int, end: int) -> list[_Tag]:
    out = []
    for m in _TAG_RE.finditer(text, start, end):
        s = m.group(0)
        out.append(_Tag(s.strip("</>"), s.startswith("</"), m.start(), m.end()))
    return out


def _first(tags: list[_Tag], i: int, name: str, closing: bool, stop: int | None = None) -> int | None:
    """Index of the first tag at or after i with that name/closing, before tag index stop."""
    for j in range(i, len(tags) if stop is None else stop):
        if tags[j].name == name and tags[j].closing == closing:
            return j
    return None


def _find_blocks(tags: list[_Tag]) -> list[_RawBlock]:
    blocks: list[_RawBlock] = []
    i = 0
    while (g := _first(tags, i, "guideline", False)) is not None:
        ge = _first(tags, g + 1, "guideline", True)
        if ge is None:
            break
        if _first(tags, g + 1, "guideline", False, ge) is not None:  # nested guideline: restart inside
            i = g + 1
            continue
        t = _first(tags, ge + 1, "takeaway", False)
        if t is None or _first(tags, ge + 1, "guideline", False, t) is not None:
            i = g + 1
            continue
        te = _first(tags, t + 1, "takeaway", True)
        if te is None:
            break
        blocks.append(_RawBlock(_Pair(tags[g], tags[ge]), _Pair(tags[t], tags[te])))
        i = te + 1
    return blocks


def _pairs(tags: list[_Tag], name: str) -> tuple[list[_Pair], list[_Tag]]:
    """Non-overlapping <name>…</name> pairs (first close after each open) and the leftover tags."""
    pairs, leftover = [], []
    i = 0
    while i < len(tags):
        tag = tags[i]
        if tag.name == name and not tag.closing:
            j = _first(tags, i + 1, name, True)
            if j is not None:
                pairs.append(_Pair(tag, tags[j]))
                i = j + 1
                continue
        leftover.append(tag)
        i += 1
    return pairs, leftover


def _nonspace(s: str) -> int:
    return sum(1 for c in s if not c.isspace())


def _split_label(content: str) -> tuple[int | None, str]:
    content = content.strip()
    m = _LABEL_RE.match(content)
    if m is None:
        return None, content
    return (int(m.group(1)) if m.group(1) else None), content[m.end() :].strip()


class _Scan:
    """One pass over a response: the raw blocks, the tree and every violation, in check order."""

    def __init__(self, text: str, start: int = 0, max_plans: int = MAX_PLANS):
        self.text = text
        self.errors: list[SchemaError] = []
        self.blocks: list[Block] = []
        tags = _tags(text, start, len(text))
        raw = _find_blocks(tags)
        if not raw:
            self._error("no_block", "no complete <guideline>…</guideline> <step>… <takeaway>…</takeaway> block", start)
        cursor = start
        for n, rb in enumerate(raw):
            self._check_gap(cursor, rb.guideline.open.start, first=(n == 0))
            self.blocks.append(
                self._block(rb, tags, preamble=text[cursor : rb.guideline.open.start], max_plans=max_plans)
            )
            cursor = rb.takeaway.close.end
        self.final_start = cursor
        self.final = text[cursor:]
        for tag in _tags(text, cursor, len(text)):
            self._error(
                "tag_in_final",
                f"{tag.text} after the last complete block; the final text holds no tags",
                tag.start,
                True,
            )
        self.answer = find_boxed(self.final)
        if self.answer is None or not self.answer.strip():
            what = "an empty \\boxed{}" if self.answer is not None else "no \\boxed{…}"
            self._error("missing_answer", f"the final text has {what}; put the final answer in \\boxed{{…}}", cursor)

    def _error(self, kind: str, message: str, offset: int, structural: bool = False) -> None:
        self.errors.append(SchemaError(kind, message, offset, structural))

    def _check_gap(self, start: int, end: int, first: bool) -> None:
        gap = self.text[start:end]
        gap_tags = _tags(self.text, start, end)
        if first:
            for tag in gap_tags:
                self._error("stray_tag", f"{tag.text} before the first complete block", tag.start, True)
            if not gap_tags and _nonspace(gap):
                self._error("text_before_first_block", "text before the first <guideline>; start with the block", start)
        elif gap_tags or _nonspace(gap):
            what = gap_tags[0].text if gap_tags else repr(gap.strip()[:40])
            self._error(
                "text_between_blocks", f"{what} between </takeaway> and the next <guideline>", start, bool(gap_tags)
            )

    def _block(self, rb: _RawBlock, tags: list[_Tag], preamble: str, max_plans: int) -> Block:
        text = self.text
        g, t = rb.guideline, rb.takeaway
        inner = [x for x in tags if g.content_start <= x.start and x.end <= g.content_end]
        plan_pairs, plan_leftover = _pairs(inner, "plan")
        steps_region = [x for x in tags if g.close.end <= x.start and x.end <= t.open.start]
        step_pairs, step_leftover = _pairs(steps_region, "step")

        if not plan_pairs:
            self._error("no_plans", "a <guideline> with no <plan>", g.open.start, True)
        elif len(plan_pairs) > max_plans:
            self._error("too_many_plans", f"{len(plan_pairs)} plans; at most {max_plans} are allowed", g.open.start)
        self._check_guideline_text(g, plan_pairs, plan_leftover)
        if len(step_pairs) != len(plan_pairs):
            self._error(
                "plan_step_mismatch",
                f"{len(plan_pairs)} plan(s) but {len(step_pairs)} step(s); write one <step> per <plan>, in order",
                g.close.end,
                True,
            )
        self._check_between(g.close.end, t.open.start, step_pairs, step_leftover, "text_between_steps", "steps")

        plans = tuple(self._element(p, "plan", MIN_PLAN_CHARS, Plan) for p in plan_pairs)
        steps = tuple(self._element(p, "step", MIN_STEP_CHARS, Step) for p in step_pairs)
        takeaway = text[t.content_start : t.content_end]
        if _nonspace(takeaway) < MIN_TAKEAWAY_CHARS:
            self._error("short_takeaway", f"takeaway shorter than {MIN_TAKEAWAY_CHARS} characters", t.open.start)
        for tag in _tags(text, t.content_start, t.content_end):
            self._error("tag_in_takeaway", f"{tag.text} inside <takeaway>", tag.start, True)
        return Block(
            plans=plans,
            steps=steps,
            takeaway=takeaway.strip(),
            span=Span(g.open.start, t.close.end),
            preamble=preamble,
            takeaway_span=Span(t.open.start, t.close.end),
        )

    def _check_guideline_text(self, g: _Pair, plans: list[_Pair], leftover: list[_Tag]) -> None:
        if not plans:
            return
        outside = self.text[g.content_start : plans[0].open.start] + self.text[plans[-1].close.end : g.content_end]
        outside_tags = [x for x in leftover if x.start < plans[0].open.start or x.start >= plans[-1].close.end]
        if _nonspace(outside):
            what = outside_tags[0].text if outside_tags else "text"
            self._error(
                "text_in_guideline", f"{what} inside <guideline> outside any <plan>", g.open.start, bool(outside_tags)
            )
        self._check_between(plans[0].open.start, plans[-1].close.end, plans, leftover, "text_between_plans", "plans")

    def _check_between(
        self, start: int, end: int, pairs: list[_Pair], leftover: list[_Tag], kind: str, what: str
    ) -> None:
        """Text or tags in [start, end) that fall outside every pair."""
        cursor, junk = start, ""
        for p in pairs:
            junk += self.text[cursor : p.open.start]
            cursor = p.close.end
        junk += self.text[cursor:end]
        stray = [x for x in leftover if start <= x.start < end]
        if _nonspace(junk):
            if stray:
                tag = stray[0]
                verb = "unclosed" if not tag.closing else "unmatched"
                msg = f"{verb} {tag.text} between {what}"
                offset = tag.start
            else:
                msg, offset = f"text between {what}: {junk.strip()[:40]!r}", start
            self._error(kind, msg, offset, bool(stray))

    def _element(self, pair: _Pair, name: str, min_chars: int, cls):
        content = self.text[pair.content_start : pair.content_end]
        if _nonspace(content) < min_chars:
            self._error(f"short_{name}", f"<{name}> shorter than {min_chars} characters", pair.open.start)
        for tag in _tags(self.text, pair.content_start, pair.content_end):
            self._error(f"tag_in_{name}", f"{tag.text} inside <{name}>", tag.start, True)
        label, body = _split_label(content)
        return cls(label=label, text=body, span=Span(pair.open.start, pair.close.end))


def _as_text(text: str | bytes, source: str) -> str:
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source} is not UTF-8 (byte {e.start}: {e.reason}); decode it first") from e
    if not isinstance(text, str):
        raise TypeError(f"{source} must be str, got {type(text).__name__}")
    return text


def validate(text: str | bytes, start: int = 0, max_plans: int = MAX_PLANS) -> list[SchemaError]:
    """Every violation of the NPR schema in ``text[start:]`` (``start`` skips the prompt).

    Returns ``[]`` for a valid trace. Each error has a kind (see ``PENALTIES``), a message
    and the character offset where it was found.
    """
    return _Scan(_as_text(text, "trace"), start, max_plans).errors


def format_score(text: str | bytes, start: int = 0, max_plans: int = MAX_PLANS) -> float:
    """NPR's Stage-1 format reward: 0.0 for a valid trace, otherwise a penalty in [-2, 0).

    Penalties (``PENALTIES``) are summed in check order; a "stop" violation adds its penalty
    and ends the scoring; the sum is clamped at -2.
    """
    score = 0.0
    for err in validate(text, start, max_plans):
        penalty, stop = PENALTIES[err.kind]
        score += penalty
        if stop:
            break
    return max(MIN_FORMAT_SCORE, round(score, 6))


def parse(text: str | bytes, start: int = 0, strict: bool = True, source: str = "trace") -> ParallelTrace:
    """Parse ``text[start:]`` into a ``ParallelTrace`` with character offsets into ``text``.

    A response with no block parses to a trace with no blocks. With ``strict`` (default),
    misplaced tags raise ``SchemaParseError`` listing the violations; otherwise the
    best-effort tree is returned with ``errors`` set.
    """
    text = _as_text(text, source)
    scan = _Scan(text, start)
    structural = [e for e in scan.errors if e.structural]
    if strict and structural:
        raise SchemaParseError(scan.errors, source)
    return ParallelTrace(
        blocks=tuple(scan.blocks),
        final=scan.final.strip(),
        answer=scan.answer,
        final_span=Span(scan.final_start, len(text)),
        errors=tuple(scan.errors),
    )
