"""``npr_parallel``: NPR's fork/join decoding as a verl agent loop over stock vLLM / SGLang servers.

The loop replays npr's engine scheduler (``npr.engine.scheduler``) with one server request per segment:

- the main line decodes until ``<plan>`` (the loop prefills the plan label ``k:``, as the engine does) or
  ``</guideline>``; there it checks the fork (plans, ``max_branches``, ``max_depth``, ``min_fork_budget``)
  and prefills the guideline separator;
- one request per plan on ``prefix + <step>\\nk:`` decodes the branch to ``</step>`` (the server's prefix
  cache shares the prefix); the loop prefills the step separator after each;
- the join is one request on ``prefix + every branch + <takeaway>``; decoding continues as before.

Budgets count every token of every branch and every prefilled scaffold token against ``response_length``,
as npr's engine does; an illegal tag, an EOS inside a block or a fork the engine would refuse end the sample
with npr's finish reason. The flat response is npr's layout (``Result.token_ids``); ``response_mask`` is 1 on
sampled tokens and 0 on prefilled scaffold (1 there too with ``loss_on_prefilled``), and all 0 when npr's
Stage 3 would drop the rollout (``npr.train.stage3.drop_reason``), which ``npr_papo``'s estimator reads as
"masked out".

The join is approximate. A stock server re-prefills ``prefix + branches + <takeaway>`` causally with
sequential positions, so each branch sees its earlier siblings and the takeaway's positions differ from the
tree's: every token after a join is decoded from a context that the tree-attention actor does not score.
The loop returns which tokens were decoded after a join (``npr_after_join``); ``join_gap`` measures the
rollout-vs-actor log-prob gap split there; verl's rollout correction (``algorithm.rollout_correction``)
reweights by it. npr's own engine never re-prefills: its rollouts are exact (docs/verl.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.workers.rollout.replica import TokenOutput

from npr.engine import SamplingParams
from npr.integrations.verl.rewards import TagKeepingDecoder
from npr.masks import Phase, StructureError, next_phase
from npr.schema import GUIDELINE_SEPARATOR, STEP_SEPARATOR, TAKEAWAY_OPEN, plan_label, step_open
from npr.tokens import tag_token_ids
from npr.train.config import Stage3Config
from npr.train.presets import PRESETS
from npr.train.stage3 import drop_reason


def _stage3_setting(name: str) -> Any:
    """``Stage3Config``'s value of ``name`` under the ``qwen3-4b`` preset (the preset, else the field default)."""
    preset = PRESETS["stage3"]["qwen3-4b"]
    return preset[name] if name in preset else {f.name: f.default for f in fields(Stage3Config)}[name]


AGENT_NAME = "npr_parallel"

Generate = Callable[..., Awaitable[Any]]  # verl's server_manager.generate: (request_id=, prompt_ids=, sampling_params=)


@dataclass(frozen=True)
class ForkJoinLimits:
    """npr's engine limits (``npr.engine.EngineConfig``), enforced by the loop at each fork."""

    max_branches: int = 5
    max_depth: int = 8
    min_fork_budget: int = 32


