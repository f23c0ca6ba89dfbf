"""The NPR engine: continuous batching of parallel-branch decoding over any HF causal LM.

``Engine(model, tokenizer, EngineConfig)`` owns the KV pool and runs the loop

    plan (scheduler) -> one packed forward (paged tree attention) -> sample -> consume (scheduler)

until every request has finished. docs/engine.md explains the design.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from npr.engine.attention import BatchPlan, paged_attention, plan_batch
from npr.engine.config import CPU_KV_CACHE_GIB, EngineConfig, EngineInputError, SamplingParams
from npr.engine.kv_pool import KVPool
from npr.engine.sampling import (
    RowParams,
    SamplingPlan,
    SeenTokens,
    apply_repetition_penalty,
    plan_sampling,
    redraw_wide,
    row_uniforms,
    sample,
)
from npr.engine.scheduler import Scheduler
from npr.engine.state import FinishReason, Request, Scaffold, Stream, StreamDelta
from npr.engine.upload import StepUpload
from npr.schema import GUIDELINE_SEPARATOR, STEP_SEPARATOR, TAKEAWAY_OPEN, plan_label, step_open
from npr.tokens import tag_token_ids


@dataclass
class RequestStats:
    generated_tokens: int
    """Every response token: all branches, sampled and prefilled."""
    critical_path_tokens: int
    """The longest chain of dependent tokens: sequential tokens plus the longest branch of each block."""
    forward_passes: int
    wall_time_s: float
    parallel_blocks: int
    """Blocks the engine forked into branches."""
    preemptions: int = 0
    """Times the request's KV was freed to make room and later recomputed (outputs are unchanged)."""

    @property
    def ideal_speedup(self) -> float:
        return self.generated_tokens / max(1, self.critical_path_tokens)


@dataclass
class Result:
    """One sample of one prompt.

    ``token_ids``, ``position_ids``, ``logprobs`` and ``sampled`` cover the response in the flat
    canonical layout (prompt excluded): exactly what ``npr.masks.parallel_mask_and_positions``
    describes for ``prompt_ids + token_ids`` (``plain`` mode: causal, arange). ``logprobs`` are
    the model's own log-probabilities (temperature 1, no processors) of sampled tokens and NaN
    for tokens the engine prefilled (``sampled`` False). ``blocks`` lists each executed parallel
    block as the [start, end) spans of its branches in ``token_ids``.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    position_ids: list[int]
    logprobs: list[float]
    sampled: list[bool]
    text: str
    finish_reason: FinishReason  # equal to its string: "stop", "eos", "length", "invalid_schema", "cancelled"
    diagnostic: str | None
    mode: str
    blocks: list[list[tuple[int, int]]]
    stats: RequestStats
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
    """With ``SamplingParams.top_logprobs``: per token, its position's most likely (id, log-prob), best first
    (``()`` for prefilled tokens); else None."""

    @property
    def branches_per_block(self) -> list[int]:
        return [len(b) for b in self.blocks]


@dataclass
class EngineEvent:
    """What one engine step produced: finished results, the tokens every stream appended
    (``deltas``, for streaming servers), and counts for progress displays."""

    finished: list[Result] = field(default_factory=list)
    tokens: int = 0
    """Tokens fed to the model in this step (prefill and re-prefill included)."""
    live_requests: int = 0
    waiting_groups: int = 0
    deltas: list[StreamDelta] = field(default_factory=list)
    preempted_requests: int = 0
    """Requests waiting to be recomputed after a preemption."""


@dataclass
class PenaltyPlan:
    """The repetition penalty of one step: ``StepUpload`` handles of the branch rows of the logits,
    their seen-table slots and factors (1.0 for a branch that sampled nothing yet), and the width
    of the seen table to read."""

    rows: int
    slots: int
    factor: int
    width: int


@dataclass
class StepSampling:
    params: RowParams
    plan: SamplingPlan
    penalty: PenaltyPlan | None


def kv_pool_bytes(total: int, others: int, in_use: int, forward: int, utilization: float) -> int:
    """vLLM's rule: the pool gets ``utilization`` of the device's ``total`` bytes less what other
    processes hold (``others``), what this process's tensors hold (``in_use``: the weights) and the
    activations of the largest forward (``forward``). Raises when nothing is left."""
    left = int(total * utilization) - others - in_use - forward
    if left <= 0:
        gib = [round(x / 2**30, 2) for x in (total, others, in_use, forward)]
        raise EngineInputError(
            f"gpu_memory_utilization={utilization} leaves no memory for the KV pool (device {gib[0]} GiB, other "
            f"processes {gib[1]} GiB, weights {gib[2]} GiB, a forward {gib[3]} GiB); raise it or set kv_cache_gib"
        )
    return left


@torch.no_grad()
def measure_cuda_memory(model, device: torch.device, tokens: int) -> tuple[int, int, int, int]:
    """(total, other processes, this process's tensors, a ``tokens``-token forward's peak activations), bytes."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    in_use = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=device), logits_to_keep=1, use_cache=False)
    forward = torch.cuda.max_memory_allocated(device) - in_use
    torch.cuda.empty_cache()
    return total, others, in_use, forward


