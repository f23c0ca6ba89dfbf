"""Stage-2 data: the JSONL written by ``npr sample`` (or any file in its layout), tokenized
into tree-masked sequences; plus a small synthetic set for the smoke preset.

Layout, one object per line (other keys are provenance and are ignored)::

    {"id": "...", "problem": "...", "answer": "...", "response": "<guideline>…\\boxed{…}"}

A line that is not JSON, or lacks one of these fields, stops the run before any compute with
an error naming the file, line and field. A response whose tokens do not form the NPR
structure, or that is too long, is dropped and counted: it never crashes the run.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from npr.data import DataError
from npr.data.errors import DataFileError
from npr.data.jsonl import decode_utf8
from npr.masks import has_complete_blocks
from npr.prompts import encode_prompt
from npr.schema import validate

SFT_FIELDS = ("id", "problem", "answer", "response")
SYNTHETIC_PREFIX = "synthetic:"
SAMPLE_FILE = "data.jsonl"  # what `npr sample --out DIR` writes


@dataclass(frozen=True)
class SftExample:
    id: str
    problem: str
    answer: str
    response: str


@dataclass(frozen=True)
class TokenizedExample:
    """Prompt ids (chat template, NPR instruction) and response ids (ending with EOS)."""

    id: str
    prompt_ids: list[int]
    response_ids: list[int]


def _field(row: dict, name: str, path: str, lineno: int) -> str:
    if name not in row:
        raise DataFileError(
            path, lineno, name, "missing", f"every line needs {', '.join(SFT_FIELDS)} (the layout `npr sample` writes)"
        )
    value = row[name]
    if not isinstance(value, str) or not value.strip():
        raise DataFileError(
            path,
            lineno,
            name,
            f"must be a non-empty string, got {json.dumps(value)[:40]}",
            "fill it in or delete the line",
        )
    from npr.validate import unicode_problem

    if unicode_problem(value):
        raise DataFileError(path, lineno, name, unicode_problem(value), "write valid Unicode text")
    return value


def read_sft_jsonl(path: str | Path, allow_empty: bool = False) -> list[SftExample]:
    """Every example of an SFT JSONL file; raises ``DataError`` / ``DataFileError`` on bad input
    (and on a file without examples unless ``allow_empty``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; give the JSONL that `npr sample` wrote (its --out directory holds data.jsonl)"
        )
    examples = []
    for lineno, line in enumerate(decode_utf8(path.read_bytes(), str(path)).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(
                str(path),
                lineno,
                None,
                f"not valid JSON ({e.msg} at column {e.colno})",
                "write one JSON object per line",
            ) from e
        if not isinstance(row, dict):
            raise DataFileError(str(path), lineno, None, "not a JSON object", "write one object per line")
        examples.append(SftExample(*(_field(row, name, str(path), lineno) for name in SFT_FIELDS)))
    if not examples and not allow_empty:
        raise DataError(
            f"{path} holds no examples (an empty dataset): rejection sampling kept nothing? "
            "Check `npr sample`'s summary.json, sample more tries, or train Stage 1 longer"
        )
    return examples


def synthetic_examples(spec: str) -> list[SftExample]:
    """Programmatic canonical traces (not self-distilled: smoke data, or a primer_data mix).

    ``synthetic:arith?n=12&seed=0``: ``What is a + b?`` split into tens and units;
    ``synthetic:chain_sum?size=64&seed=3&terms=2&digits=1``: the problems of that reasoning-gym
    spec (2 terms), computed directly in one branch and by counting in the other.
    """
    kind, _, query = spec[len(SYNTHETIC_PREFIX) :].partition("?")
    if kind == "chain_sum":
        return _chain_sum_traces(query)
    if kind != "arith":
        raise DataError(
            f"{spec!r}: unknown synthetic set {kind!r}; use synthetic:arith?n=N&seed=S or "
            "synthetic:chain_sum?size=N&seed=S&terms=2&digits=1"
        )
    params = dict(parse_qsl(query))
    rng = random.Random(int(params.get("seed", 0)))
    examples = []
    for i in range(int(params.get("n", 12))):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        tens, units = (a // 10 + b // 10) * 10, a % 10 + b % 10
        response = (
            f"<guideline>\n<plan>1: add the tens of {a} and {b}</plan>\n<plan>2: add the units</plan>\n"
            f"</guideline>\n<step>\n1: {a // 10 * 10} + {b // 10 * 10} = {tens}\n</step>\n"
            f"<step>\n2: {a % 10} + {b % 10} = {units}\n</step>\n<takeaway>\n{tens} + {units} = {a + b}\n"
            f"</takeaway>\nThe answer is \\boxed{{{a + b}}}."
        )
        examples.append(SftExample(f"arith-{i}", f"What is {a} + {b}?", str(a + b), response))
    return examples


_TWO_TERMS = re.compile(r"(\d+) ([+-]) (\d+) =\s*$")


def _chain_sum_traces(query: str) -> list[SftExample]:
    from npr.data import load_problems

    examples = []
    for p in load_problems(f"rg:chain_sum?{query}"):
        match = _TWO_TERMS.search(p.problem)
        if match is None:
            raise DataError(f"synthetic:chain_sum needs 2-term problems (terms=2); {p.id} is {p.problem!r}")
        a, op, b = match.groups()
        step = 1 if op == "+" else -1
        counted = ", ".join(str(int(a) + step * k) for k in range(int(b) + 1)) + f": {b} step(s) from {a}"
        inverse = f"{p.answer} {'-+'[op == '-']} {b} = {a}"
        plan2, step2 = (
            (f"count from {a} by {'ones' if op == '+' else 'minus ones'}, {b} times", counted)
            if int(b) <= 12
            else ("check with the inverse operation", inverse)
        )
        response = (
            f"<guideline>\n<plan>1: compute {a} {op} {b} directly</plan>\n<plan>2: {plan2}</plan>\n"
            f"</guideline>\n<step>\n1: {a} {op} {b} = {p.answer}\n</step>\n<step>\n2: {step2}\n</step>\n"
            f"<takeaway>\nboth steps end at {p.answer}\n</takeaway>\nThe answer is \\boxed{{{p.answer}}}."
        )
        examples.append(SftExample(f"synthetic-{p.id}", p.problem, p.answer, response))
    return examples


def load_sft_examples(spec: str, limit: int | None = None, allow_empty: bool = False) -> list[SftExample]:
    """Examples of ``spec``: a JSONL file, a directory from ``npr sample`` (its data.jsonl), or synthetic:…"""
    if spec.startswith(SYNTHETIC_PREFIX):
        examples = synthetic_examples(spec)
    else:
        path = Path(spec)
        examples = read_sft_jsonl(path / SAMPLE_FILE if path.is_dir() else path, allow_empty)
    return examples if limit is None else examples[:limit]


def tokenize_examples(
    examples: list[SftExample], tokenizer, tag_ids: dict[str, int], max_seq_len: int, prompt_options: dict | None = None
) -> tuple[list[TokenizedExample], Counter]:
    """Tokenized examples whose structure holds, and the count of dropped ones by reason
    (``schema_structural``: tags out of place in the text; ``structure``: the token sequence
    does not form the tree; ``too_long``: over ``max_seq_len``). ``prompt_options``: the
    instruction keywords of ``encode_prompt`` (``InstructionConfig.prompt_options``)."""
    kept, dropped = [], Counter()
    eos = tokenizer.eos_token_id
    for ex in examples:
        if any(e.structural for e in validate(ex.response)):
            dropped["schema_structural"] += 1
            continue
        prompt = encode_prompt(tokenizer, ex.problem, "npr", **(prompt_options or {}))
        response = tokenizer.encode(ex.response, add_special_tokens=False) + [eos]
        if len(prompt) + len(response) > max_seq_len:
            dropped["too_long"] += 1
            continue
        if not has_complete_blocks(prompt, response, tag_ids):
            dropped["structure"] += 1
            continue
        kept.append(TokenizedExample(ex.id, prompt, response))
    return kept, dropped
