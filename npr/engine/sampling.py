"""Token sampling: repetition penalty, temperature, top-k, top-p, per-stream generators.

Each stream draws from its own ``torch.Generator``, so what a branch samples does not depend
on which other requests or branches share the batch, nor on the engine mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_CANDIDATES = 256  # top-p looks at this many tokens first and widens only when they hold too little mass


def apply_repetition_penalty(logits: torch.Tensor, previous: Sequence[int], penalty: float) -> torch.Tensor:
    """HF/CTRL rule on ``logits`` [V] in place: divide positive scores (multiply negative ones) of
    tokens in ``previous`` by ``penalty``."""
    if penalty == 1.0 or not previous:
        return logits
    idx = torch.tensor(sorted(set(previous)), device=logits.device)
    scores = logits[idx]
    logits[idx] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def _filtered_choice(probs: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """Sample one token id from ``probs`` [V] restricted to top-k and the top-p nucleus."""
    k = min(top_k, probs.numel()) if top_k > 0 else probs.numel()
    if k == probs.numel() and top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    width = min(k, _CANDIDATES)
    values, index = probs.topk(width)  # [w] descending
    if top_p < 1.0 and width < k and float(values.sum()) < top_p:
        values, index = probs.topk(k)  # the nucleus is wider than the candidates: look at all k
    if top_p < 1.0:
        before = values.cumsum(0) - values  # mass strictly before each token
        values = values[before < top_p]  # keeps at least the top token
        index = index[: len(values)]
    return int(index[torch.multinomial(values, 1, generator=generator)])


def sample_rows(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (already processed). Temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    return torch.tensor([_filtered_choice(probs[i], top_k, top_p, g) for i, g in enumerate(generators)])
