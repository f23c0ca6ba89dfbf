"""Memory plan of a training stage per GPU, before launch: the arithmetic behind ``npr memory``.

Pure functions of explicit inputs (no torch): a ``ModelShape`` (from a model's config.json) and
``PlanInputs`` (what one process holds and computes), and ``plan_memory`` returns the bytes of each
line (parameters, gradients, AdamW states, the engine's weights and KV pool, activations, the log-prob
logits, ...) in each phase of a step, the peak and what dominates it. ``inputs_from_config`` is the
one place that reads a stage's config; ``fitting_changes`` finds the settings that make a plan fit.

The counts follow what npr's code allocates (docs/training.md, "Memory per GPU before launch"):

- model state: fp32 master weights, their gradients and AdamW's two states, 1/N each under FSDP
  (which reduce-scatters every pass; ``sharded_gradient_accumulation`` False models the ``no_sync``
  of earlier npr, UNSHARDED fp32 gradients besides the shards); DDP keeps gradients and its
  buckets (2 copies);
  bf16 autocast (no FSDP) caches a bf16 copy of every linear weight during the forward/backward;
- the engine (RL stages): its copy of the weights in ``rollout_dtype`` (always a copy under FSDP)
  and its KV pool, resident for the whole run today, plus the decode step's [rows, V] logits;
- the update's activations, per token of a forward pass: with gradient checkpointing each decoder
  layer keeps its input (the residual stream) and one layer at a time is recomputed in the
  backward, holding every tensor its ops save (counted op by op in ``layer_saved_bytes``);
- the log-prob step (``log_prob_bytes``): chunked (``logprob_chunk_size`` C, ``npr.train.lm_head``)
  one chunk's [C, V] logits, whatever the length; the full path npr had before held [T, V] logits,
  their fp32 copy and ``log_softmax``'s output, 12 bytes per vocabulary entry per predicted token
  at the backward's peak (measured 12.3).

The CPU benchmark ``benchmarks/memory_plan_check.py`` checks the arithmetic against the peak
resident size of the real update step (docs/performance.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from npr.errors import NprError

GIB = 1 << 30
CUDA_RESERVE_BYTES = GIB  # CUDA context, NCCL buffers, allocator slack: an estimate, not a measurement
LOGITS_BACKWARD_BYTES = 12  # per vocab entry per predicted token: [T, V] fp32 saved + grad out + grad in
DECODE_LOGITS_COPIES = 3  # the engine's decode step: fp32 logits, probabilities, sorted copy for top-p
# What this build's code does (issue 26 item 3; change these when the code changes): FSDP reduce-scatters every
# micro-batch into the gradient shards (npr.train.update.backward_micro_batches; before, no_sync kept unsharded
# fp32 gradients between passes), and the RL stages free the engine's weight copy and KV pool for the update
# (release_engine_for_update, on for CUDA by default: npr.train.rollout.RolloutWorker.release_memory)
CODE_SHARDS_GRADIENT_ACCUMULATION = True
CODE_RELEASES_ENGINE_FOR_UPDATE = True
DEFAULT_PROMPT_TOKENS = 1024
OFFLOAD_FIELDS = ("cpu_offload",)  # the config field of FSDP's CPU offload (npr.train.fsdp.fsdp_plugin)
# Whether npr.train.lm_head's chunk loops still hold the previous chunk's tensors (z, grad) while the next chunk's
# logits are made: 12 V bytes per chunk token instead of 8 (measured, benchmarks/memory_plan_check.py). They `del`
# them at the end of each chunk since the merge of issue 26's two halves
CHUNK_LOOP_HOLDS_PREVIOUS = False


class MemoryPlanError(NprError, ValueError):
    """A model config or setting the planner cannot use; the message names what it needs."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on (HF config.json field names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_parameters(self) -> int:
        h, q, kv, i = self.hidden_size, self.q_width, self.kv_width, self.intermediate_size
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * i
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attention + mlp + norms

    @property
    def embedding_parameters(self) -> int:
        """Input embedding, plus the LM head when it is not tied, plus the final norm."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def parameters(self) -> int:
        return self.embedding_parameters + self.num_hidden_layers * self.layer_parameters

    def describe(self) -> str:
        return (
            f"{self.parameters / 1e9:.2f} B parameters: {self.num_hidden_layers} layers, hidden "
            f"{self.hidden_size}, {self.num_attention_heads}/{self.num_key_value_heads} heads of {self.head_dim}, "
            f"MLP {self.intermediate_size}, vocab {self.vocab_size}"
            + (", tied embeddings" if self.tie_word_embeddings else "")
        )


_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def shape_from_config(config: Mapping[str, Any], where: str) -> ModelShape:
    """The ``ModelShape`` of an HF config.json mapping (``text_config`` of a multimodal one)."""
    if isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]
    missing = [k for k in _REQUIRED if not isinstance(config.get(k), int) or config.get(k) < 1]
    if missing:
        raise MemoryPlanError(
            f"{where}: no usable {', '.join(missing)}; npr memory needs a decoder-only model's "
            f"config.json with {', '.join(_REQUIRED)} (and num_key_value_heads, head_dim)"
        )
    heads = config["num_attention_heads"]
    return ModelShape(
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qk_norm=config.get("model_type") in ("qwen3",),
    )


# config.json fields of models npr memory knows without a download (from their HF model cards' config.json)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, num_key_value_heads=8)
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": dict(
        _QWEN3,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-1.7B": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-4B": dict(
        _QWEN3,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=True,
    ),
    "Qwen/Qwen3-8B": dict(
        _QWEN3,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
    # the embedded model (npr.models: SmolLM2-135M-Instruct; the 8 NPR tags grow its vocabulary to 49160)
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    ),
}
for _name in ("Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-4B-Thinking-2507"):  # the 2507 releases: Qwen3-4B's shape
    KNOWN_MODELS[_name] = KNOWN_MODELS["Qwen/Qwen3-4B"]
KNOWN_MODELS["embedded"] = dict(KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"], vocab_size=49160)
# npr.models' tiny random models (a byte tokenizer: 3 specials + 256 bytes + the 8 tags)
_TINY = dict(
    vocab_size=267,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
KNOWN_MODELS["tiny-random-llama"] = dict(_TINY, model_type="llama", tie_word_embeddings=False)
KNOWN_MODELS["tiny-random-qwen3"] = dict(_TINY, model_type="qwen3", tie_word_embeddings=True)


def read_model_shape(spec: str) -> tuple[ModelShape, str]:
    """(shape, where it was read) of ``spec``: a local directory or config.json, a known name, or an
    HF hub id already in the local hub cache; never downloads. ``MemoryPlanError`` otherwise."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MemoryPlanError(
                f"{path} is a directory without config.json; npr memory reads the model's "
                "config.json: point --model at an HF model directory or a run's final/"
            )
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise MemoryPlanError(
                f"{path}: cannot read it as JSON ({type(e).__name__}); npr memory needs the "
                "model's config.json (an HF model directory or a run's final/)"
            ) from e
        if not isinstance(config, Mapping):
            raise MemoryPlanError(f"{path}: not a JSON object; npr memory needs the model's config.json")
        return shape_from_config(config, str(path)), str(path)
    if spec in KNOWN_MODELS:
        return shape_from_config(KNOWN_MODELS[spec], spec), f"{spec} (config fields listed in npr.train.memory_plan)"
    cached = _hub_cache_config(spec)
    if cached is not None:
        return read_model_shape(cached)
    known = ", ".join(k for k in KNOWN_MODELS if "/" in k)
    raise MemoryPlanError(
        f"model {spec!r}: no config.json found (not a local directory, not a known name, not in "
        f"the HF hub cache); pass --model with a directory holding config.json, or one of {known}"
    )


