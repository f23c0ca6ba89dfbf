"""Engine and sampling settings (dataclasses; every field says what it does)."""

from __future__ import annotations

from dataclasses import dataclass, field

from npr.errors import NprError

MODES = ("parallel", "sequential", "plain")
ATTENTION_KERNELS = ("auto", "flex", "sdpa")
CPU_KV_CACHE_GIB = 2.0  # the KV pool on a CPU when neither kv_cache_tokens nor kv_cache_gib is given


class EngineInputError(NprError, ValueError):
    """Bad input to the engine, found before any work starts."""


@dataclass(frozen=True)
class EngineConfig:
    """How the NPR engine decodes.

    ``mode``: ``parallel`` forks one branch per plan at ``</guideline>`` and decodes them at once;
    ``sequential`` runs the same tree, one branch after another (the speedup baseline);
    ``plain`` is ordinary decoding with no structure (base models, Stage-1 rollouts).
    """

    mode: str = "parallel"
    max_branches: int = 5
    """Most plans a guideline may open; more ends the request as ``invalid_schema`` (NPR uses 5)."""
    max_depth: int = 8
    """Most parallel blocks per request; a further ``</guideline>`` ends the request (``length``)."""
    min_fork_budget: int = 32
    """No fork when fewer generated tokens than this remain in ``max_new_tokens``; ends as ``length``."""
    repetition_penalty: float = 1.02
    """HF-style penalty on tokens already generated in the same step (branch); 1.0 disables. NPR: 1.02."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_tokens: int | None = None
    """KV pool capacity in tokens; None sizes it from ``kv_cache_gib``."""
    kv_cache_gib: float | None = None
    """KV pool memory when ``kv_cache_tokens`` is None. None: on CUDA, what ``gpu_memory_utilization``
    leaves; on a CPU, ``CPU_KV_CACHE_GIB``."""
    gpu_memory_utilization: float = 0.9
    """vLLM's name and meaning: the fraction of the GPU's memory this engine may use. The KV pool takes
    that fraction of the device's memory less what other processes, this one's tensors (the weights)
    and a measured forward of ``max_num_batched_tokens`` tokens take (``kv_pool_bytes``). Used on CUDA
    when neither ``kv_cache_tokens`` nor ``kv_cache_gib`` is given (Qwen3-4B on an 80 GB card at 0.9:
    ~60 GB, ~400k tokens, so a 30k-token rollout fits many times)."""
    max_num_seqs: int = 64
    """Most live streams (a request's main line, or each of its decoding branches) at once. A fork
    opens as many branches as this leaves room for (at least one) and the rest as others close."""
    max_num_batched_tokens: int | None = 8192
    """Most tokens fed in one forward (vLLM's name; chunked prefill): requests that only decode go first,
    then prompts, forks, joins and re-prefills in order, the last one cut to the tokens left and
    continued in the next steps while decoding goes on. At least ``block_size`` and ``max_num_seqs``
    (one decode token per live stream must fit); None feeds everything planned in one forward."""
    prefill_group_tokens: int = 32
    """Requests feeding more query tokens than this in a step run in attention calls of their own
    (with requests of nearly their shape), so padding never dominates."""
    attention: str = "auto"
    """Attention kernel: ``flex`` (compiled ``flex_attention`` reading the paged pool in place),
    ``sdpa`` (gathers each request's pages, then SDPA), or ``auto``: ``flex`` on CUDA, ``sdpa`` on
    a CPU, where it measured faster (docs/performance.md)."""
    shared_prefix_attention: bool = True
    """``sdpa`` on a CPU: the rows of one call that share leading pages (the samples of a prompt; the
    prompts of a batch under ``share_prompt_prefix``) attend to them in one call per group, merged with
    each row's own pages by log-sum-exp, instead of each row gathering and reading them again
    (``npr.engine.attention.SharedPrefix``; docs/performance.md)."""
    share_prompt_prefix: bool = True
    """Prompts that begin with the same whole KV blocks (a batch's chat template and system instruction)
    store and prefill them once; the samples of all of them list those blocks (``Scheduler.share_prefix``)."""
    debug: bool = False
    """Check after every request that all its KV blocks went back to the pool."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise EngineInputError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.max_branches < 1:
            raise EngineInputError("max_branches must be >= 1")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_depth < 1:
            raise EngineInputError("block_size, max_num_seqs and max_depth must be >= 1")
        if self.attention not in ATTENTION_KERNELS:
            raise EngineInputError(f"unknown attention {self.attention!r}; use one of {', '.join(ATTENTION_KERNELS)}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < max(
            self.block_size, self.max_num_seqs
        ):
            raise EngineInputError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below one KV block (block_size="
                f"{self.block_size}) or one decode token per stream (max_num_seqs={self.max_num_seqs}); raise it"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise EngineInputError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise EngineInputError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.repetition_penalty <= 0:
            raise EngineInputError("repetition_penalty must be > 0 (1.0 disables it)")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling for one ``generate`` call. ``temperature == 0`` is greedy and deterministic."""

    max_new_tokens: int = 1024
    """Budget of generated tokens per request, counting every token of every branch and the
    scaffold tokens the engine prefills (NPR counted only one branch)."""
    temperature: float = 1.0
    top_p: float = 1.0
    """Nucleus: keep the most likely tokens while the mass before them (after top-k, renormalised)
    is below ``top_p``; 1.0 disables it."""
    top_k: int = 0
    """Keep the ``top_k`` most likely tokens; 0 disables top-k (applied before top-p)."""
    n: int = 1
    """Samples per prompt; they share the prompt's KV (stored and prefilled once)."""
    seed: int | None = 0
    """Base seed; prompt j uses ``seed + j`` and every draw is keyed by (that seed, sample, block,
    branch, offset), so results do not depend on batching, on the mode or on preemption. None
    draws a random base seed."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a request with finish reason ``stop`` (EOS ends it with ``eos``)."""
    ignore_eos: bool = False
    """Keep decoding past EOS (benchmarks): EOS is then an ordinary token."""
    logprobs: bool = True
    """Record the model's log-prob of every sampled token (RL needs them; evaluation can skip the work)."""
    top_logprobs: int = 0
    """Also record, at every sampled position, the ``top_logprobs`` most likely tokens and their log-probs
    (same distribution as ``logprobs``; ``Result.top_logprobs``): one ``topk`` over the rows that ask."""
    logits_processors: tuple = field(default=(), compare=False)
    """Callables ``(stream: StreamView, logits: FloatTensor[V]) -> FloatTensor[V]`` applied
    before sampling (see ``npr.engine.forcing``)."""

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise EngineInputError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.n < 1 or self.top_logprobs < 0:
            raise EngineInputError("top_k and top_logprobs must be >= 0 and n >= 1")