def _model_dims(model) -> tuple[int, int, int]:
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise EngineInputError(
            f"{config.model_type} has non-full attention layers ({sorted(set(layer_types))}); the NPR engine "
            "supports full-attention decoder models (Llama, Qwen2, Qwen3, Mistral without sliding window)"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim


class Engine:
    """Parallel-branch decoding for NPR; see ``generate``, ``generate_stream``, ``submit``/``step``/``cancel``."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        layers, kv_heads, head_dim = _model_dims(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = self.config
        bytes_per_token = layers * 2 * kv_heads * head_dim * param.element_size()
        tokens = cfg.kv_cache_tokens or int(self._pool_bytes(model) // bytes_per_token)
        num_blocks = max(1, tokens // cfg.block_size)
        self.pool = KVPool(
            layers, kv_heads, head_dim, num_blocks, cfg.block_size, self.dtype, self.device, max_rows=cfg.max_num_seqs
        )
        self.scaffold = self._scaffold(tokenizer, model)
        self.scheduler = Scheduler(cfg, self.pool, self.scaffold)
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self._seen: SeenTokens | None = None  # the tokens each branch sampled (repetition penalty)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]

    def _pool_bytes(self, model) -> float:
        """KV pool bytes: ``kv_cache_gib`` when given; on CUDA what ``gpu_memory_utilization`` leaves after
        the memory in use and a measured forward; on a CPU ``CPU_KV_CACHE_GIB``."""
        cfg = self.config
        if cfg.kv_cache_gib is not None:
            return cfg.kv_cache_gib * 2**30
        if self.device.type != "cuda":
            return CPU_KV_CACHE_GIB * 2**30
        total, others, in_use, forward = measure_cuda_memory(model, self.device, cfg.max_num_batched_tokens or 8192)
        return kv_pool_bytes(total, others, in_use, forward, cfg.gpu_memory_utilization)

    def _scaffold(self, tokenizer, model) -> Scaffold:
        enc = lambda s: tuple(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
        eos = set()
        for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            eos |= set(source if isinstance(source, (list, tuple)) else [source]) - {None}
        tags = tag_token_ids(tokenizer)
        return Scaffold(
            tag_of={v: k for k, v in tags.items()},
            plan_label=tuple(enc(plan_label(k)) for k in range(1, self.config.max_branches + 1)),
            guideline_separator=enc(GUIDELINE_SEPARATOR),
            step_open=tuple(enc(step_open(k)) for k in range(1, self.config.max_branches + 1)),
            step_separator=enc(STEP_SEPARATOR),
            takeaway_open=enc(TAKEAWAY_OPEN),
            eos_ids=frozenset(eos),
        )

    # ------------------------------------------------------------------ API

    def submit(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams,
        first_index: int = 0,
        prompt_indices: Sequence[int] | None = None,
    ) -> None:
        """Queue prompts (token ids, or text tokenized as-is: apply the chat template first, see
        ``npr.prompts``). Prompt i gets index ``prompt_indices[i]`` (default ``first_index + i``),
        which keys its results and its seeds. Every check runs before anything is queued."""
        indices = list(prompt_indices) if prompt_indices is not None else [first_index + i for i in range(len(prompts))]
        if len(indices) != len(prompts):
            raise EngineInputError(f"{len(prompts)} prompts but {len(indices)} prompt indices")
        encoded = []
        for index, p in zip(indices, prompts):
            ids = (
                list(self.tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else [int(t) for t in p]
            )
            if not ids:
                raise EngineInputError(f"prompt {index} is empty")
            if self.context_length and len(ids) + params.max_new_tokens > self.context_length:
                raise EngineInputError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"it exceeds the model context of {self.context_length}; shorten it or lower max_new_tokens"
                )
            self.scheduler.check_fits(index, len(ids), params)
            encoded.append(ids)
        base_seed = params.seed if params.seed is not None else random.randrange(2**31)
        self.scheduler.share_prefix(encoded)
        for index, ids in zip(indices, encoded):
            self.scheduler.submit(index, ids, params, base_seed + index)

    def cancel(self, prompt_index: int, sample_index: int | None = None) -> int:
        """End the queued or running samples of ``prompt_index`` (all of them, or ``sample_index``)
        with finish reason ``cancelled``. Their KV is freed at once and the next ``step`` reports
        their ``Result`` (tokens decoded so far). Call between steps. Returns how many it ended."""
        return self.scheduler.cancel(prompt_index, sample_index)

    def has_work(self) -> bool:
        """Whether ``step`` has anything to do or report."""
        return self.scheduler.has_work()

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> list[Result]:
        """Decode every prompt (``params.n`` samples each); results ordered by prompt, then sample."""
        results = []
        for event in self.generate_stream(prompts, params):
            results += event.finished
        return sorted(results, key=lambda r: (r.prompt_index, r.sample_index))

    def generate_stream(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
    ) -> Iterator[EngineEvent]:
        """Like ``generate``, yielding an ``EngineEvent`` after every forward."""
        params = params or SamplingParams()
        self.submit(prompts, params)
        while self.scheduler.has_work():
            yield self.step()

    def step(self) -> EngineEvent:
        """One forward over every live stream; more prompts may be submitted between steps.

        The host plans the step (feeds, attention indices, sampling settings), sends it to the device
        in one upload, runs the forward and sampling there, and reads back the sampled tokens: one
        transfer each way (a nucleus wider than its candidates, which is rare, redraws with one more)."""
        plan = self.scheduler.plan()
        feeds, samplers = plan.feeds, plan.samplers
        event = EngineEvent()
        if feeds:
            upload = StepUpload()
            batch_plan = plan_batch(feeds, self.pool, self.kernel_for, self.config.prefill_group_tokens, upload)
            streams = [s for group in samplers for s in group]
            fan_out = None  # a prompt's logits serve all its n samples
            if len(streams) != len(samplers):
                fan_out = upload.add([r for r, group in enumerate(samplers) for _ in group])
            sampling = self._plan_sampling(streams, upload)
            upload.send(self.device)
            self.pool.pages.apply(upload)
            if self._seen is not None:
                self._seen.apply(upload)
            logits = self._forward(batch_plan, upload)  # [rows asking for logits, V] float32
            if fan_out is not None:
                logits = logits.index_select(0, upload[fan_out])
            tokens, logprobs, top = self._sample(streams, logits, sampling, upload)
            event.deltas = self.scheduler.consume(list(zip(streams, tokens, logprobs)), top)
            event.tokens = sum(len(f.tokens) for f in feeds)
        event.finished = [self._result(r) for r in self.scheduler.take_finished()]
        event.live_requests = len(self.scheduler.running)
        event.waiting_groups = len(self.scheduler.waiting)
        event.preempted_requests = len(self.scheduler.preempted)
        if self.config.debug and not self.scheduler.has_work():
            self.pool.assert_empty()
            self.scheduler.assert_no_seen_rows_held()
        return event

    # ------------------------------------------------------------------ internals

    def kernel_for(self, groups: int, queries: int, keys: int) -> str:
        """The attention kernel of one call (``EngineConfig.attention``; ``auto``: flex on CUDA, SDPA on
        a CPU, where SDPA measured faster at every size the CPU benchmarks reach)."""
        if self.config.attention != "auto":
            return self.config.attention
        return "flex" if self.device.type == "cuda" else "sdpa"

    @torch.no_grad()
    def _forward(self, plan: BatchPlan, upload: StepUpload) -> torch.Tensor:
        input_ids, position_ids, batch, logit_rows = plan.build(
            self.pool, upload, self.dtype, self.config.shared_prefix_attention
        )
        keep = 0 if plan.all_rows_logits else logit_rows  # every row: no gather needed
        with paged_attention(self.model):
            out = self.model(
                input_ids=input_ids, position_ids=position_ids, npr_batch=batch, logits_to_keep=keep, use_cache=False
            )
        return out.logits[0].float()

    def _plan_sampling(self, streams: list[Stream], upload: StepUpload) -> StepSampling:
        """The step's sampling, decided on the host and staged in ``upload``: per-row settings and
        noise, and the repetition penalty's rows (branches) with their seen-token table changes."""
        params = self._row_params(streams)
        plan = plan_sampling(params, upload, self.vocab_size)
        updates, self.scheduler.seen_updates = self.scheduler.seen_updates, []
        penalty = None
        if self.config.repetition_penalty != 1.0:
            if self._seen is None:
                self._seen = SeenTokens(self.config.max_num_seqs, self.device)
            for slot, history in updates:  # new branches (history empty) and readmitted ones (rebuilt)
                self._seen.reset(slot, history)
            self._seen.stage(upload)
            rows = [i for i, s in enumerate(streams) if s.seen_slot >= 0]
            if rows:
                slots = [streams[i].seen_slot for i in rows]
                factor = [self.config.repetition_penalty if self._seen.lists[s] else 1.0 for s in slots]
                penalty = PenaltyPlan(
                    upload.add(rows), upload.add(slots), upload.add(factor, torch.float32), self._seen.width(slots)
                )
        return StepSampling(params, plan, penalty)

    def _row_params(self, streams: list[Stream]) -> RowParams:
        temperature, top_p, top_k, keys, drawn = [], [], [], [], []
        for i, s in enumerate(streams):
            p = s.request.params
            temperature.append(p.temperature)
            top_p.append(p.top_p)
            top_k.append(p.top_k)
            if p.temperature > 0:
                keys.append(s.noise_key())
                drawn.append(i)
        uniform = [0.0] * len(streams)
        for i, u in zip(drawn, row_uniforms(keys)):  # one vectorised hash for the step's drawing rows
            uniform[i] = u
        return RowParams(temperature, top_p, top_k, uniform)

    def _sample(
        self, streams: list[Stream], logits: torch.Tensor, sampling: StepSampling, upload: StepUpload
    ) -> tuple[list[int], list[float], dict[int, tuple[tuple[int, float], ...]]]:
        """Process and sample one token per stream, batched on the device; log-probs are those of
        the unprocessed model (temperature 1). logits: [S, V] float32, edited in place. Returns the
        tokens, their log-probs and, for the streams that ask ``top_logprobs``, their row's top (id,
        log-prob) pairs (one ``topk`` over those rows only, read back in the step's one transfer)."""
        top_rows = [i for i, s in enumerate(streams) if s.request.params.top_logprobs]
        want_logprobs = bool(top_rows) or any(s.request.params.logprobs for s in streams)
        processors = any(s.request.params.logits_processors for s in streams)
        edits = sampling.penalty is not None or processors
        raw = logits.clone() if want_logprobs and edits else logits
        if sampling.penalty is not None:
            pen = sampling.penalty
            seen_ids = self._seen.ids.index_select(0, upload[pen.slots])[:, : pen.width]  # [r, w]
            apply_repetition_penalty(logits, seen_ids, upload[pen.factor], rows=upload[pen.rows])
        for i, stream in enumerate(streams if processors else ()):
            for processor in stream.request.params.logits_processors:
                row = logits[i]
                out = processor(stream, row)
                if out is not row:
                    logits[i] = out
        params = sampling.params
        tokens, wide = sample(logits, params, sampling.plan, upload)
        lse = torch.logsumexp(raw, dim=-1) if want_logprobs else None  # [S]
        chosen = (
            raw.gather(1, tokens[:, None])[:, 0] - lse
            if want_logprobs
            else torch.full_like(wide, math.nan, dtype=torch.float32)
        )
        parts = [tokens.double(), chosen.double(), wide.double()]
        k = max((streams[i].request.params.top_logprobs for i in top_rows), default=0)
        if top_rows:  # [t, k]: the same k for every asking row (the widest), cut per row on the host
            rows = torch.tensor(top_rows, device=raw.device) if len(top_rows) < len(streams) else None
            top_raw = raw if rows is None else raw.index_select(0, rows)  # [t, V]
            top_lse = lse if rows is None else lse.index_select(0, rows)  # [t]
            values, ids = top_raw.topk(min(k, raw.shape[1]), dim=-1)  # [t, k]
            parts += [(values - top_lse[:, None]).double().reshape(-1), ids.double().reshape(-1)]
        flat = torch.cat(parts).tolist()  # the step's one transfer
        count = len(streams)
        token_ids = [int(t) for t in flat[:count]]
        logprobs, wide_rows = flat[count : 2 * count], flat[2 * count : 3 * count]
        top = {}
        if top_rows:
            k = min(k, raw.shape[1])
            values, ids = flat[3 * count : 3 * count + len(top_rows) * k], flat[3 * count + len(top_rows) * k :]
            for j, i in enumerate(top_rows):
                want = streams[i].request.params.top_logprobs
                top[i] = tuple((int(ids[j * k + c]), values[j * k + c]) for c in range(min(want, k)))
        redo = [i for i, w in enumerate(wide_rows) if w]
        if redo:  # rare: a nucleus wider than the candidates
            for i, t in zip(redo, redraw_wide(logits, params, redo)):
                token_ids[i] = t
                if want_logprobs:
                    logprobs[i] = float(raw[i, t] - lse[i])
        if self._seen is not None:
            for s, t in zip(streams, token_ids):
                if s.seen_slot >= 0:
                    self._seen.add(s.seen_slot, t)
        return token_ids, logprobs, top

    def _result(self, req: Request) -> Result:
        tokens, positions, logprobs, sampled = [], [], [], []
        top = [] if req.params.top_logprobs else None
        offsets = {}
        for seg in req.segments:
            if top is not None:
                top += [seg.top_logprobs.get(i, ()) for i in range(len(seg))]
            offsets[seg.id] = len(tokens)
            tokens += seg.tokens
            positions += range(seg.start_pos, seg.start_pos + len(seg))
            logprobs += seg.logprobs
            sampled += seg.sampled
        blocks = [[(offsets[s.id], offsets[s.id] + len(s)) for s in segs] for segs in req.blocks]
        saved = sum(sum(e - s for s, e in b) - max(e - s for s, e in b) for b in blocks if b)
        end = len(tokens) - (1 if tokens and tokens[-1] in self.scaffold.eos_ids else 0)
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=False)
        if self.config.debug:
            assert not req.resident, "finished request kept its KV pages"
        now = time.perf_counter()
        ended = req.ended or now
        return Result(
            prompt_index=req.prompt_index,
            sample_index=req.sample_index,
            prompt_ids=list(req.group.prompt_ids),
            token_ids=tokens,
            position_ids=positions,
            logprobs=logprobs,
            sampled=sampled,
            text=text,
            finish_reason=req.finish_reason,
            diagnostic=req.diagnostic,
            mode=self.config.mode,
            blocks=blocks,
            stats=RequestStats(
                generated_tokens=len(tokens),
                critical_path_tokens=len(tokens) - saved,
                forward_passes=req.forward_passes,
                wall_time_s=ended - (req.started or ended),
                parallel_blocks=len(blocks),
                preemptions=req.preemptions,
            ),
            top_logprobs=top,
        )