def _hub_cache_config(spec: str) -> str | None:
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(spec, "config.json")
    except Exception:  # an invalid repo id: treated as unknown
        return None
    return found if isinstance(found, str) else None


@dataclass(frozen=True)
class PlanInputs:
    """What one process of a stage holds and computes; every size the planner reads.

    A forward/backward pass holds ``units_per_pass`` units of ``unit_tokens`` tokens (a sequence, or a
    pack of responses behind one prompt), of which ``predicted_per_unit`` tokens have their log-prob
    taken. ``passes_per_step``: the most passes one process makes per optimizer step.
    """

    stage: str
    gpus: int
    fsdp: bool
    device: str  # cuda (the flex attention layout) or cpu (dense)
    master_bytes: int  # bytes per weight of the trained (master) weights: 4 for float32
    autocast_bf16: bool  # mixed_precision bf16: bf16 compute over the master weights
    gradient_checkpointing: bool
    unit_tokens: int
    predicted_per_unit: int
    units_per_pass: int
    passes_per_step: int
    logprob_chunk_tokens: int = 0  # 0: today's [T, V] logits; C > 0: one [C, V] chunk at a time
    temperature_scaled: bool = False
    engine_weight_bytes: int = 0  # bytes per weight of the engine's own copy (0: none, it reads the policy)
    kv_pool_bytes: int = 0
    decode_rows: int = 0  # the engine's max_num_seqs (0: no engine)
    engine_released_for_update: bool = CODE_RELEASES_ENGINE_FOR_UPDATE
    sharded_gradient_accumulation: bool = CODE_SHARDS_GRADIENT_ACCUMULATION
    offload: bool = False  # parameters, gradients and optimizer states on the host (FSDP CPU offload)

    @property
    def tokens_per_pass(self) -> int:
        return self.units_per_pass * self.unit_tokens

    @property
    def predicted_per_pass(self) -> int:
        return self.units_per_pass * self.predicted_per_unit

    @property
    def compute_bytes(self) -> int:
        return 2 if self.autocast_bf16 else self.master_bytes

    @property
    def residual_bytes(self) -> int:
        """The residual stream's dtype: fp32 under autocast over fp32 weights; bf16 under FSDP's bf16
        MixedPrecisionPolicy (no autocast: the gathered weights themselves are bf16)."""
        if self.fsdp and self.autocast_bf16:
            return 2
        return self.master_bytes


