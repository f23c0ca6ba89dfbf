"""Tree attention mask and position ids: the one definition of NPR's parallel structure.

SFT, RL log-prob recomputation and the engine all read a response's token ids through the
grammar below, so they agree on which tokens form a shared prefix, which form each branch,
and where the takeaway sits (NPR, arXiv 2512.07461 §3.2; Multiverse's layout).

Layout of one block, in token order::

    <guideline> <plan> … </plan> … </guideline> [sep]   shared: causal, positions continue
    <step> … </step> [sep]                               branch 1: positions base, base+1, …
    <step> … </step> [sep]                               branch 2: positions base, base+1, …
    <takeaway> …                                         sees everything before it

``base`` is one past the position of the last shared token (the ``</guideline>`` and any
separator after it). A branch is its ``<step>`` … ``</step>`` and the separator tokens after
``</step>``. Sibling branches cannot see each other in either direction. ``<takeaway>`` gets
position ``base + longest branch``; tokens after it continue from there. A sequence with no
block gets a causal mask and ``arange`` positions. Tokens before ``response_start`` (the
prompt) are plain causal context whatever they contain.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


class StructureError(ValueError):
    """A token sequence whose tags do not form the NPR structure (the caller drops it)."""


class Phase(enum.Enum):
    """Where a token stands in the grammar of a response."""

    TEXT = "text"  # outside any block: before the first one, between, or the final text
    GUIDELINE = "guideline"  # inside <guideline>, outside a plan
    PLAN = "plan"
    SHARED = "shared"  # after </guideline>, before the first <step>
    STEP = "step"
    AFTER_STEP = "after_step"  # separator after </step>, part of that branch
    TAKEAWAY = "takeaway"


# (phase, tag) -> next phase. A tag missing here is out of place in that phase.
_TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.TEXT, "<guideline>"): Phase.GUIDELINE,
    (Phase.GUIDELINE, "<plan>"): Phase.PLAN,
    (Phase.PLAN, "</plan>"): Phase.GUIDELINE,
    (Phase.GUIDELINE, "</guideline>"): Phase.SHARED,
    (Phase.SHARED, "<step>"): Phase.STEP,
    (Phase.STEP, "</step>"): Phase.AFTER_STEP,
    (Phase.AFTER_STEP, "<step>"): Phase.STEP,
    (Phase.AFTER_STEP, "<takeaway>"): Phase.TAKEAWAY,
    (Phase.TAKEAWAY, "</takeaway>"): Phase.TEXT,
}


def next_phase(phase: Phase, tag: str | None) -> Phase:
    """The phase after a token: ``tag`` is the tag string of a tag token, None for any other.

    Raises ``StructureError`` for a tag out of place. Counting plans against steps is the
    caller's job (``scan_blocks`` and the engine's scheduler both do it).
    """
    if tag is None:
        return phase
    try:
        return _TRANSITIONS[(phase, tag)]
    except KeyError:
        raise StructureError(f"{tag} is not allowed inside {phase.value}") from None


@dataclass(frozen=True)
class BlockLayout:
    """Token indices of one parallel block (half-open spans).

    ``guideline_start``: index of ``<guideline>``; ``first_step``: index of the first
    ``<step>`` (everything before it is shared); ``steps``: each branch's [start, end) span,
    separators after ``</step>`` included; ``takeaway``: index of ``<takeaway>``.
    """

    guideline_start: int
    first_step: int
    steps: tuple[tuple[int, int], ...]
    takeaway: int

    @property
    def num_plans(self) -> int:
        return len(self.steps)


def _tag_lookup(tag_ids: Mapping[str, int]) -> dict[int, str]:
    lookup = {int(v): k for k, v in tag_ids.items()}
    if len(lookup) != len(tag_ids):
        raise ValueError(f"tag_ids maps two tags to one token id: {dict(tag_ids)}")
    return lookup


def scan_blocks(
    input_ids: Sequence[int] | torch.Tensor, tag_ids: Mapping[str, int], response_start: int = 0
) -> list[BlockLayout]:
    """The parallel blocks of ``input_ids[response_start:]``, or ``StructureError``.

    ``tag_ids`` maps each tag string (``"<step>"``, …) to its token id. A response must end
    outside any block (after ``</takeaway>`` or with no block at all).
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if not 0 <= response_start <= len(ids):
        raise ValueError(f"response_start={response_start} is outside a sequence of {len(ids)} tokens")
    tags = _tag_lookup(tag_ids)
    blocks: list[BlockLayout] = []
    phase = Phase.TEXT
    plans = 0
    guideline_start = first_step = -1
    steps: list[list[int]] = []
    for i in range(response_start, len(ids)):
        tag = tags.get(ids[i])
        try:
            new = next_phase(phase, tag)
        except StructureError as e:
            raise StructureError(f"token {i}: {e}") from None
        if tag == "<guideline>":
            guideline_start, plans, steps = i, 0, []
        elif tag == "<plan>":
            plans += 1
        elif tag == "</guideline>" and plans == 0:
            raise StructureError(f"token {i}: </guideline> closes a guideline with no <plan>")
        elif tag == "<step>":
            if len(steps) == plans:
                raise StructureError(f"token {i}: <step> {len(steps) + 1} for a guideline with {plans} plan(s)")
            if steps:
                steps[-1][1] = i
            else:
                first_step = i
            steps.append([i, -1])
        elif tag == "<takeaway>":
            if len(steps) != plans:
                raise StructureError(f"token {i}: <takeaway> after {len(steps)} step(s) for {plans} plan(s)")
            steps[-1][1] = i
            blocks.append(BlockLayout(guideline_start, first_step, tuple((s, e) for s, e in steps), i))
        phase = new
    if phase is not Phase.TEXT:
        raise StructureError(f"sequence ends inside {phase.value} (an unclosed block)")
    return blocks


