"""npr.data: strict JSONL problems, benchmarks by name, reasoning-gym specs, the hub fallback."""

from __future__ import annotations

import json
import sys
import types

import pytest

from npr.data import (
    BENCHMARKS,
    DataError,
    DataFileError,
    MissingBenchmarkError,
    Problem,
    UnknownSpecError,
    load_problems,
    parse_rg_spec,
    read_problems_jsonl,
    split_specs,
)
from npr.data.gym import parse_value
from npr.data.hub import answer_text, parse_hf_spec

GOOD = '{"id": "a", "problem": "1+1?", "answer": "2"}'


def write(tmp_path, *lines: str, name: str = "p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- strict JSONL -----------------------------------------------------------------------------

BAD_LINES = [  # (second line of the file, field named in the error or None, words in the message)
    ("{not json", None, "not valid JSON"),
    ('["id", "problem"]', None, "not an object"),
    ('{"id": "b", "problem": "x"}', "answer", "missing"),
    ('{"id": "b", "problem": "   ", "answer": "1"}', "problem", "empty"),
    ('{"id": "b", "problem": "x", "answer": 42}', "answer", "not a string"),
    ('{"id": 7, "problem": "x", "answer": "1"}', "id", "not a string"),
    ('{"id": "a", "problem": "again", "answer": "3"}', "id", "duplicate id 'a' (first on line 1)"),
]


@pytest.mark.parametrize("line,field,words", BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, line, field, words):
    path = write(tmp_path, GOOD, line)
    with pytest.raises(DataFileError) as info:
        read_problems_jsonl(path)
    message = str(info.value)
    assert f"{path}:2" in message and words in message
    assert info.value.line == 2 and info.value.field == field
    if field:
        assert f"field {field!r}" in message


def test_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, GOOD, "", '{"id": "b", "problem": "x"}')
    with pytest.raises(DataFileError, match=r":3: field 'answer'"):
        read_problems_jsonl(path)


def test_good_file_keeps_order_ignores_extra_keys_and_sets_source(tmp_path):
    path = write(tmp_path, GOOD, "", '{"id": "b", "problem": "2+2?", "answer": "4", "level": 3}')
    problems = read_problems_jsonl(path, source="mine")
    assert problems == [Problem("a", "1+1?", "2", "mine"), Problem("b", "2+2?", "4", "mine")]
    assert read_problems_jsonl(path)[0].source == str(path)


def test_non_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin.jsonl"
    data = (GOOD + "\n").encode() + b'{"id": "b", "problem": "caf\xe9", "answer": "1"}\n'
    path.write_bytes(data)
    offset = len(GOOD) + 1 + len('{"id": "b", "problem": "caf')  # hand-counted: the \xe9 byte
    with pytest.raises(DataError, match=rf"not UTF-8: byte offset {offset} \(line 2\)"):
        read_problems_jsonl(path)


def test_utf8_bom_and_u2028_inside_strings_are_fine(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"id": "a", "problem": "x\u2028y", "answer": "1"}\n'.encode())
    assert read_problems_jsonl(path)[0].problem == "x\u2028y"


def test_empty_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="holds no problems"):
        read_problems_jsonl(write(tmp_path, ""))
    with pytest.raises(DataError, match="no such file"):
        load_problems(str(tmp_path / "nope.jsonl"))


# -- specs and benchmarks ---------------------------------------------------------------------


def test_split_specs():
    assert split_specs(" aime24, math500,,rg:chain_sum?size=5 ") == ["aime24", "math500", "rg:chain_sum?size=5"]
    with pytest.raises(DataError):
        split_specs(" , ")


def test_path_spec_and_limit(tmp_path):
    path = write(tmp_path, GOOD, '{"id": "b", "problem": "2+2?", "answer": "4"}')
    assert [p.id for p in load_problems(str(path), limit=1)] == ["a"]
    with pytest.raises(DataError, match="positive integer"):
        load_problems(str(path), limit=0)


@pytest.mark.parametrize("file_name", ["minerva.jsonl", "minerva_math.jsonl"])
def test_benchmark_by_name_accepts_both_file_names(tmp_path, file_name):
    write(tmp_path, GOOD, name=file_name)
    problems = load_problems("minerva", data_dir=tmp_path)
    assert problems == [Problem("a", "1+1?", "2", "minerva")]
    assert load_problems("MINERVA_MATH", data_dir=tmp_path) == problems  # alias, case-insensitive