@dataclass(frozen=True)
class MemoryLine:
    """One line of the plan: bytes live in each phase, and what they are."""

    name: str
    rollout: int
    update: int
    step: int
    note: str = ""

    def at(self, phase: str) -> int:
        return getattr(self, phase)


@dataclass(frozen=True)
class MemoryPlan:
    inputs: PlanInputs
    shape: ModelShape
    lines: tuple[MemoryLine, ...]
    activation_bytes_per_token: float  # saved for the backward, all layers, per token of a pass
    phases: tuple[str, ...] = field(default=("rollout", "update", "step"))

    def total(self, phase: str) -> int:
        return sum(line.at(phase) for line in self.lines)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> int:
        return self.total(self.peak_phase)

    @property
    def dominant(self) -> MemoryLine:
        return max(self.lines, key=lambda line: line.at(self.peak_phase))

    def fits(self, gpu_bytes: float) -> bool:
        return self.peak <= gpu_bytes


def layer_saved_bytes(shape: ModelShape, inputs: PlanInputs) -> float:
    """Bytes one decoder layer's ops save for the backward, per token (its input excluded), counted op by
    op for transformers' Llama/Qwen3 layers: RMSNorms compute in fp32 (normalised fp32 rows saved), each
    linear saves its input (under autocast each of q/k/v and gate/up casts it anew), RoPE saves nothing
    per token, attention saves q, k, v (repeated to all heads in the CPU dense layout), its output and
    logsumexp, the MLP saves gate, silu(gate), up and their product."""
    h, q, kv, i = shape.hidden_size, shape.q_width, shape.kv_width, shape.intermediate_size
    cb, rb = inputs.compute_bytes, inputs.residual_bytes
    if rb == 4:  # fp32 stream: the normalised rows (fp32), then each consumer's input (autocast casts it anew)
        casts = 3 if cb != 4 else 1
        norm_in = 4 * h + casts * cb * h  # q, k, v
        norm_mlp = 4 * h + (2 if cb != 4 else 1) * cb * h  # gate, up
        residual = 4 * h  # the stream after attention, saved by the second norm
    else:  # bf16 stream: the fp32 copy, the normalised rows cast back, the output the linears save
        norm_in = norm_mlp = (4 + rb + cb) * h
        residual = 0  # only its fp32 copy is saved (counted in the norm)
    head_norm = (4 + cb) * (q + kv) if shape.qk_norm else 0  # fp32 copy + cast, per head
    dense = inputs.device != "cuda"
    kv_saved = (q if dense and shape.num_key_value_heads != shape.num_attention_heads else kv) * 2 * cb
    attention = q * cb + kv_saved + q * cb + 4 * shape.num_attention_heads + q * cb  # q, k+v, out, lse, o_proj in
    mlp = 4 * i * cb
    return norm_in + head_norm + attention + residual + norm_mlp + mlp


