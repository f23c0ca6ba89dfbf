"""npr.tokens: the 8 tags as special tokens, mean-initialised, idempotent, saved and reloaded."""

from __future__ import annotations

import torch

from npr.models import _byte_tokenizer, _tiny_config, save_model
from npr.schema import TAGS
from npr.tokens import add_tag_tokens, tag_token_ids


def _untagged(spec: str):
    from transformers import AutoModelForCausalLM

    tok = _byte_tokenizer()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_tiny_config(spec, len(tok))), tok


def test_tags_become_single_tokens_with_mean_init():
    model, tok = _untagged("tiny-random-llama")  # untied head
    old_embed = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    added = add_tag_tokens(model, tok)
    assert added == list(TAGS)
    ids = tag_token_ids(tok)
    assert len(set(ids.values())) == 8
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape[0] == len(tok) == old_embed.shape[0] + 8
    assert torch.equal(embed[: old_embed.shape[0]], old_embed)  # old rows untouched
    for tag, i in ids.items():
        base = tok.encode(tag.strip("</>"), add_special_tokens=False)
        assert torch.allclose(embed[i], old_embed[base].mean(0))
        assert torch.allclose(head[i], old_head[base].mean(0))
    # "guideline" and "</guideline>" share a base word, hence an initial row
    assert torch.equal(embed[ids["<step>"]], embed[ids["</step>"]])


def test_tied_head_stays_tied():
    model, tok = _untagged("tiny-random-qwen3")
    add_tag_tokens(model, tok)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_idempotent():
    model, tok = _untagged("tiny-random-llama")
    add_tag_tokens(model, tok)
    with torch.no_grad():  # pretend training moved a tag row
        model.get_input_embeddings().weight[tag_token_ids(tok)["<plan>"]] += 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(tok)
    assert add_tag_tokens(model, tok) == []
    assert len(tok) == n
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tags_split_text_and_keep_whitespace():
    _, tok = _untagged("tiny-random-llama")
    add_tag_tokens(None, tok)
    ids = tok.encode("a<step>\n1: x</step>\n", add_special_tokens=False)
    t = tag_token_ids(tok)
    assert t["<step>"] in ids and t["</step>"] in ids
    assert tok.decode(ids) == "a<step>\n1: x</step>\n"


def test_saved_checkpoint_reloads_in_vanilla_transformers(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_llama
    out = save_model(model, tok, tmp_path / "ckpt")
    tok2 = AutoTokenizer.from_pretrained(out)
    model2 = AutoModelForCausalLM.from_pretrained(out)
    assert tag_token_ids(tok2) == tag_token_ids(tok)
    text = "<guideline>\n<plan>1: a</plan>\n</guideline>\n"
    assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model2(ids).logits, atol=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind
