"""Per-token log-probabilities of responses under one flat masked forward: THE function that
SFT's loss and both RL stages' policy losses read.

A ``TokenSequence`` is prompt + response ids with the attention pattern that produced them:
the tree mask and position ids of ``npr.masks.parallel_mask_and_positions`` for a structured
trace (Stage 2 data, Stage 3 rollouts), or a causal mask with ``arange`` positions for plain
decoding (Stage 1 rollouts). ``response_logprobs`` right-pads a batch with
``npr.masks.batch_inputs`` (additive float mask, padding folded in) and returns
``log p(response token t | everything that token may see)`` for every response token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from npr.masks import batch_inputs, parallel_mask_and_positions


@dataclass(frozen=True)
class TokenSequence:
    """One sequence for the flat forward.

    input_ids LongTensor[L] (prompt then response), allowed BoolTensor[L, L] (query i may see
    key j), position_ids LongTensor[L], response_start: index of the first response token.
    """

    input_ids: torch.Tensor
    allowed: torch.Tensor
    position_ids: torch.Tensor
    response_start: int

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.response_start


def structured_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int],
                        tag_ids: Mapping[str, int]) -> TokenSequence:
    """Prompt + response with the tree mask and positions; ``StructureError`` if malformed."""
    ids = torch.tensor([*prompt_ids, *response_ids], dtype=torch.long)  # [L]
    allowed, positions = parallel_mask_and_positions(ids, tag_ids, response_start=len(prompt_ids))
    return TokenSequence(ids, allowed, positions, len(prompt_ids))


def causal_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> TokenSequence:
    """Prompt + response with a plain causal mask and ``arange`` positions (plain decoding)."""
    ids = torch.tensor([*prompt_ids, *response_ids], dtype=torch.long)  # [L]
    n = len(ids)
    return TokenSequence(ids, torch.ones(n, n, dtype=torch.bool).tril_(), torch.arange(n), len(prompt_ids))


def response_logprobs(model, sequences: Sequence[TokenSequence], pad_token_id: int,
                      mask_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every response token under one batched, masked forward of ``model``.

    Args:
        model: an HF causal LM (possibly wrapped by DDP/accelerate); gradients flow.
        sequences: B sequences, each with at least one response token.
        pad_token_id: id used for right padding (its positions are masked out).
        mask_dtype: dtype of the additive attention mask (default: the model's parameter dtype).

    Returns:
        logprobs FloatTensor[B, T] (float32; T = longest response), entry (b, t) is
        ``log p(token response_start+t | its visible context)``, 0 past a response's end;
        mask BoolTensor[B, T], True on real response tokens.
    """
    if any(s.response_length < 1 or s.response_start < 1 for s in sequences):
        raise ValueError("every sequence needs a prompt (>= 1 token) and a response (>= 1 token)")
    dtype = mask_dtype or next(model.parameters()).dtype
    batch = batch_inputs([(s.input_ids, s.allowed, s.position_ids) for s in sequences], pad_token_id, dtype)
    # Only logits from the first response's predecessor onward are needed: skip the shared prompt.
    first = min(s.response_start for s in sequences) - 1
    length = batch["input_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"], logits_to_keep=length - first, use_cache=False)
    logits = out.logits  # [B, L - first, V]
    longest = max(s.response_length for s in sequences)
    mask = torch.zeros((len(sequences), longest), dtype=torch.bool)  # [B, T]
    rows = []
    for b, s in enumerate(sequences):
        n, start = len(s.input_ids), s.response_start
        # logits at index i predict token i + 1; row b's response tokens are start .. n-1
        predicting = logits[b, start - 1 - first:n - 1 - first].float()  # [T_b, V]
        targets = s.input_ids[start:n].to(predicting.device)  # [T_b]
        token_logprobs = predicting.log_softmax(-1).gather(-1, targets[:, None])[:, 0]  # [T_b]
        rows.append(torch.nn.functional.pad(token_logprobs, (0, longest - (n - start))))
        mask[b, :n - start] = True
    logprobs = torch.stack(rows)  # [B, T]
    return logprobs, mask.to(logprobs.device)
