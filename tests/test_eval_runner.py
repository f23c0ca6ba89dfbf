"""npr eval: the run directory, determinism, resume and its integrity, per-problem failures,
refusals before any write, and the smoke eval CI runs."""

from __future__ import annotations

import json
import types

import pytest
import torch

from npr.cli.main import main
from npr.engine import StructureForcer
from npr.errors import NprError
from npr.eval.rundir import Ledger
from npr.eval.runner import EvalConfig, EvalError, evaluate

RG = "rg:chain_sum?size=2&seed=7&terms=2"


def config(**kw) -> EvalConfig:
    base = dict(
        model="tiny-random-llama",
        benchmarks=("math500", "aime25", RG),
        k=2,
        limit=2,
        max_new_tokens=160,
        dtype="float32",
        kv_cache_gib=0.05,
    )
    base.update(kw)
    return EvalConfig(**base)


def forcer(tok):
    return (StructureForcer(tok, [[6, 9]], final_tokens=3),)


def run(tmp_path, tiny_llama, benchmark_pack, name="run", **kw):
    cfg = config(data_dir=str(benchmark_pack.path), **kw.pop("cfg", {}))
    return evaluate(cfg, tmp_path / name, model_and_tokenizer=tiny_llama, logits_processors=forcer(tiny_llama[1]), **kw)


def strip_times(records):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_eval_writes_a_self_describing_run(tmp_path, tiny_llama, benchmark_pack):
    results = run(
        tmp_path,
        tiny_llama,
        benchmark_pack,
        cfg={"baseline_mode": "sequential", "speed_rounds": 2, "speed_problems": 4, "latency_requests": 2},
    )
    out = tmp_path / "run"
    for name in (
        "config.json",
        "samples.jsonl",
        "results.json",
        "report.html",
        "progress.json",
        "baseline/samples.jsonl",
        "baseline/results.json",
    ):
        assert (out / name).is_file(), name
    described = json.loads((out / "config.json").read_text())
    assert described["settings"]["k"] == 2 and described["settings"]["top_p"] == 0.7
    assert "parallel reasoning format" in described["prompt"]["instruction"]
    assert len(described["model_sha256"]) == 64 and described["versions"]["torch"]
    samples = read(out / "samples.jsonl")
    assert len(samples) == 3 * 2 * 2  # benchmarks x problems x k
    assert {s["benchmark"] for s in samples} == {"math500", "aime25", RG}
    # the forced structure: every sample executed one block of two parallel branches
    assert all(s["parallel_blocks"] == 1 and s["branches_per_block"] == [2] for s in samples)
    overall = results["overall"]
    assert overall["trigger_rate"] == 1.0 and overall["branches_per_block"] == 2.0
    assert overall["speedup"] is not None and overall["token_latency_ratio"] > 1.0
    baseline = read(out / "baseline" / "samples.jsonl")
    assert all(s["parallel_blocks"] == 0 and s["tree_blocks"] == 1 for s in baseline)
    page = (out / "report.html").read_text()
    assert "branch" in page and "Speedup of parallel over sequential" in page and "Decomposition" in page
    # the alternated timing: 2 rounds of 4 problems x k=2 per mode, and 2 single requests per mode and round
    speed = json.loads((out / "results.json").read_text())["speed"]
    assert speed["batched"]["problems"] == 4 and speed["batched"]["samples_per_run"] == 8
    assert len(speed["batched"]["speedups"]) == 2 and len(speed["batch1"]["speedups"]) == 2
    assert speed["batch1"]["requests"] == 2 and speed["batch1"]["ideal"] > 1.0  # forced two-branch blocks
    part = speed["batched"]
    assert part["speedup_min"] <= part["speedup_median"] <= part["speedup_max"]
    assert all(s["size"] is None for s in samples)  # benchmark problems have no size


def test_same_seed_same_results(tmp_path, tiny_llama, benchmark_pack):
    kw = {"cfg": {"temperature": 1.0, "benchmarks": ("math500",)}}
    run(tmp_path, tiny_llama, benchmark_pack, "a", **kw)
    run(tmp_path, tiny_llama, benchmark_pack, "b", **kw)
    a, b = read(tmp_path / "a" / "samples.jsonl"), read(tmp_path / "b" / "samples.jsonl")
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    assert strip_times(sorted(a, key=key)) == strip_times(sorted(b, key=key))


