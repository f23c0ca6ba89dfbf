"""What the server is doing, for the live page: every in-flight request and, for one, its text so far.

``GET /live`` answers a snapshot (the page polls it): the engine loop's numbers (running, queued, KV
blocks) and one row per in-flight request (queued or decoding, from any client: the page, curl, the
``openai`` client), read from the request's ``Generation`` on the event loop, where it is updated,
so a snapshot never sees a half-applied step. ``?follow=ID`` adds that request's choices: the content
so far (the flat canonical text) and the text of each branch still decoding. A request leaves the
list when its response ends.
"""

from __future__ import annotations

import time
import weakref

from npr.serve.responses import ChatFormat

LABEL_CHARS = 120


class LiveRequests:
    """The in-flight requests' formats, weakly held (a finished response's objects go as usual)."""

    def __init__(self):
        self._formats: weakref.WeakValueDictionary[str, ChatFormat] = weakref.WeakValueDictionary()
        self._labels: dict[str, tuple[str, str, float]] = {}  # id -> (endpoint, label, arrival)

    def add(self, fmt: ChatFormat, endpoint: str, label: str) -> None:
        self._formats[fmt.id] = fmt
        self._labels[fmt.id] = (endpoint, " ".join(label.split())[:LABEL_CHARS], time.time())

    def snapshot(self, stats: dict, follow: str | None = None) -> dict:
        for gone in [k for k in self._labels if k not in self._formats]:
            del self._labels[gone]
        now, rows, followed = time.time(), [], None
        for rid, fmt in list(self._formats.items()):
            g = fmt.g
            if g.done or g.closed:
                continue
            endpoint, label, arrived = self._labels[rid]
            started = any(job.started is not None for job in g.jobs)
            rows.append(
                {
                    "id": rid,
                    "endpoint": endpoint,
                    "label": label,
                    "age_s": round(now - arrived, 2),
                    "state": "decoding" if started else "queued",
                    "choices": len(g.streams),
                    "generated_tokens": sum(s.generated for s in g.streams),
                    "branches_decoding": sum(len(s.branch_text) for s in g.streams),
                }
            )
            if rid == follow:
                followed = {
                    "id": rid,
                    "label": label,
                    "choices": [
                        {
                            "index": c,
                            "content": s.text,
                            "done": s.done,
                            "branches": [
                                {"block": b, "branch": k, "text": t} for (b, k), t in sorted(s.branch_text.items())
                            ],
                        }
                        for c, s in enumerate(g.streams)
                    ],
                }
        rows.sort(key=lambda r: -r["age_s"])
        total = stats["kv_blocks_total"]
        server = {**stats, "kv_usage": round(stats["kv_blocks_used"] / total, 4) if total else 0.0}
        return {"server": server, "requests": rows, "follow": followed}


__all__ = ["LiveRequests"]
