"""The HTML report, the trajectory viewer and ``npr view`` (plus a headless-Chromium check)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from npr.cli.main import main
from npr.eval.report import bar_chart, build_report, line_chart, nice_max, scatter_chart, write_report
from npr.eval.viewer import (
    TraceFileError,
    block_execution,
    normalize_record,
    read_records,
    render_viewer_page,
    script_json,
)

NPR_TEXT = """<guideline>
<plan>1: add the tens</plan>
<plan>2: add the units</plan>
</guideline>
<step>
1: tens give twenty plus thirty = fifty
</step>
<step>
2: units give three plus four = seven
</step>
<takeaway>
fifty and seven make 57
</takeaway>
The answer is \\boxed{57}."""
MULTIVERSE_TEXT = (
    "Think.<Parallel><Goal><Outline>1: small cases</Outline><Outline>2: formula</Outline></Goal>"
    "<Path>1: n=1 gives 1</Path><Path>2: n(n+1)/2</Path><Conclusion>agree</Conclusion></Parallel>"
    "So \\boxed{55}."
)
EVIL = "I give up </script><script>window.__pwned=1</script> <!-- \u2028 & \\boxed{1}"


def sample(i: int, correct: bool, output: str = NPR_TEXT, **extra) -> dict:
    """Record i: benchmark math500 for i < 4 else aime24, problems p0 (i % 4 < 2) and p1, two samples each."""
    record = {
        "benchmark": "math500" if i < 4 else "aime24",
        "problem_id": f"p{i % 4 // 2}",
        "sample": i % 2,
        "problem": "What is 23 + 34?",
        "prompt": "SYSTEM\nWhat is 23 + 34?",
        "answer": "57",
        "output": output,
        "pred": "57" if correct else "58",
        "correct": correct,
        "reward": float(correct),
        "mode": "parallel",
        "finish_reason": "eos",
        "diagnostic": None,
        "parallel_blocks": 1,
        "branches_per_block": [2],
        "tokens": 120 + i,
        "critical_path_tokens": 70,
        "forward_passes": 75,
        "wall_time_s": 1.5,
    }
    record.update(extra)
    return record


def embedded_payload(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="npr-samples">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


# -- records --------------------------------------------------------------------------------------


def test_normalize_parses_npr_text_without_a_trace():
    record = normalize_record({"output": NPR_TEXT, "custom": 3})
    assert [len(b["steps"]) for b in record["trace"]["blocks"]] == [2]
    assert record["trace"]["blocks"][0]["steps"][1]["text"] == "units give three plus four = seven"
    assert record["format_valid"] is True and record["format_errors"] == []
    assert record["pred"] == "57" and record["block_exec"] == ["text"] and record["extra"] == {"custom": 3}


def test_normalize_keeps_runner_fields_and_reads_other_formats():
    invalid = normalize_record({"text": "no tags, \\boxed{3}", "pred": None})
    assert invalid["format_valid"] is False and invalid["format_errors"][0].startswith("no_block")
    assert invalid["pred"] is None  # the runner's null pred is kept
    multiverse = normalize_record(MULTIVERSE_TEXT)
    assert multiverse["trace"]["source_format"] == "multiverse" and multiverse["format_valid"] is None
    assert [s["text"] for s in multiverse["trace"]["blocks"][0]["steps"]] == ["n=1 gives 1", "n(n+1)/2"]
    r1 = normalize_record(
        {"response": "<Parallel><Path>a</Path><Path>b</Path></Parallel><Summary>s</Summary> \\boxed{2}"}
    )
    assert r1["trace"]["source_format"] == "parallel-r1" and r1["pred"] == "2"
    with pytest.raises(ValueError, match="no trace and no text field"):
        normalize_record({"answer": "1"})


def test_block_execution():
    assert block_execution({"parallel_blocks": 1}, 3) == ["parallel", "not_parallel", "not_parallel"]
    assert block_execution({"branches_per_block": [2, 2]}, 2) == ["parallel", "parallel"]
    assert block_execution({"mode": "sequential", "parallel_blocks": 0}, 2) == ["sequential", "sequential"]
    assert block_execution({}, 1) == ["text"]


def test_read_records_formats(tmp_path):
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(
        json.dumps(sample(0, True)) + "\n\n" + json.dumps({"text": MULTIVERSE_TEXT}) + "\n", encoding="utf-8"
    )
    assert [r["trace"]["source_format"] for r in read_records(jsonl)] == ["npr", "multiverse"]
    as_json = tmp_path / "s.json"
    as_json.write_text(json.dumps({"samples": [NPR_TEXT, {"output": NPR_TEXT}]}), encoding="utf-8")
    assert len(read_records(as_json)) == 2
    txt = tmp_path / "t.txt"
    txt.write_text(MULTIVERSE_TEXT, encoding="utf-8")
    assert read_records(txt)[0]["pred"] == "55"


@pytest.mark.parametrize(
    "content,words",
    [
        ('{"output": "x"}\n{oops\n', ":2: not valid JSON"),
        ('{"output": "x"}\n[1, 2]\n', ":2: a JSON list"),
        ('{"answer": "1"}\n', ":1: no trace and no text field"),
    ],
)
def test_read_records_errors_name_file_and_line(tmp_path, content, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TraceFileError, match=re.escape(str(path) + words)):
        read_records(path)


# -- page safety ----------------------------------------------------------------------------------


def test_script_json_cannot_close_the_tag():
    text = script_json({"s": EVIL})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"s": EVIL}


def test_viewer_page_embeds_outputs_safely():
    page = render_viewer_page([normalize_record(sample(0, False, output=EVIL))], title="t <b>")
    assert page.count("</script>") == 2  # the data tag and the app tag, nothing from the output
    assert "window.__pwned" not in page.split("npr-samples")[0] and "<title>t &lt;b&gt;</title>" in page
    assert embedded_payload(page)["samples"][0]["output"] == EVIL
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_payload_stores_each_problem_and_prompt_once():
    payload = embedded_payload(render_viewer_page([normalize_record(sample(i, True)) for i in range(4)]))
    assert payload["strings"] == ["What is 23 + 34?", "SYSTEM\nWhat is 23 + 34?"]
    assert {(s["problem_ref"], s["prompt_ref"]) for s in payload["samples"]} == {(0, 1)}


# -- charts ---------------------------------------------------------------------------------------


def test_nice_max():
    assert [nice_max(v) for v in (0.83, 1.0, 3.2, 120, 0, 2.5, 7)] == [1, 1, 5, 200, 1, 2.5, 10]


def _circles(svg: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg)]


def test_charts():
    bars = bar_chart([("a", 0.5), ("b", None), ("c", 1.0)], "acc", top=1.0)
    assert bars.count("<rect") == 2 and "n/a" in bars and bars.startswith("<svg")
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', bars)]
    assert heights[1] == pytest.approx(2 * heights[0])  # 1.0 is twice as tall as 0.5 on a 0..1 axis


def test_scatter_thins_a_big_run_but_keeps_its_spread():
    """10,000 points become a page-sized sample that still spans the whole range, in order."""
    few = _circles(scatter_chart([(i, i / 2, True) for i in range(100)], "s", "x", "y"))
    many = _circles(scatter_chart([(i, i / 2, True) for i in range(10_000)], "s", "x", "y"))
    assert len(few) == 100  # small runs are drawn whole
    assert 1_000 < len(many) < 10_000  # thinned, not dropped
    xs = [x for x, _ in many]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 0.95 * (max(x for x, _ in few) - min(x for x, _ in few))
    assert all(y_a >= y_b for (_, y_a), (_, y_b) in zip(many, many[1:]))  # y = x/2 rises: svg y falls


def test_line_chart_orders_points_by_step():
    line = line_chart([(2, 1.0), (1, 0.0), (3, 0.5)], "reward")
    points = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', line).group(1).split()]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    assert xs == sorted(xs) and len(points) == 3  # step 1, 2, 3 from left to right
    assert ys[1] < ys[2] < ys[0]  # reward 1.0 (step 2) highest, 0.0 (step 1) lowest: svg y grows downwards


# -- report ---------------------------------------------------------------------------------------


def test_report_has_table_plots_curves_and_viewer(tmp_path):
    correct = [True, True, True, False, True, True, False, False]  # aime24: p0 right twice, p1 wrong twice
    records = [sample(i, c) for i, c in enumerate(correct)]
    baseline = [dict(r, mode="sequential", parallel_blocks=0, branches_per_block=[]) for r in records]
    curves = {"stage1": [{"step": 1, "reward": -1.0, "format_valid_rate": 0.2}, {"step": 2, "reward": 0.5}]}
    path = write_report(
        tmp_path / "run",
        records,
        wall_time_s={"math500": 2.0, "aime24": 2.0},
        baseline_records=baseline,
        baseline_wall_time_s={"math500": 5.0, "aime24": 3.0},
        curves=curves,
    )
    assert path == tmp_path / "run" / "report.html"
    page = path.read_text(encoding="utf-8")
    row = re.search(r"<tr class=\"\"><th>aime24</th>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[:4] == ["4", "2", "50.0%", "50.0%"]  # samples, k, avg@2 (1 + 0) / 2, best@2 (1 + 0) / 2
    math_row = re.search(r"<tr class=\"\"><th>math500</th>(.*?)</tr>", page).group(1)
    assert re.findall(r"<td>(.*?)</td>", math_row)[2:4] == ["75.0%", "100.0%"]  # (1 + 1/2) / 2; both problems solved
    assert cells[-2:] == ["1.50×", "1.50×"]  # speedup 3 s / 2 s; tokens equal → TPS ratio equal
    assert "wall-clock speedup over baseline" in page and "branches per executed block" in page
    assert "Training curves" in page and ">format_valid_rate<" in page
    assert len(embedded_payload(page)["samples"]) == 8


def test_report_lists_problems_that_did_not_run(tmp_path):
    failure = {
        "benchmark": "math500",
        "problem_id": "p9",
        "failure": "prompt_too_long",
        "location": "m.jsonl:9",
        "message": "m.jsonl:9: problem 'p9': prompt_too_long: 5000 prompt tokens + ... exceed 4096",
    }
    page = build_report([sample(0, True)], failures=[failure, dict(failure, problem_id="p10", location="m.jsonl:10")])
    section = re.search(r'<section id="failures">(.*?)</section>', page, re.S).group(1)
    assert "Problems not evaluated (2)" in section and "prompt_too_long ×2" in section
    assert section.count("<tr><th>math500</th>") == 2 and "m.jsonl:10" in section
    assert '<section id="failures">' not in build_report([sample(0, True)])


def test_report_without_baseline_or_curves():
    page = build_report([sample(0, True)])
    assert ">speedup</th>" not in page and "over baseline" not in page and "Training curves" not in page
    assert "sum of per-sample times" in page


# -- npr view -------------------------------------------------------------------------------------


def test_npr_view_writes_a_page(tmp_path, capsys):
    src = tmp_path / "samples.jsonl"
    src.write_text("\n".join(json.dumps(sample(i, True)) for i in range(3)), encoding="utf-8")
    assert main(["view", str(src), "--out", str(tmp_path / "v.html")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(embedded_payload((tmp_path / "v.html").read_text(encoding="utf-8"))["samples"]) == 3
    assert main(["view", str(src)]) == 0 and (tmp_path / "samples.html").is_file()


def test_npr_view_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n", encoding="utf-8")
    assert main(["view", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: not valid JSON" in err and "Traceback" not in err


# -- headless Chromium ----------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium_dump(page_path, tmp_path) -> tuple[str, list[str]]:
    """(DOM after the scripts ran, console messages) of a page opened in headless Chromium."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("headless Chromium not found; install it with `apt-get install -y chromium` (Debian)")
    profile = tmp_path / f"profile-{page_path.stem}"
    out = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, [line for line in out.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.browser
def test_console_errors_are_detected(tmp_path):
    """The check below can fail: a page that throws is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>notDefined()</script></body></html>", encoding="utf-8")
    _, console = chromium_dump(page, tmp_path)
    assert any("notDefined" in line for line in console)


@pytest.mark.browser
def test_report_renders_branches_side_by_side_in_chromium(tmp_path):
    records = [
        sample(0, True),
        sample(
            1,
            False,
            output=EVIL,
            parallel_blocks=0,
            branches_per_block=[],
            finish_reason="invalid_schema",
            diagnostic={"kind": "no_block"},
        ),
    ]
    path = write_report(tmp_path, records, curves={"stage1": [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.4}]})
    dom, console = chromium_dump(path, tmp_path)
    assert console == [], console
    assert 'data-viewer-ready="1"' in dom and 'data-selected="0"' in dom
    columns = re.findall(r'<div class="branch" data-branch="(\d)">.*?<pre class="txt step-text">(.*?)</pre>', dom, re.S)
    assert columns == [("1", "tens give twenty plus thirty = fifty"), ("2", "units give three plus four = seven")]
    assert "executed in parallel by the engine" in dom and "window.__pwned" not in dom.split("npr-samples")[0]
    assert re.search(r'<div id="v-errors" class="v-errors" hidden="">', dom)  # no viewer error was shown


@pytest.mark.browser
def test_viewer_filters_stay_inside_the_side_panel_at_1400px(tmp_path):
    """The pipeline's report labels samples "NPR-Zero (parallel): chain_sum_2"; a select sized to
    its longest option used to overflow the 300 px side panel into the detail pane."""
    from chromium import Browser

    labels = ("seed model (plain)", "sequential RL baseline (plain)")
    records = [sample(i, True, benchmark=f"{label}: chain_sum_2") for label in labels for i in range(2)]
    path = write_report(tmp_path, records)
    controls = ("#f-bench", "#f-correct", "#f-kind", "#f-text")
    with Browser(tmp_path, width=1400) as browser:
        browser.goto(path.as_uri())
        browser.wait_for("document.body.dataset.viewerReady === '1'")
        side, main_pane = browser.rect(".v-side"), browser.rect(".v-main")
        for control in controls:
            box = browser.rect(control)
            assert side["left"] <= box["left"] and box["right"] <= side["right"], (control, box, side)
            assert box["right"] < main_pane["left"], (control, box, main_pane)
        assert browser.console_errors() == []
        # the check can fail: with the old rule (controls sized to their content) the select overflows
        browser.evaluate(
            "document.head.appendChild(Object.assign(document.createElement('style'),{textContent:"
            "'.v-filters{grid-template-columns:none}.v-filters select,.v-filters input{width:auto;min-width:auto}'}))"
            " && true"
        )
        assert browser.rect("#f-bench")["right"] > side["right"]
