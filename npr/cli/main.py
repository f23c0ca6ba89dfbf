"""Entry point of the ``npr`` command: a thin dispatcher over subcommand modules.

Subcommand modules are imported only when chosen, so ``npr --help`` stays fast.

Exit status: 0 done; 2 bad input (argparse, or an ``NprError``: one message, no traceback,
nothing written); 130 interrupted; 1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("npr.cli.pipeline", "run all of NPR end to end: base eval, Stage 1-3, evals, report (the main job)"),
    "version": ("npr.cli.version", "print the npr, torch and transformers versions"),
    "demo": ("npr.cli.demo", "load a model and show a parsed parallel trace with its tree attention mask"),
    "generate": ("npr.cli.generate", "decode a prompt with the NPR engine (parallel, sequential or plain)"),
    "eval": ("npr.cli.eval", "evaluate a model on benchmarks through the engine: avg@k, best@k, trigger rate, speedup"),
    "view": ("npr.cli.view", "render samples.jsonl or parallel traces as a self-contained HTML trajectory viewer"),
    "train": (
        "npr.cli.train",
        "train an NPR stage: stage1 (NPR-Zero, DAPO), stage2 (NPR-Beta, parallel SFT), stage3 (PAPO)",
    ),
    "sample": ("npr.cli.sample", "rejection-sample correct, format-valid traces from a Stage-1 model for Stage 2"),
    "memory": (
        "npr.cli.memory",
        "plan a training stage's memory per GPU before launch: does it fit, and what to change",
    ),
    "serve": (
        "npr.cli.serve",
        "serve a model over the OpenAI API, reasoning in parallel, with a live branch view at /",
    ),
}

DESCRIPTION = """\
npr: the Native Parallel Reasoner (arXiv 2512.07461).
Teach a causal LM to reason in parallel branches: DAPO (NPR-Zero), self-distilled parallel SFT
(NPR-Beta), PAPO with the NPR engine (NPR). Runs on a CPU with the embedded SmolLM2-135M-Instruct
and on GPUs with any HF causal LM.
"""


# glibc mallopt parameters: tensors above the mmap threshold are mapped and unmapped on every
# allocation (page faults and zeroing each time), and freed heap memory is trimmed back to the OS
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: (1 << 31) - 1}


def tune_malloc() -> bool:
    """Keep freed tensor memory in the process for reuse (glibc only; ``NPR_MALLOC_TUNING=0`` opts out).

    By default glibc maps each allocation of more than a few MiB afresh and unmaps it when freed, so
    every training step page-faults and zeroes its activations and logits again: on the 2-core CPU
    the cold start's SFT spent ~40 % of its time in the kernel. Raising the mmap and trim thresholds
    lets the heap reuse that memory (docs/performance.md, "Memory allocator"); the process's
    resident size stays near its peak instead. Returns whether the settings were applied; a value
    of ``NPR_MALLOC_TUNING`` that is not a boolean (0/1/true/false/on/off/yes/no) raises ``UsageError``.
    """
    from npr.validate import env_bool

    if not env_bool("NPR_MALLOC_TUNING", True) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, …): leave the allocator alone
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``npr`` parser; only the subcommand named in ``argv`` (default: sys.argv) gets its full parser."""
    parser = argparse.ArgumentParser(
        prog="npr", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(sub, name, help_text)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.command_line = "npr " + " ".join(argv)  # for the headers of written configs
    args.argv = argv  # --show-config tells given flags from defaults
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    from npr.errors import NprError

    try:
        check_environment()
        return module.run(args) or 0
    except NprError as e:
        print(f"npr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk is not a bug: one line naming where, and how to continue
        from npr.fsio import disk_full_message, disk_full_path, is_disk_full

        out = getattr(args, "out", None)
        if not is_disk_full(e, out):
            raise
        print(
            f"npr {args.command}: error: {disk_full_message(disk_full_path(e) or out, args.command)}", file=sys.stderr
        )
        return 2


def check_environment() -> None:
    """The environment variables every command reads, checked before it starts (``NprError``)."""
    from npr.validate import check_cache_dir, env_bool

    env_bool("NPR_MALLOC_TUNING", True)
    check_cache_dir()


def console_main() -> int:
    """The ``npr`` console script: the process-wide allocator settings, then ``main``."""
    from npr.errors import NprError

    try:
        tune_malloc()
    except NprError as e:
        print(f"npr: error: {e}", file=sys.stderr)
        return 2
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
