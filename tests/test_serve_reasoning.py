"""The reasoning split (``--reasoning-parser npr``): hand-computed cases, and streamed == whole at any cut."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.schema import parse
from npr.serve.reasoning import ReasoningSplitter, split_reasoning

BLOCK = (
    "<guideline>\n<plan>1: add them</plan>\n<plan>2: check</plan>\n</guideline>\n"
    "<step>\n1: 12 + 30 = 42\n</step>\n<step>\n2: 42 - 30 = 12\n</step>\n<takeaway>\nit is 42\n</takeaway>\n"
)
FINAL = "The answer is \\boxed{42}."


def streamed(text: str, cuts: list[int]) -> tuple[str | None, str]:
    splitter, reasoning, content = ReasoningSplitter(), "", ""
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        r, c = splitter.feed(text[a:b])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return (reasoning + r) or None, content + c


@pytest.mark.parametrize(
    "text,reasoning,content",
    [
        (BLOCK + FINAL, BLOCK, FINAL),  # the trace up to the last takeaway, then the answer
        (BLOCK + BLOCK + "\n\n" + FINAL, BLOCK + BLOCK + "\n\n", FINAL),  # the whitespace after the last block is trace
        ("Just 42.", None, "Just 42."),  # no block: no reasoning
        ("  \\boxed{42}", None, "  \\boxed{42}"),
        (BLOCK[:60], BLOCK[:60], ""),  # cut by max_tokens inside the block: all reasoning (an unclosed <think>)
        (BLOCK + "<guideline>\n<plan>1: more", BLOCK + "<guideline>\n<plan>1: more", ""),
        (BLOCK, BLOCK, ""),
        ("<guid", None, "<guid"),  # not a block after all
        (BLOCK + FINAL + BLOCK, BLOCK, FINAL + BLOCK),  # a block after the final text stays in the content
        ("Hm. " + BLOCK + FINAL, None, "Hm. " + BLOCK + FINAL),  # text before the first block: not an NPR trace
    ],
)
def test_hand_computed_splits(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)
    assert streamed(text, list(range(1, len(text)))) == (reasoning, content)  # one character at a time


def test_the_split_is_where_the_schema_parser_ends_the_blocks():
    text = BLOCK + BLOCK + FINAL
    trace = parse(text)
    reasoning, content = split_reasoning(text)
    end = trace.final_span.start  # the end of the last </takeaway>
    assert reasoning == text[:end] + "\n" and content == trace.final == FINAL


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.integers(0, 3),
    final=st.sampled_from(["", "\n", FINAL, "\n" + FINAL, "<gu", " x <guideline>"]),
    cut_at=st.lists(st.floats(0, 1), max_size=6),
)
def test_streamed_pieces_equal_the_whole_split(blocks, final, cut_at):
    text = BLOCK * blocks + final
    cuts = sorted({int(f * len(text)) for f in cut_at})
    reasoning, content = split_reasoning(text)
    assert (reasoning or "") + content == text
    assert streamed(text, cuts) == (reasoning, content)


def test_a_whole_guideline_tag_is_reasoning_at_once():
    """The first piece of an NPR answer is often just ``<guideline>``: it opens a block, so it goes out as
    reasoning in the same step (holding it until the next piece cost a step of time to first token); a partial
    tag still waits."""
    splitter = ReasoningSplitter()
    assert splitter.feed("<guideline>") == ("<guideline>", "")
    assert splitter.feed("\n<plan>") == ("\n<plan>", "")
    partial = ReasoningSplitter()
    assert partial.feed("<guide") == ("", "")
    assert partial.feed("line>") == ("<guideline>", "")
