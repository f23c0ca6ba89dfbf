"""One engine loop for every client: a thread that owns the engine and steps it.

HTTP handlers run on the asyncio event loop and never touch the engine. They hand a ``Job`` (one
prompt, its n samples) to ``EngineLoop.submit`` and read what the loop sends back from the job's
``Sink``. The loop thread, between two steps, submits new jobs to the engine and applies
cancellations, so a new request joins the running batch at the next step (continuous batching)
and a cancelled one frees its KV blocks at once. After each step it routes the step's deltas and
finished results to their sinks: one ``call_soon_threadsafe`` per event loop per step.

Admission is bounded: at most ``max_queue`` jobs may wait for the engine to start them; beyond
that ``submit`` raises ``Overloaded`` and the server answers 503 with ``Retry-After``.

``one_at_a_time`` (``npr serve --deterministic``): the loop hands the engine the next job only when
the previous one has finished, so every job runs exactly as it would alone on an idle server (the
same forwards, the same shapes, the same kernels): its output cannot depend on other requests, at
any dtype. Its own samples and branches are still batched; other requests wait in the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

from npr.engine import Engine, Result, SamplingParams, StreamDelta
from npr.serve.metrics import Metrics

log = logging.getLogger("npr.serve")


class Overloaded(Exception):
    """No room for a request now: answer 503 and ask the client to retry. ``code`` says why:
    ``overloaded`` (the queue is full), ``shutting_down`` or ``engine_failed``."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class Sink:
    """Where the loop thread delivers a job's items (``StreamDelta``, ``Result``, or an ``Exception``):
    an ``asyncio.Queue`` of item lists on the event loop that created the sink."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list] = asyncio.Queue()


@dataclass(eq=False)
class Job:
    """One prompt of one HTTP request, decoded as ``params.n`` samples.

    ``index`` keys the job in the engine (its ``prompt_index``); ``params.seed`` is the request's
    seed: sample i draws from the same generators as sample i of ``npr generate --seed``.
    """

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when the engine first reported progress (loop thread)
    left: int = 0  # samples not finished (loop thread)


class EngineLoop:
    """Owns ``engine`` on one thread; see the module docstring. Thread-safe: ``submit``, ``cancel``,
    ``drain``, ``stop``, ``stats`` (a signal handler may call ``drain``: the lock is reentrant)."""

    def __init__(self, engine: Engine, max_queue: int = 256, one_at_a_time: bool = False):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.engine = engine
        self.max_queue = max_queue
        self.one_at_a_time = one_at_a_time
        self._cond = threading.Condition(threading.RLock())
        self._inbox: list[Job] = []
        self._cancels: list[tuple[Job, int | None]] = []
        self._queued = 0  # jobs submitted and not yet started by the engine
        self._jobs: dict[int, Job] = {}  # loop thread: jobs in the engine, by index
        self._indices = itertools.count()
        self._thread: threading.Thread | None = None
        self._draining = False
        self._drain_deadline: float | None = None
        self._cancel_all = False
        self._stopping = False
        self.failure: str | None = None  # set when a step raised and the engine could not be cleaned up
        self.steps = 0
        self.generated_tokens = 0
        self.metrics = Metrics()

    # ------------------------------------------------------------------ any thread

    def new_index(self) -> int:
        return next(self._indices)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="npr-engine-loop", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return not (self._draining or self._stopping or self.failure)

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none); raises ``Overloaded`` when the queue is full or closed."""
        with self._cond:
            if self.failure is not None:
                raise Overloaded(f"the engine failed ({self.failure}); restart the server", "engine_failed")
            if not self.accepting:
                raise Overloaded("the server is shutting down", "shutting_down")
            if self._queued + len(jobs) > self.max_queue:
                raise Overloaded(
                    f"the server is overloaded: {self._queued} requests are already waiting (the limit "
                    f"is {self.max_queue})",
                    "overloaded",
                )
            self._queued += len(jobs)
            for job in jobs:
                job.left = job.params.n
            self._inbox += jobs
            self._cond.notify()

    def cancel(self, job: Job, sample_index: int | None = None) -> None:
        """Stop a job (or one of its samples) at the next step; its KV blocks are freed then."""
        with self._cond:
            self._cancels.append((job, sample_index))
            self._cond.notify()

    def drain(self, timeout_s: float) -> None:
        """Refuse new jobs; cancel what is still running after ``timeout_s`` seconds (0: now)."""
        with self._cond:
            self._draining = True
            deadline = time.monotonic() + max(0.0, timeout_s)
            self._drain_deadline = min(deadline, self._drain_deadline or deadline)
            self._cond.notify()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel everything, let the thread deliver the results and exit."""
        with self._cond:
            self._stopping = self._cancel_all = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def stats(self) -> dict:
        pool = self.engine.pool
        with self._cond:
            queued = self._queued
        return {
            "running": len(self.engine.scheduler.running),
            "queued": queued,
            "kv_blocks_used": pool.used_blocks,
            "kv_blocks_total": pool.num_blocks,
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
        }

    # ------------------------------------------------------------------ loop thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._inbox
                    or self._cancels
                    or self._cancel_all
                    or self._stopping
                    or self.engine.scheduler.has_work()
                ):
                    self._cond.wait()  # idle: nothing to drain either
                if not self.one_at_a_time:
                    inbox, self._inbox = self._inbox, []
                elif self._jobs or self.engine.scheduler.has_work():
                    inbox = []  # the running job finishes first
                else:
                    inbox, self._inbox = self._inbox[:1], self._inbox[1:]
                cancels, self._cancels = self._cancels, []
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                    self._cancel_all = True
                cancel_all = self._cancel_all
                self._cancel_all = False
            out: dict[Job, list] = {}
            for job in inbox:
                self._start(job, out)
            if cancel_all:
                cancels += [(job, None) for job in self._jobs.values()]
            for job, sample in cancels:
                self._cancel(job, sample, out)
            if self.engine.scheduler.has_work():
                self._step(out)
            self._deliver(out)
            with self._cond:
                if self._stopping and not self._jobs and not self._inbox:
                    return

    def _start(self, job: Job, out: dict) -> None:
        # the engine seeds prompt i with params.seed + i; the job's own seed must not depend on its index
        params = dataclasses.replace(job.params, seed=job.params.seed - job.index)
        try:
            self.engine.submit([job.prompt_ids], params, prompt_indices=[job.index])
        except Exception as e:  # validated before queueing: this is a bug, not bad input
            self._mark_started(job)
            out.setdefault(job, []).append(e)
            return
        self._jobs[job.index] = job

    def _mark_started(self, job: Job) -> None:
        if job.started is None:
            job.started = time.perf_counter()
            with self._cond:
                self._queued -= 1
            self.metrics.request_started(len(job.prompt_ids), job.started - job.submitted)

    def _cancel(self, job: Job, sample: int | None, out: dict) -> None:
        if job.index not in self._jobs:
            with self._cond:  # still in the inbox of a later round, or already finished
                if job in self._inbox and sample is None:
                    self._inbox.remove(job)
                    self._queued -= 1
            return
        self.engine.cancel(job.index, sample)  # KV freed now; the next step reports the results as "cancelled"

    def _finished(self, job: Job, result: Result, out: dict) -> None:
        self._mark_started(job)
        out.setdefault(job, []).append(result)
        reason = {"eos": "stop"}.get(result.finish_reason, result.finish_reason)
        self.metrics.sample_finished(reason, sum(result.branches_per_block), result.stats.parallel_blocks)
        job.left -= 1
        if job.left <= 0:
            del self._jobs[job.index]
            self.metrics.request_finished(time.perf_counter() - job.submitted)

    def _step(self, out: dict) -> None:
        try:
            event = self.engine.step()
        except Exception as e:  # a bug or an out-of-memory: fail the jobs in flight, keep serving if we can
            log.error("engine step failed; failing %d request(s)\n%s", len(self._jobs), traceback.format_exc())
            for job in list(self._jobs.values()):
                self._mark_started(job)
                out.setdefault(job, []).append(e)
                try:
                    self.engine.cancel(job.index)
                except Exception:
                    self.failure = f"{type(e).__name__}: {e}"
                del self._jobs[job.index]
            return
        self.steps += 1
        generated = sum(len(d.token_ids) for d in event.deltas)
        self.generated_tokens += generated
        self.metrics.step(generated)
        for delta in event.deltas:
            job = self._jobs.get(delta.prompt_index)
            if job is not None:
                self._mark_started(job)
                out.setdefault(job, []).append(delta)
        for result in event.finished:
            job = self._jobs.get(result.prompt_index)
            if job is not None:
                self._finished(job, result, out)

    def _deliver(self, out: dict[Job, list]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, items in out.items():
            by_loop.setdefault(job.sink.loop, []).append((job.sink.queue, items))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_fan_out, batch)
            except RuntimeError:  # that event loop is closed: its clients are gone
                pass


def _fan_out(batch: list[tuple[asyncio.Queue, list]]) -> None:
    for queue, items in batch:
        queue.put_nowait(items)


__all__ = ["EngineLoop", "Job", "Overloaded", "Sink", "StreamDelta"]
