"""``npr serve`` as a process: help, a taken port, and SIGTERM / Ctrl-C ending in-flight requests cleanly."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

try:  # the openai client's HTTP library: httpx2 in openai >= 3, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

SERVE = [sys.executable, "-m", "npr.cli.main", "serve"]
TINY = ["--model", "tiny-random-llama", "--dtype", "float32", "--threads", "1", "--kv-cache-tokens", "65536",
        "--port", "0", "--mode", "plain", "--log-level", "warning"]


def test_help_explains_the_server():
    out = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for words in ("/v1/chat/completions", "--api-key", "--max-queue", "--drain-timeout", "127.0.0.1", "from openai"):
        assert words in out.stdout


def test_a_taken_port_is_a_clear_error_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        start = time.monotonic()
        out = subprocess.run([*SERVE, "--model", "./no-such-model", "--port", str(port)], capture_output=True,
                             text=True, timeout=60)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr and "does not exist" not in out.stderr  # refused before the model loads
    assert time.monotonic() - start < 30


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*SERVE, *TINY, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline, seen = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            seen += line
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if match:
                return proc, match.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"npr serve did not start:\n{seen}{proc.stderr.read()}")


def stream_until_end(lines) -> tuple[int, str | None, bool]:
    """(content chunks, last finish reason, [DONE] seen) of the rest of an SSE response."""
    chunks, finish, done = 0, None, False
    for line in lines:
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                chunks += bool(choice.get("text"))
                finish = choice.get("finish_reason") or finish
    return chunks, finish, done


def test_sigterm_drains_and_a_second_signal_cancels_then_exit_0():
    """SIGTERM stops accepting but lets the in-flight request go on decoding (--drain-timeout); Ctrl-C then
    cancels it: its stream ends in the OpenAI shape (finish_reason "cancelled", [DONE]) and the process exits 0.
    (The drain timeout running out is tested in-process: tests/test_serve.py.)"""
    proc, url = start_server("--drain-timeout", "600")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 3500, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if '"text":"' in line and '"text":""' not in line)  # decoding
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            with pytest.raises(httpx.TransportError):  # no new connections while draining
                httpx.get(url + "/health", timeout=5)
            chunks_while_draining = 0
            for line in lines:
                chunks_while_draining += '"text":"' in line and '"text":""' not in line
                if chunks_while_draining == 20:
                    break
            proc.send_signal(signal.SIGINT)
            cancelled_at = time.monotonic()
            _, finish, done = stream_until_end(lines)
        assert chunks_while_draining == 20  # the request kept decoding after SIGTERM
        assert finish == "cancelled" and done  # ended in the OpenAI shape, not cut off
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - cancelled_at < 30
        err = proc.stderr.read()
        assert "npr serve: stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