def test_interrupted_run_resumes_to_the_same_samples(tmp_path, tiny_llama, benchmark_pack, monkeypatch):
    run(tmp_path, tiny_llama, benchmark_pack, "full")
    import npr.eval.runner as runner

    real = runner.EvalRun._run_benchmark
    calls = []

    def crash_on_second(self, engine, bench, *a):
        calls.append(bench)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, engine, bench, *a)

    monkeypatch.setattr(runner.EvalRun, "_run_benchmark", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_llama, benchmark_pack, "cut")
    kept = read(tmp_path / "cut" / "samples.jsonl")
    assert {r["benchmark"] for r in kept} == {"math500"}
    monkeypatch.setattr(runner.EvalRun, "_run_benchmark", real)
    with pytest.raises(EvalError, match="--resume"):
        run(tmp_path, tiny_llama, benchmark_pack, "cut")
    run(tmp_path, tiny_llama, benchmark_pack, "cut", resume=True)
    key = lambda r: (r["benchmark"], r["problem_id"], r["sample"])  # noqa: E731
    full = sorted(read(tmp_path / "full" / "samples.jsonl"), key=key)
    resumed = sorted(read(tmp_path / "cut" / "samples.jsonl"), key=key)
    assert strip_times(full) == strip_times(resumed)


def test_resume_with_other_settings_is_refused(tmp_path, tiny_llama, benchmark_pack):
    run(tmp_path, tiny_llama, benchmark_pack, cfg={"benchmarks": (RG,)})
    with pytest.raises(EvalError, match="other inputs: settings k: 2 -> 3"):
        run(tmp_path, tiny_llama, benchmark_pack, cfg={"benchmarks": (RG,), "k": 3}, resume=True)
    run(tmp_path, tiny_llama, benchmark_pack, cfg={"benchmarks": (RG,), "k": 3}, overwrite=True)
    assert len(read(tmp_path / "run" / "samples.jsonl")) == 2 * 3


