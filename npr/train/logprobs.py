"""Per-token log-probabilities of responses under one flat masked forward: THE function that
SFT's loss and both RL stages' policy losses read.

A ``TokenSequence`` is a prompt followed by one or more responses, with the attention pattern
that produced them as ``npr.masks.TreeIds`` (four ids per token, never an L x L matrix) and
position ids: the tree of ``npr.masks.tree_ids_and_positions`` for a structured trace (Stage 2
data, Stage 3 rollouts), or causal ids with ``arange`` positions for plain decoding (Stage 1
rollouts). Several responses to the same prompt can be packed behind one copy of their common
prefix (``pack_shared_prefix``: the whole prompt for the responses to one prompt, the system
instruction for different problems): each sees the prefix and itself, never another, so its
log-probs are those of its own forward while the shared prefix is computed once.

``response_logprobs`` runs a micro-batch of sequences in one of two layouts:

- ``flex``: every sequence of the micro-batch laid end to end in ONE row (document ids keep
  them apart), no padding, and a flex_attention ``BlockMask`` built from the tree ids
  (``npr.masks.tree_block_mask``): memory O(L) beyond the model's activations, fully masked
  tiles skipped. Logits are computed only where a response token is predicted.
- ``dense``: the sequences right-padded into a batch; attention runs by *pieces*
  (``segment_pieces``, the ``npr_segments`` implementation): a packed row's prefix attends to
  itself and each member to the prefix and itself, under additive float masks of the rule, so
  the all-masked member x member blocks are never computed (1.6x faster SFT steps on the tiny
  cold start; docs/performance.md). Masks are O(P^2 + sum (P + n_m) n_m) per row, O(L^2) for a
  row that is not packed. torch 2.13 has no flex_attention backward on CPU, so this is the CPU
  training path; ``resolve_attention`` states the rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from npr.masks import TreeIds, attention_bias, dense_tree_mask, tree_block_mask, tree_ids_and_positions, tree_visible
from npr.train.config import ATTENTION_CHOICES
from npr.train.lm_head import DEFAULT_LOGPROB_CHUNK, output_head, selected_logprobs

FLEX_ATTENTION_NAME = "npr_flex"
# transformers' attention implementation that reads each layout's mask
SEGMENTS_ATTENTION_NAME = "npr_segments"
_IMPLEMENTATION = {"flex": FLEX_ATTENTION_NAME, "dense": SEGMENTS_ATTENTION_NAME}
_compiled_flex = None


def compiled_flex(device_type: str):
    """``torch.compile(flex_attention)``, once per process: with dynamic shapes on CUDA (every
    packed row has another length); with static shapes on CPU, where torch 2.13's inductor
    emits C++ that does not compile ("cur_kvSplitSize6 was not declared") once a kernel
    compiled for one length serves another, dynamically or by automatic dynamic recompilation.
    CPU rows are therefore padded to a power of two (``flex_row_length``): one compile per size.
    """
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=device_type == "cuda")
    return _compiled_flex


def flex_row_length(length: int, device_type: str) -> int:
    """Length a packed row is padded to: the next multiple of flex's 128-token block (CUDA), or
    the next power of two >= 128 (CPU: static-shape compiles, see ``compiled_flex``)."""
    if device_type == "cuda":
        return -(-length // 128) * 128
    return max(128, 1 << (length - 1).bit_length())


def flex_attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The attention of every layer under ``attention: flex``: one ``flex_attention`` call with
    the row's BlockMask, registered with transformers' ``AttentionInterface`` as ``npr_flex``.

    query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None). Compiled once per
    process (``compiled_flex``).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        raise TypeError(
            f"attention {FLEX_ATTENTION_NAME} reads a flex_attention BlockMask, got "
            f"{type(attention_mask).__name__}; build it with npr.masks.tree_block_mask"
        )
    if dropout or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise ValueError(f"attention {FLEX_ATTENTION_NAME} supports no dropout, softcap or attention sinks")
    heads, kv_heads = query.shape[1], key.shape[1]
    gqa = heads != kv_heads
    if gqa and heads & (heads - 1):  # flex's GQA wants a power-of-two head count: expand the keys instead
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
        gqa = False
    flex = compiled_flex(query.device.type)
    out = flex(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)  # [B, Hq, L, D]
    return out.transpose(1, 2).contiguous(), None


def _register_flex() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX_ATTENTION_NAME, flex_attention_forward)


_register_flex()


def resolve_attention(choice: str, device: torch.device) -> str:
    """``flex`` or ``dense`` for a training run on ``device`` (``choice`` other than auto is kept).

    auto: ``flex`` on CUDA (fused kernels, O(L) mask memory: the path NPR's 30k-token traces
    need); ``dense`` on CPU, where torch 2.13's flex_attention has no backward (it raises
    NotImplementedError) and where the dense step is also the faster one at the lengths CPU
    runs train on (measured in docs/performance.md, "Training memory").
    """
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    return "flex" if torch.device(device).type == "cuda" else "dense"


def model_config(model):
    """The HF config of ``model``, through a DDP wrapper (FSDP2 wraps in place)."""
    return getattr(model, "module", model).config


def attention_of(model) -> str:
    """The layout the model's current attention implementation reads: ``flex`` or ``dense``."""
    return "flex" if model_config(model)._attn_implementation == FLEX_ATTENTION_NAME else "dense"


