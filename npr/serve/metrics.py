"""``GET /metrics``: Prometheus text format (version 0.0.4), written by hand (no client library needed).

vLLM's metric names where the meaning is the same, labelled ``model_name``; NPR's own under
``npr:``. The engine loop thread records (``request_started``, ``request_finished``, ``step``);
the HTTP handler renders. Counters only grow; histograms use fixed buckets (seconds).
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket (not cumulative)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out += [
            f'{name}_bucket{{{labels},le="+Inf"}} {self.count}',
            f"{name}_sum{{{labels}}} {self.sum}",
            f"{name}_count{{{labels}}} {self.count}",
        ]
        return out


class Metrics:
    """Server-wide counters; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # OpenAI finish reason -> samples
        self.branches = 0
        self.parallel_blocks = 0
        self.ttft = Histogram()
        self.e2e = Histogram()

    def request_started(self, prompt_tokens: int, ttft_s: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.ttft.observe(ttft_s)

    def sample_finished(self, finish_reason: str, branches: int, parallel_blocks: int) -> None:
        with self._lock:
            self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
            self.branches += branches
            self.parallel_blocks += parallel_blocks

    def request_finished(self, e2e_s: float) -> None:
        with self._lock:
            self.e2e.observe(e2e_s)

    def step(self, generated_tokens: int) -> None:
        with self._lock:
            self.generation_tokens += generated_tokens

    def render(self, model_name: str, running: int, waiting: int, kv_used: int, kv_total: int) -> str:
        label = 'model_name="' + model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        with self._lock:
            metric(
                "vllm:num_requests_running",
                "gauge",
                "Requests decoding in the engine.",
                [f"vllm:num_requests_running{{{label}}} {running}"],
            )
            metric(
                "vllm:num_requests_waiting",
                "gauge",
                "Requests waiting to start.",
                [f"vllm:num_requests_waiting{{{label}}} {waiting}"],
            )
            metric(
                "vllm:kv_cache_usage_perc",
                "gauge",
                "KV-cache usage: 1 means 100 percent.",
                [f"vllm:kv_cache_usage_perc{{{label}}} {kv_used / kv_total if kv_total else 0.0}"],
            )
            metric(
                "vllm:prompt_tokens",
                "counter",
                "Prompt tokens processed.",
                [f"vllm:prompt_tokens_total{{{label}}} {self.prompt_tokens}"],
            )
            metric(
                "vllm:generation_tokens",
                "counter",
                "Tokens generated (every branch).",
                [f"vllm:generation_tokens_total{{{label}}} {self.generation_tokens}"],
            )
            metric(
                "vllm:request_success",
                "counter",
                "Samples finished, by finish reason.",
                [
                    f'vllm:request_success_total{{{label},finished_reason="{reason}"}} {n}'
                    for reason, n in sorted(self.finished.items())
                ],
            )
            metric(
                "vllm:time_to_first_token_seconds",
                "histogram",
                "Time to the first token, queueing included.",
                self.ttft.lines("vllm:time_to_first_token_seconds", label),
            )
            metric(
                "vllm:e2e_request_latency_seconds",
                "histogram",
                "Request latency, submission to last sample.",
                self.e2e.lines("vllm:e2e_request_latency_seconds", label),
            )
            metric(
                "npr:branches",
                "counter",
                "Branches decoded (a block of k plans counts k).",
                [f"npr:branches_total{{{label}}} {self.branches}"],
            )
            metric(
                "npr:parallel_blocks",
                "counter",
                "Parallel blocks executed.",
                [f"npr:parallel_blocks_total{{{label}}} {self.parallel_blocks}"],
            )
            metric(
                "npr:invalid_schema",
                "counter",
                "Samples ended by an invalid NPR structure.",
                [f"npr:invalid_schema_total{{{label}}} {self.finished.get('invalid_schema', 0)}"],
            )
        return "\n".join(lines) + "\n"


__all__ = ["Histogram", "Metrics"]