def test_data_dir_from_env(tmp_path, monkeypatch):
    write(tmp_path, GOOD, name="aime24.jsonl")
    monkeypatch.setenv("NPR_DATA_DIR", str(tmp_path))
    assert [p.id for p in load_problems("aime24")] == ["a"]
    with pytest.raises(DataError, match="--data-dir .* is not a directory"):
        load_problems("aime24", data_dir=tmp_path / "missing")


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(UnknownSpecError) as info:
        load_problems("aime2099")
    assert all(name in str(info.value) for name in BENCHMARKS) and "rg:" in str(info.value)


def test_missing_benchmark_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingBenchmarkError) as info:
        load_problems("aime25", data_dir=tmp_path)
    message = str(info.value)
    assert "aime25.jsonl" in message and "NPR_DATA_DIR" in message and "--data-dir" in message
    assert "install `datasets`" in message and "HF_HUB_OFFLINE is set" in message


# -- the hub fallback, with a stand-in `datasets` module ----------------------------------------


class FakeRows(list):
    column_names = ["id", "question", "final_answer"]


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []
    module = types.ModuleType("datasets")
    module.__spec__ = types.SimpleNamespace(name="datasets")

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return FakeRows(
            [
                {"id": 1, "question": "Find x.", "final_answer": ["$3$", "$4$"]},
                {"id": 2, "question": "Find y.", "final_answer": ["5"]},
            ]
        )

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("NPR_DATA_DIR", raising=False)
    return calls


def test_benchmark_falls_back_to_the_hub(fake_datasets):
    problems = load_problems("olympiadbench", limit=1)
    assert fake_datasets == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")]
    assert problems == [Problem("1", "Find x.", "3, 4", "olympiadbench")]


def test_hf_spec_guesses_columns(fake_datasets):
    problems = load_problems("hf:someone/olympiad:dev")
    assert fake_datasets == [("someone/olympiad", None, "dev")]
    assert [(p.id, p.answer, p.source) for p in problems] == [
        ("1", "3, 4", "hf:someone/olympiad:dev"),
        ("2", "5", "hf:someone/olympiad:dev"),
    ]


def test_hf_spec_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot read the Hugging Face hub: HF_HUB_OFFLINE is set"):
        load_problems("hf:HuggingFaceH4/MATH-500")


def test_hf_spec_forms_and_answer_text():
    assert parse_hf_spec("hf:a/b") == ("a/b", None, "test")
    assert parse_hf_spec("hf:a/b:train") == ("a/b", None, "train")
    assert parse_hf_spec("hf:a/b:cfg:dev") == ("a/b", "cfg", "dev")
    with pytest.raises(DataError):
        parse_hf_spec("hf:nodataset")
    assert answer_text(["$69$", "$84$"]) == "69, 84"
    assert answer_text({"rows": [[1]], "header": ["House"]}) == '{"header": ["House"], "rows": [[1]]}'
    assert answer_text(27) == "27"


# -- reasoning-gym ------------------------------------------------------------------------------


def test_parse_value_and_rg_spec():
    assert [parse_value(v) for v in ("3", "-2", "0.5", "true", "False", "abc")] == [3, -2, 0.5, True, False, "abc"]
    assert parse_rg_spec("rg:chain_sum?size=20&seed=7&terms=2") == ("chain_sum", {"size": 20, "seed": 7, "terms": 2})
    with pytest.raises(DataError, match="given twice"):
        parse_rg_spec("rg:chain_sum?seed=1&seed=2")
    with pytest.raises(DataError, match="no value"):
        parse_rg_spec("rg:chain_sum?seed=")


