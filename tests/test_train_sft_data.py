"""Stage-2 data: strict reading, drops counted by reason, synthetic traces valid and correct."""

from __future__ import annotations

import json

import pytest

from npr.data import DataError, load_problems
from npr.data.errors import DataFileError
from npr.rewards import is_correct
from npr.schema import validate
from npr.tokens import tag_token_ids
from npr.train.sft_data import load_sft_examples, read_sft_jsonl, synthetic_examples, tokenize_examples


@pytest.mark.parametrize(
    "spec,problems",
    [
        ("synthetic:chain_sum?size=40&seed=3&terms=2&digits=1", "rg:chain_sum?size=40&seed=3&terms=2&digits=1"),
        ("synthetic:chain_sum?size=10&seed=4&terms=2&digits=2", "rg:chain_sum?size=10&seed=4&terms=2&digits=2"),
    ],
)
def test_synthetic_chain_sum_traces_are_valid_and_correct(spec, problems):
    examples = synthetic_examples(spec)
    for example, problem in zip(examples, load_problems(problems), strict=True):
        assert validate(example.response) == [], example.response
        assert is_correct(example.response, problem) and example.problem == problem.problem


def test_synthetic_arith_is_valid():
    assert all(validate(e.response) == [] for e in synthetic_examples("synthetic:arith?n=8&seed=1"))
    with pytest.raises(DataError, match="unknown synthetic set"):
        synthetic_examples("synthetic:poetry")


def test_bad_lines_name_file_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    row = {"id": "a", "problem": "p", "answer": "1", "response": "r"}
    path.write_text(json.dumps(row) + "\n\n{not json\n")
    with pytest.raises(DataFileError, match=f"{path}:3: not valid JSON"):
        read_sft_jsonl(path)
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "response": ""}) + "\n")
    with pytest.raises(DataFileError, match=f"{path}:2: field 'response'"):
        read_sft_jsonl(path)


def test_directory_spec_reads_data_jsonl_and_empty_is_an_error(tmp_path):
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        load_sft_examples(str(tmp_path))
    assert load_sft_examples(str(tmp_path), allow_empty=True) == []


def test_tokenize_drops_and_counts(tiny_llama):
    _, tok = tiny_llama
    good = synthetic_examples("synthetic:arith?n=3")
    broken = good[0].__class__("x", "q", "1", "<step>\n1: stray\n</step>\n\\boxed{1}")
    long = good[1].__class__("y", "q" * 3000, "1", good[1].response)
    kept, dropped = tokenize_examples([*good, broken, long], tok, tag_token_ids(tok), max_seq_len=2000)
    assert [k.id for k in kept] == [g.id for g in good]
    assert dropped == {"schema_structural": 1, "too_long": 1}
    assert all(k.response_ids[-1] == tok.eos_token_id for k in kept)  # the model learns to stop
