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
TINY = [
    "--model",
    "tiny-random-llama",
    "--dtype",
    "float32",
    "--threads",
    "1",
    "--kv-cache-tokens",
    "65536",
    "--port",
    "0",
    "--mode",
    "plain",
    "--log-level",
    "warning",
]


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
        out = subprocess.run(
            [*SERVE, "--model", "./no-such-model", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr and "does not exist" not in out.stderr  # refused before the model loads
    assert time.monotonic() - start < 30


def start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*SERVE, *TINY, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
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


@pytest.mark.parametrize(
    "argv, env, words",
    [
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
    ],
)
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


def parsed(monkeypatch, argv: list[str]):
    """The args ``serve`` would get (it is replaced: nothing loads)."""
    from npr.cli import serve as serve_cli
    from npr.cli.main import main

    monkeypatch.delenv("NPR_API_KEY", raising=False)
    seen = {}
    monkeypatch.setattr(serve_cli, "serve", lambda args, sock: seen.update(args=args) or 0)
    assert main(["serve", "--port", "0", *argv]) == 0
    return seen["args"]


def test_vllm_style_command_lines(monkeypatch):
    args = parsed(
        monkeypatch,
        [
            "tiny-random-llama",
            "--dtype",
            "auto",
            "--max-model-len",
            "512",
            "--allowed-origins",
            '["http://a.example", "http://b.example"]',
            "--allowed-methods",
            "GET,POST",
        ],
    )
    assert args.model == "tiny-random-llama" and args.dtype == "bfloat16" and args.max_model_len == 512
    assert args.allowed_origins == ("http://a.example", "http://b.example") and args.allowed_methods == ("GET", "POST")
    assert parsed(monkeypatch, ["--model", "tiny-random-llama"]).model == "tiny-random-llama"
    # the KV pool as vLLM sizes it: by --gpu-memory-utilization unless a size is given
    default = parsed(monkeypatch, [])
    assert default.kv_cache_gib is None and default.gpu_memory_utilization == 0.9
    assert parsed(monkeypatch, ["--gpu-memory-utilization", "0.5"]).gpu_memory_utilization == 0.5
    assert parsed(monkeypatch, []).model == "embedded" and parsed(monkeypatch, []).allowed_origins == ()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--gpu-memory-utilization", "1.5"], "argument --gpu-memory-utilization: must be in (0, 1]"),
        (["--enforce-eager"], "--enforce-eager is a vLLM flag"),
        (
            ["--max-num-seq-s", "4"],
            "unrecognized argument --max-num-seq-s; the closest npr serve flag is --max-num-seqs",
        ),
        (["--servd-model-name", "x"], "the closest npr serve flag is --served-model-name"),
        (["--block-size=16"], "unrecognized argument --block-size; `npr serve --help` lists the flags"),
        (["--max-model-len", "0"], "argument --max-model-len: must be >= 1"),
        (["--dtype", "int8"], "is not a dtype"),
        (["--allowed-origins", "[1]"], "every item must be a string"),
    ],
)
def test_vllm_flags_npr_lacks_name_what_to_use(monkeypatch, capsys, argv, words):
    from npr.cli.main import main

    monkeypatch.setattr("npr.cli.serve.serve", lambda args, sock: pytest.fail("started serving"))
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "0", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err, err


def test_two_different_models_are_an_error(monkeypatch, capsys):
    from npr.cli.main import main

    monkeypatch.setattr("npr.cli.serve.serve", lambda args, sock: pytest.fail("started serving"))
    assert main(["serve", "tiny-random-llama", "--model", "embedded", "--port", "0"]) == 2
    assert "two models given" in capsys.readouterr().err


def test_max_model_len_caps_the_context():
    """A real start: --max-model-len is the context the server checks requests against."""
    proc, url = start_server("--max-model-len", "300")
    try:
        card = httpx.get(url + "/v1/models").json()["data"][0]
        assert card["max_model_len"] == 300
        r = httpx.post(url + "/v1/completions", json={"prompt": "x" * 290, "max_tokens": 20})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_flag_runs_requests_one_at_a_time(monkeypatch, deterministic):
    """--deterministic: the engine loop hands the engine one request at a time, with no prompt-prefix sharing."""
    from npr.cli.main import main

    seen = {}

    class NotServing:
        def run(self, sockets):
            pass

    def capture(app, engine_loop, drain_timeout_s, log_level):
        seen["api"] = app.state.api
        return NotServing()

    monkeypatch.setattr("npr.cli.serve.make_server", capture)
    argv = ["serve", "tiny-random-llama", "--port", "0", "--kv-cache-tokens", "4096"]
    assert main(argv + (["--deterministic"] if deterministic else [])) == 0
    api = seen["api"]
    assert api.config.deterministic is api.loop.one_at_a_time is deterministic
    assert api.engine.config.share_prompt_prefix is not deterministic
