"""The chat page at ``/`` in headless Chromium, against a server whose answers are forced into two branches."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from chromium import Browser

from npr.engine import Engine, EngineConfig, StructureForcer
from npr.serve import ServeConfig, create_app
from npr.serve.background import BackgroundServer

try:  # the openai client's HTTP library: httpx2 in openai >= 3, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx


@pytest.mark.browser
def test_the_page_streams_branches_side_by_side(tiny_llama, tmp_path):
    model, tok = tiny_llama
    # long branches, so that several frames render while both decode
    forcer = StructureForcer(tok, [[150, 120]], plan_tokens=3, takeaway_tokens=6, final_tokens=3, answer="42")
    engine = Engine(model, tok, EngineConfig(debug=True, kv_cache_tokens=1 << 15))
    app = create_app(engine, ServeConfig(model_name="tiny", system_prompt="none", logits_processors=(forcer,)))
    with BackgroundServer(app) as server, Browser(tmp_path, width=1400) as browser:
        browser.goto(server.url + "/")
        browser.wait_for("document.body.dataset.state === 'ready'")
        browser.evaluate("document.getElementById('q').focus()")
        browser.call("Input.insertText", {"text": "What is 40 + 2?"})
        browser.call(
            "Input.dispatchKeyEvent",
            {"type": "keyDown", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"},
        )
        browser.wait_for("document.body.dataset.state !== 'ready'", timeout=10)
        browser.wait_for("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
        browser.screenshot(tmp_path / "page.png")
        assert browser.evaluate("document.body.dataset.state") == "done", browser.evaluate("document.body.innerText")
        assert int(browser.evaluate("document.body.dataset.liveColumns")) >= 2  # side by side while decoding
        columns = browser.evaluate(
            "Array.from(document.querySelectorAll('.answer .block .branch'))"
            ".map(c => [c.dataset.branch, c.querySelector('.step-text').textContent.length,"
            " c.getBoundingClientRect().left, c.getBoundingClientRect().top])"
        )
        assert [c[0] for c in columns] == ["1", "2"] and all(c[1] > 50 for c in columns)
        assert columns[0][2] < columns[1][2] and abs(columns[0][3] - columns[1][3]) < 1  # one row, two columns
        assert browser.evaluate("document.querySelector('.answer .take').textContent").startswith("takeaway")
        assert browser.evaluate("document.querySelector('.answer mark.ans').textContent") == "\\boxed{42}"
        chips = browser.evaluate("document.querySelector('.answer .chips').textContent")
        assert "parallel blocks: 1" in chips and "branches/block: 2" in chips and "finish: stop" in chips
        assert browser.console_errors() == []
        assert engine.pool.used_blocks == 0


class Slow:
    """A logits processor that sleeps a little per row: requests stay in flight long enough to be watched."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, stream, row):
        time.sleep(self.seconds)
        return row


@pytest.mark.browser
def test_the_page_shows_the_server_and_follows_a_request(tiny_llama, tmp_path):
    """Three streaming requests sent with a plain HTTP client (not the page) are listed with the queue and KV usage;
    clicking one follows it: its branches decode side by side in the page."""
    model, tok = tiny_llama
    forcer = StructureForcer(tok, [[120, 100]], plan_tokens=3, takeaway_tokens=6, final_tokens=3, answer="42")
    engine = Engine(model, tok, EngineConfig(debug=True, kv_cache_tokens=1 << 15))
    app = create_app(
        engine, ServeConfig(model_name="tiny", system_prompt="none", logits_processors=(forcer, Slow(0.004)))
    )
    questions = ["What is 40 + 2?", "What is 6 * 7?", "What is 50 - 8?"]

    def stream(question):  # as curl -N would: read the SSE lines to the end
        body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "stream": True, "max_tokens": 400}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            return sum(1 for line in r.iter_lines() if line.startswith("data: "))

    with BackgroundServer(app) as server, Browser(tmp_path, width=1400) as browser, ThreadPoolExecutor(3) as pool:
        browser.goto(server.url + "/")
        browser.wait_for("document.body.dataset.state === 'ready'")
        futures = [pool.submit(stream, q) for q in questions]
        browser.wait_for("+document.body.dataset.serverRequests === 3", timeout=30)
        browser.wait_for(
            "/3 running · 0 queued · KV \\d+\\/\\d+ blocks/.test(document.getElementById('srv-stats').textContent)",
            timeout=30,
        )
        stats = browser.evaluate("document.getElementById('srv-stats').textContent")
        assert "3 running" in stats and "0 queued" in stats and "KV " in stats, stats
        labels = browser.evaluate(
            "Array.from(document.querySelectorAll('#srv-list button.req')).map(b => b.textContent)"
        )
        assert sorted(q for q in questions if any(q in label for label in labels)) == sorted(questions), labels
        target = browser.evaluate("document.querySelector('#srv-list button.req').dataset.id")
        box = browser.rect(f"#srv-list button.req[data-id='{target}']")
        x, y = (box["left"] + box["right"]) / 2, (box["top"] + box["bottom"]) / 2
        for kind in ("mousePressed", "mouseReleased"):  # a real click
            browser.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})
        browser.wait_for(f"document.body.dataset.follow === '{target}'", timeout=10)
        browser.wait_for("+document.body.dataset.followColumns >= 2", timeout=30)
        browser.wait_for("document.querySelectorAll('#follow-box .branch.live').length >= 2", timeout=30)
        browser.screenshot(tmp_path / "server.png")
        columns = browser.evaluate(
            "Array.from(document.querySelectorAll('#follow-box .branch'))"
            ".map(c => [c.dataset.branch, c.getBoundingClientRect().left,"
            " c.getBoundingClientRect().top])"
        )
        assert [c[0] for c in columns] == ["1", "2"] and columns[0][1] < columns[1][1]
        assert abs(columns[0][2] - columns[1][2]) < 1  # side by side
        assert all(f.result(timeout=120) > 0 for f in futures)
        browser.wait_for("+document.body.dataset.serverRequests === 0", timeout=30)
        assert "(ended)" in browser.evaluate("document.getElementById('follow-title').textContent")
        assert browser.console_errors() == []
    assert engine.pool.used_blocks == 0