def has_complete_blocks(prompt_ids: Sequence[int], response_ids: Sequence[int], tag_ids: Mapping[str, int]) -> bool:
    """Whether ``response_ids`` scans as complete blocks after ``prompt_ids`` (``scan_blocks``
    succeeds), so that the tree mask describes them; a response cut inside a block or ended by an
    illegal tag does not."""
    try:
        scan_blocks([*prompt_ids, *response_ids], tag_ids, len(prompt_ids))
    except StructureError:
        return False
    return True


def branch_start_position(last_shared_position: int) -> int:
    """Position of every branch's first token (``<step>``): one past the shared prefix."""
    return last_shared_position + 1


def takeaway_position(last_shared_position: int, branch_lengths: Sequence[int]) -> int:
    """Position of ``<takeaway>``: after the longest branch, so it follows every branch."""
    return last_shared_position + max(branch_lengths) + 1


@dataclass(frozen=True)
class TreeIds:
    """The tree attention pattern of a row as four ids per token: O(L), never an L x L matrix.

    A row is a fixed-depth tree, and a token sees an earlier token unless the two sit in
    different subtrees at some level (sibling exclusion; ``tree_visible``):

    - ``document``: independent sequences packed into one row never see each other;
    - ``member``: responses packed behind one shared prefix (``-1`` on the prefix, which every
      member sees) never see each other;
    - ``region`` / ``branch``: the steps region of each parallel block (numbered in token
      order, ``-1`` outside) and the branch inside it; sibling branches of one region never
      see each other, while everything after the region (the takeaway) sees all of them.

    Each field is LongTensor[L]. ``tree_ids_and_positions`` reads region and branch from
    ``scan_blocks``: the same parse the engine's scheduler follows.
    """

    document: torch.Tensor
    member: torch.Tensor
    region: torch.Tensor
    branch: torch.Tensor

    def __len__(self) -> int:
        return len(self.document)

    def to(self, device) -> TreeIds:
        return TreeIds(*(t.to(device) for t in (self.document, self.member, self.region, self.branch)))

    def slice(self, start: int, end: int) -> TreeIds:
        return TreeIds(*(t[start:end] for t in (self.document, self.member, self.region, self.branch)))

    @staticmethod
    def causal(length: int) -> TreeIds:
        """One document, one member, no parallel block: a causal row."""
        return TreeIds(
            torch.zeros(length, dtype=torch.long),
            torch.zeros(length, dtype=torch.long),
            torch.full((length,), -1, dtype=torch.long),
            torch.full((length,), -1, dtype=torch.long),
        )

    @staticmethod
    def cat(parts: Sequence[TreeIds]) -> TreeIds:
        return TreeIds(*(torch.cat([getattr(p, f) for p in parts]) for f in ("document", "member", "region", "branch")))


