"""NPR's parallel branches on llama.cpp: npr's scheduler, llama.cpp's unified KV cache as the runner.

``LlamaCppEngine(gguf, tokenizer, EngineConfig)`` is an ``npr.engine.Engine`` whose runner is
llama.cpp: the scheduler (``npr.engine.scheduler``: the NPR grammar of ``npr.masks.next_phase``, the
scaffold of ``npr.schema.canonical``, budgets across branches, ``max_branches``, ``min_fork_budget``,
illegal-schema ends, admission, preemption, continuous batching, ``n`` samples sharing the prompt)
plans every step exactly as for the torch runner, and ``step`` executes the plan on llama.cpp.
``submit``, ``generate``, ``generate_stream``, ``cancel`` and the ``Result`` / ``EngineEvent`` types are
the engine's own.

**The mapping** (docs/engine.md, "llama.cpp backend"). A resident request owns a *main sequence*
``m``; a branch segment owns a sequence while it is decoded. A segment's tokens decode on one of them:

- the shared prompt prefix and the prompt are decoded once, on the main sequence of the request in
  whose row the scheduler feeds them, and copied (``seq_cp``, no data) to every other resident reader;
- a main-line segment (the response before a block, a takeaway and what follows) decodes on ``m``;
- a branch decodes on its own sequence ``b``, made by copying ``m``'s cells at positions below the
  branch's first position (the prefix and everything before the fork: its ancestry, not its
  siblings), so branches decode together at overlapping positions without seeing each other;
- a branch that has closed (``</step>`` and its separator written) is copied back onto ``m`` at its
  own positions and ``b`` is removed: at the join ``m`` holds every branch, its last position is
  pos(separator) + longest branch, and the takeaway decodes there, on llama.cpp's own position rule.

One scheduler step may need several ``llama_decode`` calls (*waves*): a feed waits for a later wave
while a segment it reads is fed in this step on another sequence (the shared separator before the
branches of a fork, a branch's last tokens before the takeaway, a prefix before another group's
prompt). Decode-only steps are one call. The scheduler's KV pages account for the cells: the
context has as many cells as the pool has slots, and a segment never holds more cells than slots.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from npr.backends.llama_context import LLAMA_MAX_SEQ, ContextSize, LlamaContext, LlamaCppError
from npr.engine.config import CPU_KV_CACHE_GIB, EngineConfig, EngineInputError
from npr.engine.engine import Engine, EngineEvent
from npr.engine.kv_pool import KVPool, Segment
from npr.engine.sampling import apply_repetition_penalty, redraw_wide, sample
from npr.engine.scheduler import Scheduler
from npr.engine.state import Request, Scaffold, Stream
from npr.schema import GUIDELINE_SEPARATOR, STEP_SEPARATOR, TAKEAWAY_OPEN, plan_label, step_open
from npr.tokens import tag_token_ids

KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16


class _RequestSeqs:
    """The llama.cpp sequences of one resident request: its main sequence, what it holds of the
    shared prompt, and one sequence per branch segment being decoded."""

    __slots__ = ("main", "shared", "branches", "preemptions")

    def __init__(self, main: int, preemptions: int):
        self.main = main
        self.preemptions = preemptions  # the request's count when these were made: a later one frees them
        self.shared: set[int] = set()  # ids of the prefix / prompt segments copied or decoded onto main
        self.branches: dict[int, int] = {}  # branch segment id -> its sequence


class LlamaCppEngine(Engine):
    """npr's engine API on llama.cpp (see the module docstring). ``gguf``: a GGUF file whose vocabulary
    holds the tokenizer's ids (the NPR tags included: ``npr.backends.gguf_model``); ``threads``:
    llama.cpp's CPU threads (default: torch's, as npr's engine uses; ggml's threads spin while they
    wait, so on a CPU shared with other work fewer threads can be much faster)."""

    def __init__(self, gguf: str | Path, tokenizer, config: EngineConfig | None = None, threads: int | None = None):
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        seqs = 2 * cfg.max_num_seqs + 1  # a main sequence per resident request, one per live branch, one spare
        if seqs > LLAMA_MAX_SEQ:
            raise EngineInputError(
                f"max_num_seqs={cfg.max_num_seqs} needs {seqs} llama.cpp sequences; llama.cpp "
                f"allows {LLAMA_MAX_SEQ}: use max_num_seqs <= {(LLAMA_MAX_SEQ - 1) // 2}"
            )
        facts = gguf_facts(gguf)
        self.context_length, self.vocab_size = facts.context_length, facts.vocab_size
        if len(tokenizer) > self.vocab_size:
            raise EngineInputError(
                f"the tokenizer has {len(tokenizer)} ids but {gguf} only {self.vocab_size}: the "
                "GGUF lacks the NPR tags (build it with npr.backends.gguf_model)"
            )
        tokens = cfg.kv_cache_tokens or int((cfg.kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30 // facts.kv_bytes_per_token)
        num_blocks = max(1, tokens // cfg.block_size)
        batch = min(cfg.max_num_batched_tokens or 2048, 2048)
        self.llama = LlamaContext(
            gguf,
            ContextSize(
                cells=num_blocks * cfg.block_size + batch,
                seqs=seqs,
                batch=batch,
                threads=threads or torch.get_num_threads(),
            ),
        )
        # the scheduler's page accounting only: no tensors (0 layers)
        self.pool = KVPool(0, 1, 1, num_blocks, cfg.block_size, torch.float32, "cpu", max_rows=cfg.max_num_seqs)
        self.scaffold = llama_scaffold(tokenizer, cfg)
        self.scheduler = Scheduler(cfg, self.pool, self.scaffold)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._seqs: dict[int, _RequestSeqs] = {}  # request id -> its sequences
        self._free = list(range(seqs - 1, -1, -1))
        self.decode_calls = 0

    # ------------------------------------------------------------------ a step

    def step(self) -> EngineEvent:
        """One scheduler step: plan, decode the feeds on llama.cpp (one call, or a few waves at forks and
        joins), sample every stream, consume. More prompts may be submitted between steps."""
        plan = self.scheduler.plan()
        self.scheduler.seen_updates = []  # the torch runner's table; here the streams' histories are read
        self._sync()
        event = EngineEvent()
        if plan.feeds:
            logits = self._run(plan.feeds)  # [feeds asking for logits, V]
            streams = [s for group in plan.samplers for s in group]
            fan = [r for r, group in enumerate(plan.samplers) for _ in group]
            rows = torch.from_numpy(logits[fan] if len(fan) != len(logits) else logits)
            tokens, logprobs = self._sample(streams, rows)
            event.deltas = self.scheduler.consume(list(zip(streams, tokens, logprobs)))
            event.tokens = sum(len(f.tokens) for f in plan.feeds)
        self._sync()
        event.finished = [self._result(r) for r in self.scheduler.take_finished()]
        event.live_requests = len(self.scheduler.running)
        event.waiting_groups = len(self.scheduler.waiting)
        event.preempted_requests = len(self.scheduler.preempted)
        if self.config.debug and not self.scheduler.has_work():
            self.assert_empty()
        return event

    def assert_empty(self) -> None:
        """Debug check, with nothing left to do: every page, seen row, sequence id and KV cell is free."""
        self.pool.assert_empty()
        self.scheduler.assert_no_seen_rows_held()
        held = [s for s in range(self.llama.n_seq) if self.llama.last_position(s) >= 0]
        if self._seqs or held or len(self._free) != self.llama.n_seq:
            raise AssertionError(
                f"llama.cpp leak: sequences {held} hold cells, {len(self._seqs)} request(s) mapped, "
                f"{self.llama.n_seq - len(self._free)} id(s) taken"
            )

    # ------------------------------------------------------------------ sequences

    def _take_seq(self) -> int | None:
        return self._free.pop() if self._free else None

    def _drop_seq(self, seq: int) -> None:
        self.llama.remove(seq)
        self._free.append(seq)

    def _sync(self) -> None:
        """Free the sequences of requests that left the pool (finished or preempted), give new resident
        requests a main sequence, copy written prompts to readers that lack them, merge closed branches."""
        resident = {r.id: r for r in self.scheduler.running if r.resident}
        gone = [
            rid
            for rid, seqs in self._seqs.items()
            if rid not in resident or resident[rid].preemptions != seqs.preemptions
        ]  # preempted and readmitted in one plan
        for rid in gone:
            seqs = self._seqs.pop(rid)
            for seq in seqs.branches.values():
                self._drop_seq(seq)
            self._drop_seq(seqs.main)
        for req in resident.values():
            if req.id not in self._seqs:
                seq = self._take_seq()
                assert seq is not None, "a resident request always has a sequence id (2 * max_num_seqs + 1)"
                self._seqs[req.id] = _RequestSeqs(seq, req.preemptions)
        for req in resident.values():
            self._share_prompt(req)
            self._merge_closed(req)

    def _holder(self, seg: Segment) -> int | None:
        """A main sequence holding the whole shared segment ``seg`` (prefix or prompt), or None."""
        for seqs in self._seqs.values():
            if seg.id in seqs.shared:
                return seqs.main
        return None

    def _share_prompt(self, req: Request) -> bool:
        """Copy the written prefix and prompt onto ``req``'s main sequence if another holds them.
        Returns whether it now holds both (each part that exists)."""
        seqs = self._seqs[req.id]
        for seg in (req.group.prefix, req.group.prompt):
            if seg is None or seg.id in seqs.shared:
                continue
            if seg.written < len(seg):
                return False
            holder = self._holder(seg)
            if holder is None:
                return False  # re-fed by the scheduler (its pages went with its last reader)
            self.llama.copy(holder, seqs.main, seg.start_pos, seg.start_pos + len(seg))
            seqs.shared.add(seg.id)
        return True

    def _merge_closed(self, req: Request) -> None:
        """Copy every written, closed branch onto the main sequence and free its sequence."""
        seqs = self._seqs[req.id]
        if not seqs.branches:
            return
        closed = {b.segment.id for b in req.open_block.branches if b.closed} if req.open_block else set()
        for seg in req.segments:
            seq = seqs.branches.get(seg.id)
            if seq is not None and (seg.frozen or seg.id in closed) and seg.written == len(seg):
                self.llama.copy(seq, seqs.main, seg.start_pos, -1)
                del seqs.branches[seg.id]
                self._drop_seq(seq)

    # ------------------------------------------------------------------ decoding a plan

    def _target(self, feed, req: Request, completing: dict[int, int]) -> int | None:
        """The sequence ``feed`` decodes on, its ancestry in place; None while it must wait a wave."""
        seqs, seg, group = self._seqs[req.id], feed.segment, req.group

        def ready(s: Segment, seq: int) -> bool:  # written, or completed earlier in this wave on ``seq``
            return s.written == len(s) or completing.get(s.id) == seq

        if seg is group.prefix:
            return seqs.main
        if seg is group.prompt:
            if group.prefix is not None and group.prefix.id not in seqs.shared:
                if completing.get(group.prefix.id) == seqs.main:
                    return seqs.main
                if not self._share_prompt(req):
                    return None
            return seqs.main
        for s in (group.prefix, group.prompt):
            if s is not None and s.id not in seqs.shared and completing.get(s.id) != seqs.main:
                if not self._share_prompt(req):
                    return None
        if seg.branch == 0:
            for s in req.segments:
                if s.id >= seg.fork:
                    break
                if not ready(s, seqs.main) or s.id in seqs.branches:
                    return None
            return seqs.main
        seq = seqs.branches.get(seg.id)
        if seq is not None:
            return seq
        for s in req.segments:  # a new branch sequence: its whole ancestry must be on main
            if s.id >= seg.fork:
                break
            if s.written < len(s) or s.id in seqs.branches:
                return None
        seq = self._take_seq()
        if seq is None:
            return None
        self.llama.copy(seqs.main, seq, 0, seg.start_pos)
        seqs.branches[seg.id] = seq
        return seq

    def _run(self, feeds: Sequence) -> np.ndarray:
        """Decode every feed (in waves, see the module docstring); the logits of the feeds that ask, in
        feed order: [n, V] float32."""
        by_row = {r.row: r for r in self.scheduler.running if r.resident}
        out: dict[int, np.ndarray] = {}
        pending = list(enumerate(feeds))
        while pending:
            tokens, positions, seq_ids, wants, fed, later = [], [], [], [], [], []
            completing: dict[int, int] = {}
            for index, feed in pending:
                req = by_row[feed.row]
                seq = self._target(feed, req, completing)
                if seq is None:
                    later.append((index, feed))
                    continue
                seg, n = feed.segment, len(feed.tokens)
                first = seg.start_pos + feed.start
                tokens += feed.tokens
                positions += range(first, first + n)
                seq_ids += [seq] * n
                wants += [False] * (n - 1) + [feed.logits]
                fed.append((index, feed, req, seq))
                if feed.start + n == len(seg):
                    completing[seg.id] = seq
            if not fed:
                raise LlamaCppError(
                    "the llama.cpp backend could not place any feed of this step (a bug: please "
                    "report it with the request that triggered it)"
                )
            logits = self.llama.decode(tokens, positions, seq_ids, wants)
            self.decode_calls += 1
            row = 0
            for index, feed, req, _seq in fed:
                seg = feed.segment
                seg.written = feed.start + len(feed.tokens)
                if seg is req.group.prefix or seg is req.group.prompt:
                    if seg.written == len(seg):
                        self._seqs[req.id].shared.add(seg.id)
                if feed.logits:
                    out[index] = logits[row]
                    row += 1
            self._sync()
            pending = later
        return np.stack([out[i] for i in sorted(out)]) if out else np.zeros((0, self.vocab_size), np.float32)

    # ------------------------------------------------------------------ sampling

    def _sample(self, streams: list[Stream], logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """One token per stream from its logits row [S, V]: the repetition penalty inside branches, the
        logits processors, then ``npr.engine.sampling.sample`` with the engine's counter-keyed noise, so
        the same settings draw the same tokens as the torch runner would from the same logits."""
        want_logprobs = any(s.request.params.logprobs for s in streams)
        raw = logits.clone() if want_logprobs else logits
        penalty = self.config.repetition_penalty
        if penalty != 1.0:
            rows = [i for i, s in enumerate(streams) if s.seen_slot >= 0 and s.history]
            if rows:
                lists = [sorted(set(streams[i].history)) for i in rows]
                width = max(map(len, lists))
                seen = torch.tensor([ids + [ids[0]] * (width - len(ids)) for ids in lists], dtype=torch.long)
                apply_repetition_penalty(logits, seen, torch.full((len(rows),), penalty), rows=torch.tensor(rows))
        for i, stream in enumerate(streams):
            for processor in stream.request.params.logits_processors:
                out = processor(stream, logits[i])
                if out is not logits[i]:
                    logits[i] = out
        params = self._row_params(streams)  # the engine's settings and noise: the same draws as npr's engine
        tokens, wide = sample(logits, params)
        token_ids = tokens.tolist()
        for i in [i for i, w in enumerate(wide.tolist()) if w]:
            token_ids[i] = redraw_wide(logits, params, [i])[0]
        if not want_logprobs:
            return token_ids, [math.nan] * len(streams)
        lse = torch.logsumexp(raw, dim=-1)
        chosen = raw.gather(1, torch.tensor(token_ids)[:, None])[:, 0] - lse
        return token_ids, chosen.tolist()


def llama_scaffold(tokenizer, config: EngineConfig) -> Scaffold:
    """The engine's scaffold ids (``npr.schema.canonical``) from the tokenizer, as ``Engine`` builds them."""
    enc = lambda s: tuple(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
    eos = tokenizer.eos_token_id
    tags = tag_token_ids(tokenizer)
    return Scaffold(
        tag_of={v: k for k, v in tags.items()},
        plan_label=tuple(enc(plan_label(k)) for k in range(1, config.max_branches + 1)),
        guideline_separator=enc(GUIDELINE_SEPARATOR),
        step_open=tuple(enc(step_open(k)) for k in range(1, config.max_branches + 1)),
        step_separator=enc(STEP_SEPARATOR),
        takeaway_open=enc(TAKEAWAY_OPEN),
        eos_ids=frozenset(eos if isinstance(eos, (list, tuple)) else [eos]) - {None},
    )


@dataclass(frozen=True)
class GGUFFacts:
    """What the engine reads from a GGUF's header before loading it."""

    vocab_size: int
    context_length: int
    kv_bytes_per_token: int
    """KV cache bytes per cell (f16 keys and values, every layer)."""


def gguf_facts(gguf: str | Path) -> GGUFFacts:
    """The header facts of ``gguf`` (read once per file version: GGUFReader parses the whole vocabulary)."""
    stat = Path(gguf).stat()
    return _gguf_facts(str(gguf), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_facts(gguf: str, size: int, mtime_ns: int) -> GGUFFacts:
    from gguf import GGUFReader

    from npr.backends.gguf_model import _field_value

    fields = GGUFReader(gguf).fields
    value = lambda key: _field_value(fields[key])  # noqa: E731
    arch = value("general.architecture")
    heads = value(f"{arch}.attention.head_count")
    kv_heads = value(f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv" in fields else heads
    head_dim = (
        value(f"{arch}.attention.key_length")
        if f"{arch}.attention.key_length" in fields
        else value(f"{arch}.embedding_length") // heads
    )
    return GGUFFacts(
        vocab_size=len(fields["tokenizer.ggml.tokens"].data),
        context_length=value(f"{arch}.context_length"),
        kv_bytes_per_token=value(f"{arch}.block_count") * 2 * kv_heads * head_dim * KV_BYTES_PER_VALUE,
    )
