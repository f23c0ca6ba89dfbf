"""Per-token log-probabilities of responses under one flat masked forward: THE function that
SFT's loss and both RL stages' policy losses read.

A ``TokenSequence`` is a prompt followed by one or more responses, with the attention pattern
that produced them: the tree mask and position ids of ``npr.masks.parallel_mask_and_positions``
for a structured trace (Stage 2 data, Stage 3 rollouts), or a causal mask with ``arange``
positions for plain decoding (Stage 1 rollouts). Several responses to the same prompt can be
packed behind one copy of the prompt (``pack_responses``): each sees the prompt and itself,
never another, so its log-probs are those of its own forward while the prompt is computed once.
``response_logprobs`` right-pads a batch with ``npr.masks.batch_inputs`` (additive float mask,
padding folded in) and returns ``log p(token | everything that token may see)`` for every
response token, one row per response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from npr.masks import batch_inputs, parallel_mask_and_positions


@dataclass(frozen=True)
class TokenSequence:
    """One row of the flat forward.

    input_ids LongTensor[L], allowed BoolTensor[L, L] (query i may see key j), position_ids
    LongTensor[L]; ``context_end``: length of the prompt; ``spans``: the [start, end) token
    range of each response. A response's first token is predicted from the prompt's last
    token, every later one from the token before it.
    """

    input_ids: torch.Tensor
    allowed: torch.Tensor
    position_ids: torch.Tensor
    context_end: int
    spans: tuple[tuple[int, int], ...]

    @property
    def response_start(self) -> int:
        return self.spans[0][0]

    @property
    def response_lengths(self) -> list[int]:
        return [e - s for s, e in self.spans]

    @property
    def response_length(self) -> int:
        return sum(self.response_lengths)

    def predictors(self, span: tuple[int, int]) -> torch.Tensor:
        """Indices whose logits predict the tokens of ``span``: LongTensor[end - start]."""
        start, end = span
        index = torch.arange(start - 1, end - 1)  # [T]
        index[0] = self.context_end - 1
        return index


def _single(ids: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, prompt_length: int) -> TokenSequence:
    return TokenSequence(ids, allowed, positions, prompt_length, ((prompt_length, len(ids)),))


def structured_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int],
                        tag_ids: Mapping[str, int]) -> TokenSequence:
    """Prompt + response with the tree mask and positions; ``StructureError`` if malformed."""
    ids = torch.tensor([*prompt_ids, *response_ids], dtype=torch.long)  # [L]
    allowed, positions = parallel_mask_and_positions(ids, tag_ids, response_start=len(prompt_ids))
    return _single(ids, allowed, positions, len(prompt_ids))


def causal_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> TokenSequence:
    """Prompt + response with a plain causal mask and ``arange`` positions (plain decoding)."""
    ids = torch.tensor([*prompt_ids, *response_ids], dtype=torch.long)  # [L]
    n = len(ids)
    return _single(ids, torch.ones(n, n, dtype=torch.bool).tril_(), torch.arange(n), len(prompt_ids))


def pack_responses(sequences: Sequence[TokenSequence]) -> TokenSequence:
    """Single-response sequences of one prompt packed behind one copy of it.

    Each response keeps its own mask over the prompt and itself and its own positions; no
    response sees another. The prompts must be identical.
    """
    first = sequences[0]
    prompt = first.context_end
    for s in sequences:
        same_prompt = s.context_end == prompt and torch.equal(s.input_ids[:prompt], first.input_ids[:prompt])
        if len(s.spans) != 1 or not same_prompt:
            raise ValueError("pack_responses needs single-response sequences of the same prompt")
    length = prompt + sum(s.response_length for s in sequences)
    ids = torch.empty(length, dtype=torch.long)  # [L]
    allowed = torch.zeros(length, length, dtype=torch.bool)  # [L, L]
    positions = torch.empty(length, dtype=torch.long)  # [L]
    ids[:prompt], positions[:prompt] = first.input_ids[:prompt], first.position_ids[:prompt]
    allowed[:prompt, :prompt] = first.allowed[:prompt, :prompt]
    spans, offset = [], prompt
    for s in sequences:
        n = s.response_length
        ids[offset:offset + n] = s.input_ids[prompt:]
        positions[offset:offset + n] = s.position_ids[prompt:]
        allowed[offset:offset + n, :prompt] = s.allowed[prompt:, :prompt]
        allowed[offset:offset + n, offset:offset + n] = s.allowed[prompt:, prompt:]
        spans.append((offset, offset + n))
        offset += n
    return TokenSequence(ids, allowed, positions, prompt, tuple(spans))


def pack_in_budget(sequences: Sequence[TokenSequence], max_tokens: int) -> list[TokenSequence]:
    """Consecutive responses of the same prompt packed greedily into sequences of at most
    ``max_tokens`` tokens (a response longer than that stays alone). ``max_tokens <= 0``:
    no packing. Response order is kept, so response i of the input is row i of the output."""
    if max_tokens <= 0:
        return list(sequences)
    packed, group = [], []
    for s in sequences:
        same_prompt = group and s.context_end == group[0].context_end and torch.equal(
            s.input_ids[:s.context_end], group[0].input_ids[:group[0].context_end])
        if group and (not same_prompt or group[0].context_end + sum(g.response_length for g in group)
                      + s.response_length > max_tokens):
            packed.append(pack_responses(group) if len(group) > 1 else group[0])
            group = []
        group.append(s)
    if group:
        packed.append(pack_responses(group) if len(group) > 1 else group[0])
    return packed


def response_logprobs(model, sequences: Sequence[TokenSequence], pad_token_id: int,
                      mask_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every response token under one batched, masked forward of ``model``.

    Args:
        model: an HF causal LM (possibly wrapped by DDP/accelerate); gradients flow.
        sequences: B sequences holding R responses in all, each response >= 1 token.
        pad_token_id: id used for right padding (its positions are masked out).
        mask_dtype: dtype of the additive attention mask (default: the model's parameter dtype).

    Returns:
        logprobs FloatTensor[R, T] (float32; T = longest response; rows in sequence, then
        span order), entry (r, t) is ``log p(token t of response r | its visible context)``,
        0 past a response's end; mask BoolTensor[R, T], True on real response tokens.
    """
    if any(s.context_end < 1 or min(s.response_lengths) < 1 for s in sequences):
        raise ValueError("every sequence needs a prompt (>= 1 token) and responses of >= 1 token")
    dtype = mask_dtype or next(model.parameters()).dtype
    batch = batch_inputs([(s.input_ids, s.allowed, s.position_ids) for s in sequences], pad_token_id, dtype)
    # Only logits from the last prompt token onward are read: skip the rest of the prompt.
    first = min(s.context_end for s in sequences) - 1
    length = batch["input_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"], logits_to_keep=length - first, use_cache=False)
    logits = out.logits  # [B, L - first, V]
    longest = max(max(s.response_lengths) for s in sequences)
    rows, lengths = [], []
    for b, s in enumerate(sequences):
        for span in s.spans:
            index = (s.predictors(span) - first).to(logits.device)  # [T_r]
            predicting = logits[b].index_select(0, index).float()  # [T_r, V]
            targets = s.input_ids[span[0]:span[1]].to(logits.device)  # [T_r]
            token_logprobs = predicting.log_softmax(-1).gather(-1, targets[:, None])[:, 0]  # [T_r]
            rows.append(torch.nn.functional.pad(token_logprobs, (0, longest - len(targets))))
            lengths.append(len(targets))
    logprobs = torch.stack(rows)  # [R, T]
    mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # [R, T]
    return logprobs, mask.to(logprobs.device)
