"""``npr generate``: decode one prompt with the NPR engine and print the answer (and the branch tree)."""

from __future__ import annotations

import sys


def add_parser(sub, name: str, help_text: str):
    from npr.cli.args import (
        device_name,
        dtype_name,
        non_negative_float,
        non_negative_int,
        positive_int,
        probability,
        seed,
    )

    p = sub.add_parser(
        name,
        help=help_text,
        description=help_text + ". The prompt goes through the model's chat "
        "template with the NPR format instruction (--style npr) or a plain step-by-step request.",
    )
    p.add_argument(
        "--model",
        default="embedded",
        help="embedded (default), tiny-random-llama, tiny-random-qwen3, "
        "a local directory (e.g. a run's final/) or an HF hub id",
    )
    p.add_argument("--prompt", required=True, help="the question; '-' reads it from stdin")
    p.add_argument(
        "--mode",
        default="parallel",
        choices=["parallel", "sequential", "plain"],
        help="parallel: branches decoded at once; sequential: same tree, one branch at a time; "
        "plain: ordinary decoding (default: parallel)",
    )
    p.add_argument("--style", default="npr", choices=["npr", "plain"], help="prompt style (default: npr)")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024, help="budget over all branches (default: 1024)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus mass in (0, 1] (default: 1)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off (default)")
    p.add_argument("--seed", type=seed, default=0, help="0 <= seed < 2**32 (default: 0)")
    p.add_argument("--n", type=positive_int, default=1, help="samples (they share the prompt's KV)")
    p.add_argument("--dtype", default="bfloat16", type=dtype_name, help="bfloat16 (default, faster on CPU) or float32")
    p.add_argument("--device", default="cpu", type=device_name, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument(
        "--backend",
        default="npr",
        choices=["npr", "llamacpp"],
        help="npr's engine (default) or llama.cpp "
        "from the model's GGUF (embedded: the shipped Q4_1 file with the NPR tags; needs npr[llamacpp])",
    )
    p.add_argument("--tree", action="store_true", help="print each sample's branch tree and engine stats")
    return p


def print_tree(console, result) -> None:
    from rich.tree import Tree

    from npr.schema import parse

    trace = parse(result.text, strict=False)
    s = result.stats
    root = Tree(
        f"[bold]sample {result.sample_index}[/] finish={result.finish_reason}"
        f"{' (' + result.diagnostic + ')' if result.diagnostic else ''} · {s.generated_tokens} tokens, "
        f"critical path {s.critical_path_tokens} (ideal speedup {s.ideal_speedup:.2f}x), "
        f"{s.forward_passes} forwards, {s.wall_time_s:.1f}s"
    )
    executed = result.branches_per_block
    for b, block in enumerate(trace.blocks):
        how = f"{executed[b]} parallel branches" if b < len(executed) else "not executed as branches"
        node = root.add(f"[bold]block {b + 1}[/]: {how}")
        for i, step in enumerate(block.steps):
            plan = block.plans[i].text if i < len(block.plans) else ""
            branch = node.add(f"[cyan]plan {i + 1}[/] {plan}")
            branch.add(f"[green]step[/] {step.text}")
        node.add(f"[magenta]takeaway[/] {block.takeaway}")
    root.add(f"[yellow]answer[/] {trace.answer}")
    console.print(root)


def run(args) -> int:
    import time

    from rich.console import Console

    from npr.backends import build_engine
    from npr.engine import EngineConfig, SamplingParams
    from npr.errors import UsageError
    from npr.models import load_model_and_tokenizer
    from npr.prompts import encode_prompt

    console = Console(stderr=True)
    from npr.validate import check_text

    if args.prompt == "-":  # bytes, so that non-UTF-8 input is named rather than a UnicodeDecodeError
        question = check_text(
            sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "--prompt - (stdin)", escaped_bytes=True
        )
    else:  # Python hands non-UTF-8 bytes of argv over as lone surrogates
        question = check_text(args.prompt, "--prompt", escaped_bytes=True)
    if not question.strip():
        raise UsageError(
            "--prompt is empty"
            + (" (nothing on stdin)" if args.prompt == "-" else "")
            + '; give the question, e.g. --prompt "What is 7 + 5?"'
        )
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        n=args.n,
        seed=args.seed,
    )
    config = EngineConfig(mode=args.mode)
    with console.status(f"loading {args.model}"):
        model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    engine = build_engine(args.backend, args.model, model, tok, config)
    prompt = encode_prompt(tok, question, style=args.style)
    results, tokens, start = [], 0, time.perf_counter()
    with console.status("decoding") as status:
        for event in engine.generate_stream([prompt], params):
            results += event.finished
            tokens += event.tokens
            elapsed = time.perf_counter() - start
            status.update(
                f"decoding: {tokens} tokens, {tokens / elapsed:.0f} tok/s, {len(results)}/{args.n} samples done"
            )
    out = Console()
    for result in sorted(results, key=lambda r: r.sample_index):
        if args.tree:
            print_tree(out, result)
        sys.stdout.write(result.text + "\n")  # verbatim: rich would wrap lines and rewrite tabs and :emoji: codes
        sys.stdout.flush()
    return 0
