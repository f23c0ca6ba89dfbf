"""The server's Python per engine step: what ``npr serve`` adds on the event loop, next to the engine step.

``benchmarks/serve_speed.py`` measures the whole server against the engine (HTTP, threads, two
processes); this script isolates the part that grows with the tokens per step and holds the GIL
while the engine thread works: turning each step's ``StreamDelta``s into SSE chunks. It runs the
serve_speed workload once through the engine directly, records every step's deltas and results,
then replays them through the serving path (``SampleStream``: incremental decode, branch text,
join; ``ChatFormat.chunks`` with the reasoning split; JSON encoding) and reports CPU ms per step
next to the engine's own ms per step. On a GPU the engine step of a 4B model is ~10-30 ms, so
this ratio, not the CPU one, says how much the event loop can slow the engine thread there.

    OMP_NUM_THREADS=1 python benchmarks/serve_overhead.py --model embedded --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

from npr.engine import Engine
from npr.serve.responses import FINAL, ChatFormat, Generation, _json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_speed  # the same workload (after the path insert above)


def record(engine: Engine, prompts, params) -> tuple[list, float]:
    engine.submit(prompts, params)
    events, start = [], time.perf_counter()
    while engine.scheduler.has_work():
        events.append(engine.step())
    return events, (time.perf_counter() - start) / max(1, len(events))


def replay(events, tok, prompts, params) -> float:
    """CPU seconds of the serving path over all ``events``: one chat ``Generation`` per prompt."""
    eos = frozenset({tok.eos_token_id})
    formats = []
    for i in range(len(prompts)):
        job = SimpleNamespace(index=i, params=params, sink=None, prompt_ids=prompts[i], submitted=0.0, started=0.0)
        formats.append(ChatFormat(Generation(None, [job], tok, eos, []), "bench", False, reasoning=True))
    start = time.thread_time()
    for fmt in formats:
        "".join(f"data: {_json(chunk)}\n\n" for chunk in fmt.opening())
    for event in events:
        for d in event.deltas:
            fmt = formats[d.prompt_index]
            update = fmt.g.streams[0].feed(d)
            "".join(f"data: {_json(chunk)}\n\n" for chunk in fmt.chunks(0, update))
        for r in event.finished:
            fmt = formats[r.prompt_index]
            update = fmt.g.streams[0].finish(r)
            "".join(f"data: {_json(chunk)}\n\n" for u in (update, FINAL) for chunk in fmt.chunks(0, u))
    return time.thread_time() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    ss_args = serve_speed.parse_args(["--model", args.model, "--dtype", args.dtype, "--requests", str(args.requests)])
    model, tok = serve_speed.load(ss_args)
    prompts, _, params, config = serve_speed.workload(tok, ss_args)
    events, step_s = record(Engine(model, tok, config), prompts, params)
    streams = statistics.median(len(e.deltas) for e in events)
    serving = statistics.median(replay(events, tok, prompts, params) for _ in range(args.repeats)) / len(events)
    print(
        f"# serve_overhead: {args.model}, {args.dtype}, {args.requests} requests, {len(events)} steps, "
        f"median {streams:.0f} deltas/step"
    )
    print("| engine ms/step | serving path CPU ms/step | serving / engine |")
    print("|---|---|---|")
    print(f"| {1e3 * step_s:.1f} | {1e3 * serving:.2f} | {serving / step_s:.4f} |")


if __name__ == "__main__":
    main()
