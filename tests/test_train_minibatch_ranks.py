"""Every rank in every optimizer step: with ``mini_batch_size: 1`` (NPR's setting) two gloo
processes each contribute rollouts to every mini-batch, and each mini-batch's loss and gradient
equal one process's on the same global batch (the loss normaliser is the mini-batch's global
token count). Tiny random Llama built locally, fp32."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from distributed_util import run_gloo

GROUPS, SAMPLES = 4, 4  # 16 rollouts; each of the two ranks holds two whole groups (contiguous prompt shards)


def _global_batch(tok):
    """16 rollouts in global order: (group id, prompt ids, response ids, advantage)."""
    g = torch.Generator().manual_seed(3)
    vocab = min(tok.vocab_size, 200)
    rows = []
    for group in range(GROUPS):
        prompt = torch.randint(3, vocab, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        for _ in range(SAMPLES):
            length = int(torch.randint(2, 7, (1,), generator=g))
            response = torch.randint(3, vocab, (length,), generator=g).tolist()
            rows.append((group, prompt, response, float(torch.randn(1, generator=g))))
    return rows


def _accelerator(rank: int, world: int):
    """What policy_backward asks of accelerate's Accelerator; gradients are averaged by hand after
    each backward, as DDP does."""
    import torch.distributed as dist

    def reduce(tensor, reduction="sum"):
        if world > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(tensor):
        if world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    return SimpleNamespace(
        num_processes=world,
        process_index=rank,
        device=torch.device("cpu"),
        reduce=reduce,
        gather=gather,
        backward=lambda loss: loss.backward(),
        no_sync=lambda model: contextlib.nullcontext(),
    )


def _mini_batch_updates(rank: int, world: int) -> list[dict]:
    """This rank's mini-batches (global rollout indices), and each step's loss and averaged gradient."""
    import torch.distributed as dist

    from npr.algos import get_policy_loss
    from npr.models import load_model_and_tokenizer
    from npr.train.logprobs import causal_sequence
    from npr.train.rl import mini_batch_parts
    from npr.train.update import PolicyBatch, policy_backward

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny-random-llama")
    model = model.float().train()
    rows = _global_batch(tok)
    per_rank = len(rows) // world
    mine = list(range(rank * per_rank, (rank + 1) * per_rank))  # global rollout indices
    acc = _accelerator(rank, world)
    parts = mini_batch_parts(acc, [SimpleNamespace(group=rows[j][0]) for j in mine], 1)
    loss_fn = get_policy_loss("dapo", clip_low=0.2, clip_high=0.28)
    updates = []
    for part in parts:
        chosen = [rows[mine[i]] for i in part]
        batch = PolicyBatch(
            [causal_sequence(p, r) for _, p, r, _ in chosen],
            [torch.ones(len(r), dtype=torch.bool) for _, _, r, _ in chosen],
            torch.tensor([a for *_, a in chosen]),
            [torch.full((len(r),), float("nan")) for _, _, r, _ in chosen],
        )
        model.zero_grad(set_to_none=True)
        metrics = policy_backward(acc, model, batch, loss_fn, "token-mean", tok.pad_token_id, micro_batch_size=2)
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if world > 1:
                dist.all_reduce(grad)
                grad = grad / world
            grads[name] = grad.clone()
        updates.append(
            {
                "rollouts": [mine[i] for i in part],
                "loss": metrics["loss"],
                "units": metrics["loss_units"],
                "grads": grads,
            }
        )
    return updates


def _on_two_ranks(rank: int, world: int, out: str) -> None:
    torch.save(_mini_batch_updates(rank, world), f"{out}.rank{rank}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gloo") / "out")
    run_gloo(_on_two_ranks, 2, out)
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


def test_every_rank_contributes_to_every_optimizer_step(two_ranks):
    """mini_batch_size 1 over 4 groups: 4 optimizer steps; each rank's 8 rollouts are cut into 4
    parts of 2, so every step holds 4 rollouts, 2 from each rank (the old cut of the global group
    order gave each step one whole group, held by one rank: the other computed nothing)."""
    rank0, rank1 = two_ranks
    assert len(rank0) == len(rank1) == GROUPS
    for step0, step1 in zip(rank0, rank1):
        assert len(step0["rollouts"]) == len(step1["rollouts"]) == 2
        assert all(j < 8 for j in step0["rollouts"]) and all(j >= 8 for j in step1["rollouts"])
        assert step0["loss"] == step1["loss"] and step0["units"] == step1["units"]  # global figures


def test_two_ranks_equal_one_process_on_the_same_global_batch(two_ranks):
    """Each step's mini-batch is the same set of rollouts on one process, and its loss and gradient
    (the loss normalised by the mini-batch's global token count) equal the two ranks'."""
    one = _mini_batch_updates(0, 1)
    assert len(one) == len(two_ranks[0])
    for k, single in enumerate(one):
        both = sorted(two_ranks[0][k]["rollouts"] + two_ranks[1][k]["rollouts"])
        assert sorted(single["rollouts"]) == both
        assert single["units"] == two_ranks[0][k]["units"]
        assert single["loss"] == pytest.approx(two_ranks[0][k]["loss"], rel=1e-6, abs=1e-7)
        grads = two_ranks[0][k]["grads"]
        assert any(float(g.abs().max()) > 0 for g in single["grads"].values())
        for name, grad in single["grads"].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
