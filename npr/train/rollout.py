"""Rollouts for RL and sampling: the engine, its copy of the weights, scoring and rollout metrics.

``RolloutWorker`` owns one ``npr.engine.Engine`` for the whole run (its KV pool is allocated
once). The engine decodes either the trained weights themselves or a copy in
``rollout_dtype`` (e.g. bf16 for speed on CPU) that ``sync`` refreshes after every update.
Seeds: the engine seeds sample ``s`` of prompt ``i`` from ``seed + i`` and ``s``; we pass the
prompt's index in the GLOBAL batch, so the union of rollouts over processes does not depend on
how many processes there are.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from npr.data import Problem
from npr.engine import Engine, EngineConfig, Result, SamplingParams, StructureForcer
from npr.models import resolve_dtype
from npr.rewards import is_correct
from npr.schema import parse, validate
from npr.train.config import RolloutConfig
from npr.train.freed_memory import return_freed_memory

# Branch lengths the smoke presets force: one block of two branches (npr.engine.forcing).
SMOKE_BRANCH_TOKENS = [[6, 9]]


def build_forcer(tokenizer, forcing: str):
    """The logits processor of ``rollout_forcing`` (smoke/test only), or None."""
    if forcing == "structure":
        return StructureForcer(tokenizer, branch_tokens=SMOKE_BRANCH_TOKENS)
    return None


def release_wanted(setting: str, device: torch.device) -> bool:
    """Whether ``release_engine_for_update`` (auto, on, off) frees the engine's memory for the
    update on ``device``: auto frees it on CUDA, where the update needs the room, and keeps it on
    a CPU, where the host's memory is larger and reallocating costs time."""
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


@dataclass
class _Released:
    """What ``RolloutWorker.release_memory`` freed: the KV pool's shape, and the weight copy's
    parameters with their shapes (empty when the engine decodes the trained weights)."""

    pool_shape: torch.Size
    parameters: list[tuple[torch.nn.Parameter, torch.Size]]


class RolloutWorker:
    """The engine over the policy's weights (or a synced copy in ``rollout_dtype``).

    ``policy_is_trained``: ``policy`` is the trained module itself (False: a gathered copy of
    sharded weights, which ``release_memory`` may free like a ``rollout_dtype`` copy)."""

    def __init__(
        self, policy: torch.nn.Module, tokenizer, config: RolloutConfig, mode: str, policy_is_trained: bool = True
    ):
        self.policy, self.tokenizer, self.config = policy, tokenizer, config
        policy_dtype = next(policy.parameters()).dtype
        dtype = resolve_dtype(config.rollout_dtype) if config.rollout_dtype else policy_dtype
        if dtype == policy_dtype:
            self.model = policy
        else:
            self.model = copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)
        self.owns_weights = self.model is not policy or not policy_is_trained
        self.engine = Engine(
            self.model,
            tokenizer,
            EngineConfig(
                mode=mode,
                kv_cache_tokens=config.kv_cache_tokens,
                kv_cache_gib=config.kv_cache_gib,
                max_num_seqs=config.max_num_seqs,
            ),
        )
        self._released: _Released | None = None

    @property
    def released(self) -> bool:
        return self._released is not None

    def release_memory(self) -> None:
        """Free the KV pool and the engine's own weight copy (not the trained weights) while the
        engine is idle, e.g. for an update; ``restore_memory`` (which ``sync`` calls) rebuilds
        them. The same code on every device; ``release_wanted`` decides where it runs."""
        if self.released:
            return
        if self.engine.scheduler.has_work():
            raise RuntimeError("release_memory: the engine still has requests in flight")
        pool = self.engine.pool
        owned = list(self.model.parameters()) if self.owns_weights else []
        self._released = _Released(pool.keys.shape, [(p, p.shape) for p in owned])
        layers, heads, _, head_dim = pool.keys.shape
        pool.keys = pool.keys.new_empty(layers, heads, 0, head_dim)  # keeps dtype, device and the per-slot shape
        pool.values = pool.values.new_empty(layers, heads, 0, head_dim)
        for p in owned:
            p.data = p.data.new_empty(0)
        return_freed_memory(pool.keys.device)  # and what decoding freed: the update starts from live memory only

    def restore_memory(self) -> None:
        """Reallocate what ``release_memory`` freed: a zeroed KV pool (its pages are all free) and
        the weight copy's parameters, UNINITIALISED: the caller copies the weights in (``sync``)."""
        if not self.released:
            return
        pool = self.engine.pool
        # the update's freed activations go back first, so the pool takes their room instead of adding to it (a CPU
        # heap keeps freed pages under the npr command's malloc tuning; CUDA's allocator caches freed blocks)
        return_freed_memory(pool.keys.device)
        # one allocation for keys and values: a large pool then lies above glibc's mmap threshold (1 GiB under the
        # npr command's tuning), so the next release unmaps it instead of leaving its pages in the heap
        both = torch.zeros((2, *self._released.pool_shape), dtype=pool.keys.dtype, device=pool.keys.device)
        pool.keys, pool.values = both[0], both[1]  # [layers, Hkv, slots, D] each
        for p, shape in self._released.parameters:
            p.data = p.data.new_empty(shape)
        self._released = None

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's updated weights into the engine's copy (no-op when shared), after
        rebuilding what ``release_memory`` freed."""
        self.restore_memory()
        if self.model is not self.policy:
            self.model.load_state_dict(self.policy.state_dict())

    def generate(self, prompts: Sequence[Sequence[int]], first_index: int, params: SamplingParams) -> list[Result]:
        """Decode ``prompts`` (global indices from ``first_index``); results by prompt, then sample."""
        if self.released:
            raise RuntimeError("generate: the engine's memory was released and the weights not synced since")
        if not prompts:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            self.engine.submit([list(p) for p in prompts], params, first_index=first_index)
            results: list[Result] = []
            while self.engine.scheduler.has_work():
                results += self.engine.step().finished
        finally:
            self.model.train(was_training)
        return sorted(results, key=lambda r: (r.prompt_index, r.sample_index))

    def sampling_params(self, n: int, seed: int) -> SamplingParams:
        c = self.config
        forcer = build_forcer(self.tokenizer, c.rollout_forcing)
        return SamplingParams(
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            n=n,
            seed=seed,
            logits_processors=(forcer,) if forcer else (),
        )


@dataclass
class Rollout:
    """One scored response: the engine's result, its problem and what the reward saw."""

    problem: Problem
    result: Result
    reward: float
    correct: bool
    format_valid: bool
    parallel_blocks: int
    group_base: int = 0  # the group id of its generation batch's prompt 0

    @property
    def group(self) -> int:
        """The prompt group's id, unique over a step's generation rounds (DAPO's refill draws
        several batches whose prompt indices restart at 0; one id per batch would merge two
        problems into one group for the advantages and the mini-batches)."""
        return self.group_base + self.result.prompt_index


