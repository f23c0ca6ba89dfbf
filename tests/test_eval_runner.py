"""npr eval: the run directory, determinism, resume, refusals, and the smoke eval CI runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from npr.engine import StructureForcer
from npr.eval.runner import EvalConfig, EvalError, evaluate

RG = "rg:chain_sum?size=2&seed=7&terms=2"


def config(**kw) -> EvalConfig:
    base = dict(model="tiny-random-llama", benchmarks=("math500", "aime25", RG), k=2, limit=2, max_new_tokens=160,
                dtype="float32", kv_cache_gib=0.05)
    base.update(kw)
    return EvalConfig(**base)


def forcer(tok):
    return (StructureForcer(tok, [[6, 9]], final_tokens=3),)


def run(tmp_path, tiny_llama, shared_benchmarks, name="run", **kw):
    cfg = config(data_dir=str(shared_benchmarks), **kw.pop("cfg", {}))
    return evaluate(cfg, tmp_path / name, model_and_tokenizer=tiny_llama, logits_processors=forcer(tiny_llama[1]), **kw)


def strip_times(records):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_eval_writes_a_self_describing_run(tmp_path, tiny_llama, shared_benchmarks):
    results = run(tmp_path, tiny_llama, shared_benchmarks, cfg={"baseline_mode": "sequential", "speed_rounds": 2,
                                                                "speed_problems": 4, "latency_requests": 2})
    out = tmp_path / "run"
    for name in ("config.json", "samples.jsonl", "results.json", "report.html", "progress.json",
                 "baseline/samples.jsonl", "baseline/results.json"):
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


def test_same_seed_same_results(tmp_path, tiny_llama, shared_benchmarks):
    kw = {"cfg": {"temperature": 1.0, "benchmarks": ("math500",)}}
    run(tmp_path, tiny_llama, shared_benchmarks, "a", **kw)
    run(tmp_path, tiny_llama, shared_benchmarks, "b", **kw)
    a, b = read(tmp_path / "a" / "samples.jsonl"), read(tmp_path / "b" / "samples.jsonl")
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    assert strip_times(sorted(a, key=key)) == strip_times(sorted(b, key=key))


def test_interrupted_run_resumes_to_the_same_samples(tmp_path, tiny_llama, shared_benchmarks, monkeypatch):
    run(tmp_path, tiny_llama, shared_benchmarks, "full")
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
        run(tmp_path, tiny_llama, shared_benchmarks, "cut")
    kept = read(tmp_path / "cut" / "samples.jsonl")
    assert {r["benchmark"] for r in kept} == {"math500"}
    monkeypatch.setattr(runner.EvalRun, "_run_benchmark", real)
    with pytest.raises(EvalError, match="--resume"):
        run(tmp_path, tiny_llama, shared_benchmarks, "cut")
    run(tmp_path, tiny_llama, shared_benchmarks, "cut", resume=True)
    key = lambda r: (r["benchmark"], r["problem_id"], r["sample"])  # noqa: E731
    full = sorted(read(tmp_path / "full" / "samples.jsonl"), key=key)
    resumed = sorted(read(tmp_path / "cut" / "samples.jsonl"), key=key)
    assert strip_times(full) == strip_times(resumed)


def test_resume_with_other_settings_is_refused(tmp_path, tiny_llama, shared_benchmarks):
    run(tmp_path, tiny_llama, shared_benchmarks, cfg={"benchmarks": (RG,)})
    with pytest.raises(EvalError, match="other settings.*k"):
        run(tmp_path, tiny_llama, shared_benchmarks, cfg={"benchmarks": (RG,), "k": 3}, resume=True)
    run(tmp_path, tiny_llama, shared_benchmarks, cfg={"benchmarks": (RG,), "k": 3}, overwrite=True)
    assert len(read(tmp_path / "run" / "samples.jsonl")) == 2 * 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--benchmarks", "nosuchbench"], "nosuchbench"),
        (["--k", "0"], "--k must be >= 1"),
        (["--model", "./no/such/model"], "does not exist"),
    ],
)
def test_bad_input_is_a_clear_error_before_compute(tmp_path, args, message):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "npr.cli.main", "eval", "--model", "tiny-random-llama", "--benchmarks", RG,
           "--limit", "1", "--k", "1", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bench.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "2+2?"}\n')
    cmd = [sys.executable, "-m", "npr.cli.main", "eval", "--model", "tiny-random-llama", "--benchmarks", str(bad),
           "--k", "1", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "bench.jsonl:2" in proc.stderr and "answer" in proc.stderr


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "npr.cli.main", "eval", "--model", "tiny-random-llama", "--benchmarks", RG,
           "--limit", "2", "--k", "2", "--max-new-tokens", "24", "--dtype", "float32", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "avg@k" in proc.stdout and (out / "report.html").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
