"""Statistics over all ranks: two gloo processes compute what one process computes for the
same global batch (PAPO advantages, gathered lists)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from distributed_util import run_gloo

# 16 rewards, 4 groups of 4; processes 0 and 1 each hold two groups (4 right, 4 wrong each)
REWARDS = [1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0]
GROUPS = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def _on_two_ranks(rank: int, world: int, out: str) -> None:
    from npr.train.rl import global_advantages
    from npr.train.update import gather_floats

    acc = SimpleNamespace(num_processes=world, process_index=rank)
    mine = slice(8 * rank, 8 * rank + 8)
    advantages = global_advantages(acc, "papo", torch.tensor(REWARDS[mine]), torch.tensor(GROUPS[mine]))
    gathered = gather_floats(acc, [float(rank)] * (rank + 1))  # lists of lengths 1 and 2
    torch.save((advantages, gathered), f"{out}.rank{rank}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gloo") / "out")
    run_gloo(_on_two_ranks, 2, out)
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


def test_papo_advantages_use_the_global_batch_std(two_ranks):
    """The issue's example: with the global std (16 rewards: 8 right, 8 wrong, sqrt(16/15)) a
    right answer in a 3-of-4 group gets 0.5 / 1.0328 = 0.484 and a wrong one -1.452; one
    process's std over its 8 rewards (sqrt(8/7)) would give 0.468 / -1.403."""
    from npr.algos import papo_advantages

    two = torch.cat([advantages for advantages, _ in two_ranks])
    one = papo_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS))
    assert torch.equal(two, one)  # bit for bit
    assert two[0].item() == pytest.approx(0.5 / math.sqrt(16 / 15), rel=1e-6)
    assert round(two[0].item(), 3) == 0.484 and round(two[3].item(), 3) == -1.452
    per_rank = papo_advantages(torch.tensor(REWARDS[:8]), torch.tensor(GROUPS[:8]))
    assert round(per_rank[0].item(), 3) == 0.468 and round(per_rank[3].item(), 3) == -1.403


def test_gather_floats_concatenates_in_process_order(two_ranks):
    assert [gathered for _, gathered in two_ranks] == [([0.0, 1.0, 1.0], 0), ([0.0, 1.0, 1.0], 1)]
