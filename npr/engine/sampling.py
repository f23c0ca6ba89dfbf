"""Batched, device-side token sampling: repetition penalty, temperature, top-k, top-p, log-probs.

Every row of a step is processed at once on the model's device; the only host transfer is the
final token ids and log-probs (one per step, not one per row).

**Reproducible noise.** A row draws one uniform number from a counter-based hash of its *key*
``(seed, sample, block, branch, offset)`` (``row_uniform``): no generator state exists, so what a
stream samples does not depend on which other streams share the batch, on the engine mode, or on
a preemption that recomputed its KV. The token is then the inverse CDF of the row's (filtered)
distribution at that number:

- ``temperature == 0``: argmax;
- no top-k and no top-p: the categorical over the whole vocabulary (cumulative sum in float64);
- top-k and/or top-p: the top candidates in descending order (``CANDIDATES``, or ``top_k`` when
  larger), top-k first, then the nucleus of the renormalised top-k mass (a token is kept while the
  mass strictly before it is below ``top_p``, so the top token always is; HF's and vLLM's order).
  A row whose nucleus is wider than the candidates (flagged with the tokens, so the check costs no
  extra transfer) is redrawn over the fully sorted vocabulary: the same rule, the same number, the
  same token.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

CANDIDATES = 256  # top-k/top-p rows look at this many tokens first


def row_uniform(*key: int) -> float:
    """A uniform number in [0, 1) from an integer key (blake2b: identical on every platform)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *(k & 0x7FFF_FFFF_FFFF_FFFF for k in key)),
                             digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


@dataclass
class RowParams:
    """Per-row settings of one step, as lists on the host (one entry per logits row)."""

    temperature: list[float]
    top_p: list[float]
    top_k: list[int]
    uniform: list[float]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor,
                             rows: torch.Tensor | None = None) -> torch.Tensor:
    """HF/CTRL rule in place on ``logits`` [R, V]: where ``seen`` [r, V] is True, divide positive scores
    by ``penalty`` [r] and multiply negative ones by it. Row i of ``seen`` describes row ``rows[i]`` of
    ``logits`` (default: row i). Only the seen entries are read and written (a branch has seen a few
    hundred of the vocabulary's tokens, so this is not a pass over [R, V]); finding them
    (``nonzero``) waits for the device on CUDA, once per step with branch rows."""
    i, cols = seen.nonzero(as_tuple=True)
    target = i if rows is None else rows[i]
    values = logits[target, cols]
    p = penalty[i]
    logits[target, cols] = torch.where(values < 0, values * p, values / p)
    return logits


def _inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative ``weights`` [R, C] at ``uniform`` [R] (float64 sums)."""
    cdf = weights.double().cumsum(-1)  # [R, C]
    target = uniform * cdf[:, -1]  # [R]
    index = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]  # first entry with cdf > target
    return index.clamp_(max=weights.shape[1] - 1)


def _nucleus(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor, width: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p draw over the ``width`` best tokens of ``z`` [R, V] (scaled logits).

    Returns (token ids [R], wide [R] bool: the nucleus may extend past ``width``, redraw wider).
    """
    values, index = z.topk(width, dim=-1)  # [R, C] descending
    probs = torch.exp(values - torch.logsumexp(z, dim=-1, keepdim=True))  # [R, C]: mass over the whole vocabulary
    rank = torch.arange(width, device=z.device)[None, :]
    k = torch.where(top_k > 0, top_k, z.shape[1])[:, None]  # [R, 1]
    in_k = rank < k
    kept = probs * in_k
    total = kept.sum(-1, keepdim=True)  # [R, 1] candidate mass
    inside = k <= width  # the whole top-k set is among the candidates: renormalise over it
    norm = torch.where(inside, total, torch.ones_like(total))  # else over the whole vocabulary (top_k 0)
    before = (kept.cumsum(-1) - kept) / norm  # renormalised mass strictly before each token
    keep = in_k & (before < top_p[:, None])
    choice = _inverse_cdf(kept * keep, uniform)
    # the candidates hold the whole nucleus unless they are fewer than k and their mass falls short of top_p
    wide = ~inside[:, 0] & (total[:, 0] < top_p)
    return index.gather(1, choice[:, None])[:, 0], wide


def sample(logits: torch.Tensor, params: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of processed ``logits`` [R, V] (float32). Returns (tokens [R] int64, wide
    [R] bool): rows flagged ``wide`` must be redrawn with ``redraw_wide``."""
    device = logits.device
    sampled = [i for i, t in enumerate(params.temperature) if t > 0]
    # greedy rows take the argmax (a pass over [R, V] only when there are some)
    tokens = logits.argmax(-1) if len(sampled) < len(logits) else torch.zeros(len(logits), dtype=torch.long,
                                                                                device=device)
    wide = torch.zeros(len(tokens), dtype=torch.bool, device=device)
    if not sampled:
        return tokens, wide
    full = [i for i in sampled if params.top_p[i] >= 1.0 and params.top_k[i] <= 0]
    filtered = [i for i in sampled if params.top_p[i] < 1.0 or params.top_k[i] > 0]
    for rows, nucleus in ((full, False), (filtered, True)):
        if not rows:
            continue
        index = torch.tensor(rows, device=device)
        temperature = torch.tensor([params.temperature[i] for i in rows], device=device)
        uniform = torch.tensor([params.uniform[i] for i in rows], dtype=torch.float64, device=device)
        z = logits if len(rows) == len(logits) else logits.index_select(0, index)  # [r, V]
        if any(params.temperature[i] != 1.0 for i in rows):
            z = z / temperature[:, None]
        if nucleus:
            width = min(z.shape[1], max(CANDIDATES, *(params.top_k[i] for i in rows)))
            top_k = torch.tensor([params.top_k[i] for i in rows], device=device)
            top_p = torch.tensor([params.top_p[i] for i in rows], device=device)
            chosen, row_wide = _nucleus(z, top_k, top_p, uniform, width)
            wide.index_copy_(0, index, row_wide)
        else:
            chosen = _inverse_cdf(torch.softmax(z, dim=-1), uniform)
        tokens.index_copy_(0, index, chosen)
    return tokens, wide


def redraw_wide(logits: torch.Tensor, params: RowParams, rows: list[int]) -> list[int]:
    """Tokens of ``rows`` drawn over the fully sorted vocabulary (their nucleus outgrew the candidates)."""
    device = logits.device
    index = torch.tensor(rows, device=device)
    temperature = torch.tensor([params.temperature[i] for i in rows], device=device)
    z = logits.index_select(0, index) / temperature[:, None]
    top_k = torch.tensor([params.top_k[i] for i in rows], device=device)
    top_p = torch.tensor([params.top_p[i] for i in rows], device=device)
    uniform = torch.tensor([params.uniform[i] for i in rows], dtype=torch.float64, device=device)
    return _nucleus(z, top_k, top_p, uniform, z.shape[1])[0].tolist()
