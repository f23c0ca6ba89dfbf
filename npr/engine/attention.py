"""Paged tree attention, plugged into transformers through its public ``AttentionInterface``.

The model runs unchanged on one packed sequence of new tokens (batch 1, ``[1, N]``) with the
tree position ids. Every attention layer calls ``paged_attention_forward``, which

1. writes the new tokens' keys and values into their pool slots, then
2. for each attention group (one request: its prompt, sequential part and live branches)
   gathers the keys the group can see and runs SDPA with the group's tree mask.

Writing first means a token can attend to tokens fed in the same forward: a fork (the shared
separator plus every branch's scaffold) and a join (the last branch's ``</step>`` plus the
``<takeaway>``) each take one forward. The mask is the same rule as ``npr.masks``: a token sees
its own segment causally and every segment in its ancestry, never a sibling branch.

Groups with many query tokens (prefills) run alone; small ones (decode steps) are padded into
one batched SDPA call. The metadata is built once per forward and reused by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from npr.engine.kv_pool import KVPool, Segment

ATTENTION_NAME = "npr_paged"


@dataclass
class Feed:
    """Tokens of one segment fed in one forward: ``tokens`` go at offsets ``start…`` of ``segment``.

    ``group`` is the attention group (tokens of one group share their gathered keys); ``logits``
    asks for the logits at the last fed token.
    """

    segment: Segment
    start: int
    tokens: list[int]
    group: int
    logits: bool


@dataclass
class AttentionCall:
    q_range: tuple[int, int] | None  # set when the queries are packed rows [start, end) with no padding
    q_index: torch.Tensor  # [G, Qmax] packed row of each query (pads repeat a valid row)
    q_valid: torch.Tensor  # [G, Qmax] bool
    key_slots: torch.Tensor  # [G, Nmax] pool slot of each key (pads point at slot 0)
    bias: torch.Tensor | None  # [G, 1, Qmax, Nmax] additive mask in the model dtype; None: all visible


@dataclass
class PagedBatch:
    pool: KVPool
    write_slots: torch.Tensor  # [N] slot of each packed new token
    calls: list[AttentionCall]


def paged_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            npr_batch: PagedBatch | None = None, **kwargs):
    """AttentionInterface entry: query [1, H, N, D], key/value [1, Hkv, N, D] -> ([1, N, H, D], None)."""
    if npr_batch is None:
        raise RuntimeError("npr_paged attention called without npr_batch; use the Engine (or sdpa) instead")
    pool, layer = npr_batch.pool, module.layer_idx
    keys, values = pool.keys[layer], pool.values[layer]  # [slots, Hkv, D]
    keys.index_copy_(0, npr_batch.write_slots, key[0].transpose(0, 1))
    values.index_copy_(0, npr_batch.write_slots, value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [N, H, D]
    calls = npr_batch.calls
    if len(calls) == 1 and calls[0].q_range == (0, q.shape[0]):  # the common decode step: no scatter
        return _attend(calls[0], q, keys, values, scaling).transpose(1, 2).reshape(1, *q.shape), None
    out = torch.empty_like(q)  # [N, H, D]
    for call in calls:
        o = _attend(call, q, keys, values, scaling)  # [G, H, Qmax, D]
        if call.q_range is not None:
            start, end = call.q_range
            out[start:end] = o.transpose(1, 2).reshape(end - start, *q.shape[1:])
        else:
            out[call.q_index[call.q_valid]] = o.transpose(1, 2)[call.q_valid]
    return out.unsqueeze(0), None


def _attend(call: AttentionCall, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling) -> torch.Tensor:
    """SDPA of one call's queries over its gathered keys: q [N, H, D] packed -> [G, H, Qmax, D]."""
    g, nmax = call.key_slots.shape
    flat = call.key_slots.reshape(-1)
    k = keys.index_select(0, flat).view(g, nmax, *keys.shape[1:]).transpose(1, 2)  # [G, Hkv, Nmax, D]
    v = values.index_select(0, flat).view(g, nmax, *values.shape[1:]).transpose(1, 2)  # [G, Hkv, Nmax, D]
    if call.q_range is not None:  # contiguous, unpadded: a view instead of a gather
        start, end = call.q_range
        qg = q[start:end].view(g, -1, *q.shape[1:]).transpose(1, 2)  # [G, H, Qmax, D]
    else:
        qg = q[call.q_index].transpose(1, 2)  # [G, H, Qmax, D]
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=call.bias, scale=scaling,
                                          enable_gqa=k.shape[1] != qg.shape[1])


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


