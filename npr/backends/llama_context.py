"""A thin wrapper over llama.cpp's batch and memory API (llama-cpp-python's low-level bindings).

One ``LlamaContext`` owns a model, a context with a **unified** KV cache (one pool of cells for every
sequence) and a reusable batch. A cell holds a key/value, a position and a *set* of sequence ids; a
token of sequence s at position p attends to the cells whose set holds s at positions <= p.
``copy(src, dst, p0, p1)`` (``llama_memory_seq_cp``) adds ``dst`` to the sets of ``src``'s cells in
[p0, p1), copying no data; ``remove(seq)`` takes ``seq`` out of every set, and a cell whose set
empties is free. That is NPR's fork (copy the main line to each branch) and join (copy each branch
back onto the main line) with nothing prefilled twice (docs/engine.md, "llama.cpp backend").

``decode`` feeds (token, position, sequence, wants logits) rows in batches of at most ``n_batch``
and returns the logits rows asked for, copied out of llama.cpp's buffer.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npr.errors import NprError

LLAMA_MAX_SEQ = 256  # llama.cpp's compile-time bound on sequence ids (src/llama-cparams.h)


class LlamaCppError(NprError, RuntimeError):
    """llama.cpp is missing or refused an input; the message says what to do."""


def import_llama_cpp():
    """The ``llama_cpp`` module, or an ``LlamaCppError`` naming the extra to install."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppError(
            "the llama.cpp backend needs llama-cpp-python: pip install 'npr[llamacpp]' "
            f"(it builds llama.cpp from source; {e})"
        ) from e
    return llama_cpp


@dataclass(frozen=True)
class ContextSize:
    """What a context holds: ``cells`` KV cells shared by all sequences, ``seqs`` sequence ids,
    ``batch`` tokens per ``llama_decode`` call."""

    cells: int
    seqs: int
    batch: int = 512
    threads: int | None = None


_LOG_CALLBACK = None  # keeps the quiet log callback alive (llama.cpp holds a raw pointer)


def _quiet_logs(lib) -> None:
    """Keep llama.cpp's per-load chatter off stderr; errors still print."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    @lib.llama_log_callback
    def callback(level, text, user_data):
        if level == 4:  # GGML_LOG_LEVEL_ERROR (0 none, 1 debug, 2 info, 3 warn, 5 continued)
            os.write(2, text)

    _LOG_CALLBACK = callback
    lib.llama_log_set(callback, ctypes.c_void_p(0))


class LlamaContext:
    """A model, a unified-KV context and a batch; see the module docstring."""

    def __init__(self, gguf: str | Path, size: ContextSize):
        lib = self.lib = import_llama_cpp()
        path = Path(gguf)
        if not path.is_file():
            raise LlamaCppError(f"no GGUF file at {path}")
        if not 1 <= size.seqs <= LLAMA_MAX_SEQ:
            raise LlamaCppError(f"{size.seqs} sequences requested; llama.cpp allows 1..{LLAMA_MAX_SEQ}")
        _quiet_logs(lib)
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        # no extra weight buffer types: on this CPU (AMX) llama.cpp repacks the Q4_1 weights for AMX and
        # llama_decode then segfaults (llama-cpp-python 0.3.36 built with GGML_NATIVE); the plain CPU
        # buffer runs the same kernels everywhere else
        mparams.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {path} (see its error above)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.model)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = size.cells
        cparams.n_batch = cparams.n_ubatch = min(size.batch, size.cells)
        cparams.n_seq_max = size.seqs
        cparams.kv_unified = True  # one cell pool: a cell may belong to many sequences (fork/join by seq_cp)
        threads = size.threads or os.cpu_count() or 1
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LlamaCppError(
                f"llama.cpp could not create a context of {size.cells} cells and {size.seqs} "
                "sequences (see its error above)"
            )
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.n_seq = size.seqs
        self.memory = lib.llama_get_memory(self.ctx)
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        if not sys.is_finalizing():  # at exit the bindings may be gone; the process frees everything anyway
            self.close()

    # ---------------------------------------------------------------- memory

    def copy(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Add ``dst`` to the cells of ``src`` at positions [p0, p1) (-1: open end); no data is copied."""
        self.lib.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def remove(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        """Take ``seq`` out of its cells at [p0, p1) (-1: open end); cells left with no sequence are freed."""
        if not self.lib.llama_memory_seq_rm(self.memory, seq, p0, p1):
            raise LlamaCppError(f"llama.cpp refused to remove positions [{p0}, {p1}) of sequence {seq}")

    def last_position(self, seq: int) -> int:
        """Largest position of ``seq``'s cells, -1 when it has none."""
        return self.lib.llama_memory_seq_pos_max(self.memory, seq)

    def first_position(self, seq: int) -> int:
        return self.lib.llama_memory_seq_pos_min(self.memory, seq)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    # ---------------------------------------------------------------- decode

    def decode(self, tokens: list[int], positions: list[int], seqs: list[int], logits: list[bool]) -> np.ndarray:
        """Feed the rows (token i at ``positions[i]`` of sequence ``seqs[i]``) in order, in batches of
        at most ``n_batch``; returns [rows with ``logits[i]``, n_vocab] float32, in row order."""
        lib, batch, n = self.lib, self._batch, len(tokens)
        out = np.empty((sum(map(bool, logits)), self.n_vocab), dtype=np.float32)
        row = 0
        for start in range(0, n, self.n_batch):
            end = min(n, start + self.n_batch)
            want = []
            for j, i in enumerate(range(start, end)):
                batch.token[j] = tokens[i]
                batch.pos[j] = positions[i]
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = seqs[i]
                batch.logits[j] = bool(logits[i])
                if logits[i]:
                    want.append(j)
            batch.n_tokens = end - start
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise LlamaCppError(
                    f"llama_decode returned {rc} for {end - start} tokens (1: no free KV cell; "
                    "<0: an invalid batch, llama.cpp's error above says why)"
                )
            for j in want:
                ptr = lib.llama_get_logits_ith(self.ctx, j)
                out[row] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
                row += 1
        return out
