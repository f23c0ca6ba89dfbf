"""The scheduler: a plain-Python state machine over requests, their branches and the KV pages.

Per step it returns the feeds for one forward (``plan``) and, given the sampled tokens, moves
every stream along the NPR grammar (``consume``). It never touches model tensors; it allocates
pages, which the pool records for the device-side page table.

States of a request's streams::

    main: TEXT/GUIDELINE/PLAN (plan_label(k) prefilled after the k-th <plan>)
          ──samples </guideline>──► fork: main suspended,
          one branch per plan, each prefilled with step_open(k) at pos(last shared)+1
    branch k: STEP ──samples </step>──► closing (feeds </step> + separator, then done)
    all branches closing/done ──► join: a takeaway segment that sees every branch,
          prefilled with <takeaway> at pos(last shared) + longest branch + 1; main resumes
          in TAKEAWAY, then TEXT (another block, or the final answer and EOS)

``sequential`` mode starts branch k+1 when branch k closes; ``parallel`` mode starts every branch
the live-stream budget (``max_num_seqs``) allows, the rest as others close; ``plain`` mode skips the
grammar. Token ids only: the scaffold ids come from the engine, which got them from the tokenizer.

**Memory.** Requests are admitted while pages are free (no worst-case reservation). When a step
needs more pages than are free, the youngest resident request is *preempted*: its pages are freed
and it waits, ahead of new work, to be re-prefilled (prompt, prefix, branches, takeaway: every
segment with its own positions and mask) and continue exactly where it stopped; its sampling noise
is keyed by counters, not generator state, so its output does not change. A request that alone
needs more than the pool ends with finish reason ``length`` and a diagnostic that says so.

**Shared prompt prefixes.** The whole pages several prompts begin with (``share_prefix``) are a
segment of their own, created before those prompts' segments (so the mask rule reads it as their
ancestry), listed first in every sample's row, fed once in the row of its first resident reader,
and released with the last group that has resident requests, like a prompt's pages.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from npr.engine.attention import Feed
from npr.engine.config import EngineConfig, EngineInputError, SamplingParams
from npr.engine.kv_pool import KVPool, Segment
from npr.engine.state import FinishReason, Group, OpenBlock, Request, Scaffold, Stream, StreamDelta, StreamKind
from npr.masks import Phase, StructureError, branch_start_position, next_phase, takeaway_position


@dataclass(frozen=True)
class StepPlan:
    """What the scheduler plans for one forward (vLLM's ``SchedulerOutput``): ``feeds``, the tokens to feed
    (the feeds of one page-table row consecutive), and ``samplers``: per feed that asks for logits, in
    order, the streams those logits serve (a new prompt's serve all its samples)."""

    feeds: list[Feed]
    samplers: list[list[Stream]]


class Scheduler:
    def __init__(self, config: EngineConfig, pool: KVPool, scaffold: Scaffold):
        self.config = config
        self.pool = pool
        self.scaffold = scaffold
        self.waiting: deque[Group] = deque()  # groups not admitted yet
        self.preempted: list[Request] = []  # by request id: the oldest is readmitted first
        self.running: list[Request] = []  # resident requests by id
        self.finished: list[Request] = []  # finished, not yet reported (``take_finished``)
        self.seen_updates: list[tuple[int, list[int]]] = []  # (seen slot, tokens): rows to rebuild
        self._free_seen = list(range(config.max_num_seqs - 1, -1, -1))
        self._next_segment = 0
        self._next_request = 0
        self._groups_alive: list[Group] = []
        self._touched: dict[int, tuple[Request, Segment]] = {}  # segments appended to in this step
        # shared prompt prefixes (``share_prefix``): token ids -> segment, most recently used last
        self._prefixes: OrderedDict[tuple[int, ...], Segment] = OrderedDict()
        self._last_prompt: list[int] = []
        self._running_need: int | None = None  # pages the resident requests' next feeds need (``_make_room``)

    # ------------------------------------------------------------------ submission and cancellation

    def start_blocks(self, prompt_len: int, params: SamplingParams) -> int:
        """KV pages a prompt needs to start decoding: its own pages plus one per sample."""
        return math.ceil(prompt_len / self.pool.block_size) + params.n

    def check_fits(self, prompt_index: int, prompt_len: int, params: SamplingParams) -> None:
        """Raise if this prompt could never start: its pages plus one per sample exceed the pool,
        or it has more samples than ``max_num_seqs`` streams."""
        need = self.start_blocks(prompt_len, params)
        if need > self.pool.num_blocks:
            raise EngineInputError(
                f"prompt {prompt_index} needs {need} KV pages to start ({prompt_len} prompt tokens, n={params.n}) "
                f"but the pool has {self.pool.num_blocks}; raise EngineConfig.kv_cache_tokens/kv_cache_gib or "
                "shorten the prompt"
            )
        if params.n > self.config.max_num_seqs:
            raise EngineInputError(f"n={params.n} samples exceed max_num_seqs={self.config.max_num_seqs} live streams")

    def submit(self, prompt_index: int, prompt_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.check_fits(prompt_index, len(prompt_ids), params)
        prefix = self._prefix_for(prompt_ids)
        start = len(prefix) if prefix is not None else 0
        prompt = self._frozen_segment(prompt_ids[start:], start)
        group = Group(prompt_index, list(prompt_ids), params, seed, prompt, prefix)
        for i in range(params.n):
            self._next_request += 1
            group.requests.append(Request(group, i, self._next_request))
        self.waiting.append(group)

    # ------------------------------------------------------------------ shared prompt prefixes

    MAX_PREFIXES = 16
    """Shared prefixes remembered for later prompts (least recently used forgotten first; a group
    holding one keeps it)."""

    def _shareable(self, a: Sequence[int], b: Sequence[int]) -> int:
        """Tokens of the whole pages ``a`` and ``b`` both begin with, leaving each >= 1 token of its own
        (a prompt's last token must be fed to give its logits)."""
        n, most = 0, min(len(a), len(b)) - 1
        while n < most and a[n] == b[n]:
            n += 1
        return n // self.pool.block_size * self.pool.block_size

    def _frozen_segment(self, tokens: Sequence[int], start_pos: int) -> Segment:
        seg = self._new_segment(start_pos)
        seg.frozen = True
        for t in tokens:
            seg.append(t, math.nan, False)
        return seg

    def share_prefix(self, prompts: Sequence[Sequence[int]]) -> None:
        """Remember, among ``prompts`` that begin with the same page of tokens, the whole pages they all
        begin with, so that each of them, submitted next, stores and prefills those pages once
        (``EngineConfig.share_prompt_prefix``)."""
        if not self.config.share_prompt_prefix:
            return
        bs = self.pool.block_size
        clusters: dict[tuple[int, ...], list[Sequence[int]]] = {}
        for p in prompts:
            if len(p) > bs:
                clusters.setdefault(tuple(p[:bs]), []).append(p)
        for members in clusters.values():
            if len(members) > 1:
                n = min(self._shareable(members[0], p) for p in members[1:])  # >= bs: they share a page
                if tuple(members[0][:n]) not in self._prefixes:
                    self._remember(tuple(members[0][:n]))

    def _remember(self, key: tuple[int, ...]) -> Segment:
        self._prefixes[key] = seg = self._frozen_segment(key, 0)
        while len(self._prefixes) > self.MAX_PREFIXES:
            self._prefixes.popitem(last=False)
        return seg

    def _prefix_for(self, prompt_ids: list[int]) -> Segment | None:
        """The longest remembered prefix of ``prompt_ids`` that leaves it a token of its own, else the
        whole pages it shares with the prompt submitted before it (remembered from now on), else None."""
        if not self.config.share_prompt_prefix:
            return None
        best = None
        for key in self._prefixes:
            if (
                len(key) < len(prompt_ids)
                and (best is None or len(key) > len(best))
                and tuple(prompt_ids[: len(key)]) == key
            ):
                best = key
        previous, self._last_prompt = self._last_prompt, prompt_ids
        if best is not None:
            self._prefixes.move_to_end(best)
            return self._prefixes[best]
        n = self._shareable(previous, prompt_ids)
        return self._remember(tuple(prompt_ids[:n])) if n else None

    def cancel(self, prompt_index: int, sample_index: int | None = None) -> int:
        """Finish the queued, preempted or running samples of ``prompt_index`` (one, or all) as
        ``cancelled`` and free their KV now; the next step reports them. Returns how many it cancelled."""
        groups = [g for g in (*self.waiting, *self._groups_alive) if g.prompt_index == prompt_index]
        hit = [r for g in groups for r in g.requests if not r.finished and sample_index in (None, r.sample_index)]
        for req in hit:
            self._finish(req, FinishReason.CANCELLED, "cancelled by the caller")
            if not req.resident:  # queued or preempted: nothing to release
                self.finished.append(req)
        self.waiting = deque(g for g in self.waiting if not all(r.finished for r in g.requests))
        self.preempted = [r for r in self.preempted if not r.finished]
        self._collect()
        return len(hit)

    def has_work(self) -> bool:
        return bool(self.waiting or self.preempted or self.running or self.finished)

    def take_finished(self) -> list[Request]:
        done, self.finished = self.finished, []
        return done

    def live_streams(self) -> int:
        """Stream slots held: each resident request's live streams, and at least one (a request
        between a fork and its first branch keeps its main line's slot)."""
        return sum(max(1, len(r.streams())) for r in self.running if not r.finished)

    # ------------------------------------------------------------------ pages

    def _new_segment(
        self, start_pos: int, fork: int | None = None, order: int = 0, block: int = 0, branch: int = 0
    ) -> Segment:
        self._next_segment += 1
        seg_id = self._next_segment
        return Segment(seg_id, start_pos, seg_id if fork is None else fork, order, block, branch)

    def _rows_of(self, req: Request, seg: Segment) -> list[int]:
        if seg is req.group.prompt:
            return [r.row for r in req.group.requests if r.resident]
        if seg is req.group.prefix:
            return [r.row for r in self.running if r.group.prefix is seg]
        return [req.row]

    def _allocate(self, seg: Segment, rows: list[int]) -> None:
        """Pages for every token of ``seg`` (the plan feeds them all); the rows list each new page."""
        bs, table = self.pool.block_size, self.pool.pages
        while len(seg.pages) * bs < len(seg):
            page = self.pool.allocate(seg.id, len(seg.pages) * bs)
            seg.pages.append(page)
            for row in rows:
                table.append(row, page)
        self._sync_valid(seg)

    def _sync_valid(self, seg: Segment) -> None:
        """A frozen segment's readers see its last page only up to its length."""
        bs = self.pool.block_size
        if seg.frozen and seg.pages and len(seg.pages) * bs >= len(seg):
            self.pool.pages.set_valid(seg.pages[-1], len(seg) - (len(seg.pages) - 1) * bs)

    def _freeze(self, seg: Segment) -> None:
        seg.frozen = True
        self._sync_valid(seg)

    def _pages_to_feed(self, req: Request) -> int:
        bs = self.pool.block_size
        need = 0
        for s in req.segments:  # a plain loop: this runs for every resident request, twice per step
            n = len(s.tokens)
            if s.written < n:
                need += max(0, -(-n // bs) - len(s.pages))
        if not req.resident:
            need += sum(
                p.pages_needed(len(p), bs)
                for p in (req.group.prefix, req.group.prompt)
                if p is not None and not p.pages
            )
        return need

    def _release(self, req: Request) -> None:
        """Free a request's pages and row (finished or preempted); the prompt goes with its last reader."""
        if not req.resident:
            return
        for seg in req.segments:
            self.pool.release(seg.pages)
            seg.pages, seg.written = [], 0
        self._return_seen_slots(req)
        self.pool.pages.close_row(req.row)
        req.row = None
        group = req.group
        group.resident -= 1
        if group.resident == 0:
            self._drop_pages(group.prompt)
            prefix = group.prefix  # goes with the last resident request of any group that reads it
            if prefix is not None and not any(r.resident and r.group.prefix is prefix for r in self.running):
                self._drop_pages(prefix)

    def _drop_pages(self, seg: Segment) -> None:
        self.pool.release(seg.pages)
        seg.pages, seg.written = [], 0

    def _make_resident(self, req: Request) -> None:
        req.row = self.pool.pages.open_row()
        group = req.group
        group.resident += 1
        for seg in (group.prefix, group.prompt):  # the row lists the prefix's pages, then the prompt's
            if seg is None:
                continue
            if seg.pages:
                for page in seg.pages:
                    self.pool.pages.append(req.row, page)
            else:
                self._allocate(seg, [req.row])
        for stream in req.streams():
            if stream.kind is StreamKind.BRANCH:
                self._give_seen_slot(stream)
        req.mark_started()
        self.running.append(req)
        self.running.sort(key=lambda r: r.id)

    def _return_seen_slot(self, stream: Stream) -> None:
        if stream.seen_slot >= 0:
            self._free_seen.append(stream.seen_slot)
            stream.seen_slot = -1

    def _return_seen_slots(self, req: Request) -> None:
        for stream in [req.main, *(req.open_block.branches if req.open_block else [])]:
            if stream is not None:
                self._return_seen_slot(stream)

    def assert_no_seen_rows_held(self) -> None:
        """Debug check, with nothing left to do: every seen-token row is back, none twice."""
        if sorted(self._free_seen) != list(range(self.config.max_num_seqs)):
            raise AssertionError(f"seen-table leak: {self.config.max_num_seqs - len(set(self._free_seen))} row(s) held")

    def _give_seen_slot(self, stream: Stream) -> None:
        if self.config.repetition_penalty != 1.0 and stream.seen_slot < 0:
            stream.seen_slot = self._free_seen.pop()
            self.seen_updates.append((stream.seen_slot, list(stream.history)))

    # ------------------------------------------------------------------ admission and preemption

    def _make_room(self) -> None:
        """Preempt the youngest resident requests until this step's feeds fit in the free pages."""
        while self.running:
            need = sum(self._pages_to_feed(r) for r in self.running)
            if need <= self.pool.free_blocks:
                self._running_need = need  # read by ``_admit``, which runs next with the same requests
                return
            victim = self.running[-1]
            if len(self.running) == 1:
                held = sum(
                    len(s.pages) for s in (*victim.segments, victim.group.prompt, victim.group.prefix) if s is not None
                )
                self._finish(victim, FinishReason.LENGTH, self._too_big(victim, held + need))
                self._collect()
                return
            self.running.pop()
            self._release(victim)
            victim.preemptions += 1
            self.preempted.append(victim)
            self.preempted.sort(key=lambda r: r.id)

    def _admit(self) -> None:
        """Readmit preempted requests (oldest first), then admit new groups, while pages and streams allow.

        Pages: the running requests' feeds come first; what stays free after an admission covers one
        new page per live stream, so a step rarely preempts what it just admitted. With nothing
        resident, the first in line is admitted regardless (``check_fits`` guarantees a new group
        fits an empty pool; a preempted request that no longer fits alone ends as ``length``)."""
        need, self._running_need = self._running_need, None
        if not self.preempted and not self.waiting:
            return
        cap, pool = self.config.max_num_seqs, self.pool
        live = self.live_streams()
        if need is None:
            need = sum(self._pages_to_feed(r) for r in self.running)
        spare = pool.free_blocks - need
        while self.preempted:
            req = self.preempted[0]
            streams = max(1, len(req.streams()))
            need = self._pages_to_feed(req)
            if not self.running:
                if need > pool.free_blocks:
                    self.preempted.pop(0)
                    self._finish(req, FinishReason.LENGTH, self._too_big(req, need))
                    self.finished.append(req)
                    continue
            elif live + streams > cap or need + live + streams > spare or pool.pages.free_rows == 0:
                return
            self.preempted.pop(0)
            self._make_resident(req)
            live, spare = live + streams, spare - need
        while self.waiting:
            group = self.waiting[0]
            todo = [r for r in group.requests if not r.finished]
            need = math.ceil(len(group.prompt_ids) / pool.block_size) + len(todo)
            if self.running and (live + len(todo) > cap or need + live > spare or pool.pages.free_rows < len(todo)):
                return
            self.waiting.popleft()
            self._start_group(group, todo)
            live, spare = live + len(todo), spare - need

    def _too_big(self, req: Request, need: int) -> str:
        return (
            f"the KV pool ({self.pool.num_blocks} pages of {self.pool.block_size} tokens) cannot hold this request "
            f"alone (it needs {need} pages for its {req.used} tokens and its prompt); raise "
            "EngineConfig.kv_cache_tokens/kv_cache_gib"
        )

    def _start_group(self, group: Group, requests: list[Request]) -> None:
        for req in requests:
            seg = self._new_segment(len(group.prompt_ids), order=0)
            req.segments.append(seg)
            req.main = Stream(request=req, segment=seg, kind=StreamKind.MAIN, phase=Phase.TEXT, block=0, branch=0)
            self._make_resident(req)
        self._groups_alive.append(group)

    # ------------------------------------------------------------------ planning

    def plan(self) -> StepPlan:
        """Feeds for the next forward and, per feed that asks for logits, the streams to sample.

        The prompt of a new group is one feed whose last logits serve all its n samples; a
        re-prefilled prompt asks for none. Pages for every feed are allocated here, so the forward
        never runs out of them. ``max_num_batched_tokens`` bounds the tokens fed (``_within_budget``).
        """
        self._make_room()
        self._admit()
        fed_prompts: set[int] = set()
        wanted = [(req, self._feeds_of(req, fed_prompts)) for req in self.running]
        feeds: list[Feed] = []
        samplers: list[list[Stream]] = []
        for req, items in self._within_budget(wanted):
            for feed, streams, starts in items:
                feeds.append(feed)
                if streams is not None:
                    samplers.append(streams)
                if starts is not None:
                    starts.started = True
            req.forward_passes += bool(items)
        return StepPlan(feeds=feeds, samplers=samplers)

    def _feeds_of(self, req: Request, fed_prompts: set[int]) -> list[tuple[Feed, list[Stream] | None, Group | None]]:
        """Every unwritten token of ``req`` as feeds of its row, in order, each with the streams its logits
        serve (or None) and the group whose first logits it gives (or None). Allocates their pages."""
        items = []
        prefix = req.group.prefix  # fed (once) in the row of its first reader, before that row's prompt
        if prefix is not None and prefix.written < len(prefix) and id(prefix) not in fed_prompts:
            fed_prompts.add(id(prefix))
            self._allocate(prefix, self._rows_of(req, prefix))
            items.append((Feed(prefix, prefix.written, prefix.tokens[prefix.written :], req.row, False), None, None))
        prompt = req.group.prompt
        if prompt.written < len(prompt) and id(prompt) not in fed_prompts:
            fed_prompts.add(id(prompt))
            self._allocate(prompt, self._rows_of(req, prompt))
            first = not req.group.started
            feed = Feed(prompt, prompt.written, prompt.tokens[prompt.written :], req.row, first)
            if first:
                streams = [r.main for r in req.group.requests if r.resident and not r.segments[0].tokens]
                items.append((feed, streams, req.group))
            else:
                items.append((feed, None, None))
        live = req.streams()  # at most max_branches: a list beats a dict built per request per step
        bs = self.pool.block_size
        for seg in req.segments:
            if seg.written < len(seg):
                if len(seg.pages) * bs < len(seg) or seg.frozen:
                    self._allocate(seg, [req.row])
                stream = None
                for s in live:
                    if s.segment is seg:
                        stream = s
                        break
                wants = stream is not None and stream.wants_sample
                items.append(
                    (
                        Feed(seg, seg.written, seg.tokens[seg.written :], req.row, wants),
                        [stream] if wants else None,
                        None,
                    )
                )
        return items

    def _within_budget(self, wanted: list) -> list:
        """The feeds of one forward within ``max_num_batched_tokens`` (vLLM's chunked prefill): every
        request that only decodes (one token per stream) first, then the others in order, the last one
        cut to the tokens left. A cut feed asks for no logits (its stream samples once the rest of its
        segment is fed, in a later step), and its row's later feeds wait, since they may read it; so
        does every other request's prefill in this step."""
        budget = self.config.max_num_batched_tokens
        if budget is None or sum(len(f.tokens) for _, items in wanted for f, _, _ in items) <= budget:
            return wanted
        decoding = {id(req) for req, items in wanted if all(len(f.tokens) == 1 for f, _, _ in items)}
        budget -= sum(len(items) for req, items in wanted if id(req) in decoding)  # <= max_num_seqs <= budget
        chosen = []
        for req, items in wanted:
            if id(req) in decoding:
                chosen.append((req, items))
                continue
            kept = []
            for feed, streams, starts in items:
                if budget <= 0:
                    break
                if len(feed.tokens) > budget:  # cut: the rest of this segment is fed in later steps
                    kept.append((Feed(feed.segment, feed.start, feed.tokens[:budget], feed.row, False), None, None))
                    budget = 0
                    break
                kept.append((feed, streams, starts))
                budget -= len(feed.tokens)
            chosen.append((req, kept))
        return chosen

    # ------------------------------------------------------------------ consuming samples

    def consume(
        self,
        samples: list[tuple[Stream, int, float]],
        top_logprobs: dict[int, tuple[tuple[int, float], ...]] | None = None,
    ) -> list[StreamDelta]:
        """Apply sampled (stream, token, logprob) in order; return the step's token deltas.
        ``top_logprobs``: sample index -> its position's top (id, log-prob), for streams that asked.
        Finished requests are collected for ``take_finished``."""
        top_logprobs = top_logprobs or {}
        for i, (stream, token, logprob) in enumerate(samples):
            req = stream.request
            if req.finished:
                continue  # the budget ran out on an earlier branch of this step
            self._on_sample(stream, token, logprob, top_logprobs.get(i))
            if not req.finished and req.used >= req.params.max_new_tokens:
                self._finish(req, FinishReason.LENGTH, None)
        blocks = [req for req in self.running if not req.finished and req.open_block is not None]
        if blocks:
            live = self.live_streams()
            for req in blocks:
                if not req.finished and req.open_block is not None:  # a branch started above may end a request
                    live += self._advance_block(req, live)
        deltas = []
        for req, seg in self._touched.values():
            if seg.delivered < len(seg):
                top = (
                    tuple(seg.top_logprobs.get(i, ()) for i in range(seg.delivered, len(seg)))
                    if req.params.top_logprobs
                    else ()
                )
                deltas.append(
                    StreamDelta(
                        req.prompt_index,
                        req.sample_index,
                        seg.order,
                        seg.block,
                        seg.branch,
                        tuple(seg.tokens[seg.delivered :]),
                        tuple(seg.logprobs[seg.delivered :]),
                        top,
                    )
                )
                seg.delivered = len(seg)
        self._touched = {}
        self._collect()
        return deltas

    def _append(self, stream: Stream, token: int, logprob: float, sampled: bool, top: tuple | None = None) -> None:
        seg = stream.segment
        seg.append(token, logprob, sampled, top)
        if id(seg) not in self._touched:
            self._touched[id(seg)] = (stream.request, seg)

    def _spend(self, req: Request, count: int) -> bool:
        if req.used + count > req.params.max_new_tokens:
            self._finish(req, FinishReason.LENGTH, f"the budget of {req.params.max_new_tokens} tokens ran out")
            return False
        req.used += count
        return True

    def _force(self, stream: Stream, ids: tuple[int, ...]) -> bool:
        if not self._spend(stream.request, len(ids)):
            return False
        for t in ids:
            self._append(stream, t, math.nan, False)
        return True

    def _on_sample(self, stream: Stream, token: int, logprob: float, top: tuple | None = None) -> None:
        req = stream.request
        self._append(stream, token, logprob, True, top)
        req.used += 1
        if stream.kind is StreamKind.BRANCH:
            stream.history.append(token)
        if token in req.params.stop_token_ids:
            return self._finish(req, FinishReason.STOP, None)
        mode = self.config.mode
        if token in self.scaffold.eos_ids and not req.params.ignore_eos:
            if mode == "plain" or stream.phase is Phase.TEXT:
                return self._finish(req, FinishReason.EOS, None)
            branch = stream.kind is StreamKind.BRANCH
            where = f"step {stream.branch} of block {stream.block}" if branch else stream.phase.value
            return self._finish(req, FinishReason.INVALID_SCHEMA, f"EOS inside {where}")
        if mode == "plain":
            return
        tag = self.scaffold.tag_of.get(token)
        try:
            phase = next_phase(stream.phase, tag)
        except StructureError as e:
            where = f" (step {stream.branch} of block {stream.block})" if stream.kind is StreamKind.BRANCH else ""
            return self._finish(req, FinishReason.INVALID_SCHEMA, f"{e}{where}")
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
            self._return_seen_slot(stream)
            self._force(stream, self.scaffold.step_separator)

    def _fork(self, main: Stream) -> None:
        """Open a block at ``</guideline>``; its branches start in ``_advance_block`` (same step)."""
        req, cfg = main.request, self.config
        k = main.plans
        if k == 0:
            return self._finish(req, FinishReason.INVALID_SCHEMA, "</guideline> closes a guideline with no <plan>")
        if k > cfg.max_branches:
            return self._finish(req, FinishReason.INVALID_SCHEMA, f"{k} plans; at most max_branches={cfg.max_branches}")
        if len(req.blocks) >= cfg.max_depth:
            return self._finish(req, FinishReason.LENGTH, f"max_depth={cfg.max_depth} parallel blocks reached")
        remaining = req.params.max_new_tokens - req.used
        if remaining < cfg.min_fork_budget:
            return self._finish(
                req, FinishReason.LENGTH, f"{remaining} tokens left, below min_fork_budget={cfg.min_fork_budget}"
            )
        if not self._force(main, self.scaffold.guideline_separator):
            return
        main.wants_sample = False
        shared = main.segment
        self._freeze(shared)
        req.open_block = OpenBlock(shared, shared.start_pos + len(shared) - 1, [], k)
        req.blocks.append([])

    def _start_branch(self, req: Request, branch: int) -> None:
        block = req.open_block
        first = block.branches[0].segment.id if block.branches else None
        number = len(req.blocks)
        seg = self._new_segment(
            branch_start_position(block.last_shared_position), order=len(req.segments), block=number, branch=branch
        )
        seg.fork = seg.id if first is None else first  # siblings are never in a branch's ancestry
        stream = Stream(request=req, segment=seg, kind=StreamKind.BRANCH, phase=Phase.STEP, block=number, branch=branch)
        block.branches.append(stream)
        req.segments.append(seg)
        req.blocks[-1].append(seg)
        self._give_seen_slot(stream)
        self._force(stream, self.scaffold.step_open[branch - 1])

    def _advance_block(self, req: Request, live: int) -> int:
        """Start branches (parallel: while the live-stream budget allows, at least one; sequential:
        the next once the previous closed) or join once every branch has closed. Returns the change
        in live streams."""
        block = req.open_block
        before = max(1, len(req.streams()))
        while len(block.branches) < block.planned and not req.finished:
            open_now = len(req.streams())
            if self.config.mode != "parallel" and open_now:
                break
            if open_now and live - before + open_now + 1 > self.config.max_num_seqs:
                break
            self._start_branch(req, len(block.branches) + 1)
        if not req.finished and len(block.branches) == block.planned and all(b.closed for b in block.branches):
            self._join(req)
        return (0 if req.finished else max(1, len(req.streams()))) - before

    def _join(self, req: Request) -> None:
        block = req.open_block
        lengths = [len(b.segment) for b in block.branches]
        for b in block.branches:
            self._freeze(b.segment)
        seg = self._new_segment(
            takeaway_position(block.last_shared_position, lengths), order=len(req.segments), block=len(req.blocks)
        )
        req.segments.append(seg)
        main = req.main
        main.segment, main.phase, main.wants_sample, main.history = seg, Phase.TAKEAWAY, True, []
        main.block = len(req.blocks)
        req.open_block = None
        self._force(main, self.scaffold.takeaway_open)

    # ------------------------------------------------------------------ finishing

    def _finish(self, req: Request, reason: FinishReason, diagnostic: str | None) -> None:
        if req.finished:
            return
        req.finish_reason, req.diagnostic = reason, diagnostic
        req.ended = time.perf_counter()
        # at once, not at ``_collect``: the live-stream count no longer holds a finished request, so
        # branches other requests open later in this step may need its seen-table rows
        self._return_seen_slots(req)

    def _collect(self) -> None:
        """Release the KV of finished requests (and of prompts no sample reads any more)."""
        still = []
        for req in self.running:
            if req.finished:
                self._release(req)
                self.finished.append(req)
            else:
                still.append(req)
        self.running = still
        self._groups_alive = [g for g in self._groups_alive if not all(r.finished for r in g.requests)]