def set_attention(model, attention: str) -> None:
    """Make ``model``'s attention layers read the ``attention`` layout's mask (for a whole run:
    gradient checkpointing recomputes attention during backward, after any context has ended)."""
    model_config(model)._attn_implementation = _IMPLEMENTATION[attention]


@contextlib.contextmanager
def attention_layout(model, attention: str):
    """Temporarily switch the attention implementation (forward passes without backward only)."""
    config = model_config(model)
    previous = config._attn_implementation
    config._attn_implementation = _IMPLEMENTATION[attention]
    try:
        yield
    finally:
        config._attn_implementation = previous


@dataclass(frozen=True)
class TokenSequence:
    """One row of the flat forward (or one document of a packed row).

    input_ids LongTensor[L], tree ``TreeIds`` (who may see whom, O(L)), position_ids
    LongTensor[L]; ``context_end``: length of the prompt (of the shared prefix when packed);
    ``spans``: the [start, end) token range of each response; ``first_predictors``: for each
    response, the index of its prompt's last token, whose logits predict its first token (None:
    ``context_end - 1`` for all). Every later token is predicted from the token before it.
    """

    input_ids: torch.Tensor
    tree: TreeIds
    position_ids: torch.Tensor
    context_end: int
    spans: tuple[tuple[int, int], ...]
    first_predictors: tuple[int, ...] | None = None

    @property
    def allowed(self) -> torch.Tensor:
        """BoolTensor[L, L]: the dense mask of ``tree`` (``npr.masks.tree_visible``), built on demand."""
        return dense_tree_mask(self.tree)

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


def _single(ids: torch.Tensor, tree: TreeIds, positions: torch.Tensor, prompt_length: int) -> TokenSequence:
    return TokenSequence(ids, tree, positions, prompt_length, ((prompt_length, len(ids)),))


def structured_sequence(
    prompt_ids: Sequence[int], response_ids: Sequence[int], tag_ids: Mapping[str, int]
) -> TokenSequence:
    """Prompt + response with the tree ids and positions; ``StructureError`` if malformed."""
    ids = torch.tensor([*prompt_ids, *response_ids], dtype=torch.long)  # [L]
    tree, positions = tree_ids_and_positions(ids, tag_ids, response_start=len(prompt_ids))
    return _single(ids, tree, positions, len(prompt_ids))


