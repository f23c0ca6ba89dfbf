"""Would-be host syncs and blocking uploads of the engine's decode steps, counted on the CPU.

A ``TorchDispatchMode`` sees every aten op the step runs. On a GPU these wait for the device:
``nonzero``, ``_local_scalar_dense`` (``.item()``, ``int(t)``), boolean-mask indexing and
``masked_select`` (their output size depends on the data), and a copy to the host (``.tolist()``,
``.cpu()``, ``.numpy()``, which on a CPU run dispatch nothing, so the test counts the calls).
``torch.tensor(data, device=...)`` copies from pageable memory, which also blocks: the engine stages
everything one step sends in ``StepUpload`` (one pinned, non-blocking copy).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from npr.engine import Engine, EngineConfig, SamplingParams, StructureForcer
from npr.engine.scheduler import Scheduler

SYNC_OPS = {
    torch.ops.aten.nonzero.default,
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
}


def _is_bool_index(func, args) -> bool:
    if func not in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


class SyncCounter(TorchDispatchMode):
    """Counts would-be syncs (``events``, with names) while active."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.paused = False  # inside a compiled kernel (see the flex test)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or _is_bool_index(func, args):
            self.events.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def counted(monkeypatch):
    """A SyncCounter whose events also list host reads (``tolist``/``cpu``/``numpy``) and blocking
    uploads (``torch.tensor`` given a device)."""
    counter = SyncCounter()
    real_tensor = torch.tensor

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None and not counter.paused:
            counter.events.append("torch.tensor(..., device=)")
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    for name in ("tolist", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def read(self, *a, _real=real, _name=name, **k):
            if not counter.paused:
                counter.events.append(f"Tensor.{_name}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counter


def steady_steps(engine: Engine, counter: SyncCounter, monkeypatch) -> list[list[str]]:
    """Run the engine to the end; return the events of each step whose feeds are all one-token decodes."""
    plans = []
    real_plan = Scheduler.plan

    def plan(self):
        step = real_plan(self)
        plans.append(step.feeds)
        return step

    monkeypatch.setattr(Scheduler, "plan", plan)
    steady = []
    while engine.has_work():
        counter.events = []
        with counter:
            engine.step()
        feeds = plans[-1]
        if feeds and all(len(f.tokens) == 1 for f in feeds):
            steady.append(list(counter.events))
    return steady


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.9, 50), (0.0, 1.0, 0), (0.8, 1.0, 0)])
def test_steady_decode_syncs_at_most_once(tiny_llama, counted, monkeypatch, temperature, top_p, top_k):
    """Decode steps over branch rows (repetition penalty on) and main rows: one transfer, the sampled tokens."""
    model, tok = tiny_llama
    assert model.config.num_hidden_layers == 2
    forcer = StructureForcer(tok, [[20, 30, 25], [24]], prefix_tokens=10)
    params = SamplingParams(
        max_new_tokens=400, temperature=temperature, top_p=top_p, top_k=top_k, n=2, seed=5, logits_processors=(forcer,)
    )
    engine = Engine(
        model,
        tok,
        EngineConfig(attention="sdpa", shared_prefix_attention=False, kv_cache_tokens=4096, repetition_penalty=1.1),
    )
    engine.submit([[1, 50, 51, 52], [1, 60, 61, 62, 63, 64]], params)
    steady = steady_steps(engine, counted, monkeypatch)
    assert len(steady) >= 40
    assert all(events == ["Tensor.tolist"] for events in steady), max(steady, key=len)  # the sampled tokens


def test_flex_decode_metadata_syncs_at_most_once(tiny_llama, counted, monkeypatch):
    """The flex path (CUDA's): its block masks and query tables are built without syncs. Dynamo does not
    trace under a dispatch mode, so the compiled kernel itself (aot_eager here) runs outside the counter."""
    from torch.utils._python_dispatch import _disable_current_modes

    import npr.engine.attention as attention

    compiled = torch.compile(attention.engine_flex, backend="aot_eager", dynamic=True)

    def uncounted(*args, **kwargs):
        counted.paused = True
        try:
            with _disable_current_modes():
                return compiled(*args, **kwargs)
        finally:
            counted.paused = False

    monkeypatch.setattr(attention, "compiled_flex", lambda: uncounted)
    model, tok = tiny_llama
    forcer = StructureForcer(tok, [[12, 16]], prefix_tokens=6)
    params = SamplingParams(max_new_tokens=300, temperature=1.0, n=2, seed=5, logits_processors=(forcer,))
    engine = Engine(model, tok, EngineConfig(attention="flex", kv_cache_tokens=4096))
    engine.submit([[1, 50, 51, 52], [1, 60, 61, 62, 63, 64]], params)
    steady = steady_steps(engine, counted, monkeypatch)
    assert len(steady) >= 20
    assert all(events == ["Tensor.tolist"] for events in steady), max(steady, key=len)