def backward_working_bytes(shape: ModelShape, inputs: PlanInputs) -> float:
    """Per token, the gradients a layer's backward holds at once beyond what it saved: the gradient of
    the residual stream (fp32 accumulation) and of the MLP's three intermediate tensors."""
    return 2 * 4 * shape.hidden_size + 3 * inputs.compute_bytes * shape.intermediate_size


def activation_bytes(shape: ModelShape, inputs: PlanInputs) -> tuple[float, float, float, str]:
    """(saved body bytes, recomputed-layer bytes, bytes per token saved, note) for one pass."""
    tokens = inputs.tokens_per_pass
    layers = shape.num_hidden_layers
    per_layer = layer_saved_bytes(shape, inputs)
    rb = inputs.residual_bytes
    final = (rb + 4) * shape.hidden_size  # the last layer's output and the final norm's rows
    head_input = inputs.compute_bytes * shape.hidden_size * inputs.predicted_per_pass / max(tokens, 1)
    if inputs.gradient_checkpointing:
        saved = layers * rb * shape.hidden_size + final + head_input
        recompute = per_layer + backward_working_bytes(shape, inputs)
        note = f"{layers} layer inputs of {rb * shape.hidden_size / 1024:.1f} KiB/token kept, 1 layer recomputed"
    else:
        saved = layers * (per_layer + rb * shape.hidden_size) + final + head_input
        recompute = backward_working_bytes(shape, inputs)
        note = f"{layers} layers x {(per_layer + rb * shape.hidden_size) / 1024:.1f} KiB/token saved"
    mask = mask_casts = 0.0
    if inputs.device != "cuda":  # the dense layout's additive mask (fp32), and the bf16 cast of it that
        squares = inputs.units_per_pass * inputs.unit_tokens**2  # attention saves in each layer under autocast
        mask = squares * inputs.master_bytes
        mask_casts = squares * 2 if inputs.autocast_bf16 else 0.0
    if inputs.gradient_checkpointing:
        return saved * tokens + mask, recompute * tokens + mask_casts, saved, note
    return saved * tokens + mask + layers * mask_casts, recompute * tokens, saved, note


def log_prob_bytes(shape: ModelShape, inputs: PlanInputs) -> tuple[float, str]:
    """Peak bytes of the log-prob step beyond the hidden states, and its note.

    Chunked (``npr.train.lm_head``, C tokens): the forward holds a chunk's fp32 logits and logsumexp's
    shifted copy (8 V bytes per token); the backward the fp32 logits turned gradient in place, its
    compute-dtype copy and the chunk's [V, H] weight gradient before it is summed (6 V C + 2 V H).
    Full (npr before chunking): the [T, V] logits in the compute dtype, their fp32 copy and
    ``log_softmax``'s output, then in the backward the gradients of those (12 V bytes per token; 14 in
    the forward with a temperature)."""
    vocab = shape.vocab_size
    if inputs.logprob_chunk_tokens > 0:
        tokens = min(inputs.logprob_chunk_tokens, inputs.predicted_per_pass)
        if inputs.predicted_per_pass > tokens and CHUNK_LOOP_HOLDS_PREVIOUS:  # the previous chunk's z and grad
            return (
                12 * vocab * tokens,
                f"[{tokens}, {vocab}] chunks: the previous chunk's fp32 and bf16 gradient "
                "held while the next one's logits are made",
            )
        chunk = max(8 * vocab * tokens, 6 * vocab * tokens + 2 * vocab * shape.hidden_size)
        return chunk, f"one [{tokens}, {vocab}] chunk, forward and backward"
    per_token = LOGITS_BACKWARD_BYTES
    if inputs.temperature_scaled:  # forward: model logits, fp32 copy, tempered copy, log_softmax output
        per_token = max(per_token, (2 if inputs.compute_bytes == 2 else 0) + 12)
    tokens = inputs.predicted_per_pass
    return per_token * vocab * tokens, f"[{tokens}, {vocab}] x {per_token} B (fp32 kept for the backward)"