def eval_argv(out, *extra):
    return [
        "eval",
        "--model",
        "tiny-random-llama",
        "--benchmarks",
        RG,
        "--limit",
        "1",
        "--k",
        "1",
        "--max-new-tokens",
        "16",
        "--dtype",
        "float32",
        "--kv-cache-gib",
        "0.05",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


CPU_ONLY = not torch.cuda.is_available()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--benchmarks", "nosuchbench"], "nosuchbench"),
        (["--k", "0"], "argument --k: must be >= 1"),
        (["--model", "./no/such/model"], "does not exist"),
        (["--top-p", "2"], "argument --top-p: must be in (0, 1]"),
        (["--temperature", "nan"], "argument --temperature: must be a finite number"),
        (["--dtype", "flaot32"], "argument --dtype: 'flaot32' is not a dtype"),
        (["--kv-cache-gib", "0"], "argument --kv-cache-gib: must be > 0"),
        (["--gpu-memory-utilization", "0"], "argument --gpu-memory-utilization: must be in (0, 1]"),
        # checks that need the model, still before any file is written:
        (["--max-new-tokens", "5000"], "--max-new-tokens 5000 leaves no problem room: the model context is 4096"),
        (["--kv-cache-gib", "0.00001"], "--kv-cache-gib 1e-05 holds"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: this torch",
            marks=pytest.mark.skipif(not CPU_ONLY, reason="a CPU-only torch"),
        ),
    ],
)
def test_bad_input_is_refused_before_any_write(tmp_path, capsys, args, message):
    """Found 2: each bad value is refused with exit 2 and leaves no directory behind, so the
    corrected command then runs as a fresh run (no --resume, no --overwrite)."""
    out = tmp_path / "run"
    assert exit_code(eval_argv(out, *args)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_the_corrected_command_runs_after_a_refusal(tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_code(eval_argv(out, "--max-new-tokens", "5000")) == 2
    assert exit_code(eval_argv(out)) == 0, capsys.readouterr().err
    assert len(read(out / "samples.jsonl")) == 1


def long_problem_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"id": "short-1", "problem": "What is 2 + 3?", "answer": "5"},
        {"id": "too-long", "problem": "Add these: " + "1 + " * 1500 + "1", "answer": "1501"},
        {"id": "short-2", "problem": "What is 4 + 4?", "answer": "8"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_problem_too_long_is_recorded_and_the_run_goes_on(tmp_path, tiny_llama):
    """Found 2: a prompt over the context is a failure record naming the problem's id and file
    line; the other problems run; results.json counts it and the report lists it."""
    path = long_problem_file(tmp_path)
    results = evaluate(
        config(benchmarks=(str(path),), limit=None, max_new_tokens=24), tmp_path / "run", model_and_tokenizer=tiny_llama
    )
    records = read(tmp_path / "run" / "samples.jsonl")
    failed = [r for r in records if r.get("failure")]
    assert [(r["problem_id"], r["failure"], r["location"]) for r in failed] == [
        ("too-long", "prompt_too_long", f"{path}:2")
    ]
    assert f"{path}:2: problem 'too-long': prompt_too_long:" in failed[0]["message"]
    assert "exceed the model context of 4096" in failed[0]["message"]
    assert sorted((r["problem_id"], r["sample"]) for r in records if not r.get("failure")) == [
        ("short-1", 0),
        ("short-1", 1),
        ("short-2", 0),
        ("short-2", 1),
    ]
    assert results["failures"]["problems"] == 1 and results["failures"]["by_reason"] == {"prompt_too_long": 1}
    assert results["overall"]["samples"] == 4 and results["overall"]["problems"] == 2  # the failure is no sample
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Problems not evaluated (1)" in page and f"{path}:2" in page
    again = evaluate(
        config(benchmarks=(str(path),), limit=None, max_new_tokens=24),
        tmp_path / "run",
        resume=True,
        model_and_tokenizer=tiny_llama,
    )
    assert read(tmp_path / "run" / "samples.jsonl") == records and again["failures"] == results["failures"]


def test_resume_refuses_other_weights_at_the_same_path(tmp_path, tiny_llama, benchmark_pack):
    """Found 4: resuming with changed weights is refused and the saved model hash is kept."""
    run(tmp_path, tiny_llama, benchmark_pack, cfg={"benchmarks": (RG,)})
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model_sha256"]
    model, tok = tiny_llama
    changed = type(model)(model.config)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.get_input_embeddings().weight[0, 0] += 1e-3
    with pytest.raises(EvalError, match=r"other inputs: the model's weights \(sha256"):
        evaluate(
            config(benchmarks=(RG,), data_dir=str(benchmark_pack.path)),
            tmp_path / "run",
            resume=True,
            model_and_tokenizer=(changed.eval(), tok),
            logits_processors=forcer(tok),
        )
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_sha256"] == saved


def test_resume_refuses_changed_data(tmp_path, tiny_llama):
    path = long_problem_file(tmp_path)
    cfg = config(benchmarks=(str(path),), limit=None, max_new_tokens=24)
    evaluate(cfg, tmp_path / "run", model_and_tokenizer=tiny_llama)
    path.write_text(path.read_text().replace("What is 4 + 4?", "What is 4 + 5?").replace('"8"', '"9"'))
    with pytest.raises(EvalError, match=f"the problems of {path} \\(the data file changed\\)"):
        evaluate(cfg, tmp_path / "run", resume=True, model_and_tokenizer=tiny_llama)


def test_wall_time_excludes_discarded_work(tmp_path, tiny_llama, monkeypatch):
    """Found 4: an interrupted benchmark's recorded wall time ends at its last finished problem,
    so the work cut short (and redone on resume) is not counted. A fake clock ticks once per
    engine step; one problem decodes at a time (max_num_seqs = k)."""
    import npr.eval.runner as runner
    from npr.engine import Engine

    clock, commits, steps_after_commit = [0.0], [], [0]
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_step, real_commit = Engine.step, Ledger.commit

    def step(self):
        if commits and steps_after_commit[0] >= 3 and not getattr(self, "no_interrupt", False):
            raise KeyboardInterrupt
        clock[0] += 1.0
        steps_after_commit[0] += 1
        return real_step(self)

    def commit(self, bench, ids, wall):
        commits.append(wall)
        steps_after_commit[0] = 0
        return real_commit(self, bench, ids, wall)

    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr(Ledger, "commit", commit)
    cfg = config(benchmarks=(RG,), max_num_seqs=2, k=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, tmp_path / "run", model_and_tokenizer=tiny_llama, logits_processors=forcer(tiny_llama[1]))
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["wall_time_s"][RG] == commits[-1] < clock[0]  # 3 steps of discarded work are not counted
    kept = commits[-1]
    monkeypatch.setattr(Engine, "no_interrupt", True, raising=False)
    commits.clear()
    start = clock[0]
    evaluate(
        cfg, tmp_path / "run", resume=True, model_and_tokenizer=tiny_llama, logits_processors=forcer(tiny_llama[1])
    )
    final = json.loads((tmp_path / "run" / "progress.json").read_text())["wall_time_s"][RG]
    assert final == commits[-1] and final == kept + (clock[0] - start)


def test_ledger_keeps_only_committed_complete_problems(tmp_path):
    """What a kill can leave: samples of an uncommitted problem, a committed problem, a cut line."""
    out = tmp_path
    lines = [
        {"benchmark": "b", "problem_id": "p1", "sample": 0},
        {"benchmark": "b", "problem_id": "p2", "sample": 0},
        {"benchmark": "b", "problem_id": "p1", "sample": 1},
        {"benchmark": "b", "problem_id": "p3", "failure": "x"},
    ]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"benchmark": "b", "pro')
    (out / "progress.json").write_text(json.dumps({"done": {"b": ["p1", "p3"]}, "wall_time_s": {"b": 7.0}}))
    ledger = Ledger.open(out, k=2)
    assert ledger.done == {"b": ["p1", "p3"]} and ledger.wall_time_s == {"b": 7.0}
    assert [r["problem_id"] for r in ledger.records] == ["p1", "p1", "p3"]
    assert read(out / "samples.jsonl") == ledger.records  # the file now holds exactly the kept records
    (out / "progress.json").write_text(json.dumps({"b": 3.5}))  # the layout before the ledger: complete problems
    assert Ledger.open(out, k=2).done == {"b": ["p1"]}


def test_unreadable_progress_is_a_clear_error(tmp_path):
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(NprError, match="progress.json cannot be read.*--overwrite"):
        Ledger.open(tmp_path, k=1)


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bench.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "2+2?"}\n')
    assert (
        exit_code(
            [
                "eval",
                "--model",
                "tiny-random-llama",
                "--benchmarks",
                str(bad),
                "--k",
                "1",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "bench.jsonl:2" in err and "answer" in err and not (tmp_path / "run").exists()


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        "tiny-random-llama",
        "--benchmarks",
        RG,
        "--limit",
        "2",
        "--k",
        "2",
        "--max-new-tokens",
        "24",
        "--dtype",
        "float32",
        "--kv-cache-gib",
        "0.05",
        "--out",
        str(out),
    ]
    assert exit_code(argv) == 0, capsys.readouterr().err
    assert "avg@k" in capsys.readouterr().out and (out / "report.html").is_file()
    assert exit_code(argv) == 2 and "--resume" in capsys.readouterr().err
    assert exit_code([*argv, "--resume", "--overwrite"]) == 2  # argparse: not allowed together
    assert "not allowed with argument" in capsys.readouterr().err


def test_resume_without_config_json_is_refused(tmp_path):
    (tmp_path / "samples.jsonl").write_text("{}\n")
    with pytest.raises(EvalError, match="has samples.jsonl but no config.json"):
        evaluate(config(benchmarks=(RG,)), tmp_path, resume=True, model_and_tokenizer=("unused", "unused"))


def test_baseline_timed_only_writes_no_baseline_run(tmp_path, tiny_llama, benchmark_pack):
    """baseline_eval false: the baseline mode is timed against this one (the speedup is there) but
    not evaluated (no baseline/ directory, no baseline samples)."""
    results = run(
        tmp_path,
        tiny_llama,
        benchmark_pack,
        cfg={
            "baseline_mode": "sequential",
            "speed_rounds": 1,
            "speed_problems": 2,
            "latency_requests": 1,
            "baseline_eval": False,
        },
    )
    assert not (tmp_path / "run" / "baseline").exists()
    speed = results["speed"]
    assert len(speed["batched"]["speedups"]) == 1 and speed["batch1"]["requests"] == 1
    assert speed["baseline_mode"] == "sequential"
    with pytest.raises(EvalError, match="speed_rounds"):
        config(baseline_mode="sequential", baseline_eval=False, speed_rounds=0)