@dataclass(frozen=True)
class Scaffold:
    """Token ids the loop prefills (``npr.schema.canonical``, encoded as npr's engine encodes them)."""

    tag_of: dict[int, str]
    plan_label: tuple[tuple[int, ...], ...]
    guideline_separator: tuple[int, ...]
    step_open: tuple[tuple[int, ...], ...]
    step_separator: tuple[int, ...]
    takeaway_open: tuple[int, ...]
    eos_ids: frozenset[int]

    @classmethod
    def of(cls, tokenizer, max_branches: int, eos_ids: Sequence[int] | None = None) -> Scaffold:
        enc = lambda s: tuple(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
        eos = set(eos_ids or []) | ({tokenizer.eos_token_id} - {None})
        return cls(
            tag_of={v: k for k, v in tag_token_ids(tokenizer).items()},
            plan_label=tuple(enc(plan_label(k)) for k in range(1, max_branches + 1)),
            guideline_separator=enc(GUIDELINE_SEPARATOR),
            step_open=tuple(enc(step_open(k)) for k in range(1, max_branches + 1)),
            step_separator=enc(STEP_SEPARATOR),
            takeaway_open=enc(TAKEAWAY_OPEN),
            eos_ids=frozenset(eos),
        )


@dataclass
class ForkJoinResult:
    """The flat response in npr's layout. ``sampled`` [n] is 1 on tokens a server decoded, 0 on scaffold;
    ``logprobs`` [n] the server's (0.0 on scaffold); ``after_join`` [n] 1 on tokens decoded from a
    re-prefilled join context. ``finish_reason``: eos, stop, length or invalid_schema."""

    token_ids: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    after_join: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    diagnostic: str | None = None
    blocks: int = 0
    requests: int = 0


class _Run:
    """One sample's bookkeeping: the engine scheduler's ``_on_sample`` / ``_force`` / ``_fork`` / ``_join``."""

    def __init__(self, scaffold: Scaffold, budget: int, limits: ForkJoinLimits) -> None:
        self.s, self.budget, self.limits = scaffold, budget, limits
        self.out = ForkJoinResult()
        self.phase, self.plans, self.joined = Phase.TEXT, 0, 0

    @property
    def remaining(self) -> int:
        return self.budget - len(self.out.token_ids)

    def finish(self, reason: str, diagnostic: str | None = None) -> None:
        if self.out.finish_reason is None:
            self.out.finish_reason, self.out.diagnostic = reason, diagnostic

    def force(self, ids: Sequence[int]) -> bool:
        if len(ids) > self.remaining:
            self.finish("length", f"the budget of {self.budget} tokens ran out")
            return False
        for t in ids:
            self._append(t, 0.0, sampled=0)
        return True

    def _append(self, token: int, logprob: float, sampled: int) -> None:
        self.out.token_ids.append(token)
        self.out.sampled.append(sampled)
        self.out.logprobs.append(logprob)
        self.out.after_join.append(int(self.joined > 0 and sampled == 1))

    def sample(self, token: int, logprob: float, stop_ids: frozenset[int]) -> str | None:
        """Append one decoded token; the tag event it triggers (``<plan>``, ``</guideline>``, ``</step>``) or
        None. The run is finished when the token ends it."""
        if self.remaining <= 0:
            self.finish("length", f"the budget of {self.budget} tokens ran out")
            return None
        self._append(token, logprob, sampled=1)
        if token in stop_ids:
            self.finish("stop")
            return None
        if token in self.s.eos_ids:
            if self.phase is Phase.TEXT:
                self.finish("eos")
            else:
                self.finish("invalid_schema", f"EOS inside {self.phase.value}")
            return None
        tag = self.s.tag_of.get(token)
        try:
            self.phase = next_phase(self.phase, tag)
        except StructureError as e:
            self.finish("invalid_schema", str(e))
            return None
        if tag == "<guideline>":
            self.plans = 0
        elif tag == "<plan>":
            self.plans += 1
            if self.plans <= len(self.s.plan_label):
                self.force(self.s.plan_label[self.plans - 1])
        elif tag == "</step>":
            self.force(self.s.step_separator)
        if self.remaining <= 0 and tag != "</guideline>":  # </guideline>: fork() reports it, as the engine does
            self.finish("length")
        return tag

    def fork(self) -> int:
        """The number of branches to open at ``</guideline>`` (prefilling the separator), 0 if finished."""
        k = self.plans
        if k == 0:
            self.finish("invalid_schema", "</guideline> closes a guideline with no <plan>")
        elif k > self.limits.max_branches:
            self.finish("invalid_schema", f"{k} plans; at most max_branches={self.limits.max_branches}")
        elif self.out.blocks >= self.limits.max_depth:
            self.finish("length", f"max_depth={self.limits.max_depth} parallel blocks reached")
        elif self.remaining < self.limits.min_fork_budget:
            self.finish("length", f"{self.remaining} tokens left, below min_fork_budget={self.limits.min_fork_budget}")
        elif self.force(self.s.guideline_separator):
            self.out.blocks += 1
            return k
        return 0


async def fork_join(
    generate: Generate,
    prompt_ids: Sequence[int],
    scaffold: Scaffold,
    budget: int,
    sampling_params: dict[str, Any],
    limits: ForkJoinLimits = ForkJoinLimits(),
    stop_token_ids: Sequence[int] = (),
) -> ForkJoinResult:
    """Decode one NPR sample through ``generate`` (verl's server interface); see the module docstring.

    ``generate(request_id=, prompt_ids=, sampling_params=)`` returns an object with ``token_ids`` and
    ``log_probs``; the loop adds ``max_tokens`` (the budget left) and ``stop_token_ids`` to the params.
    """
    run = _Run(scaffold, budget, limits)
    tags = {v: k for k, v in scaffold.tag_of.items()}
    user_stops = frozenset(stop_token_ids)
    prompt = list(prompt_ids)

    async def request(context: list[int], stops: Sequence[int]):
        run.out.requests += 1
        params = {
            **sampling_params,
            "max_tokens": run.remaining,
            "stop_token_ids": sorted({*stops, *user_stops}),
            "logprobs": True,
        }
        output = await generate(request_id=uuid4().hex, prompt_ids=context, sampling_params=params)
        logprobs = output.log_probs or [0.0] * len(output.token_ids)
        return list(output.token_ids), list(logprobs)

    main_stops = (tags["<plan>"], tags["</guideline>"])
    while run.out.finish_reason is None:
        if run.remaining <= 0:
            run.finish("length", f"the budget of {budget} tokens ran out")
            break
        ids, logprobs = await request(prompt + run.out.token_ids, main_stops)
        event = None
        for token, logprob in zip(ids, logprobs):
            event = run.sample(token, logprob, user_stops)
            if event in ("<plan>", "</guideline>") or run.out.finish_reason is not None:
                break
        else:
            if run.out.finish_reason is None:
                run.finish("length", "the server stopped without EOS (max_tokens)")
        if event != "</guideline>" or run.out.finish_reason is not None:
            continue
        branches = run.fork()
        if branches == 0:
            break
        shared = prompt + run.out.token_ids
        opened = [shared + list(scaffold.step_open[k]) for k in range(branches)]
        decoded = await asyncio.gather(*(request(context, (tags["</step>"],)) for context in opened))
        for k, (ids, logprobs) in enumerate(decoded):  # in flat order, as npr's sequential mode
            if not run.force(scaffold.step_open[k]):
                break
            run.phase = Phase.STEP
            for token, logprob in zip(ids, logprobs):
                if run.sample(token, logprob, user_stops) == "</step>" or run.out.finish_reason is not None:
                    break
            if run.out.finish_reason is None and run.phase is not Phase.AFTER_STEP:
                run.finish("length", "a branch stopped before </step> (max_tokens)")
            if run.out.finish_reason is not None:
                break
        if run.out.finish_reason is None and run.force(scaffold.takeaway_open):
            run.phase, run.joined = Phase.TAKEAWAY, run.joined + 1
    return run.out


def stage3_drop_reason(
    prompt_ids: Sequence[int], result: ForkJoinResult, text: str, settings: Stage3Filter
) -> str | None:
    """npr's Stage-3 filter (``npr.train.stage3.drop_reason``, imported) on a loop result: None when it trains."""
    rollout = SimpleNamespace(
        result=SimpleNamespace(
            finish_reason=result.finish_reason, prompt_ids=list(prompt_ids), token_ids=result.token_ids, text=text
        )
    )
    return drop_reason(rollout, settings.tag_ids, settings)


@dataclass(frozen=True)
class Stage3Filter:
    """The ``Stage3Config`` fields npr's Stage-3 filter and loss read; defaults: the ``qwen3-4b`` preset."""

    tag_ids: dict[str, int]
    drop_truncated: bool = _stage3_setting("drop_truncated")
    require_parallel: bool = _stage3_setting("require_parallel")
    drop_any_schema_error: bool = _stage3_setting("drop_any_schema_error")
    loss_on_prefilled: bool = _stage3_setting("loss_on_prefilled")


def join_gap(
    rollout_logprobs: torch.Tensor, actor_logprobs: torch.Tensor, response_mask: torch.Tensor, after_join: torch.Tensor
) -> dict[str, float]:
    """Mean |rollout - actor| log-prob over sampled tokens before any join and after one.

    All [B, T]; after_join is 1 on tokens decoded from a re-prefilled join. The gap before the joins is the
    servers' numerics; the gap after them is the join's approximation (module docstring).
    """
    gap = (rollout_logprobs - actor_logprobs).abs()  # [B, T]
    sampled = response_mask.bool()
    late = sampled & after_join.bool()
    early = sampled & ~after_join.bool()
    mean = lambda m: float(gap[m].mean()) if bool(m.any()) else 0.0  # noqa: E731
    return {
        "npr/join_gap_before": mean(early),
        "npr/join_gap_after": mean(late),
        "npr/after_join_fraction": float(late.sum()) / max(1, int(sampled.sum())),
    }


class EngineServer:
    """verl's rollout-server interface (``generate``) backed by npr's engine in ``plain`` mode, in-process.

    A stock server in miniature: causal attention, sequential positions, ``stop_token_ids`` and ``max_tokens``
    honoured, the stop token returned. ``processors_for(prompt_ids)`` may add logits processors per request
    (tests force a structure with it). Requests run one at a time.
    """

    def __init__(self, engine, processors_for: Callable[[list[int]], Sequence[Any]] | None = None) -> None:
        if engine.config.mode != "plain":
            raise ValueError(
                f"EngineServer stands in for a stock server: its engine must run mode plain, not {engine.config.mode!r}"
            )
        self.engine, self.processors_for = engine, processors_for
        self._lock = asyncio.Lock()

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any], **unused: Any
    ) -> TokenOutput:
        params = SamplingParams(
            max_new_tokens=int(sampling_params["max_tokens"]),
            temperature=float(sampling_params.get("temperature", 1.0)),
            top_p=float(sampling_params.get("top_p", 1.0)),
            top_k=max(0, int(sampling_params.get("top_k", 0) or 0)),  # vLLM's -1 means off
            seed=sampling_params.get("seed", 0),
            stop_token_ids=tuple(sampling_params.get("stop_token_ids", ())),
            logits_processors=tuple(self.processors_for(list(prompt_ids))) if self.processors_for else (),
        )
        async with self._lock:
            (result,) = self.engine.generate([list(prompt_ids)], params)
        return TokenOutput(token_ids=result.token_ids, log_probs=result.logprobs, stop_reason="completed")


