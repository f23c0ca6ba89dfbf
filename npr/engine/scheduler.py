"""The scheduler: a plain-Python state machine over requests and their branches.

Per step it returns the feeds for one forward (``plan``) and, given the sampled tokens, moves
every stream along the NPR grammar (``consume``). It never touches model tensors.

States of a request's streams::

    main: TEXT/GUIDELINE/PLAN (plan_label(k) prefilled after the k-th <plan>)
          ──samples </guideline>──► fork: main suspended,
          one branch per plan, each prefilled with step_open(k) at pos(last shared)+1
    branch k: STEP ──samples </step>──► closing (feeds </step> + separator, then done)
    all branches closing/done ──► join: a takeaway segment that sees every branch,
          prefilled with <takeaway> at pos(last shared) + longest branch + 1; main resumes
          in TAKEAWAY, then TEXT (another block, or the final answer and EOS)

``sequential`` mode starts branch k+1 when branch k closes; ``plain`` mode skips the grammar.
Token ids only: the scaffold ids come from the engine, which got them from the tokenizer.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from npr.engine.attention import Feed
from npr.engine.config import EngineConfig, EngineInputError, SamplingParams
from npr.engine.kv_pool import KVPool, Segment
from npr.masks import Phase, StructureError, branch_start_position, next_phase, takeaway_position


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


class Stream:
    """A live decoding position: the main line of a request or one branch. Logits processors see
    it read-only: ``prompt_index``, ``sample_index``, ``kind`` ("main"/"branch"), ``block`` (number
    of blocks forked so far, or this branch's block), ``branch`` (1-based, 0 for main),
    ``phase``, ``tokens`` (the current segment's tokens)."""

    def __init__(self, request: Request, segment: Segment, kind: str, phase: Phase, block: int, branch: int,
                 generator: torch.Generator | None):
        self.request = request
        self.segment = segment
        self.kind = kind
        self.phase = phase
        self.block = block
        self.branch = branch
        self.generator = generator
        self.wants_sample = True
        self.closed = False  # a branch that sampled </step> (its closing tokens may still be pending)
        self.plans = 0  # main: plans opened in the current guideline
        self.history: list[int] = []  # tokens sampled in this branch (repetition penalty)

    @property
    def prompt_index(self) -> int:
        return self.request.prompt_index

    @property
    def sample_index(self) -> int:
        return self.request.sample_index

    @property
    def tokens(self) -> list[int]:
        return self.segment.tokens


@dataclass
class OpenBlock:
    """A forked block waiting for its branches to close."""

    shared: Segment
    last_shared_position: int
    branches: list[Stream]
    planned: int  # number of plans = branches to run


@dataclass
class Group:
    """A prompt and its n samples; the prompt segment is stored and prefilled once."""

    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    prompt: Segment | None = None
    requests: list[Request] = field(default_factory=list)


class Request:
    """One sample: its response segments in flat order, live streams, budget and outcome."""

    def __init__(self, group: Group, sample_index: int, request_id: int, reserved_blocks: int):
        self.group = group
        self.sample_index = sample_index
        self.id = request_id
        self.params = group.params
        self.reserved_blocks = reserved_blocks
        self.segments: list[Segment] = []
        self.main: Stream | None = None
        self.open_block: OpenBlock | None = None
        self.blocks: list[list[Segment]] = []  # executed blocks: their branch segments
        self.used = 0
        self.finish_reason: str | None = None
        self.diagnostic: str | None = None
        self.forward_passes = 0
        self.started = time.perf_counter()
        self.ended: float | None = None

    @property
    def prompt_index(self) -> int:
        return self.group.prompt_index

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def streams(self) -> list[Stream]:
        """Live streams in a fixed order: main, then branches by index."""
        if self.finished:
            return []
        if self.open_block is not None:
            return [b for b in self.open_block.branches if not b.closed]
        return [self.main]

    def generator(self, *key: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(hash((self.group.seed, self.sample_index, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g


class Scheduler:
    def __init__(self, config: EngineConfig, pool: KVPool, scaffold: Scaffold):
        self.config = config
        self.pool = pool
        self.scaffold = scaffold
        self.waiting: deque[Group] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self._next_segment = 0
        self._next_request = 0
        self._groups_alive: list[Group] = []
        self._prompt_feeds: list[Group] = []  # groups whose prompt is fed in the coming forward

    # ------------------------------------------------------------------ admission

    def request_blocks(self, params: SamplingParams) -> int:
        """Blocks one request may need at most: its budget plus one partial block per segment.

        A block of k branches opens k + 1 segments and costs at least 6k + 4 >= 5(k + 1) tokens
        (<guideline>, k plan tag pairs and labels, </guideline> and its separator, k step scaffolds of >= 2
        tokens, k </step> and separators, <takeaway>), so a budget of B tokens opens at most B / 5.
        """
        cfg = self.config
        forks = 0 if cfg.mode == "plain" else min(cfg.max_depth * (cfg.max_branches + 1),
                                                    math.ceil(params.max_new_tokens / 5))
        return math.ceil(params.max_new_tokens / self.pool.block_size) + 1 + forks

    def group_blocks(self, prompt_len: int, params: SamplingParams) -> int:
        return math.ceil(prompt_len / self.pool.block_size) + params.n * self.request_blocks(params)

    def check_fits(self, prompt_index: int, prompt_len: int, params: SamplingParams) -> None:
        """Raise if this prompt's n samples could never fit in the pool, even alone."""
        need = self.group_blocks(prompt_len, params)
        if need > self.pool.num_blocks:
            raise EngineInputError(
                f"prompt {prompt_index} needs up to {need} KV blocks ({prompt_len} prompt tokens, n={params.n}, "
                f"max_new_tokens={params.max_new_tokens}) but the pool has {self.pool.num_blocks}; "
                "raise EngineConfig.kv_cache_tokens/kv_cache_gib or lower n or max_new_tokens")

    def submit(self, prompt_index: int, prompt_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.check_fits(prompt_index, len(prompt_ids), params)
        self.waiting.append(Group(prompt_index, list(prompt_ids), params, seed))

    def _reserved_outstanding(self) -> int:
        return sum(max(0, r.reserved_blocks - sum(len(s.blocks) for s in r.segments)) for r in self.running)

    def _admit(self) -> None:
        while self.waiting:
            group = self.waiting[0]
            fits_batch = not self.running or len(self.running) + group.params.n <= self.config.max_num_seqs
            available = self.pool.free_blocks - self._reserved_outstanding()
            if not fits_batch or self.group_blocks(len(group.prompt_ids), group.params) > available:
                return
            self.waiting.popleft()
            self._start_group(group)

    def _new_segment(self, start_pos: int, visible: tuple[Segment, ...]) -> Segment:
        self._next_segment += 1
        return Segment(self._next_segment, self.pool, start_pos, visible)

    def _start_group(self, group: Group) -> None:
        group.prompt = self._new_segment(0, ())
        for t in group.prompt_ids:
            group.prompt.append(t, math.nan, False)
        for i in range(group.params.n):
            self._next_request += 1
            req = Request(group, i, self._next_request, self.request_blocks(group.params))
            seg = self._new_segment(len(group.prompt_ids), (group.prompt,))
            req.segments.append(seg)
            phase = Phase.TEXT
            req.main = Stream(req, seg, "main", phase, 0, 0, req.generator(0, 0))
            group.requests.append(req)
            self.running.append(req)
        self._groups_alive.append(group)
        self._prompt_feeds.append(group)

    # ------------------------------------------------------------------ planning

    def plan(self) -> tuple[list[Feed], list[list[Stream]]]:
        """Feeds for the next forward and, per feed that asks for logits, the streams to sample.

        The prompt of a new group is one feed whose last logits serve all its n samples.
        """
        self._admit()
        feeds: list[Feed] = []
        samplers: list[list[Stream]] = []
        for group in self._prompt_feeds:
            feeds.append(Feed(group.prompt, 0, list(group.prompt_ids), -group.prompt.id, True))
            samplers.append([r.main for r in group.requests])
            for req in group.requests:
                req.forward_passes += 1
        self._prompt_feeds = []
        for req in self.running:
            fed = False
            for stream in req.streams():
                seg = stream.segment
                if seg.written < len(seg):
                    feeds.append(Feed(seg, seg.written, seg.tokens[seg.written:], req.id, stream.wants_sample))
                    if stream.wants_sample:
                        samplers.append([stream])
                    fed = True
            for seg in self._closing_segments(req):
                feeds.append(Feed(seg, seg.written, seg.tokens[seg.written:], req.id, False))
                fed = True
            req.forward_passes += fed
        return feeds, samplers

    def _closing_segments(self, req: Request) -> list[Segment]:
        """Segments with unwritten tokens that no live stream feeds: a suspended main line at a fork,
        branches that just sampled </step>."""
        live = {id(s.segment) for s in req.streams()}
        return [seg for seg in req.segments if seg.written < len(seg) and id(seg) not in live]

    # ------------------------------------------------------------------ consuming samples

    def consume(self, samples: list[tuple[Stream, int, float]]) -> list[Request]:
        """Apply sampled (stream, token, logprob) in order; return the requests that finished."""
        done_before = len(self.finished)
        for stream, token, logprob in samples:
            req = stream.request
            if req.finished:
                continue  # the budget ran out on an earlier branch of this step
            self._on_sample(stream, token, logprob)
            if not req.finished and req.used >= req.params.max_new_tokens:
                self._finish(req, "length", None)
        for req in self.running:
            if not req.finished and req.open_block is not None:
                self._advance_block(req)
        self._collect()
        return self.finished[done_before:]

    def _spend(self, req: Request, count: int) -> bool:
        if req.used + count > req.params.max_new_tokens:
            self._finish(req, "length", f"the budget of {req.params.max_new_tokens} tokens ran out")
            return False
        req.used += count
        return True

    def _force(self, stream: Stream, ids: tuple[int, ...]) -> bool:
        if not self._spend(stream.request, len(ids)):
            return False
        for t in ids:
            stream.segment.append(t, math.nan, False)
        return True

    def _on_sample(self, stream: Stream, token: int, logprob: float) -> None:
        req = stream.request
        stream.segment.append(token, logprob, True)
        req.used += 1
        if stream.kind == "branch":
            stream.history.append(token)
        if token in req.params.stop_token_ids:
            self._finish(req, "stop", None)
            return
        mode = self.config.mode
        if token in self.scaffold.eos_ids:
            if mode == "plain" or stream.phase is Phase.TEXT:
                self._finish(req, "eos", None)
            else:
                where = f"step {stream.branch} of block {stream.block}" if stream.kind == "branch" else stream.phase.value
                self._finish(req, "invalid_schema", f"EOS inside {where}")
            return
        if mode == "plain":
            return
        tag = self.scaffold.tag_of.get(token)
        try:
            phase = next_phase(stream.phase, tag)
        except StructureError as e:
            where = f" (step {stream.branch} of block {stream.block})" if stream.kind == "branch" else ""
            self._finish(req, "invalid_schema", f"{e}{where}")
            return
        stream.phase = phase
        if tag == "<guideline>":
            stream.plans = 0
        elif tag == "<plan>":
            stream.plans += 1
            if stream.plans <= len(self.scaffold.plan_label):  # more plans than max_branches end at the fork
                self._force(stream, self.scaffold.plan_label[stream.plans - 1])
        elif tag == "</guideline>":
            self._fork(stream)
        elif tag == "</step>":
            stream.closed = True
            stream.wants_sample = False
            self._force(stream, self.scaffold.step_separator)

    def _fork(self, main: Stream) -> None:
        req, cfg = main.request, self.config
        k = main.plans
        if k == 0:
            return self._finish(req, "invalid_schema", "</guideline> closes a guideline with no <plan>")
        if k > cfg.max_branches:
            return self._finish(req, "invalid_schema", f"{k} plans; at most max_branches={cfg.max_branches}")
        if len(req.blocks) >= cfg.max_depth:
            return self._finish(req, "length", f"max_depth={cfg.max_depth} parallel blocks reached")
        remaining = req.params.max_new_tokens - req.used
        if remaining < cfg.min_fork_budget:
            return self._finish(req, "length", f"{remaining} tokens left, below min_fork_budget={cfg.min_fork_budget}")
        if not self._force(main, self.scaffold.guideline_separator):
            return
        main.wants_sample = False
        shared = main.segment
        last = shared.start_pos + len(shared) - 1
        block = OpenBlock(shared, last, [], k)
        req.open_block = block
        req.blocks.append([])
        for b in range(1, k + 1 if cfg.mode == "parallel" else 2):
            if req.finished:
                return
            self._start_branch(req, b)

    def _start_branch(self, req: Request, branch: int) -> None:
        block = req.open_block
        visible = (*block.shared.visible, block.shared)
        seg = self._new_segment(branch_start_position(block.last_shared_position), visible)
        number = len(req.blocks)
        stream = Stream(req, seg, "branch", Phase.STEP, number, branch, req.generator(number, branch))
        block.branches.append(stream)
        req.segments.append(seg)
        req.blocks[-1].append(seg)
        self._force(stream, self.scaffold.step_open[branch - 1])

    def _advance_block(self, req: Request) -> None:
        """Start the next branch (sequential) or join once every branch has closed."""
        block = req.open_block
        if not all(b.closed for b in block.branches):
            return
        if len(block.branches) < block.planned:
            return self._start_branch(req, len(block.branches) + 1)
        lengths = [len(b.segment) for b in block.branches]
        visible = (*block.shared.visible, block.shared, *(b.segment for b in block.branches))
        seg = self._new_segment(takeaway_position(block.last_shared_position, lengths), visible)
        req.segments.append(seg)
        main = req.main
        main.segment, main.phase, main.wants_sample, main.history = seg, Phase.TAKEAWAY, True, []
        main.block = len(req.blocks)
        req.open_block = None
        self._force(main, self.scaffold.takeaway_open)

    # ------------------------------------------------------------------ finishing

    def _finish(self, req: Request, reason: str, diagnostic: str | None) -> None:
        if req.finished:
            return
        req.finish_reason, req.diagnostic = reason, diagnostic
        req.ended = time.perf_counter()

    def _collect(self) -> None:
        """Release the KV of finished requests (and of prompts no sample reads any more)."""
        still = []
        for req in self.running:
            if req.finished:
                for seg in req.segments:
                    seg.release()
                self.finished.append(req)
            else:
                still.append(req)
        self.running = still
        alive = []
        for group in self._groups_alive:
            if all(r.finished for r in group.requests):
                group.prompt.release()
            else:
                alive.append(group)
        self._groups_alive = alive

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
