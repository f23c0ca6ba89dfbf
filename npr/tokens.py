"""The 8 NPR tags as single special tokens, in every stage (NPR arXiv 2512.07461 §3.2).

``add_tag_tokens`` adds them to a tokenizer and a model. Each new embedding row starts as the
mean of the embeddings of its base word's sub-tokens (``<takeaway>`` from "take" + "away"),
and so does an untied ``lm_head`` row; a tied head stays tied. It is idempotent: rows of tags
already present are left alone, so it is safe on a model that was trained with them.
"""

from __future__ import annotations

import torch

from npr.schema.canonical import TAGS


def _base_word(tag: str) -> str:
    return tag.strip("</>")


def tag_token_ids(tokenizer) -> dict[str, int]:
    """tag string -> token id; raises if a tag is not one token (call ``add_tag_tokens``)."""
    ids = {}
    for tag in TAGS:
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"{tag!r} is {len(encoded)} tokens in this tokenizer, not one; "
                "load the model through npr.models (which adds the tags) or call npr.tokens.add_tag_tokens"
            )
        ids[tag] = encoded[0]
    return ids


def add_tag_tokens(model, tokenizer) -> list[str]:
    """Add the 8 tags as special tokens to ``tokenizer`` and ``model``; return the tags added.

    Embeddings are resized only when the tokenizer outgrows them (Qwen models keep spare rows).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in TAGS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if model is None:
        return missing
    embed = model.get_input_embeddings()
    if len(tokenizer) > embed.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    with torch.no_grad():
        for tag in missing:
            new_id = tokenizer.convert_tokens_to_ids(tag)
            base_ids = tokenizer.encode(_base_word(tag), add_special_tokens=False)
            if not base_ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in base_ids):
                raise ValueError(f"cannot initialise {tag}: its base word tokenizes to unknown tokens {base_ids}")
            embed.weight[new_id] = embed.weight[base_ids].mean(dim=0)
            if head is not None and not tied:
                head.weight[new_id] = head.weight[base_ids].mean(dim=0)
    return missing
