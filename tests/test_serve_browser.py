"""The chat page at ``/`` in headless Chromium, against a server whose answers are forced into two branches."""

from __future__ import annotations

import pytest
from chromium import Browser

from npr.engine import Engine, EngineConfig, StructureForcer
from npr.serve import ServeConfig, create_app
from npr.serve.background import BackgroundServer


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
        browser.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Enter", "code": "Enter",
                                                "windowsVirtualKeyCode": 13, "text": "\r"})
        browser.wait_for("document.body.dataset.state !== 'ready'", timeout=10)
        browser.wait_for("document.body.dataset.state === 'done' || document.body.dataset.state === 'error'")
        browser.screenshot(tmp_path / "page.png")
        assert browser.evaluate("document.body.dataset.state") == "done", browser.evaluate("document.body.innerText")
        assert int(browser.evaluate("document.body.dataset.liveColumns")) >= 2  # side by side while decoding
        columns = browser.evaluate("Array.from(document.querySelectorAll('.answer .block .branch'))"
                                   ".map(c => [c.dataset.branch, c.querySelector('.step-text').textContent.length,"
                                   " c.getBoundingClientRect().left, c.getBoundingClientRect().top])")
        assert [c[0] for c in columns] == ["1", "2"] and all(c[1] > 50 for c in columns)
        assert columns[0][2] < columns[1][2] and abs(columns[0][3] - columns[1][3]) < 1  # one row, two columns
        assert browser.evaluate("document.querySelector('.answer .take').textContent").startswith("takeaway")
        assert browser.evaluate("document.querySelector('.answer mark.ans').textContent") == "\\boxed{42}"
        chips = browser.evaluate("document.querySelector('.answer .chips').textContent")
        assert "parallel blocks: 1" in chips and "branches/block: 2" in chips and "finish: stop" in chips
        assert browser.console_errors() == []
        assert engine.pool.used_blocks == 0
