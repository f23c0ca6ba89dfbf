"""The shared validation layer (npr.validate): booleans, seeds, memory sizes, environment variables,
output paths that cannot be written, and text that is not valid Unicode; each refusal is one line with
exit 2 before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from npr.cli.main import main
from npr.errors import NprError
from npr.validate import (
    check_kv_cache_gib,
    invalid_text_field,
    parse_bool,
    probe_writable,
    seed_problem,
    unicode_problem,
)


@pytest.mark.parametrize(
    "text, value",
    [
        ("1", True),
        ("0", False),
        ("true", True),
        ("False", False),
        (" on ", True),
        ("off", False),
        ("YES", True),
        ("no", False),
    ],
)
def test_booleans_parse_the_usual_words(text, value):
    assert parse_bool(text, "$X") is value


@pytest.mark.parametrize("text", ["", "2", "maybe", "enabled", "tru"])
def test_anything_else_is_not_a_boolean(text):
    with pytest.raises(NprError, match=r"\$X=.* is not a boolean; use one of 1/true/on/yes/0/false/off/no"):
        parse_bool(text, "$X")


def test_seeds_are_the_range_numpy_and_torch_take():
    assert seed_problem(0) is None and seed_problem(2**32 - 1) is None
    assert "must lie in [0, 2**32)" in seed_problem(-1) and "must lie in [0, 2**32)" in seed_problem(2**32)
    assert "integer" in seed_problem(1.5) and "integer" in seed_problem(True)


def test_a_kv_pool_larger_than_the_device_is_refused():
    check_kv_cache_gib(0.5, "cpu")
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(NprError, match="--kv-cache-gib must be"):
            check_kv_cache_gib(bad, "cpu")
    with pytest.raises(NprError, match=r"--kv-cache-gib 1e\+06 is more than the [0-9.]+ GiB of memory cpu has"):
        check_kv_cache_gib(1e6, "cpu")


MALLOC_PROBE = "from npr.cli.main import tune_malloc; print(tune_malloc())"


@pytest.mark.parametrize(
    "setting, applied", [("off", False), ("false", False), ("no", False), ("on", True), ("", True)]
)
def test_malloc_tuning_reads_every_boolean_spelling(setting, applied):
    """Before: only "0" turned it off; "off" and "false" were silently read as on."""
    out = subprocess.run(
        [sys.executable, "-c", MALLOC_PROBE],
        env={**os.environ, "NPR_MALLOC_TUNING": setting},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(applied and sys.platform.startswith("linux"))


def test_a_malloc_tuning_that_is_not_a_boolean_stops_the_console_script():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from npr.cli.main import console_main; "
            "sys.argv = ['npr', 'version']; sys.exit(console_main())",
        ],
        env={**os.environ, "NPR_MALLOC_TUNING": "maybe"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr == (
        "npr: error: $NPR_MALLOC_TUNING='maybe' is not a boolean; use one of 1/true/on/yes/0/false/off/no\n"
    ), out.stderr


def test_a_cache_dir_that_is_a_file_is_refused_before_any_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("NPR_CACHE_DIR", str(tmp_path / "f" / "sub"))
    assert main(["version"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"npr version: error: $NPR_CACHE_DIR={tmp_path / 'f' / 'sub'}: {tmp_path / 'f'} is a file, not a directory"
        )
        and err.count("\n") == 1
    ), err


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root ignores permission bits, so a chmod would not do); skipped where mounting is not
    allowed."""
    target = tmp_path / "ro"
    target.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(target)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a read-only tmpfs here")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_an_output_directory_on_a_read_only_mount_is_refused_before_the_model_loads(read_only_dir, capsys):
    """Before: eval crashed at mkdir after loading the model."""
    code = main(
        [
            "eval",
            "--model",
            "./no-such-model",
            "--benchmarks",
            "rg:chain_sum?size=2&seed=1&terms=2",
            "--out",
            str(read_only_dir / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(
        f"npr eval: error: --out {read_only_dir / 'run'}: no permission to write in {read_only_dir}"
    ), err
    assert "does not exist" not in err  # refused before the model


def test_the_write_probe_leaves_the_directory_as_it_was(tmp_path):
    before = tmp_path.stat()
    probe_writable(tmp_path, "--out x")
    assert list(tmp_path.iterdir()) == [] and tmp_path.stat().st_mtime_ns == before.st_mtime_ns


def test_invalid_unicode_is_found_and_named():
    assert unicode_problem("ok ✓") is None
    assert "lone surrogate U+D800" in unicode_problem("a\ud800b")
    assert "the byte 0xff, which is not UTF-8" in unicode_problem(b"a\xffb".decode("utf-8", "surrogateescape"), True)
    assert "lone surrogate U+DCFF" in unicode_problem(b"a\xffb".decode("utf-8", "surrogateescape"))
    assert invalid_text_field({"messages": [{"role": "user", "content": "x\udc00"}]}) == (
        "messages[0].content",
        "holds a lone surrogate U+DC00, which is not valid Unicode (at character 1)",
    )
    assert invalid_text_field({"a": ["fine", {"b": 1}]}) is None


def test_paths_are_module_level_so_the_cli_layer_shares_them():
    from npr.cli import args

    assert args.seed("4294967295") == 4294967295
    with pytest.raises(Exception, match="must not be empty"):
        args.out_path(" ")
    assert Path(args.out_path("x")) == Path("x")


@pytest.mark.parametrize("how", ["argv", "stdin"])
def test_non_utf8_bytes_of_a_prompt_are_named_not_a_traceback(how):
    """Before: a UnicodeEncodeError traceback (argv) or UnicodeDecodeError (stdin)."""
    argv = [
        sys.executable.encode(),
        b"-m",
        b"npr.cli.main",
        b"generate",
        b"--model",
        b"tiny-random-llama",
        b"--prompt",
        b"caf\xe9?" if how == "argv" else b"-",
    ]
    out = subprocess.run(
        argv,
        input=b"caf\xe9?" if how == "stdin" else b"",
        capture_output=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "LC_ALL": "C.UTF-8"},
    )
    flag = "--prompt" if how == "argv" else "--prompt - (stdin)"
    assert out.returncode == 2 and out.stderr.decode() == (
        f"npr generate: error: {flag} holds the byte 0xe9, which is not UTF-8 (at character 3); give UTF-8 text\n"
    )


def test_a_benchmark_path_with_a_comma_is_one_spec_when_the_file_exists(tmp_path):
    """Before: "runs/a,b/test.jsonl" was split in two and the error named the wrong file."""
    from npr.data import load_problems, split_specs

    folder = tmp_path / "a,b"
    folder.mkdir()
    data = folder / "x,y.jsonl"
    data.write_text('{"id": "1", "problem": "1+1?", "answer": "2"}\n')
    assert split_specs(f"aime24, {data} ,math500") == ["aime24", str(data), "math500"]
    assert split_specs(f"{data}") == [str(data)]
    assert split_specs("aime24,math500") == ["aime24", "math500"]  # no file: the usual split
    assert [p.id for p in load_problems(split_specs(str(data))[0])] == ["1"]


def test_a_tokenizer_without_a_chat_template_is_warned_about(tmp_path, tiny_llama, capsys):
    """Before: ChatML was used silently, though docs/evaluation.md promises the model's own template."""
    import json as json_module

    from npr.models import load_tokenizer, save_model

    model, tok = tiny_llama
    path = save_model(model, tok, tmp_path / "m")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json_module.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json_module.dumps(config))
    capsys.readouterr()
    loaded = load_tokenizer(str(path))
    err = capsys.readouterr().err
    assert err.startswith(
        f"npr: warning: the tokenizer of {path} has no chat template; npr formats prompts as ChatML"
    ), err
    assert "<|im_start|>" in loaded.chat_template
    load_tokenizer("tiny-random-llama")  # a template of its own: no warning
    assert capsys.readouterr().err == ""


def test_the_write_probe_does_not_need_to_own_the_directory(tmp_path, monkeypatch):
    """A writable directory of another user (a shared /tmp): setting its times back is refused, not an error."""

    def not_owner(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "utime", not_owner)
    probe_writable(tmp_path, "--out x")
    assert list(tmp_path.iterdir()) == []
