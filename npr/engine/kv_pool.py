"""The block-paged KV pool, its device-side page table, and the segments that live in it.

A **segment** is a run of tokens of one stream stored in its own blocks (pages): a prompt, the
sequential part of a response, one branch, a takeaway and what follows it. A segment sees its own
earlier tokens and every token of its ancestry (``npr.masks``): the prompt and every segment of its
request created before its *fork threshold* (``Segment.fork``). Segment ids grow in creation order,
so "in my ancestry" is the integer test ``other.id < self.fork`` among the pages of one request:

- a main-line segment (the response before the first block, a takeaway and what follows it) has
  ``fork = id``: it sees everything its request wrote before it;
- a branch has ``fork = id of its block's first branch``: it sees the prefix, not its siblings.

Sharing is by page table, never by copy: the prompt of n samples is stored once and listed in the
page table of each of its samples, the whole pages several prompts begin with (a shared system
instruction) are one older segment listed by all of them, the prefix of k branches is listed once in
their request's row, and a join copies nothing (the takeaway's threshold lies past every branch).

The pool tensors are ``[num_layers, kv_heads, num_slots, head_dim]``; slot = page * page_size + offset.
``PageTable`` keeps, on the model's device, per page its segment id, first offset and number of valid
slots, and per *row* (one resident request) its list of pages. Updates are queued on the host as
they happen (a handful of integers per new page) and travel in the step's one upload (``StepUpload``),
so nothing per step grows with the context in Python.
"""

from __future__ import annotations

import torch

from npr.engine.upload import StepUpload


class PoolExhausted(RuntimeError):
    """The pool has no free page; the scheduler plans every step within the free pages, so this is a bug."""


class PageTable:
    """Device-side paging metadata, updated incrementally (see the module docstring).

    ``page_seg`` [P] int32, ``page_start`` [P] int32 and ``page_valid`` [P] int32 describe page p;
    ``rows`` [R, W] int32 lists each row's pages (its first ``row_len[r]`` entries are live), and
    ``host_rows`` holds the same lists on the host (the SDPA kernel groups rows by shared pages).
    """

    def __init__(self, num_pages: int, page_size: int, max_rows: int, device):
        self.device = torch.device(device)
        self.page_size = page_size
        self.page_seg = torch.full((num_pages,), -1, dtype=torch.int32, device=device)
        self.page_start = torch.zeros(num_pages, dtype=torch.int32, device=device)
        self.page_valid = torch.zeros(num_pages, dtype=torch.int32, device=device)
        for t in (self.page_seg, self.page_start, self.page_valid):  # flex's mask reads them: any pool size
            torch._dynamo.mark_static(t)
        # every row may list every page: one size per engine (the attention metadata reads it)
        self.rows = torch.zeros(max_rows, num_pages, dtype=torch.int32, device=device)
        self.row_len = [0] * max_rows
        self.host_rows: list[list[int]] = [[] for _ in range(max_rows)]  # the same page lists, on the host
        self._free_rows = list(range(max_rows - 1, -1, -1))
        # queued updates, last write wins (a page or a row may be freed and reused before a flush)
        self._pages: dict[int, list[int]] = {}  # page -> [seg id, start, valid]
        self._valid: dict[int, int] = {}  # page -> valid, for pages not described since the last flush
        self._entries: dict[tuple[int, int], int] = {}  # (row, column) -> page
        self._staged: tuple[int | None, int | None, int | None] = (None, None, None)  # StepUpload handles

    # ---------------------------------------------------------------- host-side queueing

    def describe_page(self, page: int, seg_id: int, start: int) -> None:
        self._pages[page] = [seg_id, start, self.page_size]
        self._valid.pop(page, None)

    def set_valid(self, page: int, valid: int) -> None:
        if page in self._pages:
            self._pages[page][2] = valid
        else:
            self._valid[page] = valid

    def open_row(self) -> int:
        row = self._free_rows.pop()
        self.row_len[row] = 0
        self.host_rows[row] = []
        return row

    def close_row(self, row: int) -> None:
        self.row_len[row] = 0
        self.host_rows[row] = []
        self._free_rows.append(row)

    def append(self, row: int, page: int) -> None:
        column = self.row_len[row]
        self.row_len[row] = column + 1
        self.host_rows[row].append(page)
        self._entries[(row, column)] = page

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    # ---------------------------------------------------------------- one transfer per step

    def stage(self, upload: StepUpload) -> None:
        """Add the queued updates to the step's upload; ``apply`` writes them once it is sent."""
        self._staged = (
            upload.add([(p, *v) for p, v in self._pages.items()]) if self._pages else None,
            upload.add(list(self._valid.items())) if self._valid else None,
            upload.add([(*k, v) for k, v in self._entries.items()]) if self._entries else None,
        )
        self._pages, self._valid, self._entries = {}, {}, {}

    def apply(self, upload: StepUpload) -> None:
        """Write the staged updates into the device tensors (device-side index writes, no sync)."""
        pages, valid, entries = self._staged
        self._staged = (None, None, None)
        if pages is not None:
            page, seg, start, count = upload[pages].unbind(1)
            self.page_seg[page] = seg.int()
            self.page_start[page] = start.int()
            self.page_valid[page] = count.int()
        if valid is not None:
            page, count = upload[valid].unbind(1)
            self.page_valid[page] = count.int()
        if entries is not None:
            row, column, page = upload[entries].unbind(1)
            self.rows[row, column] = page.int()

    def flush(self) -> None:
        """Apply the queued updates now, in an upload of their own (tests and tools; a step stages them)."""
        upload = StepUpload()
        self.stage(upload)
        upload.send(self.device)
        self.apply(upload)


