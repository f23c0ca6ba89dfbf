"""vLLM's extra sampling fields as engine logits processors: ``repetition_penalty``, ``min_tokens``, ``min_p``.

Each is a callable ``(stream, logits[V]) -> logits[V]`` the engine applies to a stream's row
before sampling (``SamplingParams.logits_processors``), with vLLM's meaning:

- ``repetition_penalty`` (HF/CTRL rule, as vLLM): a token already in the prompt or in the tokens
  this sample has generated (its main line and every branch so far) has a positive logit divided
  by the penalty and a negative one multiplied by it. It comes on top of the engine's own
  in-branch penalty (``--repetition-penalty``, NPR's 1.02);
- ``min_tokens``: EOS cannot be sampled before the sample has generated this many tokens (all
  branches counted, as the budget counts them);
- ``min_p``: after temperature, tokens whose probability is below ``min_p`` times the most likely
  one's are removed (before top-k/top-p): ``logit < max + T * ln(min_p)``.

Only requests that set these fields pay for them (one row operation per stream and step).
"""

from __future__ import annotations

import math
import weakref

import torch


class RepetitionPenalty:
    """Per sample, a [V] bool table of the tokens seen (prompt + generated), updated incrementally."""

    def __init__(self, penalty: float):
        self.penalty = penalty
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # request -> (table, counted per segment)

    def seen(self, request, vocab: int, device) -> torch.Tensor:
        entry = self._seen.get(request)
        if entry is None:
            table = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = [t for t in request.group.prompt_ids if 0 <= t < vocab]
            if ids:
                table[torch.tensor(ids, device=device)] = True
            entry = self._seen[request] = (table, {})
        table, counted = entry
        new = []
        for seg in request.segments:
            done = counted.get(seg.id, 0)
            if len(seg.tokens) > done:
                new += seg.tokens[done:]
                counted[seg.id] = len(seg.tokens)
        if new:
            table[torch.tensor(new, device=device)] = True
        return table

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        seen = self.seen(stream.request, logits.shape[0], logits.device)
        penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(seen, penalised, logits)


class MinTokens:
    """EOS masked while the sample has generated fewer than ``min_tokens`` tokens."""

    def __init__(self, min_tokens: int, eos_ids: frozenset[int]):
        self.min_tokens, self.eos = min_tokens, sorted(eos_ids)

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        if stream.request.used < self.min_tokens:
            logits[self.eos] = float("-inf")
        return logits


class MinP:
    """Remove tokens below ``min_p`` of the top token's probability at the sample's temperature."""

    def __init__(self, min_p: float):
        self.log_min_p = math.log(min_p)

    def __call__(self, stream, logits: torch.Tensor) -> torch.Tensor:
        temperature = stream.request.params.temperature
        if temperature <= 0:  # greedy: the top token is kept anyway
            return logits
        return logits.masked_fill_(logits < logits.max() + temperature * self.log_min_p, float("-inf"))


def request_processors(
    repetition_penalty: float | None, min_tokens: int | None, min_p: float | None, eos_ids: frozenset[int]
) -> tuple:
    """The processors a request's fields ask for, in vLLM's order (penalties, then EOS, then min-p)."""
    out = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        out.append(RepetitionPenalty(repetition_penalty))
    if min_tokens:
        out.append(MinTokens(min_tokens, eos_ids))
    if min_p:
        out.append(MinP(min_p))
    return tuple(out)


__all__ = ["MinP", "MinTokens", "RepetitionPenalty", "request_processors"]
