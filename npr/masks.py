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


def scan_blocks(input_ids: Sequence[int] | torch.Tensor, tag_ids: Mapping[str, int], response_start: int = 0) -> list[BlockLayout]:
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


def parallel_mask_and_positions(
    input_ids: Sequence[int] | torch.Tensor, tag_ids: Mapping[str, int], response_start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tree attention mask and position ids for one unpadded sequence.

    Args:
        input_ids: LongTensor[L] (or a list), prompt then response.
        tag_ids: tag string -> token id for the 8 NPR tags.
        response_start: index of the first response token; earlier tokens are causal context.

    Returns:
        allowed: BoolTensor[L, L], ``allowed[i, j]`` True where query i may attend key j.
        position_ids: LongTensor[L].

    Raises ``StructureError`` for a malformed response.
    """
    n = len(input_ids)
    blocks = scan_blocks(input_ids, tag_ids, response_start)
    allowed = torch.ones(n, n, dtype=torch.bool).tril_()  # [L, L]
    positions = torch.arange(n, dtype=torch.long)  # [L]
    for block in blocks:
        lo, hi = block.first_step, block.takeaway
        last_shared = int(positions[lo - 1])  # already shifted by the blocks before
        base = branch_start_position(last_shared)
        branch_of = torch.empty(hi - lo, dtype=torch.long)  # [R] branch id of each steps-region token
        for b, (s, e) in enumerate(block.steps):
            branch_of[s - lo:e - lo] = b
            positions[s:e] = torch.arange(base, base + e - s)
        allowed[lo:hi, lo:hi] &= branch_of[:, None] == branch_of[None, :]
        start = takeaway_position(last_shared, [e - s for s, e in block.steps])
        positions[hi:] = torch.arange(start, start + n - hi)
    return allowed, positions


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
