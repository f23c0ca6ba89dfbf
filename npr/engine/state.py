"""The scheduler's plain-data state: scaffold ids, groups, requests, streams, open blocks, deltas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from npr.engine.config import SamplingParams
from npr.engine.kv_pool import Segment
from npr.masks import Phase


@dataclass(frozen=True)
class Scaffold:
    """Token ids the engine prefills (from ``npr.schema.canonical``) and the ids it watches."""

    tag_of: dict[int, str]  # token id -> tag string, for the 8 tags
    plan_label: tuple[tuple[int, ...], ...]  # index k-1 -> ids of plan_label(k), prefilled after the k-th <plan>
    guideline_separator: tuple[int, ...]
    step_open: tuple[tuple[int, ...], ...]  # index k-1 -> ids of step_open(k)
    step_separator: tuple[int, ...]
    takeaway_open: tuple[int, ...]
    eos_ids: frozenset[int]


@dataclass(slots=True)
class StreamDelta:
    """Tokens a stream appended in one step (sampled and prefilled), for streaming servers (read-only by
    convention: not frozen, since a frozen dataclass takes 2.2 us to build against 0.4, once per stream per step).

    ``segment`` is the index of the segment in the request's canonical order: concatenating every
    delta's ``token_ids`` per segment, then the segments by index, gives ``Result.token_ids``.
    ``block`` / ``branch``: the branch's block (1-based) and number, or ``branch == 0`` for the main
    line (``block`` = blocks joined before it).
    """

    prompt_index: int
    sample_index: int
    segment: int
    block: int
    branch: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    """Per token, as in ``Result.logprobs`` (NaN for prefilled tokens and when log-probs are off)."""
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    """Per token (empty unless the request asked ``top_logprobs``): its position's most likely (id, log-prob),
    best first; ``()`` for prefilled tokens."""


class StreamKind(StrEnum):
    """A request's main line, or one branch of a parallel block (equal to the strings "main"/"branch")."""

    MAIN = "main"
    BRANCH = "branch"


class FinishReason(StrEnum):
    """Why a request ended (equal to its string, which is what results and the server report)."""

    STOP = "stop"  # sampled one of its stop token ids
    EOS = "eos"  # sampled an end-of-sequence token where the schema allows one (plain mode: anywhere)
    LENGTH = "length"  # its token budget, max_depth, min_fork_budget or the KV pool ended it
    INVALID_SCHEMA = "invalid_schema"  # sampled a tag the NPR grammar does not allow there
    CANCELLED = "cancelled"  # the caller cancelled it


class Stream:
    """A live decoding position: the main line of a request or one branch. Logits processors see
    it read-only: ``prompt_index``, ``sample_index``, ``kind`` (``StreamKind``: "main"/"branch"), ``block`` (number
    of blocks forked so far, or this branch's block), ``branch`` (1-based, 0 for main),
    ``phase``, ``tokens`` (the current segment's tokens)."""

    def __init__(self, *, request: Request, segment: Segment, kind: StreamKind, phase: Phase, block: int, branch: int):
        self.request = request
        self.segment = segment
        self.kind = kind
        self.phase = phase
        self.block = block
        self.branch = branch
        self.wants_sample = True
        self.closed = False  # a branch that sampled </step> (its closing tokens may still be pending)
        self.plans = 0  # main: plans opened in the current guideline
        self.history: list[int] = []  # tokens sampled in this branch (repetition penalty)
        self.seen_slot = -1  # row of the engine's seen-token table while the branch samples

    @property
    def prompt_index(self) -> int:
        return self.request.prompt_index

    @property
    def sample_index(self) -> int:
        return self.request.sample_index

    @property
    def tokens(self) -> list[int]:
        return self.segment.tokens

    def noise_key(self) -> tuple[int, int, int, int, int]:
        """(seed, sample, block, branch, offset): the counter keying this stream's next draw."""
        return (self.request.group.seed, self.request.sample_index, self.block, self.branch, len(self.segment))


@dataclass
class OpenBlock:
    """A forked block waiting for its branches to close."""

    shared: Segment
    last_shared_position: int
    branches: list[Stream]  # started so far, in branch order
    planned: int  # number of plans = branches to run


@dataclass
class Group:
    """A prompt and its n samples; the prompt segment is stored and prefilled once.

    ``prefix``: the leading whole pages this prompt shares with other prompts (the chat template and
    system instruction of a batch), a segment of their own that every group beginning with them
    lists; ``prompt`` then holds the rest of the prompt, positions continuing after the prefix.
    """

    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    prompt: Segment
    prefix: Segment | None = None
    requests: list[Request] = field(default_factory=list)
    resident: int = 0  # requests whose KV is in the pool (the prompt's pages live while > 0)
    started: bool = False  # the prompt's logits have served the first token of every sample


class Request:
    """One sample: its response segments in flat order, live streams, budget and outcome."""

    def __init__(self, group: Group, sample_index: int, request_id: int):
        self.group = group
        self.sample_index = sample_index
        self.id = request_id
        self.params = group.params
        self.segments: list[Segment] = []
        self.main: Stream | None = None
        self.open_block: OpenBlock | None = None
        self.blocks: list[list[Segment]] = []  # executed blocks: their branch segments
        self.used = 0
        self.finish_reason: FinishReason | None = None
        self.diagnostic: str | None = None
        self.forward_passes = 0
        self.preemptions = 0
        self.row: int | None = None  # page-table row while resident
        self.started: float | None = None
        self.ended: float | None = None

    @property
    def prompt_index(self) -> int:
        return self.group.prompt_index

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def resident(self) -> bool:
        return self.row is not None

    def streams(self) -> list[Stream]:
        """Live (sampling) streams in a fixed order: main, then branches by index."""
        if self.finished or self.main is None:
            return []
        if self.open_block is not None:
            return [b for b in self.open_block.branches if not b.closed]
        return [self.main]

    def mark_started(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()
