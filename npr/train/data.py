"""Training data order: a deterministic, resumable stream of example indices, and rank shards.

The batch of step ``k`` is a pure function of (dataset size, batch size, seed, k): epochs are
seeded permutations laid end to end, and step k takes the next ``batch_size`` indices. So the
data position of a resumed run is its step, and no sampler state needs saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npr.data import DataError, Problem, load_problems


@dataclass(frozen=True)
class BatchOrder:
    """Step -> example indices: seeded permutation per epoch, batches taken in sequence."""

    num_examples: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.num_examples < 1 or self.batch_size < 1:
            raise ValueError(
                f"BatchOrder needs examples and a batch size >= 1, got {self.num_examples}, {self.batch_size}"
            )

    def epoch_permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def batch(self, step: int) -> list[int]:
        """Indices of step ``step``'s batch (0-based step); wraps into the next epoch as needed."""
        start = step * self.batch_size
        indices: list[int] = []
        epoch, offset = divmod(start, self.num_examples)
        while len(indices) < self.batch_size:
            permutation = self.epoch_permutation(epoch)
            indices += permutation[offset : offset + self.batch_size - len(indices)]
            epoch, offset = epoch + 1, 0
        return indices

    def steps_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)


def shard(items: list, rank: int, world_size: int) -> tuple[list, int]:
    """This rank's contiguous slice of ``items`` and the global index of its first item.

    ``len(items)`` must divide by ``world_size`` (checked at start-up), so every rank gets the
    same number of items and the union over ranks is ``items`` in order.
    """
    per_rank = len(items) // world_size
    return items[rank * per_rank : (rank + 1) * per_rank], rank * per_rank


def load_train_problems(spec: str, limit: int | None = None, what: str = "train_data") -> list[Problem]:
    """The problems of ``spec`` (``npr.data.load_problems``); an empty result is an error."""
    problems = load_problems(spec, limit=limit)
    if not problems:
        raise DataError(f"{what} {spec!r} holds no problems; give a spec or file with at least one problem")
    return problems


def rollout_seed(seed: int, step: int) -> int:
    """Base seed of step ``step``'s rollouts. The engine adds the global prompt index, so every
    (step, prompt, sample) draws from its own stream whatever the number of processes."""
    return (seed * 100_003 + step) * 100_000 % (2**62)
