"""Serving speed: ``npr serve`` against the engine called directly, ratios measured in one run.

The same workload both ways: N chat prompts (the NPR instruction + a distinct question), each
answer forced by a ``StructureForcer`` into one block of k branches of a fixed length (greedy;
every text token is the model's own choice), so both sides generate the same tokens.

- **direct**: ``Engine.generate`` on the N prompt id lists at once, in this process;
- **server**: ``npr serve``'s app in a child process (uvicorn, its own engine, the same model and
  settings); N client threads post streaming ``/v1/chat/completions`` at once and read every
  SSE chunk. Wall time runs from the first request sent to the last ``[DONE]`` read.

Throughput is generated tokens (every branch, ``usage.completion_tokens``) per second of wall time;
the table gives server / direct (goal >= 0.9). Time to first token (TTFT) is from a request's
send to its first chunk carrying text (content or a branch), at 1 and at N concurrent requests,
next to the engine's own time to the first token of those requests. Rounds alternate direct and
server; medians are reported. CPU ms per generated token compares the work of each side (the server's
whole process from /proc, the direct side's process time), which unlike wall time does not depend on
what else shares the cores. The last line reads ``server/direct at N requests: X`` (wall throughput).

    flock -x /tmp/npr-cpu.lock python benchmarks/serve_speed.py --model embedded --dtype bfloat16
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests (default: 32)")
    p.add_argument("--branches", type=int, default=2, help="branches of the forced block (default: 2)")
    p.add_argument("--branch-tokens", type=int, default=48, help="text tokens per branch (default: 48)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in both processes (default: 1)")
    p.add_argument("--rounds", type=int, default=2, help="alternating direct/server rounds (default: 2)")
    p.add_argument("--as-server", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def workload(tok, args):
    """(prompt id lists, questions, sampling params, engine config) shared by both sides."""
    from npr.prompts import encode_prompt

    questions = [f"What is {17 * i + 3} + {29 * i + 11}?" for i in range(args.requests)]
    forcer = StructureForcer(
        tok, [[args.branch_tokens] * args.branches], plan_tokens=4, takeaway_tokens=8, final_tokens=4, answer="0"
    )
    budget = args.branches * (args.branch_tokens + 12) + 96
    params = SamplingParams(max_new_tokens=budget, temperature=0, logprobs=False, logits_processors=(forcer,))
    prompts = [encode_prompt(tok, q) for q in questions]
    # the engine reserves a request's worst case: its budget plus a partial block per segment it could open
    per_request = max(len(p) for p in prompts) + budget + 16 * (min(48, -(-budget // 5)) + 2)
    config = EngineConfig(
        mode="parallel", max_num_seqs=max(64, args.requests), kv_cache_tokens=args.requests * per_request
    )
    return prompts, questions, params, config


def load(args):
    from npr.models import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    return load_model_and_tokenizer(args.model, dtype=args.dtype)


def run_server(args) -> None:
    """Child process: serve the same engine settings; print the port; run until stdin closes."""
    from npr.serve import ServeConfig, create_app
    from npr.serve.background import BackgroundServer

    model, tok = load(args)
    _, _, params, config = workload(tok, args)
    app = create_app(
        Engine(model, tok, config),
        ServeConfig(model_name="bench", max_queue=4 * args.requests, logits_processors=params.logits_processors),
    )
    with BackgroundServer(app) as server:
        print(f"PORT {server.port}", flush=True)
        sys.stdin.read()


def stream_one(port: int, question: str, budget: int, start: threading.Event, out: dict) -> None:
    """One streaming chat request; records its send time, first-text time, end time, text and usage."""
    body = json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": budget,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start.wait()
    out["sent"] = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    text = ""
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            out["tokens"] = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            piece = (choice["delta"].get("reasoning_content") or "") + (choice["delta"].get("content") or "")
            if "first" not in out and (piece or (choice.get("npr") or {}).get("branches")):
                out["first"] = time.perf_counter()
            text += piece
    out["end"], out["text"] = time.perf_counter(), text
    conn.close()


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def through_server(port: int, questions: list[str], budget: int, pid: int) -> dict:
    start, results = threading.Event(), [{} for _ in questions]
    cpu = process_cpu_s(pid)
    threads = [
        threading.Thread(target=stream_one, args=(port, q, budget, start, r)) for q, r in zip(questions, results)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every thread connected and waiting
    start.set()
    for t in threads:
        t.join()
    t0 = min(r["sent"] for r in results)
    return {
        "wall": max(r["end"] for r in results) - t0,
        "tokens": sum(r["tokens"] for r in results),
        "cpu": process_cpu_s(pid) - cpu,
        "ttft": [r["first"] - r["sent"] for r in results],
        "texts": [r["text"] for r in results],
    }


def direct(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    cpu = time.process_time()
    start = time.perf_counter()
    engine.submit(prompts, params)
    first, results = {}, []
    while engine.scheduler.has_work():
        event = engine.step()
        now = time.perf_counter()
        for d in event.deltas:
            first.setdefault(d.prompt_index, now - start)
        results += event.finished
    results.sort(key=lambda r: r.prompt_index)
    return {
        "wall": time.perf_counter() - start,
        "tokens": sum(len(r.token_ids) for r in results),
        "cpu": time.process_time() - cpu,
        "ttft": list(first.values()),
        "texts": [r.text for r in results],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.as_server:
        return run_server(args)
    model, tok = load(args)
    prompts, questions, params, config = workload(tok, args)
    engine = Engine(model, tok, config)
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--as-server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(child.stdout.readline().split()[1])
        print(
            f"# serve_speed: {args.model}, {args.dtype}, torch threads {args.threads}, {args.requests} requests, "
            f"one forced block of {args.branches} x {args.branch_tokens}-token branches, greedy"
        )
        direct(engine, prompts[:2], params)  # warm-up
        through_server(port, questions[:2], params.max_new_tokens, child.pid)
        rows = {"direct": [], "server": [], "direct1": [], "server1": []}
        for _ in range(args.rounds):
            rows["direct"].append(direct(engine, prompts, params))
            rows["server"].append(through_server(port, questions, params.max_new_tokens, child.pid))
            rows["direct1"].append(direct(engine, prompts[:1], params))
            rows["server1"].append(through_server(port, questions[:1], params.max_new_tokens, child.pid))
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    report(rows, args.requests)


def report(rows: dict, n: int) -> None:
    med = statistics.median
    tps = {k: med(r["tokens"] / r["wall"] for r in rows[k]) for k in rows}
    same = all(s["texts"] == d["texts"] for s, d in zip(rows["server"], rows["direct"]))
    print(f"\n1. throughput, {n} concurrent requests (median of {len(rows['direct'])} rounds)")
    print("| requests | direct tok/s | server tok/s | server / direct | same text |")
    print("|---|---|---|---|---|")
    print(f"| {n} | {tps['direct']:.1f} | {tps['server']:.1f} | {tps['server'] / tps['direct']:.2f} | {same} |")
    print(
        f"| 1 | {tps['direct1']:.1f} | {tps['server1']:.1f} | {tps['server1'] / tps['direct1']:.2f} | "
        f"{all(s['texts'] == d['texts'] for s, d in zip(rows['server1'], rows['direct1']))} |"
    )
    cpu = {k: med(1000 * r["cpu"] / r["tokens"] for r in rows[k]) for k in rows}
    print(
        f"\n1b. CPU ms per generated token (server: its whole process, HTTP and event loop included; direct: "
        f"this process; median of {len(rows['direct'])} rounds). Unlike wall time, this does not depend on what "
        "else the machine's cores run (the client threads, other jobs)"
    )
    print("| requests | direct CPU ms/token | server CPU ms/token | server / direct |")
    print("|---|---|---|---|")
    for key, count in (("", n), ("1", 1)):
        print(
            f"| {count} | {cpu['direct' + key]:.1f} | {cpu['server' + key]:.1f} | "
            f"{cpu['server' + key] / cpu['direct' + key]:.2f} |"
        )
    print("\n2. time to first token, ms (median over requests and rounds; max in parentheses)")
    print("| concurrent | server TTFT | engine TTFT | server - engine |")
    print("|---|---|---|---|")
    for key, count in (("1", 1), ("", n)):
        server = [t * 1000 for r in rows["server" + key] for t in r["ttft"]]
        engine = [t * 1000 for r in rows["direct" + key] for t in r["ttft"]]
        print(
            f"| {count} | {med(server):.0f} ({max(server):.0f}) | {med(engine):.0f} ({max(engine):.0f}) | "
            f"{med(server) - med(engine):.0f} |"
        )
    print(f"\nserver/direct at {n} requests: {tps['server'] / tps['direct']:.2f}")


if __name__ == "__main__":
    main()
