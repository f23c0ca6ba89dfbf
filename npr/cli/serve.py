"""``npr serve``: the NPR engine behind an OpenAI-compatible HTTP API, with a live chat page at ``/``."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import sys
import threading

EPILOG = """\
examples:
  npr serve                                          # the embedded SmolLM2 on http://127.0.0.1:8000
  npr serve --model runs/tiny/stage3/final --port 8001
  npr serve --host 0.0.0.0 --api-key "$KEY"          # reachable from other machines: require a key

then, from Python:
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  r = client.chat.completions.create(model="embedded", messages=[{"role": "user", "content": "What is 7 + 5?"}])
  print(r.choices[0].message.content)        # canonical text; r.choices[0].npr holds the branch tree

docs/serving.md documents the API, the npr extension fields, the streaming order and the limits.
"""


# what the serve extra installs (pyproject.toml), checked before anything loads
SERVE_PACKAGES = ("starlette", "uvicorn", "pydantic", "anyio")

# vLLM flags npr serve does not have -> what to use instead (unknown flags otherwise fail with argparse's message)
VLLM_ONLY = {
    "--tensor-parallel-size": "npr serve runs one engine on one --device",
    "--pipeline-parallel-size": "npr serve runs one engine on one --device",
    "--data-parallel-size": "run one npr serve per device",
    "--max-num-batched-tokens": "npr batches by --max-num-seqs",
    "--enable-prefix-caching": "npr shares prompt KV between samples and branches always",
    "--trust-remote-code": "npr loads Llama/Qwen-style checkpoints only",
    "--tokenizer": "npr loads the tokenizer saved with --model",
    "--chat-template": "npr uses the model's own chat template",
    "--quantization": "npr serves --dtype bfloat16 or float32",
    "--enforce-eager": "npr has no CUDA graphs to turn off",
    "--uvicorn-log-level": "use --log-level",
    "--tool-call-parser": "npr serve has no tools",
    "--enable-auto-tool-choice": "npr serve has no tools",
    "--seed": "send seed in each request",
    "--disable-log-requests": "use --log-level warning",
}


def _csv_or_json(text: str) -> tuple[str, ...]:
    """vLLM's list flags take JSON (``'["http://a"]'``); a comma-separated list is accepted too."""
    import json

    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list: {e}") from e
        if not all(isinstance(x, str) for x in items):
            raise argparse.ArgumentTypeError(f"{text!r}: every item must be a string")
        return tuple(items)
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _vllm_only_action(hint: str):
    class VllmOnly(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} is a vLLM flag that npr serve does not have: {hint}")

    return VllmOnly


