"""One optimizer update from a batch of sequences: SFT or policy-gradient, on 1 or N processes.

Distributed exactness: every loss here is normalised by the GLOBAL count of loss units
(tokens for token-mean, sequences for the seq-mean aggregations), all-reduced before the
forward passes, and multiplied by the number of processes, so that DDP's gradient average
reproduces the single-process gradient of the whole batch. Every rank runs the same number of
forward/backward passes (padding with zero-weight passes) because DDP and FSDP communicate
inside them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from npr.algos import metric_names
from npr.errors import NprError
from npr.train.fsdp import is_sharded
from npr.train.lm_head import DEFAULT_LOGPROB_CHUNK
from npr.train.logprobs import TokenSequence, causal_sequence, response_logprobs

# Metrics policy_backward adds beside the loss's own; a loss may not return these names.
TRAINER_POLICY_METRICS = frozenset(
    {
        "loss",
        "logprob_drift",
        "drift_tokens",
        "ratio_max",
        "ratio_min",
        "loss_units",
        "grad_norm",
        "lr",
        "skipped_steps",
        "optimizer_steps",
    }
)


def is_count_metric(name: str) -> bool:
    """A loss metric named ``num_*`` is a count, summed over micro-batches, ranks and optimizer steps; any other
    is a per-unit mean, averaged with the loss units as weights."""
    return name.startswith("num_")


@dataclass
class PolicyBatch:
    """This rank's rollouts for one RL update.

    ``sequences``: ``TokenSequence`` rows holding R responses in all (several per row when
    packed), in order; per response r: ``loss_masks[r]`` BoolTensor[T_r] (True where the token
    carries loss), ``advantages[r]`` (FloatTensor[R]) and ``sampler_logprobs[r]``
    FloatTensor[T_r], the engine's log-probs (NaN where prefilled), for the drift metric;
    ``old_logprobs[r]`` FloatTensor[T_r], the log-probs of the policy that drew the batch
    (``old_policy_logprobs``), or None: the batch trains in a single on-policy step, whose old
    log-probs are the recomputed ones, detached.
    """

    sequences: list[TokenSequence]
    loss_masks: list[torch.Tensor]
    advantages: torch.Tensor
    sampler_logprobs: list[torch.Tensor]
    old_logprobs: list[torch.Tensor] | None = None

    def response_rows(self, indices: Sequence[int]) -> list[int]:
        """Response indices held by the sequences ``indices``."""
        starts = [0]
        for s in self.sequences:
            starts.append(starts[-1] + len(s.spans))
        return [r for i in indices for r in range(starts[i], starts[i + 1])]


def padded(rows: Sequence[torch.Tensor], width: int, value=0) -> torch.Tensor:
    """Stack 1-D tensors right-padded with ``value`` to ``width``: -> [B, width]."""
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=value) for r in rows])


def aggregation_units(loss_mask: torch.Tensor, agg: str) -> float:
    """What the aggregation ``agg`` divides by for ``loss_mask`` [B, T]: tokens for token-mean,
    sequences holding a loss token for the seq-mean aggregations."""
    return float(loss_mask.sum()) if agg == "token-mean" else float(loss_mask.any(-1).sum())


def global_sum(accelerator, values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        tensor = accelerator.reduce(tensor, reduction="sum")
    return tensor.tolist()


def gather_floats(accelerator, values: Sequence[float]) -> tuple[list[float], int]:
    """Every process's ``values`` concatenated in process order, and the offset of this
    process's own values in that list (lists may differ in length between processes)."""
    values = [float(v) for v in values]
    if accelerator.num_processes == 1:
        return values, 0
    lists: list[list[float]] = [[] for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather_object(lists, values)  # one list per process, in process order
    offset = sum(len(v) for v in lists[: accelerator.process_index])
    return [v for part in lists for v in part], offset


def global_max(accelerator, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).max())


