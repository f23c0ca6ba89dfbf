"""The checks every command shares, run before anything expensive: ranges, booleans, output paths,
environment variables, a model's config.json and text at the edges.

Each raises an ``NprError`` (one line, exit 2) that names the flag, variable, file or field and
says what to do. ``npr.cli.args`` wraps the flag checks as argparse types; the training configs,
the model loader, the data readers, ``npr view`` and ``npr serve`` call the others.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from npr.errors import NprError, UsageError

SEED_LIMIT = 2**32  # numpy's RandomState and torch.manual_seed on every platform take 0 <= seed < 2**32
TRUE_WORDS, FALSE_WORDS = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
# config.json fields that size a model: when present each must be a positive integer
MODEL_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


# ----------------------------------------------------------------------------- values


def parse_bool(text: str, what: str) -> bool:
    """``0/1/true/false/on/off/yes/no`` (any case, spaces around allowed); anything else is refused."""
    word = text.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise UsageError(f"{what}={text!r} is not a boolean; use one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}")


def env_bool(name: str, default: bool) -> bool:
    """The boolean environment variable ``name`` (unset or empty: ``default``)."""
    value = os.environ.get(name)
    return default if value is None or not value.strip() else parse_bool(value, f"${name}")


def seed_problem(value) -> str | None:
    """Why ``value`` cannot be a seed (None: it can)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, got {value!r}"
    if not 0 <= value < SEED_LIMIT:
        return f"must lie in [0, 2**32), got {value}"
    return None


def finite_positive_problem(value) -> str | None:
    """Why ``value`` is not a finite number > 0 (a penalty, a memory size); None when it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    return None if value > 0 else f"must be > 0, got {value}"


def device_memory_bytes(device: str) -> int | None:
    """Total memory of ``device``: the GPU's for cuda, physical RAM for cpu; None where unknown."""
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(int(index or torch.cuda.current_device())).total_memory
    if kind == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_kv_cache_gib(gib: float, device: str, what: str = "--kv-cache-gib") -> None:
    """A KV pool of ``gib`` GiB is > 0 and fits in the memory ``device`` has (not counting the model)."""
    problem = finite_positive_problem(gib)
    if problem:
        raise UsageError(f"{what} {problem}")
    total = device_memory_bytes(device)
    if total is not None and gib * 2**30 > total:
        raise UsageError(
            f"{what} {gib:g} is more than the {total / 2**30:.1f} GiB of memory {device} has; "
            "give a smaller pool (it also has to leave room for the model)"
        )


def check_rollout_memory(config) -> None:
    """A training or sampling config's KV pool (``kv_cache_gib`` unless ``kv_cache_tokens`` is set) fits
    the device its rollouts run on (the first GPU when there is one, else the CPU)."""
    if getattr(config, "kv_cache_gib", None) is None or getattr(config, "kv_cache_tokens", None) is not None:
        return
    import torch

    check_kv_cache_gib(config.kv_cache_gib, "cuda" if torch.cuda.is_available() else "cpu", "--kv-cache-gib")


# ----------------------------------------------------------------------------- paths


def check_cache_dir() -> None:
    """``$NPR_CACHE_DIR``, when set, is a directory or can be made one."""
    value = os.environ.get("NPR_CACHE_DIR")
    if value is None or not value:
        return
    path = Path(value).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"$NPR_CACHE_DIR={value}: {existing} is a file, not a directory; point NPR_CACHE_DIR at a "
            "directory (or unset it for ~/.cache/npr)"
        )


def probe_writable(directory: Path, what: str) -> None:
    """Create and remove a file in the existing ``directory``: permissions, read-only mounts and full
    quotas all show here, before a model is loaded. The directory's timestamps are put back."""
    before = directory.stat()
    probe = directory / f".npr-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise UsageError(
            f"{what}: cannot write in {directory} ({e.strerror}); choose another {what.split()[0]}"
        ) from None
    os.close(fd)
    os.unlink(probe)
    try:
        os.utime(directory, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError:  # only the owner may set times (a shared /tmp): the probe itself is gone all the same
        pass


# ----------------------------------------------------------------------------- models


def check_model_config(path: Path) -> dict:
    """``path/config.json`` as a dict, refused when it is not JSON, its ``model_type`` is not a causal
    LM that transformers knows, or a size field is not a positive integer (file and field named)."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NprError(
            f"{config_file} cannot be read ({type(e).__name__}: {e}); re-save or re-copy the model"
        ) from None
    if not isinstance(config, dict):
        raise NprError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        import difflib

        close = difflib.get_close_matches(str(model_type), list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=1)
        raise NprError(
            f"{config_file}: field 'model_type' is {model_type!r}, not a causal LM this transformers "
            "knows"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + "; npr runs decoder-only models such as llama, qwen2 or qwen3"
        )
    for name in MODEL_SIZE_FIELDS:
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise NprError(
                f"{config_file}: field {name!r} must be a positive integer, got {value!r}; fix the file "
                "or re-save the model"
            )
    return config


# ----------------------------------------------------------------------------- text


def unicode_problem(text: str, escaped_bytes: bool = False) -> str | None:
    """Why ``text`` cannot go to a tokenizer (None: it can): a lone surrogate, e.g. from JSON's ``\\ud800``.
    With ``escaped_bytes`` (argv, or stdin decoded with surrogateescape) U+DC80..U+DCFF are named as the
    bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        where = f"at character {e.start}"
        if escaped_bytes and 0xDC80 <= ord(char) <= 0xDCFF:
            return f"holds the byte 0x{ord(char) - 0xDC00:02x}, which is not UTF-8 ({where})"
        return f"holds a lone surrogate U+{ord(char):04X}, which is not valid Unicode ({where})"
    return None


def check_text(text: str, what: str, escaped_bytes: bool = False) -> str:
    """``text`` unchanged, or ``UsageError`` naming ``what`` (a flag, ``file:line: field``) when it holds
    invalid Unicode (see ``unicode_problem``)."""
    problem = unicode_problem(text, escaped_bytes)
    if problem:
        raise UsageError(f"{what} {problem}; give UTF-8 text")
    return text


def invalid_text_field(value, path: str = "") -> tuple[str, str] | None:
    """(field path, problem) of the first string inside a JSON value that holds invalid Unicode."""
    if isinstance(value, str):
        problem = unicode_problem(value)
        return (path or "(the value)", problem) if problem else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        key_problem = unicode_problem(key) if isinstance(key, str) else None
        if key_problem:
            return (f"{path}.<key>" if path else "<key>", key_problem)
        found = invalid_text_field(
            item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        )
        if found:
            return found
    return None