def add_parser(sub, name: str, help_text: str):
    from npr.cli.args import device_name, dtype_name, non_negative_float, positive_float, positive_int, probability

    p = sub.add_parser(
        name,
        help=help_text,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=help_text + ". Serves POST /v1/chat/completions, POST /v1/completions, "
        "GET /v1/models, GET /health and a chat page at / that shows branches as they decode. "
        "One engine loop serves every client (continuous batching). Ctrl-C or SIGTERM stops "
        "accepting requests, lets in-flight ones finish for --drain-timeout seconds, cancels the "
        "rest and exits; a second Ctrl-C cancels at once.",
    )
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model, as `vllm serve MODEL` (same as --model)")
    p.add_argument(
        "--model",
        default=None,
        help="embedded (default: SmolLM2-135M-Instruct), tiny-random-llama, "
        "tiny-random-qwen3, a local directory (e.g. a run's final/) or an HF hub id",
    )
    p.add_argument("--served-model-name", help="the name clients send as `model` (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $NPR_API_KEY, else no key); an "
        'empty key is refused, so an unset $KEY in --api-key "$KEY" cannot switch authentication off',
    )
    p.add_argument(
        "--mode",
        default="parallel",
        choices=["parallel", "sequential", "plain"],
        help="parallel: branches decoded at once; sequential: one after another; plain: no structure",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        type=lambda t: t if t == "auto" else dtype_name(t),
        help="bfloat16 (default, faster on CPU), float32, or auto (as vLLM: half precision, bfloat16)",
    )
    p.add_argument(
        "--max-model-len",
        type=positive_int,
        help="longest prompt + completion in tokens (default: the model's max_position_embeddings); "
        "above the model's own limit is an error",
    )
    p.add_argument("--device", default="cpu", type=device_name, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    eng = p.add_argument_group("engine")
    eng.add_argument(
        "--max-num-seqs", type=positive_int, default=64, help="most requests decoding at once (default: 64)"
    )
    eng.add_argument(
        "--kv-cache-gib",
        type=positive_float,
        default=None,
        help="KV pool memory (default: on CUDA what --gpu-memory-utilization leaves; 2 GiB on a CPU)",
    )
    eng.add_argument(
        "--gpu-memory-utilization",
        type=probability,
        default=0.9,
        help="on CUDA without --kv-cache-gib/--kv-cache-tokens: the share of the GPU's memory the weights, "
        "a forward and the KV pool may take, as vLLM (default: 0.9)",
    )
    eng.add_argument(
        "--kv-cache-tokens", type=positive_int, help="KV pool capacity in tokens (overrides --kv-cache-gib)"
    )
    eng.add_argument(
        "--max-branches", type=positive_int, default=5, help="most plans per guideline (default: 5, as NPR)"
    )
    eng.add_argument("--max-depth", type=positive_int, default=8, help="most parallel blocks per answer (default: 8)")
    eng.add_argument(
        "--repetition-penalty",
        type=positive_float,
        default=1.02,
        help="inside branches, finite and > 0 (default: 1.02, as NPR)",
    )
    srv = p.add_argument_group("server")
    srv.add_argument("--max-n", type=positive_int, default=8, help="most samples per request (default: 8)")
    srv.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        help="most requests waiting to start; beyond it 503 + Retry-After (default: 256)",
    )
    srv.add_argument(
        "--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body (default: 1 MiB)"
    )
    srv.add_argument(
        "--default-max-tokens",
        type=positive_int,
        default=1024,
        help="chat budget when a request sets none, over all branches (default: 1024)",
    )
    srv.add_argument(
        "--system-prompt",
        default="npr",
        choices=["npr", "none"],
        help="npr (default): chats without a system message get the NPR format instruction, as in "
        "training and `npr generate`; none: messages go as sent",
    )
    srv.add_argument(
        "--reasoning-parser",
        default="npr",
        choices=["npr", "none"],
        help="npr (default): a chat reply's NPR blocks go to message.reasoning_content and the final "
        "text to content, as vLLM's --reasoning-parser; none: the whole text is content",
    )
    srv.add_argument(
        "--deterministic",
        action="store_true",
        help="run requests one at a time: a seeded or greedy request then gives exactly the output it "
        "gives alone, whatever else is sent, at any dtype (no batching across requests; default: off, "
        "where bfloat16 outputs can change with the load)",
    )
    srv.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=30.0,
        help="seconds in-flight requests get to finish on Ctrl-C/SIGTERM (default: 30)",
    )
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument(
        "--allowed-origins",
        type=_csv_or_json,
        default=(),
        help="CORS: origins browser apps may call from, a JSON list as vLLM ('[\"http://a.example\"]') "
        'or comma-separated; "*" for any (default: none; vLLM\'s default is every origin)',
    )
    srv.add_argument("--allowed-methods", type=_csv_or_json, default=("*",), help="CORS methods (default: *)")
    srv.add_argument("--allowed-headers", type=_csv_or_json, default=("*",), help="CORS headers (default: *)")
    srv.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (default: off)")
    for flag, hint in VLLM_ONLY.items():
        p.add_argument(flag, nargs="?", action=_vllm_only_action(hint), help=argparse.SUPPRESS)
    _suggest_on_unknown_flags(p)
    return p


