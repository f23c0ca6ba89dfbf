"""--system-prompt-file: the instruction replaced from a file, placed as NPR's released code places it."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from npr.cli.main import main
from npr.data import Problem
from npr.errors import NprError
from npr.eval.runner import EvalConfig, EvalError
from npr.prompts import NPR_INSTRUCTION, build_messages, encode_prompt, read_instruction_file
from npr.train.config import ConfigError, SampleConfig, Stage1Config, Stage2Config
from npr.train.sample import _sample_all_tries

INSTRUCTION = "Write <guideline>, <step> and <takeaway> blocks.\nEnd with \\boxed{}."


@pytest.fixture
def instruction_file(tmp_path):
    path = tmp_path / "npr.txt"
    path.write_text(f"\n{INSTRUCTION}\n\n", encoding="utf-8")  # surrounding blank lines are stripped
    return path


def test_default_prompt_is_unchanged():
    assert build_messages("1+1?") == [
        {"role": "system", "content": NPR_INSTRUCTION},
        {"role": "user", "content": "1+1?"},
    ]


def test_placements(instruction_file):
    text = read_instruction_file(instruction_file)
    assert text == INSTRUCTION
    assert build_messages(" 1+1? ", instruction=text) == [
        {"role": "system", "content": INSTRUCTION},
        {"role": "user", "content": " 1+1? "},
    ]
    # NPR's released code: question.strip() + "\n\n" + instruction in the user turn, no system message
    assert build_messages(" 1+1? ", instruction=text, placement="user") == [
        {"role": "user", "content": f"1+1?\n\n{INSTRUCTION}"}
    ]
    with pytest.raises(ValueError, match="plain"):
        build_messages("1+1?", "plain", instruction=text)


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("  \n\n", "empty")])
def test_bad_file_names_the_flag(tmp_path, content, message):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_text(content)
    for build in (
        lambda: read_instruction_file(path),
        lambda: SampleConfig(model="m", train_data="x", system_prompt_file=str(path)),
        lambda: Stage1Config(train_data="x", system_prompt_file=str(path)),
        lambda: Stage2Config(model="m", train_data="x", system_prompt_file=str(path)),
        lambda: EvalConfig(system_prompt_file=str(path)),
    ):
        with pytest.raises(NprError, match=message) as err:
            build()
        assert "--system-prompt-file" in str(err.value)


def test_plain_style_takes_no_instruction(instruction_file):
    with pytest.raises(ConfigError, match="prompt_style npr"):
        Stage1Config(train_data="x", prompt_style="plain", system_prompt_file=str(instruction_file))
    with pytest.raises(EvalError, match="--style npr"):
        EvalConfig(style="plain", system_prompt_file=str(instruction_file))


def test_cli_error_before_anything_runs(tmp_path, capsys):
    code = main(
        [
            "sample",
            "--preset",
            "smoke",
            "--system-prompt-file",
            str(tmp_path / "nope.txt"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "--system-prompt-file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["eval", "--system-prompt-file", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "ev")]) == 2
    assert "--system-prompt-file" in capsys.readouterr().err and not (tmp_path / "ev").exists()


class _SpyWorker:
    """Stands in for RolloutWorker: records the prompts it is asked to decode."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompts, first_index, params):
        self.prompts += prompts
        return []

    def sampling_params(self, n, seed):
        return None


def test_sampling_uses_the_file_and_placement(tiny_llama, instruction_file):
    tok = tiny_llama[1]
    config = SampleConfig(
        model="m", train_data="x", system_prompt_file=str(instruction_file), system_prompt_placement="user"
    )
    worker = _SpyWorker()
    problems = [Problem("p0", "What is 2 + 2?", "4", "test")]
    _sample_all_tries(worker, tok, problems, 0, config, Counter(), Counter(), None, None)
    assert worker.prompts == [encode_prompt(tok, problems[0].problem, "npr", INSTRUCTION, "user")]
    text = tok.decode(worker.prompts[0])
    assert f"What is 2 + 2?\n\n{INSTRUCTION}" in text and NPR_INSTRUCTION not in text


def test_eval_records_the_instruction(tmp_path, tiny_llama, instruction_file):
    from npr.engine import StructureForcer
    from npr.eval.runner import evaluate

    cfg = EvalConfig(
        model="tiny-random-llama",
        benchmarks=("rg:chain_sum?size=1&seed=7&terms=2",),
        k=1,
        max_new_tokens=96,
        dtype="float32",
        kv_cache_gib=0.05,
        system_prompt_file=str(instruction_file),
        system_prompt_placement="user",
    )
    evaluate(
        cfg,
        tmp_path / "ev",
        model_and_tokenizer=tiny_llama,
        logits_processors=(StructureForcer(tiny_llama[1], [[4, 4]], final_tokens=2),),
    )
    described = json.loads((tmp_path / "ev" / "config.json").read_text())
    assert described["prompt"]["instruction"] == INSTRUCTION and described["prompt"]["placement"] == "user"
    assert described["settings"]["system_prompt"] == INSTRUCTION  # a changed file is a changed setting on --resume
    record = json.loads((tmp_path / "ev" / "samples.jsonl").read_text().splitlines()[0])
    assert record["prompt"].index(record["problem"].strip()) < record["prompt"].index(INSTRUCTION)


def test_training_stages_use_the_file_and_placement(tiny_llama, instruction_file):
    """Stages 1 and 3 (rollout and eval prompts) and Stage 2 (the SFT prompt) read the same
    instruction keywords as npr sample and eval."""
    from npr.tokens import tag_token_ids
    from npr.train.rl import encode_prompts
    from npr.train.sft_data import SftExample, tokenize_examples

    tok = tiny_llama[1]
    problems = [Problem("p0", "What is 2 + 2?", "4", "test")]
    expected = encode_prompt(tok, problems[0].problem, "npr", INSTRUCTION, "user")
    flags = dict(model="m", train_data="x", system_prompt_file=str(instruction_file), system_prompt_placement="user")
    assert encode_prompts(tok, problems, Stage1Config(**flags)) == [expected]
    assert encode_prompts(tok, problems, Stage1Config(model="m", train_data="x")) == [
        encode_prompt(tok, problems[0].problem, "npr")
    ]
    response = (
        "<guideline>\n<plan>1: add</plan>\n</guideline>\n<step>\n1: 4\n</step>\n<takeaway>\n4\n</takeaway>\n\\boxed{4}"
    )
    kept, _ = tokenize_examples(
        [SftExample("p0", problems[0].problem, "4", response)],
        tok,
        tag_token_ids(tok),
        4096,
        Stage2Config(**flags).prompt_options(),
    )
    assert kept and kept[0].prompt_ids == expected
