"""``npr demo``: load a model, parse an example parallel trace, show its tree mask and positions."""

from __future__ import annotations

EXAMPLE_PROBLEM = "What is 23 + 34?"
EXAMPLE_RESPONSE = """\
<guideline>
<plan>1: add the tens</plan>
<plan>2: add the units</plan>
</guideline>
<step>
1: 20 + 30 = 50
</step>
<step>
2: 3 + 4 = 7
</step>
<takeaway>
50 + 7 = 57
</takeaway>
The answer is \\boxed{57}."""


def add_parser(sub, name: str, help_text: str):
    from npr.cli.args import device_name, dtype_name

    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument(
        "--model",
        default="embedded",
        help="model spec: embedded (default), tiny-random-llama, tiny-random-qwen3, a local directory or an HF hub id",
    )
    p.add_argument("--dtype", default="float32", type=dtype_name, help="float32 (default) or bfloat16")
    p.add_argument("--device", default="cpu", type=device_name, help="cpu (default), cuda, cuda:N or mps")
    return p


def segment_picture(segments: list[tuple[str, int, int]], allowed, positions) -> str:
    """A segment-level picture of a tree mask, read off ``allowed`` itself.

    ``segments`` are (name, start, end) token ranges. Cell (row a, column b): '◣' causal within
    a segment, '█' every token of a sees every token of b, '·' none, '▒' some.
    """
    width = max(len(name) for name, _, _ in segments)
    header = " " * (width + 16) + " ".join(f"{i:>2}" for i in range(1, len(segments) + 1))
    rows = [header]
    for a, (name, s, e) in enumerate(segments, 1):
        cells = []
        for b, (_, s2, e2) in enumerate(segments, 1):
            block = allowed[s:e, s2:e2]
            if a == b:
                cells.append(" ◣")
            elif bool(block.all()):
                cells.append(" █")
            elif not bool(block.any()):
                cells.append(" ·")
            else:
                cells.append(" ▒")
        pos = f"{int(positions[s])}..{int(positions[e - 1])}"
        rows.append(f"{a:>2} {name:<{width}} {pos:>11} {''.join(cells)}")
    return "\n".join(rows)


def response_segments(blocks, start: int, end: int) -> list[tuple[str, int, int]]:
    """Named token ranges of a response: leading text, then each block's guideline, steps,
    and takeaway (with whatever follows it up to the next block)."""
    segments = [("text", start, blocks[0].guideline_start)] if blocks and blocks[0].guideline_start > start else []
    for n, block in enumerate(blocks, 1):
        segments.append((f"b{n} guideline", block.guideline_start, block.first_step))
        segments += [(f"b{n} step {k}", s, e) for k, (s, e) in enumerate(block.steps, 1)]
        segments.append((f"b{n} takeaway+", block.takeaway, blocks[n].guideline_start if n < len(blocks) else end))
    return segments or [("text", start, end)]


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.tree import Tree

    from npr.masks import attention_bias, parallel_mask_and_positions, scan_blocks
    from npr.models import load_model_and_tokenizer
    from npr.prompts import encode_prompt
    from npr.schema import parse, validate
    from npr.tokens import tag_token_ids

    console = Console()
    with console.status(f"loading {args.model}"):
        model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    console.print(
        f"[bold]model[/] {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{model.dtype}; tags are single tokens: {tag_token_ids(tok)}"
    )

    trace = parse(EXAMPLE_RESPONSE)
    tree = Tree(f"[bold]response[/] (valid: {not validate(EXAMPLE_RESPONSE)}, answer: {trace.answer})")
    for b, block in enumerate(trace.blocks, 1):
        node = tree.add(f"block {b}: {len(block.steps)} parallel branches")
        for plan, step in zip(block.plans, block.steps):
            node.add(f"[cyan]plan {plan.label}[/] {plan.text}  →  [green]step[/] {step.text}")
        node.add(f"[magenta]takeaway[/] {block.takeaway}")
    tree.add(f"[yellow]final[/] {trace.final}")
    console.print(tree)

    prompt = encode_prompt(tok, EXAMPLE_PROBLEM)
    response = tok.encode(EXAMPLE_RESPONSE, add_special_tokens=False)
    ids = torch.tensor(prompt + response)
    allowed, positions = parallel_mask_and_positions(ids, tag_token_ids(tok), response_start=len(prompt))
    segments = [("prompt", 0, len(prompt))] + response_segments(
        scan_blocks(ids, tag_token_ids(tok), len(prompt)), len(prompt), len(ids)
    )
    console.print(
        f"\n[bold]tree attention mask[/] ({len(prompt)} prompt + {len(response)} response tokens), by segment: "
        "row = queries, column = keys; ◣ causal, █ sees all, · sees none. Positions restart for each step."
    )
    console.print(segment_picture(segments, allowed, positions), highlight=False, markup=False, soft_wrap=True)

    with torch.no_grad():
        out = model(
            input_ids=ids[None].to(model.device),
            position_ids=positions[None].to(model.device),
            attention_mask=attention_bias(allowed, model.dtype)[None, None].to(model.device),
        )
    logits = out.logits[0, len(prompt) - 1 : -1].float().cpu()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[len(prompt) :, None])
    console.print(
        f"\nmean log-prob of the response under the tree mask: {logp.mean().item():.3f} "
        f"(one flat forward, {len(ids)} tokens)"
    )
    return 0