def _suggest_on_unknown_flags(p: argparse.ArgumentParser) -> None:
    """An unknown flag (a vLLM flag npr lacks, a typo) fails naming the closest npr serve flag."""
    import difflib

    parse_known_args = p.parse_known_args

    def checked(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        flags = [a.split("=", 1)[0] for a in extras if a.startswith("--")]
        if flags:
            known = [o for a in p._actions if a.help is not argparse.SUPPRESS for o in a.option_strings]
            close = difflib.get_close_matches(flags[0], known, n=1, cutoff=0.6)
            p.error(
                f"unrecognized argument {flags[0]}; "
                + (f"the closest npr serve flag is {close[0]}" if close else "`npr serve --help` lists the flags")
            )
        return namespace, extras

    p.parse_known_args = checked


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, made before the model loads so that a taken port fails in a second."""
    from npr.errors import NprError

    if not 0 <= port <= 65535:
        raise NprError(f"--port {port} is not a port number (0-65535; 0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NprError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port (0 picks a free one) or --host"
        ) from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_server(app, engine_loop, drain_timeout_s: float, log_level: str):
    """A uvicorn server whose SIGINT/SIGTERM drain the engine loop: the first signal stops accepting and gives
    in-flight requests ``drain_timeout_s``, the second cancels them at once (their streams end cleanly, with
    finish_reason "cancelled"), a third stops without waiting for connections."""
    import uvicorn

    class Server(uvicorn.Server):
        signals = 0

        def handle_exit(self, sig, frame):
            self.signals += 1
            if self.signals == 1:
                engine_loop.drain(drain_timeout_s)
                self.should_exit = True
            elif self.signals == 2:
                engine_loop.drain(0.0)
            else:
                self.force_exit = True

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after a graceful exit; npr serve exits 0 instead
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout_s) + 5, lifespan="on")
    return Server(config)


def api_key(given: str | None, environ=os.environ) -> str | None:
    """The key ``/v1/*`` requires: ``--api-key``, else ``$NPR_API_KEY``, else None (no key).

    Fails closed: an empty or blank key (``--api-key "$KEY"`` with ``KEY`` unset, ``NPR_API_KEY=``) is an
    ``NprError`` rather than "no key", and so is one that an Authorization header cannot carry.
    """
    from npr.errors import NprError

    source, key = ("--api-key", given) if given is not None else ("$NPR_API_KEY", environ.get("NPR_API_KEY"))
    if key is None:
        return None
    if not key.strip():
        raise NprError(
            f"{source} is empty, which would switch authentication off; give the key (e.g. --api-key "
            '"$(cat key.txt)"), or leave both --api-key and $NPR_API_KEY unset to serve without one'
        )
    if key != key.strip() or not key.isascii() or not key.isprintable():
        raise NprError(
            f"{source} has spaces at its ends or characters outside printable ASCII, which an "
            "'Authorization: Bearer' header cannot carry; use a key of printable ASCII"
        )
    return key


def run(args) -> int:
    from rich.console import Console

    from npr.errors import NprError
    from npr.validate import check_kv_cache_gib

    if args.model_tag and args.model and args.model_tag != args.model:
        raise NprError(f"two models given: {args.model_tag} (positional) and --model {args.model}; give one")
    args.model = args.model_tag or args.model or "embedded"
    if args.dtype == "auto":
        args.dtype = "bfloat16"
    args.api_key = api_key(args.api_key)
    if args.kv_cache_tokens is None and args.kv_cache_gib is not None:
        check_kv_cache_gib(args.kv_cache_gib, args.device)
    if not _is_loopback(args.host) and args.api_key is None:
        Console(stderr=True).print(
            f"[yellow]warning:[/] listening on {args.host} without an API key: anyone who can reach this port can "
            "use the model and the machine's compute; pass --api-key (or set $NPR_API_KEY)",
            highlight=False,
        )
    sock = bind(args.host, args.port)  # first, before the slow imports: a taken port fails at once
    try:
        return serve(args, sock)
    finally:
        sock.close()


def serve(args, sock: socket.socket) -> int:
    import logging

    from rich.console import Console

    from npr.engine import Engine, EngineConfig
    from npr.errors import NprError
    from npr.extras import require
    from npr.models import load_model_and_tokenizer

    for package in SERVE_PACKAGES:  # a missing one names the serve extra, before the model loads
        require(package, "serve")
    from npr.serve import ServeConfig, create_app

    console = Console(stderr=True)
    engine_config = EngineConfig(
        mode=args.mode,
        max_branches=args.max_branches,
        max_depth=args.max_depth,
        repetition_penalty=args.repetition_penalty,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        kv_cache_tokens=args.kv_cache_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        share_prompt_prefix=not args.deterministic,
    )
    try:
        config = ServeConfig(
            model_name=args.served_model_name or args.model,
            max_n=args.max_n,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
            default_max_tokens=args.default_max_tokens,
            system_prompt=args.system_prompt,
            reasoning_parser=args.reasoning_parser,
            allowed_origins=args.allowed_origins,
            allowed_methods=args.allowed_methods,
            allowed_headers=args.allowed_headers,
            allow_credentials=args.allow_credentials,
            api_key=args.api_key,
            drain_timeout_s=args.drain_timeout,
            deterministic=args.deterministic,
        )
    except ValueError as e:
        raise NprError(f"--{str(e).replace('_', '-')}") from e
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with console.status(f"loading {args.model}"):
        model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
        engine = Engine(model, tok, engine_config)
    if args.max_model_len:
        if engine.context_length and args.max_model_len > engine.context_length:
            raise NprError(
                f"--max-model-len {args.max_model_len} is above {args.model}'s limit of "
                f"{engine.context_length} tokens (max_position_embeddings); lower it"
            )
        engine.context_length = args.max_model_len
    app = create_app(engine, config)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    # the page polls GET /live every 400 ms: not an access-log line each time
    logging.getLogger("uvicorn.access").addFilter(lambda record: "/live" not in record.getMessage())
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    console.print(
        f"npr serve: [bold]{config.model_name}[/] ({args.mode} mode) listening on {url}  "
        f"(chat page {url}/, API {url}/v1; Ctrl-C drains and exits)",
        highlight=False,
        soft_wrap=True,
    )
    server = make_server(app, app.state.api.loop, args.drain_timeout, args.log_level)
    server.run(sockets=[sock])
    print("npr serve: stopped", file=sys.stderr)
    return 0
