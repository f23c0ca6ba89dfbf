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


@pytest.mark.parametrize("argv, env, words", [
    (["--api-key", ""], {}, "--api-key is empty, which would switch authentication off"),
    (["--api-key", "   "], {}, "--api-key is empty"),
    ([], {"NPR_API_KEY": ""}, "$NPR_API_KEY is empty"),
    (["--api-key", " key"], {}, "--api-key has spaces at its ends"),
    (["--api-key", "kéy"], {}, "outside printable ASCII"),
    (["--kv-cache-gib", "-1"], {}, "argument --kv-cache-gib: must be > 0"),
    (["--repetition-penalty", "nan"], {}, "argument --repetition-penalty: must be a finite number"),
    (["--repetition-penalty", "0"], {}, "argument --repetition-penalty: must be > 0"),
    (["--max-n", "0"], {}, "argument --max-n: must be >= 1"),
    (["--threads", "0"], {}, "argument --threads: must be >= 1"),
    (["--drain-timeout", "-1"], {}, "argument --drain-timeout: must be >= 0"),
])
def test_bad_keys_and_values_are_refused_at_start_up(monkeypatch, capsys, argv, env, words):
    """Fails closed: `--api-key "$KEY"` with KEY unset used to serve /v1 without a key (issue 28)."""
    from npr.cli import serve as serve_cli
    from npr.cli.main import main

    monkeypatch.delenv("NPR_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(serve_cli, "serve", lambda args, sock: pytest.fail("started serving"))
    try:
        code = main(["serve", "--port", "0", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_a_public_address_without_a_key_is_warned_about(monkeypatch, capsys, host, warned):
    from npr.cli import serve as serve_cli
    from npr.cli.main import main

    monkeypatch.delenv("NPR_API_KEY", raising=False)
    seen = {}
    monkeypatch.setattr(serve_cli, "serve", lambda args, sock: seen.update(key=args.api_key) or 0)
    assert main(["serve", "--host", host, "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert ("warning: listening on 0.0.0.0 without an API key: anyone who can reach this port" in err) == warned
    assert seen == {"key": None}
    monkeypatch.setenv("NPR_API_KEY", "secret")  # the environment's key is used, and then no warning
    assert main(["serve", "--host", host, "--port", "0"]) == 0
    assert seen == {"key": "secret"} and "warning" not in capsys.readouterr().err


def test_the_server_config_refuses_an_empty_key():
    from npr.serve import ServeConfig

    with pytest.raises(ValueError, match="api_key must not be empty"):
        ServeConfig(model_name="m", api_key=" ")
