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

from npr.engine.attention import build_batch, paged_attention
from npr.engine.config import EngineConfig, EngineInputError, SamplingParams
from npr.engine.kv_pool import KVPool
from npr.engine.sampling import apply_repetition_penalty, sample_rows
from npr.engine.scheduler import Request, Scaffold, Scheduler, Stream
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
    finish_reason: str
    diagnostic: str | None
    mode: str
    blocks: list[list[tuple[int, int]]]
    stats: RequestStats

    @property
    def branches_per_block(self) -> list[int]:
        return [len(b) for b in self.blocks]


@dataclass
class EngineEvent:
    """What one engine step produced (for progress displays)."""

    finished: list[Result] = field(default_factory=list)
    tokens: int = 0
    live_requests: int = 0
    waiting_groups: int = 0


def _model_dims(model) -> tuple[int, int, int]:
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise EngineInputError(
            f"{config.model_type} has non-full attention layers ({sorted(set(layer_types))}); the NPR engine "
            "supports full-attention decoder models (Llama, Qwen2, Qwen3, Mistral without sliding window)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim


class Engine:
    """Parallel-branch decoding for NPR; see ``generate`` and ``generate_stream``."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        layers, kv_heads, head_dim = _model_dims(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = self.config
        bytes_per_token = layers * 2 * kv_heads * head_dim * param.element_size()
        tokens = cfg.kv_cache_tokens or int(cfg.kv_cache_gib * 2**30 // bytes_per_token)
        num_blocks = max(1, tokens // cfg.block_size)
        self.pool = KVPool(layers, kv_heads, head_dim, num_blocks, cfg.block_size, self.dtype, self.device)
        self.scaffold = self._scaffold(tokenizer, model)
        self.scheduler = Scheduler(cfg, self.pool, self.scaffold)
        self.context_length = getattr(model.config, "max_position_embeddings", None)

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

    def submit(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams, first_index: int = 0,
               prompt_indices: Sequence[int] | None = None) -> None:
        """Queue prompts (token ids, or text tokenized as-is: apply the chat template first, see
        ``npr.prompts``). Prompt i gets index ``prompt_indices[i]`` (default ``first_index + i``),
        which keys its results and its seeds. Every check runs before anything is queued."""
        indices = list(prompt_indices) if prompt_indices is not None else [first_index + i for i in range(len(prompts))]
        if len(indices) != len(prompts):
            raise EngineInputError(f"{len(prompts)} prompts but {len(indices)} prompt indices")
        encoded = []
        for index, p in zip(indices, prompts):
            ids = list(self.tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise EngineInputError(f"prompt {index} is empty")
            if self.context_length and len(ids) + params.max_new_tokens > self.context_length:
                raise EngineInputError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"it exceeds the model context of {self.context_length}; shorten it or lower max_new_tokens")
            self.scheduler.check_fits(index, len(ids), params)
            encoded.append(ids)
        base_seed = params.seed if params.seed is not None else random.randrange(2**31)
        for index, ids in zip(indices, encoded):
            self.scheduler.submit(index, ids, params, base_seed + index)

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> list[Result]:
        """Decode every prompt (``params.n`` samples each); results ordered by prompt, then sample."""
        results = []
        for event in self.generate_stream(prompts, params):
            results += event.finished
        return sorted(results, key=lambda r: (r.prompt_index, r.sample_index))

    def generate_stream(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
                        ) -> Iterator[EngineEvent]:
        """Like ``generate``, yielding an ``EngineEvent`` after every forward."""
        params = params or SamplingParams()
        self.submit(prompts, params)
        while self.scheduler.has_work():
            yield self.step()

    def step(self) -> EngineEvent:
        """One forward over every live stream; more prompts may be submitted between steps."""
        feeds, samplers = self.scheduler.plan()
        event = EngineEvent()
        if feeds:
            logits = self._forward(feeds)  # [R, V] float32
            streams = [s for group in samplers for s in group]
            if len(streams) != len(samplers):  # a prompt's logits serve all its n samples
                logits = logits[torch.tensor([r for r, group in enumerate(samplers) for _ in group])]
            tokens, logprobs = self._sample(streams, logits)
            done = self.scheduler.consume(list(zip(streams, tokens, logprobs)))
            event.tokens = sum(len(f.tokens) for f in feeds)
            event.finished = [self._result(r) for r in done]
        event.live_requests = len(self.scheduler.running)
        event.waiting_groups = len(self.scheduler.waiting)
        if self.config.debug and not self.scheduler.has_work():
            self.pool.assert_empty()
        return event

    # ------------------------------------------------------------------ internals

    @torch.no_grad()
    def _forward(self, feeds) -> torch.Tensor:
        input_ids, position_ids, batch, logit_rows = build_batch(
            feeds, self.pool, self.dtype, self.device, self.config.prefill_group_tokens)
        keep = 0 if len(logit_rows) == input_ids.shape[1] else logit_rows  # every row: no gather needed
        with paged_attention(self.model):
            out = self.model(input_ids=input_ids, position_ids=position_ids, npr_batch=batch,
                             logits_to_keep=keep, use_cache=False)
        return out.logits[0].float()

    def _sample(self, streams: list[Stream], logits: torch.Tensor) -> tuple[list[int], list[float]]:
        """Process and sample one token per stream; log-probs are of the unprocessed model.

        logits: [S, V] float32, one row per stream (processors may edit it in place).
        """
        want_logprobs = any(s.request.params.logprobs for s in streams)
        raw = logits.clone() if want_logprobs else None  # processors and penalties edit ``logits``
        penalty = self.config.repetition_penalty
        for i, stream in enumerate(streams):
            if stream.kind == "branch":  # NPR damps repetition inside steps only
                apply_repetition_penalty(logits[i], stream.history, penalty)
            for processor in stream.request.params.logits_processors:
                row = logits[i]
                out = processor(stream, row)
                if out is not row:
                    logits[i] = out
        tokens = logits.argmax(-1).tolist()  # greedy rows keep these
        for i, stream in enumerate(streams):
            params = stream.request.params
            if params.temperature > 0:
                tokens[i] = int(sample_rows(logits[i:i + 1], params.temperature, params.top_k, params.top_p,
                                            [stream.generator])[0])
        if raw is None:
            return tokens, [math.nan] * len(tokens)
        chosen = raw.gather(1, torch.tensor(tokens)[:, None])[:, 0] - torch.logsumexp(raw, dim=-1)  # [S]
        return tokens, chosen.tolist()

    def _result(self, req: Request) -> Result:
        tokens, positions, logprobs, sampled = [], [], [], []
        offsets = {}
        for seg in req.segments:
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
            assert all(seg.released for seg in req.segments), "finished request kept KV segments"
        return Result(
            prompt_index=req.prompt_index, sample_index=req.sample_index, prompt_ids=list(req.group.prompt_ids),
            token_ids=tokens, position_ids=positions, logprobs=logprobs, sampled=sampled, text=text,
            finish_reason=req.finish_reason, diagnostic=req.diagnostic, mode=self.config.mode, blocks=blocks,
            stats=RequestStats(
                generated_tokens=len(tokens), critical_path_tokens=len(tokens) - saved,
                forward_passes=req.forward_passes, wall_time_s=(req.ended or time.perf_counter()) - req.started,
                parallel_blocks=len(blocks)),
        )


