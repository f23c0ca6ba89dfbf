"""Inference backends: npr's own engine (``npr``) or llama.cpp (``llamacpp``, ``npr.backends.llamacpp``).

``build_engine`` gives either behind the one ``npr.engine.Engine`` API (``submit``/``step``/``generate``,
``Result``, ``EngineEvent``), so ``npr eval`` and ``npr generate`` take ``--backend``.
"""

from __future__ import annotations

from pathlib import Path

from npr.errors import NprError

BACKENDS = ("npr", "llamacpp")


class BackendError(NprError, ValueError):
    """A backend that cannot run the given model; the message says what to pass instead."""


def resolve_gguf(spec: str, tokenizer) -> Path:
    """The GGUF the llama.cpp backend runs for a model spec: ``embedded``: the shipped Q4_1 SmolLM2 with the
    NPR tags (``npr.backends.gguf_model``); a directory: the one ``*.gguf`` in it (beside an npr checkpoint)."""
    if spec == "embedded":
        from npr.backends.gguf_model import tagged_embedded_gguf

        return tagged_embedded_gguf(tokenizer)
    path = Path(spec)
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise BackendError(
        f"--backend llamacpp runs a GGUF file: --model embedded, or a model directory holding one "
        f"*.gguf with the NPR tags in its vocabulary; {spec!r} has "
        f"{len(found) if path.is_dir() else 'no directory with'} .gguf files"
    )


def build_engine(backend: str, spec: str, model, tokenizer, config):
    """An engine for ``backend``: npr's (``model`` on its device) or llama.cpp's (the GGUF of ``spec``)."""
    from npr.engine import Engine

    if backend == "npr":
        return Engine(model, tokenizer, config)
    if backend == "llamacpp":
        from npr.backends.llamacpp import LlamaCppEngine

        return LlamaCppEngine(resolve_gguf(spec, tokenizer), tokenizer, config)
    raise BackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