def global_extremes(accelerator, largest: float, smallest: float) -> tuple[float, float]:
    """(max of ``largest``, min of ``smallest``) over all processes (float64; ±inf when empty)."""
    if accelerator.num_processes == 1:
        return largest, smallest
    both = torch.tensor([largest, -smallest], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return float(both[0]), -float(both[1])


def _zero_loss(model, pad_token_id: int, chunk_size: int = DEFAULT_LOGPROB_CHUNK) -> torch.Tensor:
    """A zero-weight forward (in the run's attention layout), so a rank without data still
    joins DDP/FSDP's collectives."""
    logprobs, _ = response_logprobs(
        model, [causal_sequence([pad_token_id], [pad_token_id])], pad_token_id, chunk_size=chunk_size
    )
    return logprobs.sum() * 0.0


def micro_batches(lengths: Sequence[int], micro_batch_size: int, micro_batch_tokens: int = 0) -> list[list[int]]:
    """Consecutive item indices grouped into passes of at most ``micro_batch_size`` items and,
    when ``micro_batch_tokens`` > 0, at most that many tokens (an item longer than that runs
    alone). Under the flex layout each pass is one packed row."""
    chunks: list[list[int]] = []
    tokens = 0
    for i, n in enumerate(lengths):
        full = chunks and (
            len(chunks[-1]) >= micro_batch_size or (micro_batch_tokens > 0 and tokens + n > micro_batch_tokens)
        )
        if not chunks or full:
            chunks.append([])
            tokens = 0
        chunks[-1].append(i)
        tokens += n
    return chunks


def backward_micro_batches(
    accelerator,
    model,
    chunks: list[list[int]],
    pad_token_id: int,
    micro_loss: Callable[[list[int]], torch.Tensor],
    chunk_size: int = DEFAULT_LOGPROB_CHUNK,
) -> None:
    """Backward ``micro_loss(indices)`` over this rank's micro-batches, which every rank makes
    together. DDP synchronises gradients once, on the last pass. FSDP2 reduce-scatters every
    pass into this rank's gradient shard, as verl does: its ``no_sync`` would keep each pass's
    gradients unsharded, in fp32 under bf16 compute (16 GB for a 4B model), until the last one."""
    passes = global_max(accelerator, len(chunks))
    sync_every_pass = is_sharded(model)
    for i in range(passes):
        last = i == passes - 1
        with contextlib.nullcontext() if last or sync_every_pass else accelerator.no_sync(model):
            loss = micro_loss(chunks[i]) if i < len(chunks) else _zero_loss(model, pad_token_id, chunk_size)
            accelerator.backward(loss)


class TrainingDiverged(NprError, RuntimeError):
    """The gradient norm was not finite in too many optimizer steps in a row."""


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite gradient norm (as verl's actor skips them);
    ``limit`` in a row end the run with ``TrainingDiverged``. Every rank sees the same global norm,
    so every rank skips together."""

    limit: float
    in_a_row: int = 0
    skipped: int = 0

    def admit(self, norm: float) -> bool:
        """True when the step may be taken; counts a skip (and raises at the limit) otherwise."""
        if math.isfinite(norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"training diverged: the gradient norm was {norm} in {self.in_a_row} optimizer steps in a row (each "
                f"skipped, {self.skipped} in all); lower learning_rate, check the data, or raise max_skipped_steps"
            )
        return False


def optimizer_step(
    accelerator,
    model,
    optimizer,
    scheduler,
    max_grad_norm: float,
    advance_schedule: bool = True,
    guard: NonFiniteGuard | None = None,
) -> dict[str, float]:
    """Clip, step, advance the schedule (unless ``advance_schedule`` is False: a mini-batch step
    whose rollout batch advances it once); returns the pre-clip gradient norm, the lr used and
    ``skipped_steps``: 1.0 when the norm was not finite and the step was skipped (no parameter
    or AdamW state changes, gradients dropped; the schedule still advances), counted by ``guard``
    (None: a guard that never ends the run)."""
    lr = optimizer.param_groups[0]["lr"]
    # max_grad_norm 0: no clipping (a clip to infinity scales by exactly 1) but the same global norm,
    # computed over sharded (FSDP) or replicated gradients alike
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    take = (guard or NonFiniteGuard(limit=math.inf)).admit(norm)
    if take:
        optimizer.step()
    if advance_schedule:
        with warnings.catch_warnings():  # torch warns when a skipped first step leaves optimizer.step() uncalled
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norm, "lr": lr, "skipped_steps": 0.0 if take else 1.0}


def sft_backward(
    accelerator,
    model,
    sequences: Sequence[TokenSequence],
    pad_token_id: int,
    micro_batch_size: int,
    forward_context: Callable = contextlib.nullcontext,
    micro_batch_tokens: int = 0,
    logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK,
) -> dict[str, float]:
    """Gradients of the token-mean NLL of every response token over the global batch.

    Returns ``loss`` (global token-mean NLL) and ``tokens`` (global response tokens).
    ``micro_batch_size`` counts sequences (a packed sequence holds several responses),
    ``micro_batch_tokens`` (> 0) also caps a pass's tokens; ``forward_context()`` wraps each
    forward (e.g. bf16 autocast); ``logprob_chunk_size``: tokens per chunk of the output head.
    """
    local_tokens = sum(s.response_length for s in sequences)
    (total_tokens,) = global_sum(accelerator, [local_tokens])
    scale = accelerator.num_processes / max(total_tokens, 1.0)
    nll_sum = 0.0

    def micro_loss(indices: list[int]) -> torch.Tensor:
        nonlocal nll_sum
        with forward_context():
            logprobs, mask = response_logprobs(
                model, [sequences[i] for i in indices], pad_token_id, chunk_size=logprob_chunk_size
            )  # [b, T]
        nll = -torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum()  # []
        nll_sum += float(nll.detach())
        return nll * scale

    chunks = micro_batches([len(s.input_ids) for s in sequences], micro_batch_size, micro_batch_tokens)
    backward_micro_batches(accelerator, model, chunks, pad_token_id, micro_loss, logprob_chunk_size)
    (global_nll,) = global_sum(accelerator, [nll_sum])
    return {"loss": global_nll / max(total_tokens, 1.0), "tokens": total_tokens}


@torch.no_grad()
def old_policy_logprobs(
    accelerator,
    model,
    batch: PolicyBatch,
    pad_token_id: int,
    micro_batch_size: int,
    forward_context: Callable = contextlib.nullcontext,
    micro_batch_tokens: int = 0,
    temperature: float = 1.0,
    logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK,
) -> list[torch.Tensor]:
    """The current policy's log-probs of every response of ``batch`` (no grad): the old
    log-probs of PPO's ratio, computed once per rollout batch before its first update.

    Returns FloatTensor[T_r] per response, in order. The micro-batches are those
    ``policy_backward`` makes, so the first update's ratio is exactly 1; every rank makes the
    same number of passes (DDP broadcasts buffers and FSDP gathers weights in each forward).
    """
    chunks = micro_batches([len(s.input_ids) for s in batch.sequences], micro_batch_size, micro_batch_tokens)
    rows: list[torch.Tensor] = []
    for i in range(global_max(accelerator, len(chunks))):
        if i >= len(chunks):
            _zero_loss(model, pad_token_id, logprob_chunk_size)
            continue
        with forward_context():
            logprobs, _ = response_logprobs(
                model,
                [batch.sequences[j] for j in chunks[i]],
                pad_token_id,
                temperature=temperature,
                chunk_size=logprob_chunk_size,
            )  # [r, T]
        for row, r in enumerate(batch.response_rows(chunks[i])):
            rows.append(logprobs[row, : len(batch.loss_masks[r])].float().cpu())  # [T_r]
    return rows


def policy_backward(
    accelerator,
    model,
    batch: PolicyBatch,
    loss_fn,
    agg: str,
    pad_token_id: int,
    micro_batch_size: int,
    forward_context: Callable = contextlib.nullcontext,
    micro_batch_tokens: int = 0,
    temperature: float = 1.0,
    logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK,
) -> dict[str, float]:
    """Gradients of the policy loss ``loss_fn`` aggregated by ``agg`` over the global batch.

    The old log-probs are ``batch.old_logprobs`` (several updates per rollout batch), else the
    recomputed ones, detached (one on-policy update, the paper's setting). Log-probs are taken
    at the rollout ``temperature`` (``response_logprobs``). Metrics: every metric the loss returns
    (``metric_names``) reduced over the global batch, a unit-weighted mean or, for a ``num_*``
    count, a sum; ``loss`` likewise; ``ratio_max``/``ratio_min`` over its loss tokens, plus
    ``logprob_drift``: mean |trainer - engine| temperature-1 log-prob over sampled loss tokens.
    """
    loss_keys = metric_names(loss_fn)
    clash = sorted(set(loss_keys) & TRAINER_POLICY_METRICS)
    if clash:
        raise ValueError(f"policy loss metric(s) {clash} clash with the trainer's own {sorted(TRAINER_POLICY_METRICS)}")
    units = [aggregation_units(m[None], agg) for m in batch.loss_masks]
    (total_units,) = global_sum(accelerator, [sum(units)])
    scale = accelerator.num_processes / max(total_units, 1.0)
    sums: dict[str, float] = {}
    extremes = [float("-inf"), float("inf")]  # ratio max, min

    def micro_loss(indices: list[int]) -> torch.Tensor:
        rows = batch.response_rows(indices)
        with forward_context():
            logprobs, mask, plain = response_logprobs(
                model,
                [batch.sequences[i] for i in indices],
                pad_token_id,
                temperature=temperature,
                untempered=True,
                chunk_size=logprob_chunk_size,
            )  # [r, T] each
        width = logprobs.shape[1]
        loss_mask = padded([batch.loss_masks[r] for r in rows], width, False).to(mask.device) & mask  # [r, T]
        old = (
            logprobs.detach()
            if batch.old_logprobs is None
            else padded([batch.old_logprobs[r] for r in rows], width).to(logprobs.device)
        )  # [r, T]
        loss, metrics = loss_fn(
            logprobs=logprobs,
            old_logprobs=old,
            advantages=batch.advantages[rows].to(logprobs.device),
            mask=loss_mask,
            agg=agg,
        )
        if loss_mask.any():
            ratio = (logprobs.detach() - old)[loss_mask].exp()  # [n]
            extremes[0], extremes[1] = max(extremes[0], float(ratio.max())), min(extremes[1], float(ratio.min()))
        weight = aggregation_units(loss_mask, agg)
        engine = padded([batch.sampler_logprobs[r] for r in rows], width, float("nan")).to(logprobs.device)
        seen = loss_mask & ~engine.isnan()  # [r, T]
        drift = (plain - engine).abs()[seen].sum()
        if set(metrics) != set(loss_keys):
            raise ValueError(
                f"the policy loss returned metrics {sorted(metrics)}, not {list(loss_keys)}: a loss "
                "returns the same metric names on every call"
            )
        for key, value in (*metrics.items(), ("loss", float(loss.detach()))):
            sums[key] = sums.get(key, 0.0) + (value if is_count_metric(key) else value * weight)
        sums["logprob_drift"] = sums.get("logprob_drift", 0.0) + float(drift)
        sums["drift_tokens"] = sums.get("drift_tokens", 0.0) + float(seen.sum())
        return loss * weight * scale

    chunks = micro_batches([len(s.input_ids) for s in batch.sequences], micro_batch_size, micro_batch_tokens)
    backward_micro_batches(accelerator, model, chunks, pad_token_id, micro_loss, logprob_chunk_size)
    keys = sorted({"loss", *loss_keys, "logprob_drift", "drift_tokens"})  # the same list on every rank
    reduced = dict(zip(keys, global_sum(accelerator, [sums.get(k, 0.0) for k in keys])))
    out = {
        k: reduced[k] if is_count_metric(k) else reduced[k] / max(total_units, 1.0)
        for k in keys
        if k not in ("logprob_drift", "drift_tokens")
    }
    out["logprob_drift"] = reduced["logprob_drift"] / max(reduced["drift_tokens"], 1.0)
    out["ratio_max"], out["ratio_min"] = global_extremes(accelerator, *extremes)
    out["loss_units"] = total_units
    return out
