"""Host work per engine decode step: what the CPU spends per step outside the model's forward.

On a GPU the forward of a 36-layer model takes 10-15 ms; the host must plan the next step (scheduler),
build its metadata and upload, launch the forward and sample in less than that, or the GPU waits. This
script measures that host part on the CPU with a tiny model (2 layers, vocabulary 267), where the
device work is negligible: steady decode steps of ``plain`` requests, sampled (temperature 1, log-probs
on), at 64 and 256 rows. (Top-k/top-p add a sort of each row's candidates: device work on a GPU, but
on this CPU's vocabulary of 267 it costs more than all the host work together, so it is left out.)

Per step it prints CPU thread time of the whole step, of the model's forward (its ~aten dispatches are
the forward's host cost on a GPU, which compiled decode / CUDA graphs remove) and of the rest (host ms:
scheduling, metadata, upload, sampling, bookkeeping), and aten dispatches per step (counted in a
separate pass with a ``TorchDispatchMode``, which slows the step).

    OMP_NUM_THREADS=1 python benchmarks/engine_host.py
    OMP_NUM_THREADS=1 python benchmarks/engine_host.py --rows 64,256 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from npr.engine import Engine, EngineConfig, SamplingParams


class DispatchCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class ForwardTimer:
    """Thread time spent inside ``model.forward`` (wraps it)."""

    def __init__(self, model):
        self.total = 0.0
        self._forward = model.forward

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return self._forward(*args, **kwargs)
            finally:
                self.total += time.thread_time() - start

        model.forward = timed


def measure(model, tok, rows: int, steps: int, warm: int, top_logprobs: int = 0) -> dict[str, float]:
    config = EngineConfig(mode="plain", max_num_seqs=rows, kv_cache_tokens=rows * (warm + 2 * steps + 64))
    engine = Engine(model, tok, config)
    extra = {"top_logprobs": top_logprobs} if top_logprobs else {}  # runs on engines without the field
    params = SamplingParams(max_new_tokens=warm + 2 * steps + 8, temperature=1.0, seed=0, ignore_eos=True, **extra)
    engine.submit([[1, 10 + i % 200, 11 + i % 150, 12] for i in range(rows)], params)
    for _ in range(warm):  # the prefill and a few decode steps
        engine.step()
    timer = ForwardTimer(model)
    totals, forwards = [], []
    try:
        for _ in range(steps):
            timer.total = 0.0
            start = time.thread_time()
            engine.step()
            totals.append(time.thread_time() - start)
            forwards.append(timer.total)
        counter = DispatchCount()
        dispatches, forward_dispatches = [], []
        for _ in range(min(steps, 5)):
            counter.count = 0
            with counter:
                engine.step()
            dispatches.append(counter.count)
    finally:
        del model.forward  # back to the class's forward
    # dispatches inside the forward: the same steps with the counter only around the model
    inner = DispatchCount()
    real = model.forward

    def counted(*args, **kwargs):
        with inner:
            return real(*args, **kwargs)

    model.forward = counted
    try:
        for _ in range(min(steps, 5)):
            inner.count = 0
            engine.step()
            forward_dispatches.append(inner.count)
    finally:
        del model.forward
    step_ms = 1e3 * statistics.median(totals)
    forward_ms = 1e3 * statistics.median(forwards)
    host = [t - f for t, f in zip(totals, forwards)]
    return {
        "step_ms": step_ms,
        "forward_ms": forward_ms,
        "host_ms": 1e3 * statistics.median(host),
        "dispatches": statistics.median(dispatches),
        "forward_dispatches": statistics.median(forward_dispatches),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--top-logprobs", type=int, default=0, help="every request also asks its K best log-probs")
    args = ap.parse_args()
    from npr.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tok = load_model_and_tokenizer("tiny-random-llama")
    print(
        f"# engine_host: tiny-random-llama ({model.config.num_hidden_layers} layers), plain, sampled, "
        f"top_logprobs {args.top_logprobs}, torch threads {torch.get_num_threads()}, "
        f"median of {args.steps} steady decode steps"
    )
    print(f"{'rows':>5} {'step ms':>8} {'forward ms':>10} {'host ms':>8} {'dispatches':>10} {'in forward':>10}")
    results = {}
    for rows in (int(r) for r in args.rows.split(",")):
        r = results[rows] = measure(model, tok, rows, args.steps, args.warm, args.top_logprobs)
        print(
            f"{rows:>5} {r['step_ms']:>8.2f} {r['forward_ms']:>10.2f} {r['host_ms']:>8.2f} "
            f"{r['dispatches']:>10.0f} {r['forward_dispatches']:>10.0f}"
        )
    last = max(results)
    print(f"host ms/step at {last} rows: {results[last]['host_ms']:.2f}")


if __name__ == "__main__":
    main()
