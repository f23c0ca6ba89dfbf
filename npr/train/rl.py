"""What the two RL stages share: setup, rollout collection, the policy batch, the update and
the held-out evaluation. ``stage1`` and ``stage3`` differ only in how rollouts are scored and
selected (DAPO's dynamic sampling vs PAPO's schema filter)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from npr.algos import RATIO_LOSSES, get_advantage_estimator, get_policy_loss, hyperparameter_names
from npr.data import Problem
from npr.prompts import encode_prompt
from npr.rewards import accuracy_reward
from npr.tokens import tag_token_ids
from npr.train.config import ConfigError, RLConfig
from npr.train.data import BatchOrder, load_train_problems, rollout_seed, shard
from npr.train.fsdp import copy_full_weights, full_copy, is_sharded
from npr.train.logprobs import TokenSequence, causal_sequence, pack_in_budget, structured_sequence
from npr.train.rollout import (
    SMOKE_BRANCH_TOKENS,
    Rollout,
    RolloutWorker,
    append_rollouts,
    release_wanted,
    rollout_metrics,
    rollout_sums,
    score,
)
from npr.train.session import RunOptions, TrainSession, open_session
from npr.train.tracking import truncate_jsonl
from npr.train.update import (
    PolicyBatch,
    gather_floats,
    global_sum,
    is_count_metric,
    old_policy_logprobs,
    policy_backward,
)

EVAL_SEED_OFFSET = 7_919  # eval draws from its own seeds, the same before and after training


@dataclass
class RLRun:
    """A session plus what every RL step reads: the engine worker, prompts, data order, loss."""

    session: TrainSession
    worker: RolloutWorker
    problems: list[Problem]
    prompts: list[list[int]]
    order: BatchOrder
    loss_fn: Callable
    eval_problems: list[Problem]
    data_batches: int | None = None  # generation batches in num_epochs passes over the data (None: no end)

    @property
    def gen_batches(self) -> int:
        """Generation batches drawn so far (one per step, more with DAPO's refill): the data
        position, saved in checkpoints. A run that never refilled is at its step."""
        return int(self.session.progress.get("gen_batches", self.session.start_step))

    def data_left(self) -> bool:
        return self.data_batches is None or self.gen_batches < self.data_batches


def policy_loss_fn(config: RLConfig) -> Callable:
    """``get_policy_loss(config.policy_loss)`` with each of its hyperparameters bound from the config
    field of the same name (by the loss's signature); one without such a field keeps its default."""
    hparams = {k: getattr(config, k) for k in hyperparameter_names(config.policy_loss) if hasattr(config, k)}
    return get_policy_loss(config.policy_loss, **hparams)


def start_rl_run(stage: str, config: RLConfig, options: RunOptions, mode: str) -> RLRun:
    """Load the data (errors before any compute), open the session, build the engine."""
    problems = load_train_problems(config.train_data, config.train_limit)
    eval_problems = load_train_problems(config.eval_data, config.eval_limit, "eval_data") if config.eval_data else []
    order = BatchOrder(len(problems), config.prompts_per_step, config.seed)
    data_batches = config.num_epochs * order.steps_per_epoch() if config.num_epochs else None
    session = open_session(stage, config, options, data_batches or config.max_steps)
    world = session.accelerator.num_processes
    if config.prompts_per_step % world:
        raise ConfigError(
            f"config field 'prompts_per_step': {config.prompts_per_step} does not divide among "
            f"{world} processes; use a multiple of {world}"
        )
    worker = RolloutWorker(
        rollout_policy(session), session.tokenizer, config, mode, policy_is_trained=not is_sharded(session.model)
    )
    truncate_jsonl(rollouts_path(session), session.start_step)  # a resumed run writes later steps again
    prompts = encode_prompts(session.tokenizer, problems, config)
    return RLRun(session, worker, problems, prompts, order, policy_loss_fn(config), eval_problems, data_batches)


def encode_prompts(tokenizer, problems: Sequence[Problem], config: RLConfig) -> list[list[int]]:
    """The prompts of ``problems`` in the config's style, with its instruction (the built-in one,
    or ``system_prompt_file`` at ``system_prompt_placement``), as npr sample and eval build them."""
    instruction = config.prompt_options()
    return [encode_prompt(tokenizer, p.problem, config.prompt_style, **instruction) for p in problems]


def sampling_params(run: RLRun, n: int, seed: int, first: int, problems: Sequence[Problem]):
    """The engine's sampling parameters for ``problems`` (global prompt indices from ``first``);
    ``rollout_forcing: structure-answer`` (smoke/test only) adds ``AnswerChoiceForcer``, which
    needs each prompt's answer."""
    params = run.worker.sampling_params(n, seed)
    if run.session.config.rollout_forcing != "structure-answer":
        return params
    from dataclasses import replace

    from npr.train.smoke import AnswerChoiceForcer

    answers = {first + i: p.answer for i, p in enumerate(problems)}
    forcer = AnswerChoiceForcer(run.session.tokenizer, SMOKE_BRANCH_TOKENS, answers)
    return replace(params, logits_processors=(forcer,))


def rollout_policy(session: TrainSession) -> torch.nn.Module:
    """The module the engine decodes: the policy itself (or RolloutWorker's copy in
    ``rollout_dtype``), or under FSDP a plain gathered copy (the engine needs whole weights)."""
    if not is_sharded(session.model):
        return session.unwrapped
    from npr.models import resolve_dtype

    config = session.config
    return full_copy(session.model, resolve_dtype(config.rollout_dtype or config.dtype), session.accelerator.device)


def sync_rollout_weights(run: RLRun) -> None:
    """After an update: refresh the engine's copy of the weights (every process: under FSDP it
    all-gathers each parameter)."""
    if is_sharded(run.session.model):
        run.worker.restore_memory()
        copy_full_weights(run.session.model, run.worker.model)
    else:
        run.worker.sync()


def rollouts_path(session: TrainSession):
    acc = session.accelerator
    return session.run_dir / f"rollouts{f'.rank{acc.process_index}' if acc.num_processes > 1 else ''}.jsonl"


def generate_round(
    run: RLRun, step: int, reward: Callable[[str, Problem], float]
) -> tuple[list[Rollout], list[float], float]:
    """This rank's share of the next generation batch's rollouts, scored (for step ``step``);
    the global ``rollout_sums`` of the batch and the wall-clock seconds of decoding.

    Generation batch b takes ``order.batch(b)`` and the rollout seed of b, so a step that
    refills draws fresh problems and samples, and a resumed run continues the same stream."""
    session, config = run.session, run.session.config
    acc = session.accelerator
    batch = run.gen_batches
    indices, first = shard(run.order.batch(batch), acc.process_index, acc.num_processes)
    params = sampling_params(
        run, config.samples_per_prompt, rollout_seed(config.seed, batch), first, [run.problems[i] for i in indices]
    )
    started = time.perf_counter()
    results = run.worker.generate([run.prompts[i] for i in indices], first, params)
    wall = time.perf_counter() - started
    group_base = batch * run.order.batch_size  # group ids unique over the generation batches
    rollouts = score(results, [run.problems[i] for i in indices], first, reward, group_base)
    session.progress["gen_batches"] = batch + 1
    append_rollouts(rollouts_path(session), step + 1, rollouts)
    return rollouts, global_sum(acc, rollout_sums(rollouts)), wall


def rollout_step_metrics(totals: Sequence[float], wall: float, rounds: int) -> dict[str, float]:
    """A step's rollout metrics from its rounds' summed ``rollout_sums`` and decoding seconds."""
    metrics = rollout_metrics(totals)
    metrics["rollout_tokens_per_s"] = metrics["response_length"] * metrics["rollouts"] / max(wall, 1e-9)
    metrics["gen_rounds"] = float(rounds)
    return metrics


def collect_rollouts(run: RLRun, step: int, reward: Callable[[str, Problem], float]) -> tuple[list[Rollout], dict]:
    """This rank's share of one generation batch's rollouts, scored; plus global rollout metrics."""
    rollouts, totals, wall = generate_round(run, step, reward)
    return rollouts, rollout_step_metrics(totals, wall, 1)


def global_advantages(accelerator, estimator: str, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Advantages of this process's rollouts computed over the GLOBAL batch.

    rewards FloatTensor[K], groups LongTensor[K] (global prompt indices) -> FloatTensor[K].
    Every process gathers all kept rewards and group ids (in process order, which is global
    prompt order), runs the estimator on the whole batch and keeps its own slice. So PAPO's
    batch std (and any other batch-level statistic) is the one of the whole batch, and the
    advantages equal a single process's bit for bit; group statistics are unaffected.
    """
    all_rewards, offset = gather_floats(accelerator, rewards.tolist())
    all_groups, _ = gather_floats(accelerator, groups.tolist())
    if not all_rewards:
        return torch.zeros(0)
    advantages = get_advantage_estimator(estimator)(
        torch.tensor(all_rewards, dtype=rewards.dtype), torch.tensor(all_groups, dtype=torch.long)
    )  # [N_global]
    return advantages[offset : offset + len(rewards)]  # [K]


def policy_batch(
    rollouts: Sequence[Rollout],
    advantages: torch.Tensor,
    structured: bool,
    tag_ids: dict[str, int],
    loss_on_prefilled: bool,
    pack_tokens: int = 0,
) -> PolicyBatch:
    """Token sequences, loss masks and advantages of the selected rollouts.

    ``structured``: tree mask + positions from the schema (parallel rollouts), else causal.
    The recomputed positions must equal the engine's: any difference is a bug, not data.
    ``pack_tokens`` > 0 packs each prompt's responses behind one copy of the prompt.
    """
    sequences: list[TokenSequence] = []
    for r in rollouts:
        res = r.result
        seq = (
            structured_sequence(res.prompt_ids, res.token_ids, tag_ids)
            if structured
            else causal_sequence(res.prompt_ids, res.token_ids)
        )
        if seq.position_ids[seq.response_start :].tolist() != list(res.position_ids):
            raise RuntimeError(
                f"rollout of prompt {res.prompt_index} sample {res.sample_index}: the mask's position "
                "ids differ from the engine's; npr.masks and npr.engine disagree on the layout"
            )
        sequences.append(seq)
    masks = [
        torch.ones(len(r.result.token_ids), dtype=torch.bool)
        if loss_on_prefilled
        else torch.tensor(r.result.sampled, dtype=torch.bool)
        for r in rollouts
    ]
    engine_logprobs = [torch.tensor(r.result.logprobs, dtype=torch.float32) for r in rollouts]
    return PolicyBatch(pack_in_budget(sequences, pack_tokens), masks, advantages.float(), engine_logprobs)


def mini_batch_parts(accelerator, rollouts: Sequence[Rollout], mini_batch_size: int | None) -> list[list[int]]:
    """This rank's rollout indices in each of the step's mini-batches (PPO's ppo_mini_batch_size).

    The step makes M = ceil(global kept groups / ``mini_batch_size``) optimizer steps (None: one,
    the whole batch). All ranks' kept rollouts in global order (group id, then the order within
    a rank) are dealt out in turn: the j-th goes to mini-batch j mod M. Ranks hold contiguous
    runs of that order, so each mini-batch takes about 1/M of every rank's share, as verl cuts
    each rank's share into ``ppo_mini_batch_size`` x n / world rollouts, and every rank computes
    in every optimizer step whenever it holds at least M rollouts (``mini_batch_size`` x samples
    per prompt >= processes). Unlike verl's contiguous cut per rank, mini-batch k is the same
    set of rollouts on 1 or N processes, so N processes make one process's update.
    """
    all_groups, offset = gather_floats(accelerator, [r.group for r in rollouts])  # every rank's, in rank order
    steps = max(1, -(-len(set(all_groups)) // mini_batch_size)) if mini_batch_size else 1
    order = sorted(range(len(all_groups)), key=lambda j: all_groups[j])  # stable: rank order within a group
    position = {j: k for k, j in enumerate(order)}
    parts: list[list[int]] = [[] for _ in range(steps)]
    for i in range(len(rollouts)):
        parts[position[offset + i] % steps].append(i)
    return parts


def combine_step_metrics(updates: Sequence[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from its optimizer steps' (each a global mean over its mini-batch):
    means weighted by the mini-batches' loss units, ratio extremes over all, mean grad norm."""
    units = sum(u["loss_units"] for u in updates)
    out = {
        k: (
            sum(u[k] for u in updates)
            if is_count_metric(k)
            else sum(u[k] * u["loss_units"] for u in updates) / max(units, 1.0)
        )
        for k in updates[0]
        if k not in ("loss_units", "ratio_max", "ratio_min", "grad_norm", "lr", "skipped_steps")
    }
    out.update(
        loss_units=units,
        ratio_max=max(u["ratio_max"] for u in updates),
        ratio_min=min(u["ratio_min"] for u in updates),
        lr=updates[0]["lr"],
        grad_norm=sum(u["grad_norm"] for u in updates) / len(updates),
        optimizer_steps=float(len(updates)),
        skipped_steps=sum(u.get("skipped_steps", 0.0) for u in updates),
    )
    return out


def apply_update(run: RLRun, kept: Sequence[Rollout], advantages: torch.Tensor, structured: bool) -> dict[str, float]:
    """Update the policy from this rank's ``kept`` rollouts: ``ppo_epochs`` passes over the
    mini-batches of ``mini_batch_size`` prompt groups, one optimizer step each, the schedule
    advanced once. With several steps a ratio loss (DAPO) gets old log-probs computed once,
    before the first step, so its ratio moves off 1 and its clip binds; PAPO keeps its
    sg-ratio and needs none, so its later mini-batches are not strictly on-policy, as in NPR's
    code. Skipped on every rank when the global batch is empty; the schedule advances either
    way, so lr follows the step index."""
    session, config = run.session, run.session.config
    acc = session.accelerator
    (total,) = global_sum(acc, [len(kept)])
    if total == 0:
        session.optimizer.zero_grad(set_to_none=True)
        session.optimizer.step()  # no gradients: AdamW leaves every parameter and its state alone
        session.scheduler.step()
        return {"updated": 0.0, "trained_rollouts": 0.0, "optimizer_steps": 0.0}
    if release_wanted(config.release_engine_for_update, acc.device):
        run.worker.release_memory()  # rebuilt by sync_rollout_weights below
    pad = session.tokenizer.pad_token_id
    passes = dict(
        micro_batch_size=config.micro_batch_size,
        forward_context=session.forward_context,
        micro_batch_tokens=config.micro_batch_tokens,
        temperature=config.temperature,
        logprob_chunk_size=config.logprob_chunk_size,
    )
    batches = [
        policy_batch(
            [kept[i] for i in part],
            advantages[torch.tensor(part, dtype=torch.long)],
            structured,
            tag_ids_of(run),
            config.loss_on_prefilled,
            config.pack_group_tokens,
        )
        for part in mini_batch_parts(acc, kept, config.mini_batch_size)
    ]
    if (len(batches) > 1 or config.ppo_epochs > 1) and config.policy_loss in RATIO_LOSSES:
        for batch in batches:  # all before the first update: the policy that drew the rollouts
            batch.old_logprobs = old_policy_logprobs(acc, session.model, batch, pad, **passes)
    updates = []
    for _ in range(config.ppo_epochs):
        for batch in batches:
            metrics = policy_backward(acc, session.model, batch, run.loss_fn, config.loss_agg, pad, **passes)
            metrics.update(session.optimizer_step(advance_schedule=False))
            updates.append(metrics)
    session.scheduler.step()
    sync_rollout_weights(run)
    return {**combine_step_metrics(updates), "updated": 1.0, "trained_rollouts": total}


def evaluate(run: RLRun) -> dict[str, float]:
    """Accuracy, format-valid and trigger rates on ``eval_problems`` (sharded over processes)."""
    session, config = run.session, run.session.config
    acc = session.accelerator
    problems = run.eval_problems
    per_rank = -(-len(problems) // acc.num_processes)
    first = acc.process_index * per_rank
    mine = problems[first : first + per_rank]
    prompts = encode_prompts(session.tokenizer, mine, config)
    params = sampling_params(run, config.eval_samples, config.seed + EVAL_SEED_OFFSET, first, mine)
    results = run.worker.generate(prompts, first, params)
    totals = global_sum(acc, rollout_sums(score(results, mine, first, accuracy_reward)))
    return rollout_metrics(totals, prefix="eval_")


def run_eval_if_due(run: RLRun, when: str) -> None:
    """Evaluate ``before`` a fresh run's first step and ``after`` its last (with eval_data)."""
    session = run.session
    if not run.eval_problems:
        return
    if when == "before" and session.start_step == 0:
        session.record(0, evaluate(run))
    elif (
        when == "after"
        and session.end_step in (session.total_steps, session.data_end)
        and session.start_step < session.end_step
    ):
        session.record(session.end_step, evaluate(run))


def tag_ids_of(run: RLRun) -> dict[str, int]:
    return tag_token_ids(run.session.tokenizer)
