"""A block-paged KV pool with reference counts, and the segments that live in it.

A **segment** is a run of tokens of one stream stored in its own blocks: a prompt, the
sequential part of a response, one branch, a takeaway and what follows it. A segment sees
its own earlier tokens and every token of the segments in ``visible`` (its ancestry). Sharing
is by reference: the prompt of n samples, and the prefix of k branches, is stored once; each
reader holds a reference on its blocks, and a join adds no copies (the takeaway segment just
lists the branches as visible).

Slots are addressed flat: slot = block * block_size + offset. The pool tensors are
``[num_layers, num_slots, kv_heads, head_dim]`` for keys and values.
"""

from __future__ import annotations

import torch


class PoolExhausted(RuntimeError):
    """The pool has no free block; the scheduler's reservations make this a bug, not an input error."""


class KVPool:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks * block_size, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots, Hkv, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots, Hkv, D]
        self.refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low block ids first
        self.reserved = 0  # blocks promised to admitted requests but not yet allocated

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def bytes_per_block(self) -> int:
        per_slot = self.keys[0, 0].numel() * self.keys.element_size() * 2 * self.keys.shape[0]
        return per_slot * self.block_size

    def allocate(self) -> int:
        if not self._free:
            raise PoolExhausted("KV pool exhausted")
        block = self._free.pop()
        self.refcount[block] = 1
        return block

    def retain(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.refcount[b] > 0, f"retain of free block {b}"
            self.refcount[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.refcount[b] > 0, f"double release of block {b}"
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self._free.append(b)

    def assert_empty(self) -> None:
        """Debug check: every block is back in the pool."""
        leaked = [b for b, c in enumerate(self.refcount) if c]
        if leaked or len(self._free) != self.num_blocks:
            raise AssertionError(f"KV leak: {len(leaked)} block(s) still referenced: {leaked[:10]}")


class Segment:
    """A run of tokens in the pool. ``tokens`` holds every token of the segment, including ones
    whose KV is not computed yet (``written`` counts those that are)."""

    __slots__ = ("id", "pool", "blocks", "start_pos", "tokens", "logprobs", "sampled", "written",
                 "visible", "_slots", "released")

    def __init__(self, seg_id: int, pool: KVPool, start_pos: int, visible: tuple[Segment, ...]):
        self.id = seg_id
        self.pool = pool
        self.blocks: list[int] = []
        self.start_pos = start_pos
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sampled: list[bool] = []
        self.written = 0
        self.visible = visible
        self._slots = torch.empty(0, dtype=torch.long)
        self.released = False
        for seg in visible:  # a reader holds a reference on every block it sees
            seg.slots(len(seg))  # a visible segment is complete: its blocks exist before they are shared
            pool.retain(seg.blocks)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int, logprob: float, sampled: bool) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.sampled.append(sampled)

    def slots(self, upto: int) -> torch.Tensor:
        """Pool slots of offsets [0, upto), allocating blocks as needed. LongTensor[upto]."""
        bs = self.pool.block_size
        while len(self.blocks) * bs < upto:
            block = self.pool.allocate()
            self.blocks.append(block)
            self._slots = torch.cat([self._slots, torch.arange(block * bs, (block + 1) * bs)])
        return self._slots[:upto]

    def release(self) -> None:
        """Drop this segment's own blocks and its references on what it sees."""
        if self.released:
            return
        self.released = True
        self.pool.release(self.blocks)
        for seg in self.visible:
            self.pool.release(seg.blocks)
