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

# Branch lengths the smoke presets force: one block of two branches (npr.engine.forcing).
SMOKE_BRANCH_TOKENS = [[6, 9]]


def build_forcer(tokenizer, forcing: str):
    """The logits processor of ``rollout_forcing`` (smoke/test only), or None."""
    if forcing == "structure":
        return StructureForcer(tokenizer, branch_tokens=SMOKE_BRANCH_TOKENS)
    return None


class RolloutWorker:
    """The engine over the policy's weights (or a synced copy in ``rollout_dtype``)."""

    def __init__(self, policy: torch.nn.Module, tokenizer, config: RolloutConfig, mode: str):
        self.policy, self.tokenizer, self.config = policy, tokenizer, config
        policy_dtype = next(policy.parameters()).dtype
        dtype = resolve_dtype(config.rollout_dtype) if config.rollout_dtype else policy_dtype
        if dtype == policy_dtype:
            self.model = policy
        else:
            self.model = copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)
        self.engine = Engine(self.model, tokenizer, EngineConfig(
            mode=mode, kv_cache_tokens=config.kv_cache_tokens, kv_cache_gib=config.kv_cache_gib,
            max_num_seqs=config.max_num_seqs))

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the policy's updated weights into the engine's copy (no-op when shared)."""
        if self.model is not self.policy:
            self.model.load_state_dict(self.policy.state_dict())

    def generate(self, prompts: Sequence[Sequence[int]], first_index: int, params: SamplingParams) -> list[Result]:
        """Decode ``prompts`` (global indices from ``first_index``); results by prompt, then sample."""
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
        return SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                              n=n, seed=seed, logits_processors=(forcer,) if forcer else ())


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


def score(results: Sequence[Result], problems: Sequence[Problem], first_index: int,
          reward: Callable[[str, Problem], float], group_base: int = 0) -> list[Rollout]:
    """Rollouts with reward, correctness and format validity; ``problems[i - first_index]`` is
    the problem of global prompt index i, whose group id is ``group_base + i``."""
    out = []
    for r in results:
        problem = problems[r.prompt_index - first_index]
        out.append(Rollout(problem, r, float(reward(r.text, problem)), is_correct(r.text, problem),
                           not validate(r.text), count_blocks(r), group_base))
    return out


ROLLOUT_SUMS = ("rollouts", "reward", "correct", "format_valid", "triggered", "response_tokens", "truncated")


def rollout_sums(rollouts: Sequence[Rollout]) -> list[float]:
    """Sums over this rank's rollouts, in the order of ``ROLLOUT_SUMS`` (reduce, then divide)."""
    return [float(len(rollouts)), sum(r.reward for r in rollouts), float(sum(r.correct for r in rollouts)),
            float(sum(r.format_valid for r in rollouts)), float(sum(r.parallel_blocks >= 1 for r in rollouts)),
            float(sum(len(r.result.token_ids) for r in rollouts)),
            float(sum(r.result.finish_reason == "length" for r in rollouts))]


def rollout_metrics(totals: Sequence[float], prefix: str = "") -> dict[str, float]:
    """Means from global ``rollout_sums``: reward, accuracy, format-valid, trigger, length, truncation."""
    t = dict(zip(ROLLOUT_SUMS, totals))
    n = max(t["rollouts"], 1.0)
    return {f"{prefix}reward": t["reward"] / n, f"{prefix}accuracy": t["correct"] / n,
            f"{prefix}format_valid_rate": t["format_valid"] / n, f"{prefix}trigger_rate": t["triggered"] / n,
            f"{prefix}response_length": t["response_tokens"] / n, f"{prefix}truncated_rate": t["truncated"] / n,
            f"{prefix}rollouts": t["rollouts"]}


def rollout_record(step: int, rollout: Rollout) -> dict:
    """One line of ``rollouts.jsonl`` (fields of npr.eval's sample records, for ``npr view``)."""
    r = rollout.result
    return {"step": step, "problem_id": rollout.problem.id, "sample": r.sample_index, "reward": rollout.reward,
            "correct": rollout.correct, "format_valid": rollout.format_valid, "finish_reason": r.finish_reason,
            "diagnostic": r.diagnostic, "parallel_blocks": rollout.parallel_blocks,
            "branches_per_block": r.branches_per_block, "tokens": len(r.token_ids),
            "critical_path_tokens": r.stats.critical_path_tokens, "output": r.text}


def append_rollouts(path: Path, step: int, rollouts: Sequence[Rollout]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for rollout in rollouts:
            f.write(json.dumps(rollout_record(step, rollout)) + "\n")