def plan_memory(shape: ModelShape, inputs: PlanInputs) -> MemoryPlan:
    """The per-GPU (per-process) memory of ``inputs`` with a model of ``shape``, by line and phase:
    ``rollout`` (the engine decodes; no gradients), ``update`` (the peak of a forward/backward pass)
    and ``step`` (AdamW's step after the last pass)."""
    p, mb, n = shape.parameters, inputs.master_bytes, inputs.gpus
    share = n if inputs.fsdp else 1
    host = " (on the host: offload)" if inputs.offload else ""
    on_gpu = 0 if inputs.offload else 1
    sharded = f", 1/{n} each" if inputs.fsdp else ""
    params = on_gpu * p * mb // share
    grads = on_gpu * p * mb // share
    grad_note = f"fp32{sharded}"
    if inputs.fsdp and inputs.passes_per_step > 1 and not inputs.sharded_gradient_accumulation:
        grads += p * 4
        grad_note = f"unsharded fp32 accumulated over {inputs.passes_per_step} passes (no_sync) + the 1/{n} shards"
    elif not inputs.fsdp and n > 1:
        grads *= 2
        grad_note = "fp32 + DDP's buckets"
    optimizer = on_gpu * 2 * p * 4 // share
    lines = [
        MemoryLine(f"parameters{host}", params, params, params, f"{_dtype(mb)} master{sharded}"),
        MemoryLine(f"gradients{host}", 0, grads, grads, grad_note),
        MemoryLine(f"optimizer states{host}", optimizer, optimizer, optimizer, f"AdamW m, v in fp32{sharded}"),
    ]
    if inputs.fsdp:
        gathered = (shape.embedding_parameters + 2 * shape.layer_parameters) * inputs.compute_bytes
        unsharded_grads = (2 * shape.layer_parameters + shape.embedding_parameters) * 4
        lines.append(
            MemoryLine(
                "FSDP gathered weights",
                0,
                gathered + unsharded_grads,
                0,
                "embeddings + 2 layers unsharded, with their fp32 gradients in the backward",
            )
        )
    elif inputs.autocast_bf16 and mb != 2:
        linear = shape.num_hidden_layers * (shape.layer_parameters - 2 * shape.hidden_size) + (
            shape.vocab_size * shape.hidden_size
        )  # what autocast casts: the layers' linears and the output head
        lines.append(MemoryLine("bf16 weight copies", 0, linear * 2, 0, "autocast's cache, the output head's copy"))
    if inputs.decode_rows:
        engine_resident = 0 if inputs.engine_released_for_update else 1
        weights = p * inputs.engine_weight_bytes
        lines.append(
            MemoryLine(
                "engine weights",
                weights,
                weights * engine_resident,
                weights * engine_resident,
                f"{_dtype(inputs.engine_weight_bytes)} copy" if weights else "reads the policy",
            )
        )
        lines.append(
            MemoryLine(
                "engine KV pool",
                inputs.kv_pool_bytes,
                inputs.kv_pool_bytes * engine_resident,
                inputs.kv_pool_bytes * engine_resident,
                "resident during the update" if engine_resident else "released for the update",
            )
        )
        decode = inputs.decode_rows * shape.vocab_size * (4 * DECODE_LOGITS_COPIES + 1)
        lines.append(MemoryLine("engine decode step", decode, 0, 0, f"[{inputs.decode_rows}, V] logits"))
    body, recompute, per_token, note = activation_bytes(shape, inputs)
    logits, logits_note = log_prob_bytes(shape, inputs)
    tokens = f"{inputs.tokens_per_pass:,} tokens per pass"
    lines.append(MemoryLine("activations", 0, int(body), 0, f"{per_token / 1024:.1f} KiB/token x {tokens}: {note}"))
    # the log-prob step runs before the layers' backward; its memory is freed when the layers recompute
    live_logits = logits >= recompute
    what = (
        "one layer's saved tensors, recomputed, + its backward's gradients"
        if inputs.gradient_checkpointing
        else "the gradients one layer's backward holds"
    )
    lines.append(
        MemoryLine(
            "recomputed layer + its backward" if inputs.gradient_checkpointing else "layer backward",
            0,
            0 if live_logits else int(recompute),
            0,
            what + (f"; {recompute / GIB:.2f} GiB, not live with the logits" if live_logits else ""),
        )
    )
    lines.append(
        MemoryLine(
            "log-prob logits",
            0,
            int(logits) if live_logits else 0,
            0,
            logits_note + ("" if live_logits else f"; {logits / GIB:.2f} GiB, not at the peak"),
        )
    )
    largest = max(shape.vocab_size, shape.intermediate_size, shape.q_width) * shape.hidden_size  # one weight
    step_temp = p * 4 // share if inputs.device == "cuda" else largest * 4 * 2
    lines.append(
        MemoryLine(
            "AdamW step temporaries",
            0,
            0,
            on_gpu * step_temp,
            "foreach: one state-sized buffer" if inputs.device == "cuda" else "per tensor",
        )
    )
    if inputs.device == "cuda":
        lines.append(MemoryLine("CUDA context, NCCL, allocator", *(CUDA_RESERVE_BYTES,) * 3, "estimate"))
    if not inputs.decode_rows:
        lines = [replace(line, rollout=0) for line in lines]
    phases = ("rollout", "update", "step") if inputs.decode_rows else ("update", "step")
    return MemoryPlan(inputs, shape, tuple(lines), per_token, phases)


