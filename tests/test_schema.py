"""npr.schema: parse, validate, format_score, render, extract_answer, converters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npr.schema import (
    PENALTIES,
    SchemaParseError,
    detect_format,
    extract_answer,
    format_score,
    from_multiverse,
    from_parallel_r1,
    parse,
    render,
    validate,
)

CANONICAL = """\
<guideline>
<plan>1: add the tens</plan>
<plan>2: add the units</plan>
</guideline>
<step>
1: 20 + 30 = 50
</step>
<step>
2: 3 + 4 = 7
</step>
<takeaway>
50 + 7 = 57
</takeaway>
<guideline>
<plan>1: check by counting up</plan>
</guideline>
<step>
1: 23 + 34: 23 + 30 = 53, 53 + 4 = 57
</step>
<takeaway>
both agree on 57
</takeaway>
The answer is \\boxed{57}."""


def kinds(text: str) -> list[str]:
    return [e.kind for e in validate(text)]


# ----------------------------------------------------------------------------- parse / render


def test_parse_canonical_tree_and_offsets():
    trace = parse(CANONICAL)
    assert trace.num_branches == [2, 1]
    b1 = trace.blocks[0]
    assert [p.label for p in b1.plans] == [1, 2]
    assert [p.text for p in b1.plans] == ["add the tens", "add the units"]
    assert [s.text for s in b1.steps] == ["20 + 30 = 50", "3 + 4 = 7"]
    assert b1.takeaway == "50 + 7 = 57"
    assert trace.final == "The answer is \\boxed{57}."
    assert trace.answer == "57"
    # offsets point at the tags in the original text
    assert CANONICAL[b1.span.start : b1.span.start + 11] == "<guideline>"
    assert CANONICAL[b1.span.end - 11 : b1.span.end] == "</takeaway>"
    step2 = b1.steps[1]
    assert CANONICAL[step2.span.start : step2.span.end] == "<step>\n2: 3 + 4 = 7\n</step>"


def test_render_is_fixed_point_on_canonical_text():
    assert render(parse(CANONICAL)) == CANONICAL


def test_render_normalises_whitespace_and_labels():
    messy = (
        "<guideline>  <plan>  first idea </plan><plan>2. second idea</plan>\n</guideline>"
        "<step>1:   do the first\n\n</step>\n<step>do the second one</step>"
        "<takeaway>   same result here </takeaway>  so \\boxed{4}  "
    )
    out = render(parse(messy))
    assert out == (
        "<guideline>\n<plan>1: first idea</plan>\n<plan>2: second idea</plan>\n</guideline>\n"
        "<step>\n1: do the first\n</step>\n<step>\n2: do the second one\n</step>\n"
        "<takeaway>\nsame result here\n</takeaway>\nso \\boxed{4}"
    )
    assert render(parse(out)) == out


def test_a_bare_colon_is_a_missing_label_not_text():
    # a model that drops the number writes "<plan>: idea"; the canonical form must not become "1: : idea"
    trace = parse(
        "<guideline><plan>: idea</plan><plan> 2 :other</plan></guideline><step>:  do it</step>"
        "<step>2: do that</step><takeaway>done here</takeaway>\\boxed{1}"
    )
    assert [(p.label, p.text) for p in trace.blocks[0].plans] == [(None, "idea"), (2, "other")]
    assert trace.blocks[0].steps[0].text == "do it"
    assert render(trace).startswith(
        "<guideline>\n<plan>1: idea</plan>\n<plan>2: other</plan>\n</guideline>\n<step>\n1: do it\n</step>"
    )


def test_parse_starts_after_prompt():
    prompt = "Use <guideline> and <step> tags. Question: 1+1?\n"
    text = prompt + CANONICAL
    with pytest.raises(SchemaParseError):
        parse(text)
    trace = parse(text, start=len(prompt))
    assert trace.num_branches == [2, 1]
    assert text[trace.blocks[0].span.start :].startswith("<guideline>")


def test_parse_plain_answer_has_no_blocks():
    trace = parse("2 + 2 = 4, so \\boxed{4}")
    assert trace.blocks == () and trace.answer == "4"


def test_strict_parse_names_the_violation():
    bad = "<guideline><plan>1: a plan</plan></guideline><step>1: work <plan> oops</step><takeaway>fine enough</takeaway>\\boxed{1}"
    with pytest.raises(SchemaParseError, match="tag_in_step"):
        parse(bad)
    assert parse(bad, strict=False).num_branches == [1]


def test_non_utf8_bytes_are_a_clear_error():
    with pytest.raises(ValueError, match="not UTF-8"):
        parse(b"\xff\xfe<guideline>")
    assert parse(CANONICAL.encode()).num_branches == [2, 1]


# ----------------------------------------------------------------------------- validate / format_score


def test_valid_trace_scores_zero():
    assert validate(CANONICAL) == []
    assert format_score(CANONICAL) == 0.0


@pytest.mark.parametrize(
    "text, expected_kinds, expected_score",
    [
        # no block at all: -1.5, stop
        ("just an answer \\boxed{3}", ["no_block"], -1.5),
        # tags before the first block: -1.5, stop (the later missing answer is not scored)
        (
            "<step><guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway>",
            ["stray_tag", "missing_answer"],
            -1.5,
        ),
        # text between blocks: -1.5, stop
        (
            "<guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway> hmm "
            "<guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway>\\boxed{1}",
            ["text_between_blocks"],
            -1.5,
        ),
        # zero plans: -1.0, stop
        (
            "<guideline>think</guideline><step>1: abcdef</step><takeaway>abcdef</takeaway>\\boxed{1}",
            ["no_plans", "plan_step_mismatch"],
            -1.0,
        ),
        # steps != plans: -1.0, stop
        (
            "<guideline><plan>1: abc</plan><plan>2: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway>\\boxed{1}",
            ["plan_step_mismatch"],
            -1.0,
        ),
        # text in guideline -0.4, text between plans -0.2, text between steps -0.2: -0.8
        (
            "<guideline>so <plan>1: abc</plan> and <plan>2: abc</plan></guideline><step>1: abcdef</step> x "
            "<step>2: abcdef</step><takeaway>abcdef</takeaway>\\boxed{1}",
            ["text_in_guideline", "text_between_plans", "text_between_steps"],
            -0.8,
        ),
        # short plan (<3), two short steps (<6), short takeaway (<6): 4 x -0.4
        (
            "<guideline><plan>1:</plan><plan>2: ok</plan></guideline><step>1: ab</step><step>2:  abc </step>"
            "<takeaway>ab</takeaway>\\boxed{1}",
            ["short_plan", "short_step", "short_step", "short_takeaway"],
            -1.6,
        ),
        # tags in the final text -1.0 plus a missing answer -1.0
        (
            "<guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway> and <step>",
            ["tag_in_final", "missing_answer"],
            -2.0,
        ),
        # nothing after the last block still needs the answer (the reference code skipped this)
        (
            "<guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway>",
            ["missing_answer"],
            -1.0,
        ),
        # an empty box counts as missing
        (
            "<guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway>\\boxed{ }",
            ["missing_answer"],
            -1.0,
        ),
        # a tag inside a step is penalised on the step (the reference tested the plan's text)
        (
            "<guideline><plan>1: abc</plan></guideline><step>1: abc <plan> def</step><takeaway>abcdef</takeaway>\\boxed{1}",
            ["tag_in_step"],
            -0.4,
        ),
        # a short takeaway is penalised even when its plan is fine
        (
            "<guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>ok</takeaway>\\boxed{1}",
            ["short_takeaway"],
            -0.4,
        ),
        # more than 5 plans
        (
            "<guideline>"
            + "".join(f"<plan>{i}: abc</plan>" for i in range(1, 7))
            + "</guideline>"
            + "".join(f"<step>{i}: abcdef</step>" for i in range(1, 7))
            + "<takeaway>abcdef</takeaway>\\boxed{1}",
            ["too_many_plans"],
            -1.0,
        ),
        # text before the first block
        (
            "Sure. <guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway>\\boxed{1}",
            ["text_before_first_block"],
            -0.4,
        ),
        # everything at once clamps at -2
        (
            "x <guideline><plan>1</plan><plan>2</plan></guideline><step>1</step><step>2</step><takeaway>a</takeaway><step>",
            [
                "text_before_first_block",
                "short_plan",
                "short_plan",
                "short_step",
                "short_step",
                "short_takeaway",
                "tag_in_final",
                "missing_answer",
            ],
            -2.0,
        ),
    ],
)
def test_format_score_hand_computed(text, expected_kinds, expected_score):
    assert kinds(text) == expected_kinds
    assert format_score(text) == pytest.approx(expected_score)


def test_stop_penalty_adds_to_what_came_before():
    # block 1: text between plans (-0.2); block 2: no plans (-1.0, stop); block 2's short takeaway is not scored
    text = (
        "<guideline><plan>1: abc</plan>x<plan>2: abc</plan></guideline><step>1: abcdef</step><step>2: abcdef</step>"
        "<takeaway>abcdef</takeaway><guideline></guideline><step>1: abcdef</step><takeaway>ab</takeaway>\\boxed{1}"
    )
    assert kinds(text)[:2] == ["text_between_plans", "no_plans"]
    assert format_score(text) == pytest.approx(-1.2)


def test_errors_carry_positions():
    text = "<guideline><plan>1: abc</plan></guideline><step>1: abcdef</step><takeaway>abcdef</takeaway> done <plan>"
    err = next(e for e in validate(text) if e.kind == "tag_in_final")
    assert text[err.offset :].startswith("<plan>")
    assert "after the last complete block" in err.message


def test_every_kind_has_a_negative_penalty():
    assert all(p < 0 for p, _ in PENALTIES.values())


# ----------------------------------------------------------------------------- properties

_words = (
    st.text(alphabet="abcdefghij +=0123456789", min_size=6, max_size=30)
    .map(str.strip)
    .filter(lambda s: len(s.replace(" ", "")) >= 6)
)


@st.composite
def traces(draw):
    from npr.schema import Block, ParallelTrace, Plan, Span, Step

    z = Span(0, 0)
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(1, 5))
        blocks.append(
            Block(
                plans=tuple(Plan(i + 1, draw(_words), z) for i in range(k)),
                steps=tuple(Step(i + 1, draw(_words), z) for i in range(k)),
                takeaway=draw(_words),
                span=z,
            )
        )
    final = draw(_words) + " \\boxed{" + draw(st.text(alphabet="0123456789", min_size=1, max_size=4)) + "}"
    return ParallelTrace(blocks=tuple(blocks), final=final, answer=None, final_span=z)


@settings(max_examples=80, deadline=None)
@given(traces())
def test_render_parse_round_trip(trace):
    text = render(trace)
    assert validate(text) == []
    parsed = parse(text)
    assert [[p.text for p in b.plans] for b in parsed.blocks] == [[p.text for p in b.plans] for b in trace.blocks]
    assert [[s.text for s in b.steps] for b in parsed.blocks] == [[s.text for s in b.steps] for b in trace.blocks]
    assert render(parsed) == text


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "<guideline>",
                "</guideline>",
                "<plan>",
                "</plan>",
                "<step>",
                "</step>",
                "<takeaway>",
                "</takeaway>",
                "1: abc",
                "abcdefgh",
                " ",
                "\n",
                "\\boxed{7}",
            ]
        ),
        max_size=30,
    )
)
def test_score_is_zero_exactly_when_valid(pieces):
    text = "".join(pieces)
    score = format_score(text)
    assert -2.0 <= score <= 0.0
    assert (score == 0.0) == (validate(text) == [])


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{5} and a cut \\boxed{\\frac{1}{", "5"),
        ("no box here", None),
        ("\\boxed{ x^{2} }", "x^{2}"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


# ----------------------------------------------------------------------------- converters

MULTIVERSE = """Let me think about 23 + 34.
<Parallel>
<Goal>Split the sum.
<Outline>1: add the tens</Outline>
<Outline>2: add the units</Outline>
</Goal>
<Path>1: 20 + 30 = 50</Path>
<Path>2: 3 + 4 = 7</Path>
<Conclusion>50 + 7 = 57</Conclusion>
</Parallel>
So the answer is \\boxed{57}."""

PARALLEL_R1 = """First, 23 + 34.
<Parallel><Path>20 + 30 = 50 and 3 + 4 = 7</Path><Path>23 + 34 = 57 directly</Path></Parallel>
<Summary>Both give 57.</Summary>
Final: \\boxed{57}"""


def test_from_multiverse():
    trace = from_multiverse(MULTIVERSE)
    assert trace.source_format == "multiverse"
    assert trace.num_branches == [2]
    b = trace.blocks[0]
    assert [p.text for p in b.plans] == ["add the tens", "add the units"]
    assert [s.text for s in b.steps] == ["20 + 30 = 50", "3 + 4 = 7"]
    assert b.takeaway == "50 + 7 = 57" and b.preamble == "Let me think about 23 + 34."
    assert trace.answer == "57"
    assert validate(render(trace)) == []  # converts into a valid NPR trace


def test_from_parallel_r1():
    trace = from_parallel_r1(PARALLEL_R1)
    assert trace.source_format == "parallel-r1"
    assert trace.num_branches == [2]
    assert trace.blocks[0].plans == ()
    assert trace.blocks[0].takeaway == "Both give 57."
    assert trace.final == "Final: \\boxed{57}" and trace.answer == "57"


def test_detect_format():
    assert detect_format(CANONICAL) == "npr"
    assert detect_format(MULTIVERSE) == "multiverse"
    assert detect_format(PARALLEL_R1) == "parallel-r1"