def causal_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> TokenSequence:
    """Prompt + response, causal, with ``arange`` positions (plain decoding)."""
    ids = torch.tensor([*prompt_ids, *response_ids], dtype=torch.long)  # [L]
    return _single(ids, TreeIds.causal(len(ids)), torch.arange(len(ids)), len(prompt_ids))


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def pack_shared_prefix(sequences: Sequence[TokenSequence]) -> TokenSequence:
    """Sequences packed behind one copy of their common prefix (never past a prompt's end).

    Each keeps its own tree over the prefix and itself and its own positions; none sees
    another (each is a ``member`` of the pack, the prefix is member -1). For responses to one
    prompt the prefix is the whole prompt; for different problems it is what their prompts
    share (the chat template and the system instruction).
    """
    if any(len(s.spans) != 1 for s in sequences):
        raise ValueError("pack_shared_prefix packs single-response sequences (pack each one only once)")
    first = sequences[0]
    shared = min(s.context_end for s in sequences)
    for s in sequences[1:]:
        shared = min(shared, common_prefix_length(first.input_ids, s.input_ids))
    ids, positions = [first.input_ids[:shared]], [first.position_ids[:shared]]
    prefix = first.tree.slice(0, shared)
    trees = [TreeIds(prefix.document, torch.full_like(prefix.member, -1), prefix.region, prefix.branch)]
    spans, predictors, offset = [], [], shared
    for j, s in enumerate(sequences):
        n = len(s.input_ids) - shared
        ids.append(s.input_ids[shared:])
        positions.append(s.position_ids[shared:])
        rest = s.tree.slice(shared, len(s.input_ids))
        trees.append(TreeIds(rest.document, torch.full_like(rest.member, j), rest.region, rest.branch))
        move = lambda i: i if i < shared else offset + i - shared  # noqa: E731
        spans += [(move(a), move(b - 1) + 1) for a, b in s.spans]
        predictors += [move(s.first_predictor(k)) for k in range(len(s.spans))]
        offset += n
    return TokenSequence(
        torch.cat(ids), TreeIds.cat(trees), torch.cat(positions), shared, tuple(spans), tuple(predictors)
    )


def concat_documents(sequences: Sequence[TokenSequence]) -> TokenSequence:
    """Sequences laid end to end in one row, each its own ``document`` (none sees another):
    the packed layout of a micro-batch, with no padding. Response order is kept."""
    ids, positions, trees, spans, predictors, offset = [], [], [], [], [], 0
    for d, s in enumerate(sequences):
        ids.append(s.input_ids)
        positions.append(s.position_ids)
        trees.append(TreeIds(torch.full_like(s.tree.document, d), s.tree.member, s.tree.region, s.tree.branch))
        spans += [(a + offset, b + offset) for a, b in s.spans]
        predictors += [s.first_predictor(j) + offset for j in range(len(s.spans))]
        offset += len(s.input_ids)
    return TokenSequence(
        torch.cat(ids),
        TreeIds.cat(trees),
        torch.cat(positions),
        sequences[0].context_end,
        tuple(spans),
        tuple(predictors),
    )


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


@dataclass(frozen=True)
class Piece:
    """Queries ``[start, end)`` of a row attend to the keys of ``key_ranges`` under ``bias``
    ([1, 1, end - start, keys], additive)."""

    start: int
    end: int
    key_ranges: tuple[tuple[int, int], ...]
    bias: torch.Tensor


def segment_pieces(s: TokenSequence, dtype: torch.dtype, device) -> list[Piece]:
    """The attention of ``s`` as pieces that skip what the tree never lets anyone see.

    Packed behind a shared prefix (``pack_shared_prefix``: prefix tokens member -1, then each
    member's tokens contiguous), the prefix attends to itself and member m to the prefix and
    itself: work P^2 + sum_m (P + n_m) n_m instead of (P + sum_m n_m)^2. Any other row is one
    piece over all of it. Each piece's bias is ``tree_visible`` on its queries x keys.
    """
    n = len(s.input_ids)
    member = s.tree.member
    shared = s.context_end
    starts = [shared] + [a for a in range(shared + 1, n) if member[a] != member[a - 1]]
    ranges = list(zip(starts, starts[1:] + [n]))
    packed = (
        shared < n
        and bool((member[:shared] < 0).all())
        and len({int(member[a]) for a, _ in ranges}) == len(ranges)
        and bool((member[shared:] >= 0).all())
    )
    if not packed:
        ranges, shared = [], n
    pieces = []
    for start, end, keys in [(0, shared, ((0, shared),))] + [(a, b, ((0, shared), (a, b))) for a, b in ranges]:
        q = torch.arange(start, end)
        k = torch.cat([torch.arange(a, b) for a, b in keys])
        allowed = tree_visible(q[:, None], k[None, :], s.tree)
        pieces.append(Piece(start, end, keys, attention_bias(allowed, dtype)[None, None].to(device)))
    return pieces