def _dtype(nbytes: int) -> str:
    return {4: "fp32", 2: "bf16"}.get(nbytes, f"{nbytes}-byte")


# ----------------------------------------------------------------------------- config -> inputs


def _bytes_of(dtype: str | None) -> int:
    return 2 if dtype in ("bfloat16", "bf16", "float16", "fp16") else 4


def inputs_from_config(
    stage: str,
    config: Any,
    shape: ModelShape,
    gpus: int,
    device: str = "cuda",
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
) -> PlanInputs:
    """``PlanInputs`` of a resolved stage config (``npr.train.config``) on ``gpus`` processes: the only
    place that reads config fields. Worst case lengths: every response at ``max_new_tokens`` (Stage 1/3)
    or every example at ``max_seq_len`` (Stage 2)."""
    rl = stage in ("stage1", "stage3")
    if rl:
        response = config.max_new_tokens
        sequence = prompt_tokens + response
        pack = config.pack_group_tokens
        # a mini-batch takes its share of every rank's rollouts (npr.train.rl.mini_batch_parts)
        groups = min(config.mini_batch_size or config.prompts_per_step, config.prompts_per_step)
        items = math.ceil(groups * config.samples_per_prompt / gpus)
    else:
        sequence = config.max_seq_len
        response = max(1, sequence - prompt_tokens)
        pack = config.pack_tokens
        items = math.ceil(config.batch_size / gpus)
    unit = max(sequence, pack) if pack else sequence
    predicted = unit - prompt_tokens
    units = config.micro_batch_size
    cap = config.micro_batch_tokens
    if cap:
        units = max(1, min(units, cap // unit))
    per_unit_items = max(1, predicted // max(response, 1)) if pack else 1
    passes = math.ceil(items / (units * per_unit_items))
    master = _bytes_of(config.dtype)
    engine_bytes = kv = rows = 0
    if rl:
        rollout = config.rollout_dtype
        copy = config.fsdp or (rollout is not None and _bytes_of(rollout) != master)
        engine_bytes = _bytes_of(rollout or config.dtype) if copy else 0
        engine_dtype_bytes = _bytes_of(rollout or config.dtype)
        per_kv_token = shape.num_hidden_layers * 2 * shape.kv_width * engine_dtype_bytes
        kv = config.kv_cache_tokens * per_kv_token if config.kv_cache_tokens else int(config.kv_cache_gib * GIB)
        rows = config.max_num_seqs
    return PlanInputs(
        stage=stage,
        gpus=gpus,
        fsdp=config.fsdp,
        device=device,
        master_bytes=master,
        autocast_bf16=config.mixed_precision == "bf16",
        gradient_checkpointing=config.gradient_checkpointing,
        unit_tokens=unit,
        predicted_per_unit=predicted,
        units_per_pass=units,
        passes_per_step=passes,
        logprob_chunk_tokens=config.logprob_chunk_size,
        temperature_scaled=rl and config.temperature not in (0, 1),
        engine_weight_bytes=engine_bytes,
        kv_pool_bytes=kv,
        decode_rows=rows,
        offload=any(getattr(config, name, False) for name in OFFLOAD_FIELDS),
        engine_released_for_update=rl and CODE_RELEASES_ENGINE_FOR_UPDATE and _releases_engine(config, device),
    )


def _releases_engine(config: Any, device: str) -> bool:
    """Whether the config's ``release_engine_for_update`` frees the engine for the update on ``device``."""
    from npr.train.rollout import release_wanted

    return release_wanted(getattr(config, "release_engine_for_update", "auto"), device)


# ----------------------------------------------------------------------------- what makes it fit


@dataclass(frozen=True)
class Change:
    """A setting to change and the plan inputs it gives; ``available``: this build has the setting."""

    setting: str
    inputs: PlanInputs
    available: bool = True


def candidate_changes(inputs: PlanInputs, available: frozenset[str]) -> list[Change]:
    """Single changes that lower the peak: gradient checkpointing, chunked log-probs, a token budget of
    one sequence per pass, FSDP, more GPUs, CPU offload, sharded gradient accumulation, the engine
    released for the update, a smaller KV pool."""
    changes = []
    if not inputs.gradient_checkpointing:
        changes.append(Change("gradient_checkpointing true", replace(inputs, gradient_checkpointing=True)))
    if inputs.logprob_chunk_tokens == 0 or inputs.logprob_chunk_tokens > 1024:
        changes.append(
            Change(
                "logprob_chunk_size 1024", replace(inputs, logprob_chunk_tokens=1024), "logprob_chunk_size" in available
            )
        )
    if inputs.units_per_pass > 1:
        changes.append(
            Change(
                f"micro_batch_tokens {inputs.unit_tokens} (one sequence per pass)",
                replace(inputs, units_per_pass=1, passes_per_step=inputs.passes_per_step * inputs.units_per_pass),
            )
        )
    if not inputs.fsdp and inputs.gpus > 1:
        changes.append(Change("fsdp true", replace(inputs, fsdp=True)))
    if not inputs.fsdp and inputs.gpus == 1:
        changes.append(Change("fsdp true over --gpus 2", replace(inputs, fsdp=True, gpus=2)))
    if inputs.fsdp and inputs.gpus < 1024:
        changes.append(Change(f"--gpus {inputs.gpus * 2}", replace(inputs, gpus=inputs.gpus * 2)))
    if inputs.fsdp and not inputs.offload:
        changes.append(
            Change(
                "cpu_offload true (shards and AdamW states in host memory)",
                replace(inputs, offload=True),
                bool(set(OFFLOAD_FIELDS) & available),
            )
        )
    if inputs.fsdp and not inputs.sharded_gradient_accumulation and inputs.passes_per_step > 1:
        changes.append(
            Change(
                "sharded gradient accumulation",
                replace(inputs, sharded_gradient_accumulation=True),
                CODE_SHARDS_GRADIENT_ACCUMULATION,
            )
        )
    if inputs.decode_rows and not inputs.engine_released_for_update:
        changes.append(
            Change(
                "release_engine_for_update on",
                replace(inputs, engine_released_for_update=True),
                CODE_RELEASES_ENGINE_FOR_UPDATE,
            )
        )
    if inputs.kv_pool_bytes > 2 * GIB:
        changes.append(
            Change(
                f"kv_cache_gib {inputs.kv_pool_bytes / GIB / 2:g}",
                replace(inputs, kv_pool_bytes=inputs.kv_pool_bytes // 2),
            )
        )
    return changes


def fitting_changes(
    shape: ModelShape, inputs: PlanInputs, gpu_bytes: float, available: frozenset[str]
) -> tuple[list[tuple[Change, int]], bool]:
    """Changes that make the plan fit, each with the peak after it, and whether the last one fits.

    Greedy: the change that lowers the peak most, until the plan fits; first among the settings this
    build has, and only when those cannot make it fit among all (those it lacks are marked)."""
    chosen: list[tuple[Change, int]] = []
    for only_available in (True, False):
        chosen, fits = _greedy(shape, inputs, gpu_bytes, available, only_available)
        if fits:
            return chosen, True
    return chosen, False


def _greedy(
    shape: ModelShape, inputs: PlanInputs, gpu_bytes: float, available: frozenset[str], only_available: bool
) -> tuple[list[tuple[Change, int]], bool]:
    chosen: list[tuple[Change, int]] = []
    current, taken = inputs, set()
    for _ in range(12):
        peak = plan_memory(shape, current).peak
        if peak <= gpu_bytes:
            return chosen, True
        options = [
            c
            for c in candidate_changes(current, available)
            if (c.available or not only_available) and (c.setting.startswith("--gpus") or c.setting not in taken)
        ]
        scored = [(plan_memory(shape, c.inputs).peak, c) for c in options]
        scored = [s for s in scored if s[0] < peak]
        if not scored:
            return chosen, False
        after, best = min(scored, key=lambda s: s[0])
        taken.add(best.setting)
        current = best.inputs
        chosen.append((best, after))
    return chosen, plan_memory(shape, current).peak <= gpu_bytes
