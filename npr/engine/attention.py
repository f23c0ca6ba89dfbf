"""Paged tree attention, plugged into transformers through its public ``AttentionInterface``.

The model runs unchanged on one packed sequence of new tokens (batch 1, ``[1, N]``) with the tree
position ids. Every attention layer calls ``paged_attention_forward``, which

1. writes the new tokens' keys and values into their pool slots, then
2. runs each *attention call* of the step: the queries of one or more page-table rows (one row =
   one request: its prompt, sequential part and branches), batched as ``[G, H, Qmax, D]``, against
   the pool itself.

Writing first lets a token attend to tokens fed in the same forward: a fork (the shared separator
plus every branch's scaffold), a join (the last ``</step>`` plus ``<takeaway>``) and the re-prefill
of a preempted request each take one forward.

**One mask rule** (``tree_rule``), the rule of ``npr.masks``: a query sees a key when the key's
segment is in the query's ancestry (``key segment id < query fork threshold``, among the pages of the
query's row) and the key lies within that segment's valid length, or when the key is in the query's own
segment at or before the query. Two kernels evaluate it, behind the same interface:

- ``flex``: ``flex_attention`` (compiled) reads the pool in place, ``[1, Hkv, slots, D]``, through a
  ``BlockMask`` whose KV blocks are pool pages: each row's page list is its block table, split on the
  device into pages every query of a query block sees whole (no mask evaluated) and pages that need
  the rule. Nothing is gathered and no dense bias exists.
- ``sdpa``: gathers the keys of each row's pages and runs SDPA with the rule evaluated densely, once
  per step. Faster for short contexts on a CPU (docs/performance.md has the measurement); the
  default there. Pages that several rows share (a prompt's samples) are attended once per group
  of rows and merged by log-sum-exp (``SharedPrefix``).

All metadata is built once per forward, on the device, from the incrementally updated page table
(``kv_pool.PageTable``) and O(new tokens) per-query integers; every layer reuses it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from npr.engine.kv_pool import KVPool, Segment
from npr.engine.upload import StepUpload

ATTENTION_NAME = "npr_paged"
Q_BLOCK_SMALL = 16  # flex query-block size for decode-sized calls
Q_BLOCK_LARGE = 128  # and for prefills


@dataclass(slots=True)
class Feed:
    """Tokens of one segment fed in one forward: ``tokens`` go at offsets ``start…`` of ``segment``.

    ``row`` is the page-table row whose pages the tokens may see (their request's); ``logits`` asks
    for the logits at the last fed token.
    """

    segment: Segment
    start: int
    tokens: list[int]
    row: int
    logits: bool


def tree_rule(page_seg, page_start, page_valid, page_size: int, q_seg, q_off, q_fork, kv):
    """The mask rule: may a query (segment id ``q_seg``, offset ``q_off`` in it, fork threshold
    ``q_fork``) see pool slot ``kv``? Every argument broadcasts; page_* are [P] per-page tables.

    Visible: the key's segment is in the query's ancestry (id below the threshold, among the pages of
    the query's row) and the key lies within that segment, or the key is in the query's own segment
    at or before the query.
    """
    page = kv // page_size
    offset = kv % page_size
    seg = page_seg[page]
    own = (seg == q_seg) & (page_start[page] + offset <= q_off)
    ancestor = (seg < q_fork) & (offset < page_valid[page])
    return own | ancestor


def paged_rule(page_seg, page_start, page_valid, page_size: int, pages, live, q_seg, q_off, q_fork):
    """``tree_rule`` at every slot of each row's pages, evaluated a page at a time: the page tables are read
    once per page (not once per slot) and the slots of a page differ only by their offset. ``pages`` [G, W]
    (``live`` [G, W]: the row's real pages; the rest see nothing), q_* [G, Q] -> [G, Q, W * page_size]."""
    p = pages.long()
    seg = page_seg[p][:, None, :, None]  # [G, 1, W, 1]
    start = page_start[p][:, None, :, None]
    valid = page_valid[p][:, None, :, None]
    offset = torch.arange(page_size, device=pages.device, dtype=page_start.dtype)  # [S]
    q_seg, q_off, q_fork = (m[:, :, None, None] for m in (q_seg, q_off, q_fork))  # [G, Q, 1, 1]
    own = (seg == q_seg) & (start + offset <= q_off)  # [G, Q, W, S]
    ancestor = (seg < q_fork) & (offset < valid)
    allowed = (own | ancestor) & live[:, None, :, None]
    return allowed.reshape(allowed.shape[0], allowed.shape[1], -1)


class FlexQueries:
    """Per-query metadata of a forward for flex's ``mask_mod``, in fixed-capacity device buffers.

    The compiled kernel is specialised on the *sizes* of the tensors a ``mask_mod`` reads (the CPU
    kernel does not compile with them dynamic), so these buffers have one size per engine, enough for
    any forward (``for_pool``), and each call reads its slice ``base + b * stride + q``.
    """

    def __init__(self, device, capacity: int):
        self.device = device
        self._allocate(capacity)

    @classmethod
    def for_pool(cls, pool: KVPool) -> FlexQueries:
        """Sized for the pool: a forward feeds at most one token per pool slot; the calls pad them at most
        2x (a lone group gets an empty partner; a prefill bucket pads <= 1.25x, see ``_buckets``), decode
        groups to 16 queries each, and the last query block reads ``2 * Q_BLOCK_LARGE`` past its call."""
        slots, rows = pool.num_blocks * pool.block_size, pool.pages.rows.shape[0]
        return cls(pool.pages.device, 2 * slots + Q_BLOCK_SMALL * rows + 2 * Q_BLOCK_LARGE)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.seg, self.off, self.fork = (torch.zeros(capacity, dtype=torch.int32, device=self.device) for _ in range(3))
        for t in (self.seg, self.off, self.fork):
            torch._dynamo.mark_static(t)

    def store(self, base: int, meta: torch.Tensor, slack: int) -> None:
        """Write meta [3, n] (device) at ``base``; ``slack`` more entries stay addressable (the kernel
        may evaluate the mask for the padded rows of a last query block; those read stale entries)."""
        n = meta.shape[1]
        if base + n + slack > self.capacity:  # never, by ``for_pool``'s bound; a recompile if it were wrong
            keep = (self.seg[:base].clone(), self.off[:base].clone(), self.fork[:base].clone())
            self._allocate(max(2 * self.capacity, base + n + slack))
            for buf, old in zip((self.seg, self.off, self.fork), keep):
                buf[:base] = old
        self.seg[base : base + n] = meta[0]
        self.off[base : base + n] = meta[1]
        self.fork[base : base + n] = meta[2]


def engine_flex(query, key, value, block_mask, scale, enable_gqa, kernel_options):
    """``flex_attention`` behind a code object of the engine's own: dynamo keeps its compiled graphs
    (and counts its recompile limit) per code object, so the engine's graphs and the trainer's
    (``npr.train.logprobs.compiled_flex``, which compiles ``flex_attention`` itself) never share one
    cache entry list."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(
        query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options
    )


FLEX_BACKEND = "inductor"
"""The backend ``compiled_flex`` compiles with (tests that count graphs use ``aot_eager``: same guards)."""


@functools.cache
def _compiled_flex(backend: str):
    return torch.compile(engine_flex, dynamic=True, backend=backend)


def compiled_flex():
    """``engine_flex`` compiled once per process: dynamic shapes, and every call padded to at least
    two groups, two queries and two query blocks, so no size 0/1 specialisation recompiles it."""
    return _compiled_flex(FLEX_BACKEND)


def _mark_flex_dynamic(query, keys, values, block_mask) -> None:
    """Tell dynamo which sizes vary between calls (groups, queries, query blocks, block-table width,
    pool slots), so that the first compile is the only one: left to itself, it would specialise on
    the first call's sizes and recompile once per new one. The tensors the ``mask_mod`` reads stay
    static (one size per engine): the CPU kernel does not compile with them dynamic."""
    mark = torch._dynamo.maybe_mark_dynamic
    mark(query, 0)
    mark(query, 2)
    for t in (keys, values):
        mark(t, 2)
    for t in (block_mask.kv_num_blocks, block_mask.full_kv_num_blocks):
        mark(t, 0)
        mark(t, 2)
    for t in (block_mask.kv_indices, block_mask.full_kv_indices):
        mark(t, 0)
        mark(t, 2)
        mark(t, 3)


CUDA_LAYOUT = False
"""Use the flex block layout of CUDA on any device (tests that count graphs on a CPU set it)."""


def cuda_layout(device: torch.device) -> bool:
    """Whether flex calls on ``device`` take CUDA's block layout: 128-query blocks for prefills, Triton
    tile sizes, block tables as wide as the call's widest row."""
    return device.type == "cuda" or CUDA_LAYOUT


def q_block_size(device: torch.device, qmax: int) -> int:
    """flex query-block size: 16 (one block per decode group); prefills on CUDA use 128 (the kernel's
    preferred tile). On a CPU one size keeps it to one compile."""
    return Q_BLOCK_LARGE if cuda_layout(device) and qmax > Q_BLOCK_SMALL else Q_BLOCK_SMALL


@dataclass
class CallPlan:
    """One attention call as planned on the host: the queries of some rows batched ``[G, Qmax]``.

    ``q_range``: the call's queries are the packed rows ``[start, end)`` in order, unpadded (then no
    gather); else ``q_index`` (a ``StepUpload`` handle, [G*Qmax]) gives each query's packed row (pads
    repeat a valid row). ``meta`` [3, G, Qmax] (segment id, offset, fork threshold; pads -1, -1, 0),
    ``rows`` [G] page-table rows and ``npages`` [G] their page counts are handles too; ``width`` is the
    widest row's page count, ``flex_base`` where the call's queries start in ``FlexQueries``.
    """

    kernel: str
    rows: list[int]
    g: int
    qmax: int
    width: int
    q_range: tuple[int, int] | None
    q_index: int | None
    meta: int
    row_ids: int
    npages: int
    flex_base: int
    flex_where: int | None
    padded: bool  # some query slots are pads (groups with fewer than Qmax queries)


def plan_call(
    bucket: list, q_meta: torch.Tensor, kernel: str, table, upload: StepUpload, flex_base: int
) -> tuple[CallPlan, torch.Tensor, torch.Tensor]:
    """Plan one call over the groups of ``bucket`` ([row, queries, pages, first packed row] each) and
    stage its indices. Returns the plan and, for the output gather, each query slot's packed row
    ``index`` [G, Qmax] and ``valid`` [G, Qmax] (host tensors)."""
    rows, counts, firsts = [x[0] for x in bucket], [x[1] for x in bucket], [x[3] for x in bucket]
    if kernel == "flex" and len(rows) < 2:  # pad: >= 2 groups (an empty one), >= 2 queries per group
        rows, counts, firsts = rows + [rows[0]], counts + [0], firsts + [firsts[0]]
    g, qmax = len(rows), max(2 if kernel == "flex" else 1, max(counts))
    count = torch.tensor(counts)
    slot = torch.arange(qmax)[None, :]
    index = torch.tensor(firsts)[:, None] + torch.minimum(slot, (count.clamp(min=1) - 1)[:, None])  # [G, Qmax]
    valid = slot < count[:, None]  # [G, Qmax]
    contiguous = (
        kernel == "sdpa"
        and all(c == qmax for c in counts)
        and all(f == firsts[0] + i * qmax for i, f in enumerate(firsts))
    )
    if contiguous:
        q_range, q_index = (firsts[0], firsts[0] + g * qmax), None
        meta = q_meta[:, firsts[0] : firsts[0] + g * qmax].reshape(3, g, qmax)
    else:
        q_range, q_index = None, upload.add(index.reshape(-1))
        meta = q_meta[:, index].masked_fill(~valid, -1)  # [3, G, Qmax]; pads: no segment ...
        meta[2].masked_fill_(~valid, 0)  # ... and an empty ancestry: they see nothing
    npages = [table.row_len[r] if c else 0 for r, c in zip(rows, counts)]
    where = upload.add([flex_base, qmax], torch.int32) if kernel == "flex" else None
    plan = CallPlan(
        kernel,
        rows,
        g,
        qmax,
        max(table.row_len[r] for r in rows),
        q_range,
        q_index,
        upload.add(meta, torch.int32),
        upload.add(rows),
        upload.add(npages),
        flex_base,
        where,
        any(c != qmax for c in counts),
    )
    return plan, index, valid


class AttentionCall:
    """The device-side metadata of one planned call (``CallPlan``), built once per forward and read by every
    layer; one subclass per kernel (``DenseCall``: SDPA, ``FlexCall``: flex_attention). ``build`` picks it."""

    def __init__(self, pool: KVPool, plan: CallPlan, upload: StepUpload):
        table, device = pool.pages, pool.pages.device
        self.g, self.qmax, self.q_range, self.padded = plan.g, plan.qmax, plan.q_range, plan.padded
        self.q_index = None if plan.q_index is None else upload[plan.q_index]  # [G*Qmax]
        self.meta = upload[plan.meta]  # [3, G, Qmax] int32
        self.pages = table.rows[upload[plan.row_ids], : plan.width]  # [G, W]
        self.live = torch.arange(plan.width, device=device)[None, :] < upload[plan.npages][:, None]  # [G, W]

    @staticmethod
    def build(
        pool: KVPool,
        plan: CallPlan,
        upload: StepUpload,
        dtype: torch.dtype,
        flex_queries: FlexQueries | None,
        shared_prefix: bool = True,
    ) -> AttentionCall:
        if plan.kernel == "flex":
            return FlexCall(pool, plan, upload, flex_queries)
        return DenseCall(pool, plan, upload, dtype, shared_prefix)

    def grouped_queries(self, q: torch.Tensor) -> torch.Tensor:
        """The call's queries out of the packed q [N, H, D] -> [G, H, Qmax, D] (a view when unpadded)."""
        g, qmax = self.g, self.qmax
        if self.q_range is not None:
            start, end = self.q_range
            return q[start:end].view(g, qmax, *q.shape[1:]).transpose(1, 2)
        return q.index_select(0, self.q_index).view(g, qmax, *q.shape[1:]).transpose(1, 2)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling) -> torch.Tensor:
        """Queries q [N, H, D] (packed) against one layer's pool [Hkv, slots, D] -> [G, H, Qmax, D]."""
        raise NotImplementedError


class DenseCall(AttentionCall):
    """SDPA: the keys of each row's pages gathered (or a shared prefix attended once, ``SharedPrefix``) and
    the mask rule evaluated densely, [G, Qmax, K], as an additive bias."""

    kernel = "sdpa"

    def __init__(
        self, pool: KVPool, plan: CallPlan, upload: StepUpload, dtype: torch.dtype, shared_prefix: bool = True
    ):
        super().__init__(pool, plan, upload)
        table = pool.pages
        self._folded = None
        self.page_size = table.page_size
        allowed = self._dense_allowed(table, self.live, self.meta)
        self.shared = SharedPrefix.plan(table, plan.rows, self.pages, allowed, dtype) if shared_prefix else None
        if self.shared is None:
            self.page_index = self.pages.reshape(-1).long()  # [G*W]
            self.bias = additive_bias(allowed, dtype)
        else:  # the bias of the split's per-row part
            self.bias = self.shared.suffix_bias

    def _dense_allowed(self, table, live: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """The rule over the slots of each row's pages, [G, Qmax, K] (K = W * page_size)."""
        allowed = paged_rule(
            table.page_seg,
            table.page_start,
            table.page_valid,
            table.page_size,
            self.pages,
            live,
            meta[0],
            meta[1],
            meta[2],
        )  # [G, Qmax, K]
        if self.padded:  # pad queries see everything: no empty softmax row (their output is dropped)
            allowed |= (meta[0] < 0)[:, :, None]
        return allowed

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling) -> torch.Tensor:
        g, qmax = self.g, self.qmax
        qg = self.grouped_queries(q)
        heads, dim = keys.shape[0], keys.shape[2]
        # GQA folded into the queries: the query heads sharing a KV head become more queries of that head,
        # [G, Hkv, rep*Qmax, D] (head h = kv*rep + j -> query row j*Qmax + i). SDPA then needs no enable_gqa,
        # which with an explicit mask takes the math kernel (CPU and CUDA): 1.1-5.3x slower on the CPU
        # (docs/performance.md, "SDPA calls on a CPU")
        rep = q.shape[1] // heads
        qf = qg.reshape(g, heads, rep * qmax, dim)
        if self.shared is not None:
            out = self.shared.attend(qf, keys, values, scaling, self.folded_bias(rep), self.page_size)
        else:
            k = gather_pages(keys, self.page_index, g, self.page_size)
            v = gather_pages(values, self.page_index, g, self.page_size)
            out = F.scaled_dot_product_attention(qf, k, v, attn_mask=self.folded_bias(rep), scale=scaling)
        return out.view(g, heads * rep, qmax, dim)

    def folded_bias(self, rep: int) -> torch.Tensor:
        """The bias [G, 1, rep*Qmax, K] of the GQA-folded queries (built once per forward, reused by every layer)."""
        if self._folded is None or self._folded[0] != rep:
            self._folded = (rep, self.bias.repeat(1, 1, rep, 1) if rep > 1 else self.bias)
        return self._folded[1]


class FlexCall(AttentionCall):
    """flex_attention (compiled) over the pool in place, through a ``BlockMask`` whose KV blocks are pool pages."""

    kernel = "flex"

    def __init__(self, pool: KVPool, plan: CallPlan, upload: StepUpload, flex_queries: FlexQueries):
        super().__init__(pool, plan, upload)
        flex_queries.store(plan.flex_base, self.meta.reshape(3, -1), 2 * Q_BLOCK_LARGE)
        self.block_mask = self._block_mask(pool, self.live, self.meta, flex_queries, upload[plan.flex_where])

    def _block_mask(self, pool: KVPool, live, meta, flex_queries: FlexQueries, where: torch.Tensor):
        """flex: a BlockMask over pool pages; per query block, the pages seen whole ("full", no mask_mod)
        and the pages that need the rule ("partial"), both computed on the device from the page table."""
        from torch.nn.attention.flex_attention import BlockMask

        table, page_size, device = pool.pages, pool.block_size, self.pages.device
        qb = q_block_size(device, self.qmax)
        # the Triton kernel's tiles must divide the block mask's blocks (its defaults are larger than a page)
        self.kernel_options = {"BLOCK_M": min(qb, 64), "BLOCK_N": min(page_size, 64)} if cuda_layout(device) else None
        nqb = max(2, -(-self.qmax // qb))  # an empty trailing query block costs nothing and avoids a recompile
        pad = nqb * qb - self.qmax

        def blocks(x, fill):  # [G, Qmax] -> [G, nQB, QB, 1]
            return F.pad(x, (0, pad), value=fill).view(self.g, nqb, qb, 1)

        qs, qo, qf = blocks(meta[0], -1), blocks(meta[1], -1), blocks(meta[2], 0)
        qv = qs >= 0
        page = self.pages.long()
        seg = table.page_seg[page][:, None, None, :]  # [G, 1, 1, W]
        start = table.page_start[page][:, None, None, :]
        count = table.page_valid[page][:, None, None, :]
        ancestor, own = seg < qf, seg == qs  # [G, nQB, QB, W]
        whole = (ancestor & (count == page_size)) | (own & (start + page_size - 1 <= qo))
        some = (ancestor & (count > 0)) | (own & (start <= qo))
        live = live[:, None, :]  # [G, 1, W]
        full = (whole | ~qv).all(dim=2) & qv.any(dim=2) & live  # [G, nQB, W]
        partial = (some & qv).any(dim=2) & live & ~full
        # the CPU kernel wants the pool's width; CUDA's block tables are as wide as the widest row, at least 2
        # (a dimension of 1 would be specialised on and recompile the kernel at the first row of two pages)
        width = max(2, page.shape[1]) if cuda_layout(device) else pool.num_blocks

        def compact(keep):  # [G, nQB, W] -> counts [G, 1, nQB], indices [G, 1, nQB, width]
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
            index = page[:, None, :].expand(-1, nqb, -1).gather(-1, order).int()
            index = F.pad(index, (0, width - index.shape[-1]))
            # fresh tensors, not views: dynamo would guard on the strides of a view's base and recompile
            return keep.sum(-1, dtype=torch.int32)[:, None].clone(), index[:, None].clone()

        q_seg, q_off, q_fork = flex_queries.seg, flex_queries.off, flex_queries.fork
        page_seg, page_start, page_valid = table.page_seg, table.page_start, table.page_valid

        def mask_mod(b, h, q_idx, kv_idx):  # where: [first query in FlexQueries, Qmax]
            i = where[0] + b * where[1] + q_idx
            return tree_rule(page_seg, page_start, page_valid, page_size, q_seg[i], q_off[i], q_fork[i], kv_idx)

        partial_num, partial_index = compact(partial)
        full_num, full_index = compact(full)
        return BlockMask.from_kv_blocks(
            partial_num,
            partial_index,
            full_num,
            full_index,
            BLOCK_SIZE=(qb, page_size),
            mask_mod=mask_mod,
            seq_lengths=(self.qmax, pool.keys.shape[2]),
            compute_q_blocks=False,
        )

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling) -> torch.Tensor:
        qg = self.grouped_queries(q).contiguous()
        gqa = keys.shape[0] != q.shape[1]
        keys, values = keys[None], values[None]  # the pool itself, [1, Hkv, slots, D]: no copy
        _mark_flex_dynamic(qg, keys, values, self.block_mask)
        return compiled_flex()(qg, keys, values, self.block_mask, scaling, gqa, self.kernel_options)


def additive_bias(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """[G, Qmax, K] bool -> the additive mask [G, 1, Qmax, K]: 0 or the dtype's lowest value (never -inf, so
    a row that sees nothing stays finite)."""
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), lowest).unsqueeze(1)


def gather_pages(pool: torch.Tensor, pages: torch.Tensor, g: int, page_size: int) -> torch.Tensor:
    """One layer's pool [Hkv, slots, D] at ``pages`` [G*W] -> [G, Hkv, W*page_size, D] with contiguous
    (g, h) blocks, copied a page at a time (a page is one contiguous run of page_size * D per head)."""
    heads, dim = pool.shape[0], pool.shape[2]
    return pool.view(heads, -1, page_size * dim).index_select(1, pages).view(heads, g, -1, dim).transpose(0, 1)


def attention_with_lse(q, k, v, bias, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA [B, H, L, D] that also returns each query's log-sum-exp of its scores, [B, H, L] fp32: the CPU
    flash kernel that ``F.scaled_dot_product_attention`` runs there, asked for its second output."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)


class SharedPrefix:
    """SDPA over the pages that several rows of a call share, once for all of them (CPU).

    The samples of one prompt are rows whose page lists start with the same pages (the prompt's,
    stored once), and so are the samples of prompts that share their first pages (a batch's system
    instruction, ``EngineConfig.share_prompt_prefix``). Gathered per row, those pages are copied and
    read once per sample. Here the queries of such a group attend to the group's shared leading pages
    in one call (its queries stacked, the pages gathered once), every row attends to the rest of its
    pages in a second call, and the two partial results merge by their log-sum-exps, as flash
    attention merges tiles: ``out = (o1 e^l1 + o2 e^l2) / (e^l1 + e^l2)``. Exact up to rounding. A shared page
    counts only
    where every query of the group sees all of its slots, so the prefix call needs no mask beyond
    each group's prefix length.
    """

    MIN_SAVED = 0.25
    """Used when the pages it spares from gathering are at least this share of the call's pages."""

    def __init__(self, prefix_rows, row_pos, prefix_pages, prefix_bias, groups, per, suffix_pages, suffix_bias):
        self.prefix_rows, self.row_pos = prefix_rows, row_pos  # [Gp*per] rows of the prefix call; [G] row -> entry
        self.prefix_pages, self.prefix_bias = prefix_pages, prefix_bias  # [Gp*Lmax]; [Gp, 1, 1, Lmax*S] or None
        self.groups, self.per = groups, per
        self.suffix_pages, self.suffix_bias = suffix_pages, suffix_bias  # [G*Ws]; [G, 1, Qmax, Ws*S]

    @classmethod
    def plan(cls, table, rows: list[int], pages: torch.Tensor, allowed: torch.Tensor, dtype) -> SharedPrefix | None:
        """The split of one call, or None where too little is shared (or off the CPU, which has the
        log-sum-exp kernel). ``pages`` [G, W] and ``allowed`` [G, Qmax, W*S] are the plain call's."""
        if pages.device.type != "cpu" or len(rows) < 2:
            return None
        g, width = pages.shape
        qmax, size = allowed.shape[1], table.page_size
        by_first: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if table.row_len[r]:
                by_first.setdefault(table.host_rows[r][0], []).append(i)
        common = []  # (members, leading pages they all list), from the host lists alone
        for members in by_first.values():
            if len(members) < 2:
                continue
            lists = [table.host_rows[rows[i]] for i in members]
            n, most = 0, min(len(p) for p in lists)
            while n < most and all(p[n] == lists[0][n] for p in lists):
                n += 1
            common.append((members, n))
        needed = cls.MIN_SAVED * sum(table.row_len[r] for r in rows)
        if sum((len(m) - 1) * n for m, n in common) < needed:  # an upper bound on the saving: no device work
            return None
        whole = allowed.view(g, qmax, width, size).all(dim=3).all(dim=1).tolist()  # [G][W]: every query sees it all
        shared = []  # (members, shared leading pages every query of the group sees whole)
        for members, most in common:
            n = 0
            while n < most and all(whole[i][n] for i in members):
                n += 1
            if n:
                shared.append((members, n))
        if sum((len(m) - 1) * n for m, n in shared) < needed:
            return None
        per, lmax = max(len(m) for m, _ in shared), max(n for _, n in shared)
        skip = [0] * g  # each row's leading pages attended in the prefix call
        row_pos = [len(shared) * per] * g  # rows without a shared prefix: the "nothing seen" entry past the end
        prefix_rows, prefix_pages = [], []
        for gp, (members, n) in enumerate(shared):
            for j, i in enumerate(members):
                skip[i], row_pos[i] = n, gp * per + j
            prefix_rows += members + [members[0]] * (per - len(members))  # pads repeat a member; dropped
            head = table.host_rows[rows[members[0]]][:n]
            prefix_pages += head + [head[0]] * (lmax - n)
        prefix_bias = None
        if any(n != lmax for _, n in shared):
            seen = torch.arange(lmax * size)[None, :] < torch.tensor([n for _, n in shared])[:, None] * size
            prefix_bias = additive_bias(seen[:, None, :], dtype)  # [Gp, 1, 1, Lmax*S]
        # the rest of each row: its columns from skip on, moved to the front, [G, Ws]
        ws = max(table.row_len[r] - s for r, s in zip(rows, skip))
        column = torch.tensor(skip)[:, None] + torch.arange(ws)[None, :]
        inside = column < width
        column = column.clamp(max=width - 1)
        rest = allowed.view(g, qmax, width, size).gather(2, column[:, None, :, None].expand(-1, qmax, -1, size))
        rest &= inside[:, None, :, None]  # [G, Qmax, Ws, S]
        return cls(
            torch.tensor(prefix_rows),
            torch.tensor(row_pos),
            torch.tensor(prefix_pages),
            prefix_bias,
            len(shared),
            per,
            pages.gather(1, column).reshape(-1).long(),
            additive_bias(rest.reshape(g, qmax, ws * size), dtype),
        )

    def attend(
        self,
        qf: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scaling,
        suffix_bias: torch.Tensor,
        page_size: int,
    ) -> torch.Tensor:
        """Folded queries qf [G, Hkv, rep*Qmax, D] against one layer's pool -> [G, Hkv, rep*Qmax, D];
        ``suffix_bias`` is ``self.suffix_bias`` folded the same way (``AttentionCall.folded_bias``)."""
        g, heads, rq, dim = qf.shape
        gp, per = self.groups, self.per
        # the prefix call: each group's queries stacked, [Gp, Hkv, per*rq, D], against its pages gathered once
        qp = qf.index_select(0, self.prefix_rows).view(gp, per, heads, rq, dim).transpose(1, 2)
        o1, l1 = attention_with_lse(
            qp.reshape(gp, heads, per * rq, dim),
            gather_pages(keys, self.prefix_pages, gp, page_size),
            gather_pages(values, self.prefix_pages, gp, page_size),
            self.prefix_bias,
            scaling,
        )
        o1 = o1.view(gp, heads, per, rq, dim).transpose(1, 2).reshape(gp * per, heads, rq, dim)
        l1 = l1.view(gp, heads, per, rq).transpose(1, 2).reshape(gp * per, heads, rq)
        # one more entry for the rows without a shared prefix: nothing seen, weight 0 in the merge
        o1 = torch.cat([o1, o1.new_zeros(1, heads, rq, dim)]).index_select(0, self.row_pos)
        l1 = torch.cat([l1, l1.new_full((1, heads, rq), float("-inf"))]).index_select(0, self.row_pos)
        o2, l2 = attention_with_lse(
            qf,
            gather_pages(keys, self.suffix_pages, g, page_size),
            gather_pages(values, self.suffix_pages, g, page_size),
            suffix_bias,
            scaling,
        )
        top = torch.maximum(l1, l2)
        w1, w2 = (l1 - top).exp_(), (l2 - top).exp_()
        total = w1 + w2
        out = o1.float() * (w1 / total)[..., None] + o2.float() * (w2 / total)[..., None]
        return out.to(qf.dtype)


@dataclass
class PagedBatch:
    pool: KVPool
    write_slots: torch.Tensor  # [N] slot of each packed new token
    calls: list[AttentionCall]
    out_index: torch.Tensor | None  # [N]: each packed query's row in the calls' outputs, concatenated; None: in order


def paged_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask=None,
    scaling=None,
    dropout=0.0,
    npr_batch: PagedBatch | None = None,
    **kwargs,
):
    """AttentionInterface entry: query [1, H, N, D], key/value [1, Hkv, N, D] -> ([1, N, H, D], None)."""
    if npr_batch is None:
        raise RuntimeError("npr_paged attention called without npr_batch; use the Engine (or sdpa) instead")
    pool, layer = npr_batch.pool, module.layer_idx
    keys, values = pool.keys[layer], pool.values[layer]  # [Hkv, slots, D]
    keys.index_copy_(1, npr_batch.write_slots, key[0].to(keys.dtype))
    values.index_copy_(1, npr_batch.write_slots, value[0].to(values.dtype))
    q = query[0].transpose(0, 1)  # [N, H, D]
    outs = [
        call.attend(q, keys, values, scaling).transpose(1, 2).reshape(-1, *q.shape[1:])  # [G*Qmax, H, D]
        for call in npr_batch.calls
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if npr_batch.out_index is not None:  # drop pads and restore the packed order: indices planned on the host
        out = out.index_select(0, npr_batch.out_index)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)


@contextmanager
def paged_attention(model):
    """Route the model's attention layers to ``paged_attention_forward`` for the duration."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


# ----------------------------------------------------------------------------- building a forward


def _buckets(groups: list, small_queries: int, dense: bool, max_waste: float = 1.25) -> list[list]:
    """Split groups (row, query count, page count, …) into attention calls.

    ``dense`` (SDPA): a call costs G x Qmax x Kmax, padding included, so groups sorted by shape share a
    call only while the padded work stays within ``max_waste`` times the real work; a decode step whose
    rows are mostly one query (with a few forking rows of 13) or of varied lengths runs as a few calls
    instead of one padded to the largest row (3.2x the real work on the tiny eval; docs/performance.md,
    "SDPA calls on a CPU"). Otherwise (flex, block-sparse over pages: keys are never padded and a query
    block holds ``small_queries`` queries) decode-sized groups share one call and only larger ones
    (prefills) are split by the same rule."""
    small = [] if dense else [g for g in groups if g[1] <= small_queries]
    large = sorted((g for g in groups if dense or g[1] > small_queries), key=lambda g: (g[1], g[2]))
    buckets = [small] if small else []
    current: list = []
    real = pages = 0
    for g in large:  # sorted by query count: the newest group has the most queries
        if current and (len(current) + 1) * g[1] * max(g[2], pages) > max_waste * (real + g[1] * g[2]):
            buckets.append(current)
            current, real, pages = [], 0, 0
        current.append(g)
        real += g[1] * g[2]
        pages = max(pages, g[2])
    if current:
        buckets.append(current)
    return buckets


@dataclass
class BatchPlan:
    """One forward as planned on the host: ``StepUpload`` handles of its inputs and its attention calls."""

    input_ids: int  # [1, N]
    position_ids: int  # [1, N]
    write_slots: int  # [N]
    logit_rows: int  # [L] packed rows whose logits are needed
    all_rows_logits: bool  # L == N: the forward keeps every row's logits
    calls: list[CallPlan]
    out_index: int | None  # [N], see PagedBatch

    def build(self, pool: KVPool, upload: StepUpload, dtype: torch.dtype, shared_prefix: bool = True):
        """After ``upload.send``: ``input_ids``, ``position_ids``, the ``PagedBatch`` and ``logit_rows``
        on the device (call after ``pool.pages.apply``: the calls read the page table)."""
        flex_queries = None
        if any(c.kernel == "flex" for c in self.calls):
            if pool.flex_queries is None:
                pool.flex_queries = FlexQueries.for_pool(pool)
            flex_queries = pool.flex_queries
        calls = [AttentionCall.build(pool, c, upload, dtype, flex_queries, shared_prefix) for c in self.calls]
        out_index = None if self.out_index is None else upload[self.out_index]
        batch = PagedBatch(pool, upload[self.write_slots], calls, out_index)
        return upload[self.input_ids], upload[self.position_ids], batch, upload[self.logit_rows]


def plan_batch(feeds: Sequence[Feed], pool: KVPool, choose_kernel, small_queries: int, upload: StepUpload) -> BatchPlan:
    """Plan one forward over ``feeds`` and stage its indices (and the page table's queued updates) in
    ``upload``. Marks the fed tokens as written. The feeds of one row must be consecutive.
    ``choose_kernel(g, qmax, keys)`` names the kernel ("flex" or "sdpa") of each call."""
    bs = pool.block_size
    ids, positions, writes, logit_rows = [], [], [], []
    meta: list[list[int]] = [[], [], []]  # per packed token: segment id, offset, fork threshold
    groups: dict[int, list] = {}  # row -> [row, query count, pages, first packed row]
    row_order: list[int] = []
    n = 0
    seg_ids, offsets, forks = meta
    row_len = pool.pages.row_len
    for f in feeds:
        count, seg, start = len(f.tokens), f.segment, f.start
        if count == 1:  # a decode row: no ranges or list comprehensions (this loop runs once per row per step)
            ids.append(f.tokens[0])
            positions.append(seg.start_pos + start)
            writes.append(seg.pages[start // bs] * bs + start % bs)
            seg_ids.append(seg.id)
            offsets.append(start)
            forks.append(seg.fork)
        else:
            ids += f.tokens
            positions += range(seg.start_pos + start, seg.start_pos + start + count)
            writes += seg.slots(start, start + count, bs)
            seg_ids += [seg.id] * count
            offsets += range(start, start + count)
            forks += [seg.fork] * count
        group = groups.get(f.row)
        if group is None:
            group = groups[f.row] = [f.row, 0, row_len[f.row], n]
            row_order.append(f.row)
        elif group[3] + group[1] != n:
            raise ValueError("the feeds of one page-table row must be consecutive")
        group[1] += count
        if f.logits:
            logit_rows.append(n + count - 1)
        n += count
        seg.written = start + count
    pool.pages.stage(upload)
    q_meta = torch.tensor(meta, dtype=torch.int32)  # [3, N] on the host
    calls, base = [], 0
    dense = (
        choose_kernel(len(groups), max(g[1] for g in groups.values()), sum(g[2] for g in groups.values()) * bs)
        == "sdpa"
    )
    out_index = torch.empty(n + 1, dtype=torch.long)  # the last entry takes the pads
    for bucket in _buckets([groups[r] for r in row_order], small_queries, dense):
        kernel = choose_kernel(len(bucket), max(x[1] for x in bucket), sum(x[2] for x in bucket) * bs)
        call, index, valid = plan_call(bucket, q_meta, kernel, pool.pages, upload, base)
        slots = base + torch.arange(call.g * call.qmax)
        out_index.scatter_(0, torch.where(valid, index, n).reshape(-1), slots)
        calls.append(call)
        base += call.g * call.qmax
    in_order = (
        base == n
        and all(c.q_range is not None for c in calls)
        and [c.q_range[0] for c in calls] == sorted(c.q_range[0] for c in calls)
    )
    return BatchPlan(
        upload.add([ids]),
        upload.add([positions]),
        upload.add(writes),
        upload.add(logit_rows),
        len(logit_rows) == n,
        calls,
        None if in_order else upload.add(out_index[:n]),
    )


def build_batch(
    feeds: Sequence[Feed],
    pool: KVPool,
    dtype: torch.dtype,
    choose_kernel,
    small_queries: int,
    shared_prefix: bool = True,
):
    """``plan_batch``, sent in an upload of its own, then built: ``input_ids`` [1, N], ``position_ids``
    [1, N], the ``PagedBatch`` and ``logit_rows`` (tests and tools; the engine shares the step's upload)."""
    upload = StepUpload()
    plan = plan_batch(feeds, pool, choose_kernel, small_queries, upload)
    upload.send(pool.pages.device)
    pool.pages.apply(upload)
    return plan.build(pool, upload, dtype, shared_prefix)