def tree_visible(q: torch.Tensor, k: torch.Tensor, ids: TreeIds) -> torch.Tensor:
    """Whether query token(s) ``q`` may attend key token(s) ``k`` of a row: THE rule.

    ``q`` and ``k`` are index tensors that broadcast (``[L, 1]`` and ``[1, L]`` give the dense
    mask; scalars inside a flex_attention ``mask_mod``). A token sees itself and earlier tokens
    of its document, except those of another member and those of a sibling branch.
    """
    return (
        (k <= q)
        & (ids.document[q] == ids.document[k])
        & ((ids.member[k] < 0) | (ids.member[q] == ids.member[k]))
        & ((ids.region[q] < 0) | (ids.region[q] != ids.region[k]) | (ids.branch[q] == ids.branch[k]))
    )


def dense_tree_mask(ids: TreeIds) -> torch.Tensor:
    """BoolTensor[L, L] of ``tree_visible`` over all pairs (the dense path; O(L^2))."""
    index = torch.arange(len(ids), device=ids.document.device)  # [L]
    return tree_visible(index[:, None], index[None, :], ids)  # [L, L]


def tree_ids_and_positions(
    input_ids: Sequence[int] | torch.Tensor, tag_ids: Mapping[str, int], response_start: int = 0
) -> tuple[TreeIds, torch.Tensor]:
    """Tree ids (one document, one member) and position ids of one sequence.

    Args:
        input_ids: LongTensor[L] (or a list), prompt then response.
        tag_ids: tag string -> token id for the 8 NPR tags.
        response_start: index of the first response token; earlier tokens are causal context.

    Returns:
        ids: ``TreeIds`` of the sequence; position_ids: LongTensor[L].

    Raises ``StructureError`` for a malformed response.
    """
    n = len(input_ids)
    blocks = scan_blocks(input_ids, tag_ids, response_start)
    ids = TreeIds.causal(n)
    positions = torch.arange(n, dtype=torch.long)  # [L]
    for number, block in enumerate(blocks):
        lo, hi = block.first_step, block.takeaway
        last_shared = int(positions[lo - 1])  # already shifted by the blocks before
        base = branch_start_position(last_shared)
        ids.region[lo:hi] = number
        for b, (s, e) in enumerate(block.steps):
            ids.branch[s:e] = b
            positions[s:e] = torch.arange(base, base + e - s)
        start = takeaway_position(last_shared, [e - s for s, e in block.steps])
        positions[hi:] = torch.arange(start, start + n - hi)
    return ids, positions


