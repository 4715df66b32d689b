"""Server metrics in the Prometheus text format (version 0.0.4), without a client library.

Latencies are observed on the engine thread and read on the event loop, hence one lock.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; the last one is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return [*out, f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram()
        self.request_latency = Histogram()
        self.prompt_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.rejected: dict[str, int] = {}  # reason (queue_full, shutting_down) -> requests

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def observe_tokens(self, seconds: float, count: int) -> None:
        """`count` tokens arrived `seconds` after the previous ones: each gets the mean gap."""
        with self._lock:
            for _ in range(count):
                self.inter_token_latency.observe(seconds / count)

    def observe_finished(self, reason: str, seconds: float) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.request_latency.observe(seconds)

    def count_prompt_tokens(self, count: int) -> None:
        with self._lock:
            self.prompt_tokens += count

    def count_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self, stats, in_flight: int) -> str:
        """Prometheus text for these metrics and the engine's latest `stats` (EngineStats or None)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        def gauge(name: str, help_text: str, value: float) -> None:
            metric(name, "gauge", help_text, [f"{name} {value}"])

        def counter(name: str, help_text: str, value: float) -> None:
            metric(name, "counter", help_text, [f"{name}_total {value}"])

        gauge("leanlm_requests_in_flight", "Engine requests admitted by the server and not finished.", in_flight)
        if stats is not None:
            queries = stats.prefix_cache_queries
            gauge("leanlm_requests_running", "Requests in the running batch.", stats.num_running)
            gauge("leanlm_requests_waiting", "Requests waiting for a place in the batch.", stats.num_waiting)
            gauge("leanlm_kv_blocks_used", "KV cache blocks held by requests.", stats.kv_blocks_used)
            gauge("leanlm_kv_blocks_cached", "Free blocks still holding a cached prefix.", stats.kv_blocks_cached)
            gauge("leanlm_kv_blocks_total", "KV cache blocks in the pool.", stats.kv_blocks_total)
            gauge(
                "leanlm_prefix_cache_hit_rate",
                "Prompt blocks found in the prefix cache / blocks looked up.",
                stats.prefix_cache_hits / queries if queries else 0.0,
            )
            counter("leanlm_prefix_cache_queries", "Prompt blocks looked up in the prefix cache.", queries)
            counter("leanlm_prefix_cache_hits", "Prompt blocks found in the prefix cache.", stats.prefix_cache_hits)
            counter("leanlm_preemptions", "Requests preempted to free KV blocks.", stats.num_preemptions)
            counter("leanlm_generation_tokens", "Tokens generated.", stats.total_generated_tokens)
            if (spec := getattr(stats, "speculative", None)) is not None:
                counter(
                    "leanlm_spec_decode_draft_tokens", "Speculative tokens drafted and verified.", spec.num_draft_tokens
                )
                counter(
                    "leanlm_spec_decode_accepted_tokens", "Drafted tokens the model accepted.", spec.num_accepted_tokens
                )
                gauge(
                    "leanlm_spec_decode_acceptance_rate",
                    "Accepted / drafted speculative tokens since the start.",
                    spec.acceptance_rate,
                )
        with self._lock:
            counter("leanlm_prompt_tokens", "Prompt tokens of admitted requests.", self.prompt_tokens)
            metric(
                "leanlm_requests_finished",
                "counter",
                "Engine requests finished, by finish reason.",
                [f'leanlm_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())],
            )
            metric(
                "leanlm_requests_rejected",
                "counter",
                "Requests refused before reaching the engine, by reason.",
                [f'leanlm_requests_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())],
            )
            for name, help_text, hist in (
                ("leanlm_time_to_first_token_seconds", "Arrival to first generated token.", self.time_to_first_token),
                ("leanlm_inter_token_latency_seconds", "Gap between generated tokens.", self.inter_token_latency),
                ("leanlm_request_latency_seconds", "Arrival to last token.", self.request_latency),
            ):
                metric(name, "histogram", help_text, hist.lines(name))
        return "\n".join(lines) + "\n"
