"""``npr view`` checks each record's shape before rendering: a record it cannot render is skipped and listed
with its file:line (a file of nothing else is refused), and the page's embedded JSON always parses, NaN
and infinities included. Before (issue 28): ``trace.blocks: null`` was a traceback, a NaN token count
wrote a page that showed 0 samples, and ``plans: "ab"`` broke the page's script."""

from __future__ import annotations

import json
import re

import pytest

from npr.cli.main import main
from npr.eval.viewer import TraceFileError, normalize_record, read_records, render_viewer_page, script_json

GOOD = {"benchmark": "b", "problem_id": "p0", "output": "<answer>1</answer>", "tokens": 10}
TRACE = {
    "blocks": [
        {
            "preamble": "",
            "plans": [{"label": "1", "text": "a"}],
            "steps": [{"label": "1", "text": "s"}],
            "takeaway": "t",
        }
    ],
    "final": "",
    "answer": "1",
}


def payload(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="npr-samples">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))  # the strict parser, as the page's JSON.parse: no NaN, no Infinity


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"trace": {**TRACE, "blocks": None}}, "trace.blocks is null, not a list of blocks"),
        ({"trace": {**TRACE, "blocks": [{**TRACE["blocks"][0], "plans": "ab"}]}}, "trace.blocks[0].plans is a string"),
        (
            {"trace": {**TRACE, "blocks": [{**TRACE["blocks"][0], "steps": [3]}]}},
            "trace.blocks[0].steps[0] is a number",
        ),
        ({"trace": {**TRACE, "blocks": ["x"]}}, "trace.blocks[0] is a string, not an object"),
        ({"trace": {**TRACE, "answer": ["1"]}}, "trace.answer is a list, not a string"),
        ({"tokens": "many"}, "field tokens is a string, not a number"),
        ({"correct": "yes"}, "field correct is a string, not true/false"),
        ({"branches_per_block": "2"}, "field branches_per_block is a string, not a list of numbers"),
        ({"format_errors": "bad"}, "field format_errors is a string, not a list of strings"),
        ({"problem": {"text": "x"}}, "field problem is an object, not a string"),
    ],
)
def test_records_of_another_shape_are_skipped_and_listed_with_their_line(tmp_path, capsys, bad, words):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, **bad}) + "\n", encoding="utf-8")
    out = tmp_path / "v.html"
    assert main(["view", str(src), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"npr view: warning: skipped {src}:2: {words}"), captured.err
    assert "Traceback" not in captured.err and "1 record(s) of another shape skipped" in captured.out
    assert len(payload(out.read_text(encoding="utf-8"))["samples"]) == 1


def test_a_file_of_nothing_but_bad_records_is_refused(tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({**GOOD, "trace": {**TRACE, "blocks": None}}) + "\n" for _ in range(3)))
    assert main(["view", str(src), "--out", str(tmp_path / "v.html")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"npr view: error: {src}:1: trace.blocks is null, not a list of blocks; fix or remove the record "
        "(and 2 more record(s) like it)\n"
    ), err
    assert not (tmp_path / "v.html").exists()
    with pytest.raises(TraceFileError, match=":1: trace.blocks is null"):  # a caller without a skipped list
        read_records(src)


def test_non_finite_numbers_keep_the_page_json_valid(tmp_path):
    records = [
        normalize_record(
            {
                **GOOD,
                "tokens": float("nan"),
                "wall_time_s": float("inf"),
                "reward": float("-inf"),
                "extra_metric": [float("nan")],
            }
        )
    ]
    data = payload(render_viewer_page(records))
    sample = data["samples"][0]
    assert (sample["tokens"], sample["wall_time_s"], sample["reward"]) == ("NaN", "Infinity", "-Infinity")
    assert sample["extra"]["extra_metric"] == ["NaN"]
    assert json.loads(script_json({"x": float("nan")})) == {"x": "NaN"}


def test_a_nan_token_count_in_a_file_still_shows_every_sample(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps(GOOD) + "\n" + '{"output": "<answer>2</answer>", "tokens": NaN}\n', encoding="utf-8")
    assert main(["view", str(src), "--out", str(tmp_path / "v.html")]) == 0
    assert len(payload((tmp_path / "v.html").read_text(encoding="utf-8"))["samples"]) == 2


@pytest.mark.browser
def test_the_page_of_odd_records_runs_without_errors_in_chromium(tmp_path):
    """The page's own script parses the data and renders the sample (no console errors, no viewer error box)."""
    from test_report import chromium_dump

    src = tmp_path / "s.jsonl"
    src.write_text(
        json.dumps({**GOOD, "trace": TRACE, "tokens": float("nan")})
        + "\n"
        + json.dumps({**GOOD, "trace": {**TRACE, "blocks": [{**TRACE["blocks"][0], "plans": "ab"}]}})
        + "\n",
        encoding="utf-8",
    )
    page = tmp_path / "v.html"
    assert main(["view", str(src), "--out", str(page)]) == 0
    dom, console = chromium_dump(page, tmp_path)
    assert console == [], console
    assert 'data-viewer-ready="1"' in dom
    assert re.search(r'<div id="v-errors" class="v-errors" hidden="">', dom)