@register(AGENT_NAME)
class NprParallelAgentLoop(AgentLoopBase):
    """verl agent loop ``npr_parallel``: ``fork_join`` on the rollout servers, one sample per call.

    Set ``actor_rollout_ref.rollout.agent.default_agent_loop=npr_parallel`` (or an ``agent_name`` column).
    Budget: ``rollout.response_length`` tokens, every branch and scaffold token counted. A rollout npr's
    Stage 3 would drop (``Stage3Filter``) gets an all-zero response mask; a kept one is 1 on sampled tokens,
    and on prefilled scaffold too with ``loss_on_prefilled`` (the preset's, as the reference trains).
    Keyword arguments (from an ``agent_loop_config_path`` entry) override ``ForkJoinLimits`` / ``Stage3Filter``.
    """

    def __init__(self, *args, **kwargs):
        npr_fields = {
            k: kwargs.pop(k)
            for k in list(kwargs)
            if k in ForkJoinLimits.__dataclass_fields__ or k in Stage3Filter.__dataclass_fields__
        }
        super().__init__(*args, **kwargs)
        self.response_length = self.rollout_config.response_length
        self.configure(self.tokenizer, **npr_fields)

    def configure(self, tokenizer, **fields: Any) -> None:
        """Set the limits, scaffold and filter for ``tokenizer`` (``__init__`` calls it; tests call it alone)."""
        self.limits = ForkJoinLimits(**{k: v for k, v in fields.items() if k in ForkJoinLimits.__dataclass_fields__})
        self.filter = Stage3Filter(
            tag_token_ids(tokenizer), **{k: v for k, v in fields.items() if k in Stage3Filter.__dataclass_fields__}
        )
        self.scaffold = Scaffold.of(tokenizer, self.limits.max_branches)
        self.decoder = TagKeepingDecoder(tokenizer, self.scaffold.eos_ids)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        prompt_ids = await self.ct_build_initial_tokens(list(kwargs["raw_prompt"]))
        return await self.run_tokens(prompt_ids, sampling_params)

    async def run_tokens(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> AgentLoopOutput:
        """``run`` after the chat template: the sample's AgentLoopOutput for ``prompt_ids``."""
        result = await fork_join(
            self.server_manager.generate, prompt_ids, self.scaffold, self.response_length, sampling_params, self.limits
        )
        dropped = stage3_drop_reason(prompt_ids, result, self.decoder.decode(result.token_ids), self.filter)
        if dropped is not None:
            mask = [0] * len(result.token_ids)
        else:
            mask = [1] * len(result.token_ids) if self.filter.loss_on_prefilled else result.sampled
        return AgentLoopOutput(
            prompt_ids=list(prompt_ids),
            response_ids=result.token_ids,
            response_mask=mask,
            response_logprobs=result.logprobs,
            num_turns=2,
            metrics={},
            extra_fields={
                "npr_finish_reason": result.finish_reason,
                "npr_drop_reason": dropped,
                "npr_blocks": result.blocks,
                "npr_requests": result.requests,
                "npr_sampled": result.sampled,
                "npr_after_join": result.after_join,
            },
        )