def _group_mask(feeds: Sequence[Feed]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Key slots [N] and allowed [Q, N] for the feeds of one group (segments already written);
    allowed is None when every query sees every key (one stream feeding one token: a decode step).

    Built one segment (column block) at a time: a query sees a whole segment of its ancestry,
    its own segment up to itself, and nothing else.
    """
    segments: dict[int, Segment] = {}
    for f in feeds:
        for seg in (*f.segment.visible, f.segment):
            segments.setdefault(seg.id, seg)
    key_slots = torch.cat([seg.slots(seg.written) for seg in segments.values()])  # [N]
    if len(feeds) == 1 and len(feeds[0].tokens) == 1:
        return key_slots, None
    rows = []
    for f in feeds:
        visible = {s.id for s in f.segment.visible}
        q_off = torch.arange(f.start, f.start + len(f.tokens))[:, None]  # [q, 1]
        blocks = []
        for seg in segments.values():
            if seg is f.segment:
                blocks.append(torch.arange(seg.written)[None, :] <= q_off)  # [q, len] causal
            else:
                blocks.append(torch.full((len(f.tokens), seg.written), seg.id in visible))  # [q, len]
        rows.append(torch.cat(blocks, dim=1))
    return key_slots, torch.cat(rows)


def _pad_call(groups: list[tuple[range, torch.Tensor, torch.Tensor | None]], dtype, device) -> AttentionCall:
    """Pad (packed query rows, key_slots [N], allowed [Q, N] or None) of several groups into one SDPA call."""
    counts = [len(q) for q, _, _ in groups]
    lengths = [len(k) for _, k, _ in groups]
    g, qmax, nmax = len(groups), max(counts), max(lengths)
    q_index = torch.tensor([list(q) + [q[0]] * (qmax - len(q)) for q, _, _ in groups])  # [G, Qmax]
    q_valid = torch.arange(qmax)[None, :] < torch.tensor(counts)[:, None]  # [G, Qmax]
    key_slots = torch.nn.utils.rnn.pad_sequence([k for _, k, _ in groups], batch_first=True)  # [G, Nmax]
    if all(a is None for _, _, a in groups):  # every query sees every key of its group
        if len(set(lengths)) == 1:
            bias = None  # SDPA runs faster with no mask
        else:
            real = torch.arange(nmax)[None, :] < torch.tensor(lengths)[:, None]  # [G, Nmax]
            bias = torch.zeros(g, 1, 1, nmax, dtype=dtype).masked_fill_(~real[:, None, None, :], torch.finfo(dtype).min)
    else:
        allowed = torch.zeros(g, qmax, nmax, dtype=torch.bool)  # [G, Qmax, Nmax]
        for i, (q, k, a) in enumerate(groups):
            allowed[i, :len(q), :len(k)] = True if a is None else a
            allowed[i, len(q):, 0] = True  # pad rows see one key: no empty softmax row
        bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    first = groups[0][0][0]
    contiguous = all(c == qmax for c in counts) and all(
        q.start == first + i * qmax and q.step == 1 for i, (q, _, _) in enumerate(groups))
    q_range = (first, first + g * qmax) if contiguous else None
    return AttentionCall(q_range, q_index.to(device), q_valid.to(device), key_slots.to(device),
                         None if bias is None else bias.to(device))


def _buckets(groups: list, prefill_group_tokens: int, max_waste: float = 1.25) -> list[list]:
    """Split groups into SDPA calls: decode-sized groups (at most ``prefill_group_tokens`` queries)
    share one call; larger ones (prefills) share a call only with groups of nearly their shape,
    so that padding never costs more than ``max_waste`` times the real work."""
    small = [g for g in groups if len(g[0]) <= prefill_group_tokens]
    large = sorted((g for g in groups if len(g[0]) > prefill_group_tokens), key=lambda g: (len(g[0]), len(g[1])))
    buckets = [small] if small else []
    current: list = []
    for g in large:
        trial = current + [g]
        padded = len(trial) * max(len(x[0]) for x in trial) * max(len(x[1]) for x in trial)
        real = sum(len(x[0]) * len(x[1]) for x in trial)
        if current and padded > max_waste * real:
            buckets.append(current)
            trial = [g]
        current = trial
    if current:
        buckets.append(current)
    return buckets


def build_batch(feeds: Sequence[Feed], pool: KVPool, dtype: torch.dtype, device, prefill_group_tokens: int):
    """Model inputs and attention metadata for one forward over ``feeds``.

    Returns ``input_ids`` [1, N], ``position_ids`` [1, N], the ``PagedBatch`` and ``logit_rows``
    (LongTensor of packed rows whose logits are needed, in feed order of the feeds that ask).
    Marks the fed tokens as written. A group's feeds must be consecutive in ``feeds``.
    """
    ids, positions, writes, logit_rows = [], [], [], []
    by_group: dict[int, list[Feed]] = {}
    group_rows: dict[int, list[int]] = {}
    row = 0
    for f in feeds:
        n = len(f.tokens)
        ids += f.tokens
        first = f.segment.start_pos + f.start
        positions += range(first, first + n)
        writes.append(f.segment.slots(f.start + n)[f.start:])
        by_group.setdefault(f.group, []).append(f)
        span = group_rows.setdefault(f.group, [row, row])
        if span[1] != row:
            raise ValueError("the feeds of one attention group must be consecutive")
        span[1] = row + n
        if f.logits:
            logit_rows.append(row + n - 1)
        row += n
        f.segment.written = f.start + n
    groups = [(range(*group_rows[g]), *_group_mask(fs)) for g, fs in by_group.items()]
    calls = [_pad_call(bucket, dtype, device) for bucket in _buckets(groups, prefill_group_tokens)]
    batch = PagedBatch(pool, torch.cat(writes).to(device), calls)
    input_ids = torch.tensor([ids], device=device)
    position_ids = torch.tensor([positions], device=device)
    return input_ids, position_ids, batch, torch.tensor(logit_rows, dtype=torch.long, device=device)
