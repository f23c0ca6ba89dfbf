"""The error contract, walked over every subcommand: bad values of each argument type exit with
2, print one message naming the flag (or file:line and field) without a traceback, and write
nothing. Bugs keep their traceback. Runs in-process through ``npr.cli.main.main``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from npr.cli.main import main

CPU_ONLY = not torch.cuda.is_available()
TINY = ["--model", "tiny-random-llama"]
RG = "rg:chain_sum?size=2&seed=1&terms=2"
cuda_only_here = pytest.mark.skipif(not CPU_ONLY, reason="checks the message of a CPU-only torch")

# (argv with placeholders, words in the message); placeholders (PLACES): @OUT (not yet there), @FILE
# (a file), @DIR (an empty directory), @LISTYAML (a YAML with a list where a float belongs), @BADJSONL
# (line 2 lacks its answer), @NOTOK (a checkpoint without tokenizer.json), @TRUNC (a checkpoint with
# truncated weights), @SAMPLED (a directory holding an earlier npr sample), @MISSING (no such path), @BELOW (a path
# below a file), @BADTYPE/@BADLAYERS/@ZEROHEADS (checkpoints whose config.json has an unknown model_type,
# num_hidden_layers "two", num_attention_heads 0), @SURR (line 2's problem holds a JSON "\ud800" escape).
PLACES = {
    "@OUT": "out",
    "@FILE": "a_file.txt",
    "@DIR": "a_dir",
    "@LISTYAML": "list.yaml",
    "@BADJSONL": "bad.jsonl",
    "@NOTOK": "no_tokenizer",
    "@TRUNC": "truncated",
    "@SAMPLED": "sampled",
    "@MISSING": "missing.jsonl",
    "@BELOW": "a_file.txt/run",
    "@BADTYPE": "bad_type",
    "@BADLAYERS": "bad_layers",
    "@ZEROHEADS": "zero_heads",
    "@SURR": "surrogate.jsonl",
}
BAD_CONFIGS = {
    "@BADTYPE": {"model_type": "llamma"},
    "@BADLAYERS": {"num_hidden_layers": "two"},
    "@ZEROHEADS": {"num_attention_heads": 0},
}
CASES = {
    "pipeline": [
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["--from", "nostep", "--out", "@OUT"], "argument --from: invalid choice"),
        (["--device", "gpu", "--out", "@OUT"], "argument --device: 'gpu' is not a device"),
        pytest.param(["--device", "cuda", "--out", "@OUT"], "--device cuda: this torch", marks=cuda_only_here),
        (["--out", "@FILE"], "--out @FILE is a file, not a directory"),
        (["--out", "@OUT", "--data-dir", "@MISSING"], "--data-dir @MISSING is not a directory"),
        (["--preset", "qwen3-4b", "--out", "@OUT"], "benchmark 'aime25' not found"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--out", ""], "argument --out: must not be empty"),
        (["--out", "@BELOW"], "a_file.txt is a file, so the directory cannot be created"),
    ],
    "generate": [
        ([*TINY, "--prompt", "   "], "--prompt is empty"),
        ([*TINY, "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
        ([*TINY, "--prompt", "hi", "--max-new-tokens", "ten"], "argument --max-new-tokens: expected an integer"),
        ([*TINY, "--prompt", "hi", "--temperature", "-1"], "argument --temperature: must be >= 0"),
        ([*TINY, "--prompt", "hi", "--temperature", "nan"], "argument --temperature: must be a finite number"),
        ([*TINY, "--prompt", "hi", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
        ([*TINY, "--prompt", "hi", "--top-k", "-2"], "argument --top-k: must be >= 0"),
        ([*TINY, "--prompt", "hi", "--seed", "-1"], "argument --seed: must lie in [0, 2**32), got -1"),
        ([*TINY, "--prompt", "hi", "--n", "0"], "argument --n: must be >= 1"),
        ([*TINY, "--prompt", "hi", "--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
        ([*TINY, "--prompt", "hi", "--style", "x"], "argument --style: invalid choice"),
        ([*TINY, "--prompt", "hi", "--dtype", "flaot32"], "argument --dtype: 'flaot32' is not a dtype"),
        ([*TINY, "--prompt", "hi", "--device", "cuda:x"], "argument --device: 'cuda:x' is not a device"),
        pytest.param([*TINY, "--prompt", "hi", "--device", "cuda"], "--device cuda: this torch", marks=cuda_only_here),
        (["--model", "./nope", "--prompt", "hi"], "model path './nope' does not exist"),
        (["--model", "@NOTOK", "--prompt", "hi"], "has no tokenizer (no tokenizer.json)"),
        (["--model", "@TRUNC", "--prompt", "hi"], "model.safetensors is truncated"),
        ([*TINY, "--prompt", "hi", "--max-new-tokens", "5000"], "exceeds the model context of 4096"),
        ([*TINY, "--prompt", "a\udcff"], "--prompt holds the byte 0xff, which is not UTF-8 (at character 1)"),
        ([*TINY, "--prompt", "a\ud800"], "--prompt holds a lone surrogate U+D800, which is not valid Unicode"),
        ([*TINY, "--prompt", "hi", "--seed", "4294967296"], "argument --seed: must lie in [0, 2**32), got 4294967296"),
        (["--model", "@BADTYPE", "--prompt", "hi"], "config.json: field 'model_type' is 'llamma', not a causal LM"),
        (["--model", "@BADLAYERS", "--prompt", "hi"], "field 'num_hidden_layers' must be a positive integer, got 'tw"),
        (["--model", "@ZEROHEADS", "--prompt", "hi"], "field 'num_attention_heads' must be a positive integer, got 0"),
    ],
    "eval": [
        ([*TINY, "--out", "@OUT", "--benchmarks", ""], "argument --benchmarks: must not be empty"),
        ([*TINY, "--out", "@OUT", "--benchmarks", " , "], "no problem spec in ' , '"),
        ([*TINY, "--out", "@OUT", "--benchmarks", "aime2099"], "unknown benchmark 'aime2099'"),
        ([*TINY, "--out", "@OUT", "--benchmarks", f"{RG},{RG}"], "twice; list each benchmark once"),
        ([*TINY, "--out", "@OUT", "--benchmarks", "@BADJSONL"], "@BADJSONL:2: field 'answer': missing"),
        ([*TINY, "--out", "@OUT", "--benchmarks", "@MISSING"], "@MISSING: no such file"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--k", "0"], "argument --k: must be >= 1"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--limit", "-3"], "argument --limit: must be >= 1"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--mode", "fast"], "argument --mode: invalid choice"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--baseline-mode", "x"], "argument --baseline-mode: invalid"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--top-p", "1.5"], "argument --top-p: must be in (0, 1]"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--temperature", "inf"], "argument --temperature: must be a fin"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--top-k", "x"], "argument --top-k: expected an integer"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--max-num-seqs", "0"], "argument --max-num-seqs: must be >= 1"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--kv-cache-gib", "-1"], "argument --kv-cache-gib: must be > 0"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--dtype", "half"], "argument --dtype: 'half' is not a dtype"),
        pytest.param(
            [*TINY, "--out", "@OUT", "--benchmarks", RG, "--device", "cuda"],
            "--device cuda: this torch",
            marks=cuda_only_here,
        ),
        (
            [*TINY, "--out", "@OUT", "--benchmarks", RG, "--data-dir", "@MISSING"],
            "--data-dir @MISSING is not a directory",
        ),
        ([*TINY, "--out", "@FILE", "--benchmarks", RG], "--out @FILE is a file, not a directory"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--max-new-tokens", "4096"], "--max-new-tokens 4096 leaves no"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--kv-cache-gib", "0.000001"], "--kv-cache-gib 1e-06 holds"),
        (["--model", "./nope", "--out", "@OUT", "--benchmarks", RG], "model path './nope' does not exist"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--resume", "--overwrite"], "not allowed with argument"),
        ([*TINY, "--benchmarks", RG], "--out DIR is required"),
        ([*TINY, "--out", "", "--benchmarks", RG], "argument --out: must not be empty"),
        ([*TINY, "--out", "@OUT", "--benchmarks", "@SURR"], "@SURR:2: field 'problem': holds a lone surrogate U+D800"),
        ([*TINY, "--out", "@BELOW", "--benchmarks", RG], "a_file.txt is a file, so the directory cannot be created"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--kv-cache-gib", "100000"], "--kv-cache-gib 100000 is more"),
        ([*TINY, "--out", "@OUT", "--benchmarks", RG, "--seed", "-1"], "argument --seed: must lie in [0, 2**32)"),
        (["--model", "@ZEROHEADS", "--out", "@OUT", "--benchmarks", RG], "'num_attention_heads' must be a positive"),
    ],
    "view": [
        (["@MISSING"], "@MISSING: no such file"),
        (["@BADJSONL", "--out", "@OUT"], "@BADJSONL:1: no trace and no text field"),
        (["@BADJSONL", "--out", "@DIR"], "--out @DIR is a directory"),
        (["@BADJSONL", "--out", "@BADJSONL"], "--out @BADJSONL is one of the inputs"),
        (["@BADJSONL", "--format", "xml"], "argument --format: invalid choice"),
        ([], "the following arguments are required: FILE"),
        (["@BADJSONL", "--out", ""], "argument --out: must not be empty"),
        (["@SURR", "--out", "@OUT"], "@SURR:2: field problem holds a lone surrogate U+D800"),
    ],
    "train": [
        (
            ["stage1", "--preset", "smoke", "--out", "@OUT", "--learning-rate", "-1"],
            "--learning-rate: config field 'learning_rate': must be > 0",
        ),
        (
            ["stage1", "--preset", "smoke", "--out", "@OUT", "--learning-rate", "fast"],
            "'learning_rate' must be a finite",
        ),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--max-steps", "0"], "'max_steps': must be >= 1"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--max-steps", "2.5"], "'max_steps' must be a int"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--dynamic-sampling", "maybe"], "must be true or false"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--lr-schedule", "exp"], "'exp' is not one of cosine"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--rollout-dtype", "half"], "'half' is not one of None"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--kv-cache-gib", "0"], "'kv_cache_gib': must be > 0"),
        (
            ["stage1", "--preset", "smoke", "--out", "@OUT", "--logprob-chunk-size", "0"],
            "config field 'logprob_chunk_size': must be >= 1",
        ),
        (
            ["stage1", "--preset", "smoke", "--out", "@OUT", "--micro-batch-tokens", "64"],
            "'micro_batch_tokens': 64 is smaller than one response of max_new_tokens=96",
        ),
        (
            ["stage2", "--preset", "smoke", "--out", "@OUT", "--micro-batch-tokens", "100"],
            "'micro_batch_tokens': 100 is smaller than one example of max_seq_len=4096",
        ),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--clip-ratio-c", "0.5"], "'clip_ratio_c': must be > 1"),
        (
            ["stage3", "--preset", "smoke", "--out", "@OUT", "--max-skipped-steps", "0"],
            "'max_skipped_steps': must be >= 1",
        ),
        (
            ["stage1", "--preset", "smoke", "--out", "@OUT", "--train-limit", "none", "--stop-after", "0"],
            "'stop_after': must be >= 1 or None",
        ),
        (["stage1", "--preset", "huge", "--out", "@OUT"], "argument --preset: invalid choice: 'huge'"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--learning-rat", "1e-5"], "did you mean 'learning_rate'"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--config", "@MISSING"], "@MISSING: no such config file"),
        (
            ["stage1", "--preset", "smoke", "--out", "@OUT", "--config", "@LISTYAML"],
            "@LISTYAML:2: config field 'learning_rate' must be a finite number, got a list [0.1, 0.2]",
        ),
        (["stage1", "--preset", "smoke", "--out", "@FILE"], "--out @FILE is a file, not a directory"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--resume"], "--resume: @OUT/config.yaml does not exist"),
        (
            ["stage1", "--preset", "smoke", "--out", "@OUT", "--train-data", "rg:nosuchtask"],
            "unknown reasoning-gym task 'nosuchtask'",
        ),
        (["stage2", "--preset", "smoke", "--out", "@OUT", *TINY, "--train-data", "@MISSING"], "@MISSING"),
        (["stage3", "--preset", "smoke", "--out", "@OUT", "--model", "./nope"], "model path './nope' does not exist"),
        (["stage3", "--preset", "smoke", "--out", "@OUT", "--model", "@TRUNC"], "model.safetensors is truncated"),
        (["stage9", "--out", "@OUT"], "argument STAGE: invalid choice: 'stage9'"),
        (["stage2", "--preset", "smoke", "--out", ""], "argument --out: must not be empty"),
        (["stage2", "--preset", "smoke", "--out", "@BELOW"], "a_file.txt is a file, so the directory cannot be"),
        (["stage1", "--preset", "smoke", "--out", "@OUT", "--seed", "-1"], "'seed': must lie in [0, 2**32), got -1"),
        (["stage2", "--preset", "smoke", "--out", "@OUT", "--seed", "5000000000"], "'seed': must lie in [0, 2**32)"),
        (
            ["stage1", "--preset", "smoke", "--out", "@OUT", "--kv-cache-tokens", "none", "--kv-cache-gib", "100000"],
            "--kv-cache-gib 100000 is more",
        ),
        (["stage2", "--preset", "smoke", "--out", "@OUT", "--model", "@BADTYPE"], "field 'model_type' is 'llamma'"),
        ([], "the following arguments are required: STAGE"),
    ],
    "sample": [
        (["--preset", "smoke", "--out", "@OUT", *TINY, "--tries", "0"], "'tries/prompts_per_batch': must be >= 1"),
        (["--preset", "smoke", "--out", "@OUT", *TINY, "--temperature", "-1"], "need temperature >= 0"),
        (
            ["--preset", "smoke", "--out", "@SAMPLED", *TINY],
            "already holds sampled data (data.jsonl); pass --overwrite",
        ),
        (["--preset", "smoke", "--out", "@OUT", *TINY, "--train-data", "@BADJSONL"], "@BADJSONL:2: field 'answer'"),
        (["--preset", "smoke", "--out", "@OUT", "--model", "@NOTOK"], "has no tokenizer"),
        (["--preset", "smoke", "--out", "@FILE", *TINY], "--out @FILE is a file"),
        (["--preset", "smoke", "--out", "@OUT", *TINY, "--rollout-dtype", "fp8"], "'fp8' is not one of"),
        (["--preset", "smoke", "--out", "@OUT", *TINY, "--seed", "-1"], "'seed': must lie in [0, 2**32), got -1"),
        (["--preset", "smoke", "--out", "", *TINY], "argument --out: must not be empty"),
        (["--preset", "smoke", "--out", "@OUT", *TINY, "--train-data", "@SURR"], "@SURR:2: field 'problem': holds a"),
    ],
    "demo": [
        (["--model", "./nope"], "model path './nope' does not exist"),
        ([*TINY, "--dtype", "bf8"], "argument --dtype: 'bf8' is not a dtype"),
        ([*TINY, "--device", "tpu"], "argument --device: 'tpu' is not a device"),
        pytest.param([*TINY, "--device", "cuda"], "--device cuda: this torch", marks=cuda_only_here),
        (["--model", "@TRUNC"], "model.safetensors is truncated"),
    ],
    "version": [
        (["--verbose"], "unrecognized arguments: --verbose"),
    ],
    "memory": [
        (["--stage", "stage4"], "argument --stage: invalid choice: 'stage4'"),
        (["--stage", "stage3", "--gpus", "0"], "argument --gpus: must be >= 1, got 0"),
        (["--stage", "stage3", "--preset", "qwen3-4b", "--model", "nobody/no-such-model"], "no config.json found"),
        (["--stage", "stage3", "--preset", "qwen3-4b", "--model", "@DIR"], "is a directory without config.json"),
        (["--stage", "stage3", "--preset", "qwen3-4b", "--config", "@LISTYAML"], "must be a finite number"),
        (["--stage", "stage2", "--preset", "qwen3-4b", "--micro-batch-tokenz", "5"], "did you mean"),
    ],
}


def flatten():
    for command, cases in CASES.items():
        for case in cases:
            marks = case.marks if hasattr(case, "marks") else ()
            argv, words = case.values if hasattr(case, "marks") else case
            name = f"{command} {' '.join(argv)}".replace(" ".join(TINY), "tiny").replace(RG, "RG")
            yield pytest.param(command, argv, words, marks=marks, id=name)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama):
    """Fixture files the cases point at; the walk checks that nothing else appears beside them."""
    from npr.models import save_model

    root = tmp_path_factory.mktemp("cli_errors")
    (root / PLACES["@FILE"]).write_text("not a directory\n")
    (root / PLACES["@DIR"]).mkdir()
    (root / PLACES["@LISTYAML"]).write_text("seed: 1\nlearning_rate: [0.1, 0.2]\n")
    (root / PLACES["@BADJSONL"]).write_text(
        '{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "2+2?"}\n'
    )
    model, tok = tiny_llama
    for name in ("@NOTOK", "@TRUNC"):
        save_model(model, tok, root / PLACES[name])
    (root / PLACES["@NOTOK"] / "tokenizer.json").unlink()
    os.truncate(root / PLACES["@TRUNC"] / "model.safetensors", 10_000)
    for name, fields in BAD_CONFIGS.items():
        save_model(model, tok, root / PLACES[name])
        config = json.loads((root / PLACES[name] / "config.json").read_text())
        (root / PLACES[name] / "config.json").write_text(json.dumps({**config, **fields}))
    (root / PLACES["@SURR"]).write_text(
        '{"id": "a", "problem": "1+1?", "answer": "2", "output": "2"}\n'
        '{"id": "b", "problem": "2+\\ud800?", "answer": "4", "output": "4"}\n'
    )
    (root / PLACES["@SAMPLED"]).mkdir()
    (root / PLACES["@SAMPLED"] / "data.jsonl").write_text("{}\n")
    return root


def snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))}


def substitute(items: list[str], root: Path) -> list[str]:
    out = []
    for item in items:
        for place, name in PLACES.items():
            item = item.replace(place, str(root / name))
        out.append(item)
    return out


@pytest.mark.parametrize("command, argv, words", list(flatten()))
def test_bad_input_exits_2_with_one_message_and_writes_nothing(workspace, capsys, monkeypatch, command, argv, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NPR_DATA_DIR", raising=False)
    monkeypatch.chdir(workspace)  # relative defaults (runs/<preset>) land in the workspace, where they'd be seen
    before = snapshot(workspace)
    try:
        code = main([command, *substitute(argv, workspace)])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert substitute([words], workspace)[0] in err, err
    if code == 2 and "usage:" not in err:  # one message: "npr <command>: error: ..." on one line
        assert err.count("error:") == 1 and err.startswith(f"npr {command}: error: "), err
    assert snapshot(workspace) == before, "a refused command wrote something"


def test_every_subcommand_is_walked():
    from npr.cli.main import SUBCOMMANDS

    assert set(CASES) >= set(SUBCOMMANDS) - {"serve"}


def test_bugs_keep_their_traceback(monkeypatch):
    """Only NprErrors become exit 2; anything else is a bug and propagates (exit 1, traceback)."""
    import npr.cli.version as version

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(version, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["version"])


def test_a_real_process_shows_no_traceback(tmp_path):
    """The contract holds for the installed entry point too: exit status 2, the message, no traceback."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "npr.cli.main", "generate", "--model", "tiny-random-llama", "--prompt", " "],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--prompt is empty" in proc.stderr and "Traceback" not in proc.stderr
    assert json.dumps(proc.stderr).count("error:") == 1