def segmented_attention_forward(
    module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, npr_pieces=None, **kwargs
):
    """Attention implementation of the ``dense`` layout: per row, SDPA over each ``Piece`` (queries
    of one segment against the keys they may see), concatenated in token order; pad queries past a
    row's pieces get zeros (no real token reads them). query [B, H, L, D] -> ([B, L, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if npr_pieces is None:  # a plain call of the model (its own mask, or none): transformers' sdpa
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = []
    for b, pieces in enumerate(npr_pieces):
        outs = []
        for p in pieces:
            k = torch.cat([key[b : b + 1, :, a:c] for a, c in p.key_ranges], dim=2)
            v = torch.cat([value[b : b + 1, :, a:c] for a, c in p.key_ranges], dim=2)
            outs.append(
                sdpa_attention_forward(
                    module, query[b : b + 1, :, p.start : p.end], k, v, p.bias, dropout=dropout, scaling=scaling
                )[0]
            )  # [1, q, H, D]
        pad = query.shape[2] - pieces[-1].end
        if pad:
            outs.append(query.new_zeros(1, pad, query.shape[1], query.shape[3]))
        rows.append(torch.cat(outs, dim=1))
    return torch.cat(rows, dim=0), None


AttentionInterface.register(SEGMENTS_ATTENTION_NAME, segmented_attention_forward)


def _dense_inputs(
    sequences: Sequence[TokenSequence], pad_token_id: int, dtype: torch.dtype, device: torch.device
) -> tuple[dict, int]:
    """The right-padded batch of the dense layout, as model inputs (ids, positions, attention pieces from
    ``segment_pieces``), and its length L."""
    length = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)  # [B, L]
    position_ids = torch.zeros((len(sequences), length), dtype=torch.long)  # [B, L]
    for b, s in enumerate(sequences):
        input_ids[b, : len(s.input_ids)] = s.input_ids
        position_ids[b, : len(s.input_ids)] = s.position_ids
    pieces = [segment_pieces(s, dtype, device) for s in sequences]
    return dict(input_ids=input_ids.to(device), position_ids=position_ids.to(device), npr_pieces=pieces), length


def _dense_logits(
    model, sequences: Sequence[TokenSequence], pad_token_id: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Right-padded batch, attention by pieces (``segment_pieces``); per response its predicting
    logits [T_r, V]."""
    inputs, length = _dense_inputs(sequences, pad_token_id, dtype, next(model.parameters()).device)
    # Only logits from the first predicting token onward are read: skip the (shared) prompt.
    first = min(s.first_predictor(j) for s in sequences for j in range(len(s.spans)))
    logits = model(**inputs, logits_to_keep=length - first, use_cache=False).logits  # [B, L - first, V]
    return [
        logits[b].index_select(0, (s.predictors(j) - first).to(logits.device))
        for b, s in enumerate(sequences)
        for j in range(len(s.spans))
    ]


def _flex_inputs(
    sequences: Sequence[TokenSequence], pad_token_id: int, device: torch.device
) -> tuple[TokenSequence, dict, torch.Tensor]:
    """The flex layout's one packed row (document ids, no padding but the tail to ``flex_row_length``), its model
    inputs (ids, positions, the BlockMask of its tree) and its predicting positions [P]."""
    row = concat_documents(sequences)
    n = len(row.input_ids)
    pad = flex_row_length(n, device.type) - n  # < 128 tokens on CUDA; pads form their own document
    ids = torch.nn.functional.pad(row.input_ids, (0, pad), value=pad_token_id)[None].to(device)  # [1, L']
    positions = torch.nn.functional.pad(row.position_ids, (0, pad))[None].to(device)  # [1, L']
    tree = TreeIds.cat([row.tree, TreeIds(*(torch.full((pad,), -1, dtype=torch.long) for _ in range(4)))])
    keep = torch.cat([row.predictors(j) for j in range(len(row.spans))]).to(device)  # [P]
    return row, dict(input_ids=ids, position_ids=positions, attention_mask=tree_block_mask(tree, device)), keep


