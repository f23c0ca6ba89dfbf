"""npr.models: specs, errors, the embedded model's cache."""

from __future__ import annotations

import pytest
import torch

from npr.models import ModelSpecError, load_model, load_model_and_tokenizer, load_tokenizer
from npr.prompts import encode_prompt, prompt_text


@pytest.mark.parametrize("spec", ["tiny-random-llama", "tiny-random-qwen3"])
def test_tiny_models_are_seeded_and_tagged(spec):
    m1, tok = load_model_and_tokenizer(spec)
    m2 = load_model(spec, tokenizer=tok)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert m1.get_input_embeddings().weight.shape[0] == len(tok)
    assert not m1.training


def test_dtype_and_device():
    model = load_model("tiny-random-llama", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "unknown model spec"),
        ("./missing/dir", "does not exist"),
        ("a/b/c", "does not exist"),
    ],
)
def test_bad_specs_are_clear(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        load_tokenizer(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSpecError, match="without config.json"):
        load_model(str(tmp_path))


def test_offline_hub_id_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSpecError, match="HF_HUB_OFFLINE=1.*hf download"):
        load_tokenizer("nobody-here/not-a-model")


def test_prompt_uses_chat_template(tiny_llama):
    _, tok = tiny_llama
    text = prompt_text(tok, "What is 2+2?")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "What is 2+2?" in text
    ids = encode_prompt(tok, "What is 2+2?", style="plain")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="empty problem"):
        encode_prompt(tok, "  ")


@pytest.mark.slow
def test_embedded_model_loads_from_cache(embedded, tmp_path, monkeypatch):
    from npr.models import embedded_model_dir

    model, tok = embedded
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (embedded_model_dir() / "model.safetensors").is_file()
    assert not hasattr(model.config, "quantization_config")
    ids = torch.tensor([encode_prompt(tok, "What is 2+2?", style="plain")])
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() != ""


@pytest.mark.slow
def test_embedded_cache_is_atomic(tmp_path, monkeypatch):
    """An interrupted conversion leaves no cache entry; the next load converts again."""
    import npr.models as models

    monkeypatch.setenv("NPR_CACHE_DIR", str(tmp_path))
    calls = []

    def boom(self, *a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir()
    assert calls and list((tmp_path / "models").iterdir()) == []