def test_rg_spec_is_deterministic_with_unique_ids():
    spec = "rg:chain_sum?size=20&seed=7&terms=2"
    first, again = load_problems(spec), load_problems(spec)
    assert [(p.id, p.problem, p.answer) for p in first] == [(p.id, p.problem, p.answer) for p in again]
    assert len({p.id for p in first}) == 20 and first[0].id == "chain_sum-s7-0" and first[19].id == "chain_sum-s7-19"
    assert all(p.source == spec and p.rg_task == "chain_sum" for p in first)
    assert all(p.rg_entry["metadata"]["num_terms"] == 2 for p in first)  # the terms=2 alias took effect
    expanded = load_problems("rg:chain_sum?size=20&seed=7&min_terms=2&max_terms=2")
    assert [p.problem for p in expanded] == [p.problem for p in first]
    assert [p.problem for p in load_problems(spec, limit=3)] == [p.problem for p in first[:3]]
    assert [p.problem for p in load_problems("rg:chain_sum?size=20&seed=8&terms=2")] != [p.problem for p in first]


def test_rg_answers_are_strings_of_the_entry_answer():
    problem = load_problems("rg:chain_sum?size=1&seed=3&terms=2")[0]
    assert problem.answer == str(problem.rg_entry["answer"]) and problem.problem == problem.rg_entry["question"]
    a, op, b = problem.rg_entry["metadata"]["expression"].split()
    assert int(problem.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))


@pytest.mark.parametrize(
    "spec,words",
    [
        ("rg:no_such_task", ["unknown reasoning-gym task", "chain_sum", "basic_arithmetic"]),
        ("rg:chain_sum?bogus=1", ["no parameter 'bogus'", "min_terms", "allow_negation", "terms"]),
        ("rg:chain_sum?min_terms=5&max_terms=2", ["refused the config", "max_terms must be >= min_terms"]),
        ("rg:chain_sum?size=0", ["size must be a positive integer"]),
        ("rg:chain_sum?seed=x", ["seed must be a non-negative integer"]),
        ("rg:", ["expected rg:<task>"]),
    ],
)
def test_rg_spec_errors_list_valid_options(spec, words):
    with pytest.raises(DataError) as info:
        load_problems(spec)
    assert all(w in str(info.value) for w in words), str(info.value)


# -- the benchmark pack (../shared/benchmarks, or the tests' own small pack without it) -------------

PACK_NAMES = ("aime24", "aime25", "hmmt25", "amc23", "math500", "minerva", "olympiadbench")


@pytest.mark.parametrize("name", PACK_NAMES)
def test_pack_loads(benchmark_pack, name):
    problems = load_problems(name, data_dir=benchmark_pack.path)
    rows = benchmark_pack.rows[name]
    assert len(problems) == rows and len({p.id for p in problems}) == rows
    assert all(p.source == name and p.answer.strip() for p in problems)
    file_name = "minerva_math.jsonl" if name == "minerva" else f"{name}.jsonl"
    assert problems[-1].location == f"{benchmark_pack.path / file_name}:{rows}"  # file:line of the last row


def test_pack_first_rows(benchmark_pack):
    first_id = json.loads((benchmark_pack.path / "aime24.jsonl").read_text(encoding="utf-8").split("\n")[0])["id"]
    assert load_problems("aime24", data_dir=benchmark_pack.path, limit=1)[0].id == first_id == "aime24-I-01"
    first = json.loads((benchmark_pack.path / "math500.jsonl").read_text(encoding="utf-8").split("\n")[0])
    assert load_problems("math500", data_dir=benchmark_pack.path)[0].answer == first["answer"]


def test_training_set_loads_as_a_path(benchmark_pack):
    problems = load_problems(str(benchmark_pack.path / "train_math.jsonl"), limit=2)
    assert len(problems) == 2 and problems[0].id.startswith(("math-train-", "dapo17k-", "gsm8k-train-"))


def test_zebralogic_is_missing_from_the_pack_offline(benchmark_pack, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingBenchmarkError, match="zebralogic.jsonl.*install `datasets`"):
        load_problems("zebralogic", data_dir=benchmark_pack.path)


def test_problems_know_where_they_came_from(tmp_path):
    path = write(tmp_path, GOOD, "", '{"id": "b", "problem": "2+2?", "answer": "4"}')
    assert [p.location for p in read_problems_jsonl(path)] == [f"{path}:1", f"{path}:3"]
    assert load_problems("rg:chain_sum?size=2&seed=3&terms=2")[1].location == "rg:chain_sum?size=2&seed=3&terms=2 #1"
    assert Problem("a", "x", "1", "s", location="f:1") == Problem("a", "x", "1", "s")  # not part of equality