def _flex_logits(model, sequences: Sequence[TokenSequence], pad_token_id: int) -> list[torch.Tensor]:
    """One packed row (document ids, no padding) under a flex_attention BlockMask; logits only
    at the predicting positions. Per response its predicting logits [T_r, V]."""
    row, inputs, keep = _flex_inputs(sequences, pad_token_id, next(model.parameters()).device)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0]  # [P, V]
    return list(logits.split(row.response_lengths))


def _layout(model, attention: str):
    """A context in which ``model`` reads the ``attention`` layout's mask (checks first: see the errors)."""
    device = next(model.parameters()).device
    current = model_config(model)._attn_implementation
    if (
        current != _IMPLEMENTATION[attention]
        and torch.is_grad_enabled()
        and getattr(getattr(model, "module", model), "is_gradient_checkpointing", False)
    ):
        raise RuntimeError(
            f"the model's attention is {current!r}, not the {attention} layout's: with gradient "
            "checkpointing the backward pass recomputes attention after this call, so call "
            f"set_attention(model, {attention!r}) first"
        )
    if attention == "flex" and device.type == "cpu" and torch.is_grad_enabled():
        raise RuntimeError(
            "flex_attention has no backward on CPU (torch 2.13); train with attention dense "
            "(auto picks it on CPU), or run this forward under torch.no_grad()"
        )
    if current == _IMPLEMENTATION[attention]:
        return contextlib.nullcontext()
    return attention_layout(model, attention)


def response_logits(
    model,
    sequences: Sequence[TokenSequence],
    pad_token_id: int,
    mask_dtype: torch.dtype | None = None,
    attention: str | None = None,
) -> list[torch.Tensor]:
    """Per response (in sequence, then span order) the logits that predict its tokens:
    FloatTensor[T_r, V] each, from the ``flex`` or ``dense`` layout. The full-vocabulary path:
    for checks and benchmarks that read logits (training reads ``response_logprobs``)."""
    attention = attention or attention_of(model)
    with _layout(model, attention):
        if attention == "flex":
            return _flex_logits(model, sequences, pad_token_id)
        return _dense_logits(model, sequences, pad_token_id, mask_dtype or next(model.parameters()).dtype)


def body_hidden_states(model, **inputs) -> torch.Tensor:
    """The final hidden states [B, L, H] of ``model``'s body (after its last norm), from a call
    of the whole model (so DDP's and FSDP2's hooks run: the root unit's embedding, norm and head
    are gathered) whose ``lm_head`` sees no position (``logits_to_keep`` empty)."""
    unwrapped = getattr(model, "module", model)
    body = getattr(unwrapped, unwrapped.base_model_prefix)
    captured: list[torch.Tensor] = []
    handle = body.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    device = inputs["input_ids"].device
    try:
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device), use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def _dense_hidden(model, sequences: Sequence[TokenSequence], pad_token_id: int, dtype: torch.dtype) -> torch.Tensor:
    """Right-padded batch, attention by pieces (``segment_pieces``); the hidden states at every
    response's predicting positions, in sequence then span order: [P, H]."""
    inputs, length = _dense_inputs(sequences, pad_token_id, dtype, next(model.parameters()).device)
    hidden = body_hidden_states(model, **inputs)  # [B, L, H]
    flat = torch.cat([s.predictors(j) + b * length for b, s in enumerate(sequences) for j in range(len(s.spans))])
    return hidden.flatten(0, 1).index_select(0, flat.to(hidden.device))  # [P, H]