def parallel_mask_and_positions(
    input_ids: Sequence[int] | torch.Tensor, tag_ids: Mapping[str, int], response_start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense tree attention mask and position ids for one unpadded sequence.

    Returns ``allowed`` BoolTensor[L, L] (``allowed[i, j]``: query i may attend key j; the
    ``dense_tree_mask`` of ``tree_ids_and_positions``) and ``position_ids`` LongTensor[L].
    Raises ``StructureError`` for a malformed response.
    """
    ids, positions = tree_ids_and_positions(input_ids, tag_ids, response_start)
    return dense_tree_mask(ids), positions


def tree_block_mask(ids: TreeIds, device: torch.device | str, block_size: int = 128, chunk_blocks: int = 16):
    """flex_attention ``BlockMask`` of one row (batch 1) whose ``mask_mod`` is ``tree_visible``.

    Built without an L x L tensor: ``chunk_blocks`` query blocks at a time are compared with
    every key (O(chunk * L) memory), each (query block, key block) tile is classified as
    empty, full (every pair visible: the kernel skips ``mask_mod``) or partial, and the
    BlockMask is assembled from those block lists (O((L / block_size)^2) integers).
    """
    from torch.nn.attention.flex_attention import BlockMask

    ids = ids.to(device)
    n = len(ids)
    blocks = -(-n // block_size)
    index = torch.arange(n, device=device)  # [L]
    any_visible = torch.zeros(blocks, blocks, dtype=torch.bool, device=device)  # [Bq, Bk]
    all_visible = torch.zeros(blocks, blocks, dtype=torch.bool, device=device)  # [Bq, Bk]
    pad = blocks * block_size - n
    for first in range(0, blocks, chunk_blocks):
        rows = index[first * block_size : (first + chunk_blocks) * block_size]  # [C]
        tile = tree_visible(rows[:, None], index[None, :], ids)  # [C, L]
        short = -len(rows) % block_size  # the last query block may be short
        # padding is "not visible", so a tile touching it is never full (the kernel masks it anyway)
        tile = torch.nn.functional.pad(tile, (0, pad, 0, short))  # [c * bq, Bk * bk]
        c = tile.shape[0] // block_size
        tile = tile.view(c, block_size, blocks, block_size)  # [c, bq, Bk, bk]
        any_visible[first : first + c] = tile.any(dim=3).any(dim=1)
        all_visible[first : first + c] = tile.all(dim=3).all(dim=1)
    partial = any_visible & ~all_visible  # [Bq, Bk]

    def block_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = selected.sum(-1).to(torch.int32)  # [Bq]
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # [Bq, Bk]
        return counts[None, None], order[None, None]  # [1, 1, Bq], [1, 1, Bq, Bk]

    def mask_mod(b, h, q_idx, kv_idx):
        return tree_visible(q_idx, kv_idx, ids)

    kv_num, kv_index = block_lists(partial)
    full_num, full_index = block_lists(all_visible)
    return BlockMask.from_kv_blocks(
        kv_num, kv_index, full_num, full_index, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(n, n)
    )


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (0 where allowed, the dtype's minimum elsewhere) from a bool mask.

    Transformers passes a 4D float mask to eager and sdpa attention as given; a bool 4D mask
    is silently wrong under eager, so npr always hands the model this form.
    """
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def batch_inputs(
    sequences: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    pad_token_id: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (input_ids[L_i], allowed[L_i, L_i], position_ids[L_i]).

    Returns ``input_ids`` [B, L], ``position_ids`` [B, L], ``attention_mask`` [B, 1, L, L]
    (additive, in ``dtype``, padding folded in: no real token sees a pad; a pad query sees
    only itself so no softmax row is empty) and ``padding_mask`` [B, L] (True on real tokens).
    """
    if not sequences:
        raise ValueError("batch_inputs needs at least one sequence")
    length = max(len(ids) for ids, _, _ in sequences)
    b = len(sequences)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)  # [B, L]
    position_ids = torch.zeros((b, length), dtype=torch.long)  # [B, L]
    allowed = torch.eye(length, dtype=torch.bool).repeat(b, 1, 1)  # [B, L, L]
    padding_mask = torch.zeros((b, length), dtype=torch.bool)  # [B, L]
    for row, (ids, mask, pos) in enumerate(sequences):
        n = len(ids)
        input_ids[row, :n] = torch.as_tensor(ids)
        position_ids[row, :n] = pos
        allowed[row, :n, :n] = mask
        padding_mask[row, :n] = True
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_bias(allowed, dtype).unsqueeze(1),  # [B, 1, L, L]
        "padding_mask": padding_mask,
    }
