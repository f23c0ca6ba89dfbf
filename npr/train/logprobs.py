"""Per-token log-probabilities of responses under one flat masked forward: THE function that
SFT's loss and both RL stages' policy losses read.

A ``TokenSequence`` is a prompt followed by one or more responses, with the attention pattern
that produced them: the tree mask and position ids of ``npr.masks.parallel_mask_and_positions``
for a structured trace (Stage 2 data, Stage 3 rollouts), or a causal mask with ``arange``
positions for plain decoding (Stage 1 rollouts). Several responses to the same prompt can be
packed behind one copy of their common prefix (``pack_shared_prefix``: the whole prompt for the
responses to one prompt, the system instruction for different problems): each sees the prefix
and itself, never another, so its log-probs are those of its own forward while the shared
prefix is computed once.
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
    LongTensor[L]; ``context_end``: length of the prompt (of the shared prefix when packed);
    ``spans``: the [start, end) token range of each response; ``first_predictors``: for each
    response, the index of its prompt's last token, whose logits predict its first token (None:
    ``context_end - 1`` for all). Every later token is predicted from the token before it.
    """

    input_ids: torch.Tensor
    allowed: torch.Tensor
    position_ids: torch.Tensor
    context_end: int
    spans: tuple[tuple[int, int], ...]
    first_predictors: tuple[int, ...] | None = None

    @property
    def response_start(self) -> int:
        return self.spans[0][0]

    @property
    def response_lengths(self) -> list[int]:
        return [e - s for s, e in self.spans]

    @property
    def response_length(self) -> int:
        return sum(self.response_lengths)

    def first_predictor(self, j: int) -> int:
        return self.context_end - 1 if self.first_predictors is None else self.first_predictors[j]

    def predictors(self, j: int) -> torch.Tensor:
        """Indices whose logits predict the tokens of response ``j``: LongTensor[end - start]."""
        start, end = self.spans[j]
        index = torch.arange(start - 1, end - 1)  # [T]
        index[0] = self.first_predictor(j)
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


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def pack_shared_prefix(sequences: Sequence[TokenSequence]) -> TokenSequence:
    """Sequences packed behind one copy of their common prefix (never past a prompt's end).

    Each keeps its own mask over the prefix and itself and its own positions; none sees
    another. For responses to one prompt the prefix is the whole prompt; for different
    problems it is what their prompts share (the chat template and the system instruction).
    """
    first = sequences[0]
    shared = min(s.context_end for s in sequences)
    for s in sequences[1:]:
        shared = min(shared, common_prefix_length(first.input_ids, s.input_ids))
    length = shared + sum(len(s.input_ids) - shared for s in sequences)
    ids = torch.empty(length, dtype=torch.long)  # [L]
    allowed = torch.zeros(length, length, dtype=torch.bool)  # [L, L]
    positions = torch.empty(length, dtype=torch.long)  # [L]
    ids[:shared], positions[:shared] = first.input_ids[:shared], first.position_ids[:shared]
    allowed[:shared, :shared] = first.allowed[:shared, :shared]
    spans, predictors, offset = [], [], shared
    for s in sequences:
        n = len(s.input_ids) - shared
        ids[offset:offset + n] = s.input_ids[shared:]
        positions[offset:offset + n] = s.position_ids[shared:]
        allowed[offset:offset + n, :shared] = s.allowed[shared:, :shared]
        allowed[offset:offset + n, offset:offset + n] = s.allowed[shared:, shared:]
        move = lambda i: i if i < shared else offset + i - shared  # noqa: E731
        spans += [(move(a), move(b - 1) + 1) for a, b in s.spans]
        predictors += [move(s.first_predictor(j)) for j in range(len(s.spans))]
        offset += n
    return TokenSequence(ids, allowed, positions, shared, tuple(spans), tuple(predictors))


def pack_in_budget(sequences: Sequence[TokenSequence], max_tokens: int) -> list[TokenSequence]:
    """Consecutive sequences packed greedily behind their common prefix into sequences of at
    most ``max_tokens`` tokens (one longer than that stays alone). ``max_tokens <= 0``: no
    packing. Order is kept, so response i of the input is response i of the output."""
    if max_tokens <= 0:
        return list(sequences)
    packed, group, shared = [], [], 0
    for s in sequences:
        if group:
            new_shared = min(shared, s.context_end, common_prefix_length(group[0].input_ids, s.input_ids))
            size = new_shared + sum(len(g.input_ids) - new_shared for g in (*group, s))
            if new_shared >= 1 and size <= max_tokens:
                group.append(s)
                shared = new_shared
                continue
            packed.append(pack_shared_prefix(group) if len(group) > 1 else group[0])
        group, shared = [s], s.context_end
    if group:
        packed.append(pack_shared_prefix(group) if len(group) > 1 else group[0])
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
    # Only logits from the first predicting token onward are read: skip the (shared) prompt.
    first = min(s.first_predictor(j) for s in sequences for j in range(len(s.spans)))
    length = batch["input_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"], logits_to_keep=length - first, use_cache=False)
    logits = out.logits  # [B, L - first, V]
    longest = max(max(s.response_lengths) for s in sequences)
    rows, lengths = [], []
    for b, s in enumerate(sequences):
        for j, span in enumerate(s.spans):
            index = (s.predictors(j) - first).to(logits.device)  # [T_r]
            predicting = logits[b].index_select(0, index).float()  # [T_r, V]
            targets = s.input_ids[span[0]:span[1]].to(logits.device)  # [T_r]
            token_logprobs = predicting.log_softmax(-1).gather(-1, targets[:, None])[:, 0]  # [T_r]
            rows.append(torch.nn.functional.pad(token_logprobs, (0, longest - len(targets))))
            lengths.append(len(targets))
    logprobs = torch.stack(rows)  # [R, T]
    mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # [R, T]
    return logprobs, mask.to(logprobs.device)