def _flex_hidden(model, sequences: Sequence[TokenSequence], pad_token_id: int) -> torch.Tensor:
    """One packed row (document ids, no padding) under a flex_attention BlockMask; the hidden
    states at the predicting positions [P, H]."""
    _, inputs, keep = _flex_inputs(sequences, pad_token_id, next(model.parameters()).device)
    return body_hidden_states(model, **inputs)[0].index_select(0, keep)  # [P, H]


def response_hidden(
    model,
    sequences: Sequence[TokenSequence],
    pad_token_id: int,
    mask_dtype: torch.dtype | None = None,
    attention: str | None = None,
) -> torch.Tensor:
    """The body's hidden states at every response token's predicting position, responses in
    sequence then span order: FloatTensor[P, H] (P = all response tokens), from the ``flex`` or
    ``dense`` layout (see ``response_logprobs``)."""
    attention = attention or attention_of(model)
    with _layout(model, attention):
        if attention == "flex":
            return _flex_hidden(model, sequences, pad_token_id)
        return _dense_hidden(model, sequences, pad_token_id, mask_dtype or next(model.parameters()).dtype)


def response_logprobs(
    model,
    sequences: Sequence[TokenSequence],
    pad_token_id: int,
    mask_dtype: torch.dtype | None = None,
    attention: str | None = None,
    temperature: float = 1.0,
    untempered: bool = False,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK,
):
    """Log-probs of every response token under one masked forward of ``model``.

    The model's body gives the hidden states at the predicting positions; the output head,
    the temperature, the logsumexp and the gather then run ``chunk_size`` tokens at a time,
    recomputed in the backward (``npr.train.lm_head.selected_logprobs``), so no ``[T, V]``
    logits are ever held: beyond the hidden states the memory is one chunk's ``[C, V]``.

    Args:
        model: an HF causal LM (possibly wrapped by DDP/FSDP); gradients flow.
        sequences: B sequences holding R responses in all, each response >= 1 token.
        pad_token_id: id used for right padding in the dense layout (its positions are masked out).
        mask_dtype: dtype of the dense layout's additive mask (default: the model's parameter dtype).
        attention: ``flex`` (one packed row, BlockMask) or ``dense`` (padded batch, float mask);
            None follows the model's attention implementation (``set_attention``).
        temperature: the logits are divided by it before the softmax (> 0), so the log-probs
            are those of the distribution the rollouts were sampled from, as NPR's code (verl's
            ``logits.div_(temperature)``) trains; 0 (greedy rollouts) counts as 1.
        untempered: also return the temperature-1 log-probs (detached), e.g. to compare with
            the engine's, which are always the model's own (temperature 1).
        chunk_size: tokens per chunk of the output head (the config's ``logprob_chunk_size``).

    Returns:
        logprobs FloatTensor[R, T] (float32; T = longest response; rows in sequence, then
        span order), entry (r, t) is ``log p(token t of response r | its visible context)``,
        0 past a response's end; mask BoolTensor[R, T], True on real response tokens; with
        ``untempered`` a third FloatTensor[R, T], the temperature-1 log-probs without grad.
    """
    if any(s.context_end < 1 or min(s.response_lengths) < 1 for s in sequences):
        raise ValueError("every sequence needs a prompt (>= 1 token) and responses of >= 1 token")
    hidden = response_hidden(model, sequences, pad_token_id, mask_dtype, attention)  # [P, H]
    targets = torch.cat([s.input_ids[a:b] for s in sequences for a, b in s.spans]).to(hidden.device)  # [P]
    lengths = [b - a for s in sequences for a, b in s.spans]
    token = selected_logprobs(hidden, output_head(model), targets, temperature, chunk_size, untempered)
    logprobs = _rows(token.logprobs, lengths)  # [R, T]
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).to(logprobs.device)  # [R, T]
    if untempered:
        return logprobs, mask, _rows(token.untempered, lengths)
    return logprobs, mask


def _rows(flat: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """[P] values split into rows of ``lengths``, right-padded with 0: [R, max(lengths)]."""
    return torch.nn.utils.rnn.pad_sequence(list(flat.split(list(lengths))), batch_first=True)
