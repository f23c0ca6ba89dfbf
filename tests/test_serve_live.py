"""``GET /live``: the server-wide snapshot behind the live page (requests from any client, one followed)."""

from __future__ import annotations

import threading
import time

try:  # the openai client's HTTP library: httpx2 in openai >= 3, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

from npr.engine import Engine, EngineConfig, StructureForcer
from npr.serve import ServeConfig, create_app
from npr.serve.background import BackgroundServer


def test_live_lists_a_curl_request_follows_it_and_needs_the_key(tiny_llama):
    model, tok = tiny_llama
    forcer = StructureForcer(tok, [[60, 50]], plan_tokens=2, takeaway_tokens=3, final_tokens=2, answer="1")
    release = threading.Event()

    def hold(stream, row):  # the request decodes until the test has looked at it
        release.wait(30)
        return row

    engine = Engine(model, tok, EngineConfig(debug=True, kv_cache_tokens=1 << 14))
    config = ServeConfig(model_name="tiny", system_prompt="none", api_key="k", logits_processors=(forcer, hold))
    key = {"Authorization": "Bearer k"}
    with BackgroundServer(create_app(engine, config)) as server:
        assert httpx.get(server.url + "/live").status_code == 401
        body = {"model": "tiny", "messages": [{"role": "user", "content": "What   is\n1 + 0?"}], "max_tokens": 300}
        sent = threading.Thread(
            target=lambda: httpx.post(server.url + "/v1/chat/completions", json=body, headers=key, timeout=60)
        )
        sent.start()
        deadline = time.monotonic() + 30
        while not (snap := httpx.get(server.url + "/live", headers=key).json())["requests"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (row,) = snap["requests"]
        assert row["endpoint"] == "chat" and row["label"] == "What is 1 + 0?" and row["choices"] == 1
        assert snap["server"]["kv_blocks_total"] == engine.pool.num_blocks and 0 <= snap["server"]["kv_usage"] <= 1
        assert snap["follow"] is None
        followed = httpx.get(server.url + "/live", params={"follow": row["id"]}, headers=key).json()["follow"]
        assert followed == {
            "id": row["id"],
            "label": row["label"],  # held in its first step: nothing decoded yet
            "choices": [{"index": 0, "content": "", "done": False, "branches": []}],
        }
        release.set()
        sent.join(60)
        assert httpx.get(server.url + "/live", headers=key).json()["requests"] == []  # ended: gone