def count_blocks(result: Result) -> int:
    """Parallel blocks of a response: those the engine forked (parallel/sequential mode), or the
    blocks written in the text (plain mode, where the engine never forks)."""
    if result.mode == "plain":
        return len(parse(result.text, strict=False).blocks)
    return result.stats.parallel_blocks


def score(
    results: Sequence[Result],
    problems: Sequence[Problem],
    first_index: int,
    reward: Callable[[str, Problem], float],
    group_base: int = 0,
) -> list[Rollout]:
    """Rollouts with reward, correctness and format validity; ``problems[i - first_index]`` is
    the problem of global prompt index i, whose group id is ``group_base + i``."""
    out = []
    for r in results:
        problem = problems[r.prompt_index - first_index]
        out.append(
            Rollout(
                problem,
                r,
                float(reward(r.text, problem)),
                is_correct(r.text, problem),
                not validate(r.text),
                count_blocks(r),
                group_base,
            )
        )
    return out


ROLLOUT_SUMS = ("rollouts", "reward", "correct", "format_valid", "triggered", "response_tokens", "truncated")


def rollout_sums(rollouts: Sequence[Rollout]) -> list[float]:
    """Sums over this rank's rollouts, in the order of ``ROLLOUT_SUMS`` (reduce, then divide)."""
    return [
        float(len(rollouts)),
        sum(r.reward for r in rollouts),
        float(sum(r.correct for r in rollouts)),
        float(sum(r.format_valid for r in rollouts)),
        float(sum(r.parallel_blocks >= 1 for r in rollouts)),
        float(sum(len(r.result.token_ids) for r in rollouts)),
        float(sum(r.result.finish_reason == "length" for r in rollouts)),
    ]


def rollout_metrics(totals: Sequence[float], prefix: str = "") -> dict[str, float]:
    """Means from global ``rollout_sums``: reward, accuracy, format-valid, trigger, length, truncation."""
    t = dict(zip(ROLLOUT_SUMS, totals))
    n = max(t["rollouts"], 1.0)
    return {
        f"{prefix}reward": t["reward"] / n,
        f"{prefix}accuracy": t["correct"] / n,
        f"{prefix}format_valid_rate": t["format_valid"] / n,
        f"{prefix}trigger_rate": t["triggered"] / n,
        f"{prefix}response_length": t["response_tokens"] / n,
        f"{prefix}truncated_rate": t["truncated"] / n,
        f"{prefix}rollouts": t["rollouts"],
    }


def rollout_record(step: int, rollout: Rollout) -> dict:
    """One line of ``rollouts.jsonl`` (fields of npr.eval's sample records, for ``npr view``)."""
    r = rollout.result
    return {
        "step": step,
        "problem_id": rollout.problem.id,
        "sample": r.sample_index,
        "reward": rollout.reward,
        "correct": rollout.correct,
        "format_valid": rollout.format_valid,
        "finish_reason": r.finish_reason,
        "diagnostic": r.diagnostic,
        "parallel_blocks": rollout.parallel_blocks,
        "branches_per_block": r.branches_per_block,
        "tokens": len(r.token_ids),
        "critical_path_tokens": r.stats.critical_path_tokens,
        "output": r.text,
    }


def append_rollouts(path: Path, step: int, rollouts: Sequence[Rollout]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for rollout in rollouts:
            f.write(json.dumps(rollout_record(step, rollout)) + "\n")