class KVPool:
    """Keys and values of every layer in fixed-size pages, a free list, and the page table."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        max_rows: int,
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, kv_heads, num_blocks * block_size, head_dim)  # head-major: one head's keys are rows
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, Hkv, slots, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [layers, Hkv, slots, D]
        self.pages = PageTable(num_blocks, block_size, max_rows, device)
        self.flex_queries = None  # the attention module's per-query buffers for flex (created on first use)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low page ids first
        self._owned = [False] * num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def bytes_per_block(self) -> int:
        layers, heads, _, head_dim = self.keys.shape
        per_slot = layers * heads * head_dim * self.keys.element_size() * 2
        return per_slot * self.block_size

    def allocate(self, seg_id: int, start: int) -> int:
        """A free page for offsets ``start…`` of segment ``seg_id``."""
        if not self._free:
            raise PoolExhausted("KV pool exhausted")
        page = self._free.pop()
        self._owned[page] = True
        self.pages.describe_page(page, seg_id, start)
        return page

    def release(self, pages: list[int]) -> None:
        for p in pages:
            assert self._owned[p], f"double release of page {p}"
            self._owned[p] = False
            self._free.append(p)

    def assert_empty(self) -> None:
        """Debug check: every page is back in the pool and no row is open."""
        leaked = [p for p, owned in enumerate(self._owned) if owned]
        if leaked or len(self._free) != self.num_blocks:
            raise AssertionError(f"KV leak: {len(leaked)} page(s) still owned: {leaked[:10]}")
        if self.pages.free_rows != len(self.pages.row_len):
            raise AssertionError("KV leak: a page-table row is still open")


class Segment:
    """A run of tokens in the pool. ``tokens`` holds every token of the segment, including ones
    whose KV is not computed yet (``written`` counts those that are)."""

    __slots__ = (
        "id",
        "fork",
        "order",
        "start_pos",
        "tokens",
        "logprobs",
        "sampled",
        "written",
        "pages",
        "delivered",
        "block",
        "branch",
        "frozen",
        "top_logprobs",
    )

    def __init__(
        self, seg_id: int, start_pos: int, fork: int | None = None, order: int = 0, block: int = 0, branch: int = 0
    ):
        self.id = seg_id
        self.fork = seg_id if fork is None else fork
        self.order = order  # index in its request's canonical segment order (prompt: 0)
        self.start_pos = start_pos
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sampled: list[bool] = []
        self.written = 0
        self.pages: list[int] = []
        self.delivered = 0  # tokens already reported in an EngineEvent delta
        self.block, self.branch = block, branch
        self.frozen = False  # complete: other segments read it (its last page's valid count is set)
        self.top_logprobs: dict[int, tuple[tuple[int, float], ...]] = {}  # offset -> top (id, log-prob), if asked

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int, logprob: float, sampled: bool, top: tuple | None = None) -> None:
        if top is not None:
            self.top_logprobs[len(self.tokens)] = top
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.sampled.append(sampled)

    def pages_needed(self, upto: int, block_size: int) -> int:
        """New pages to hold offsets [0, upto)."""
        return max(0, -(-upto // block_size) - len(self.pages))

    def slots(self, start: int, end: int, block_size: int) -> list[int]:
        """Pool slots of offsets [start, end) (their pages must exist)."""
        pages = self.pages
        return [pages[i // block_size] * block_size + i % block_size for i in range(start, end)]
