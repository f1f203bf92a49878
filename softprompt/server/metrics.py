"""Counters for /metrics, rendered in the Prometheus text format."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, list[float]] = {}  # endpoint -> bucket counts + [sum, count]
        self.ttft = [0.0] * (len(BUCKETS) + 2)  # time to first token: bucket counts + [sum, count]
        self.tokens_generated = 0

    @staticmethod
    def _add(row: list[float], seconds: float) -> None:
        for i, b in enumerate(BUCKETS):
            if seconds <= b:
                row[i] += 1
        row[-2] += seconds
        row[-1] += 1

    def observe(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self._add(self.latency.setdefault(endpoint, [0.0] * (len(BUCKETS) + 2)), seconds)

    def observe_ttft(self, seconds: float) -> None:
        """A generation's time from being queued to its first token."""
        with self._lock:
            self._add(self.ttft, seconds)

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens_generated += n

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """Text exposition: request counts, latency histograms, generated tokens and ``gauges``."""
        lines = ["# HELP softprompt_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE softprompt_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'softprompt_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
            lines += ["# HELP softprompt_request_seconds Latency of successful requests.",
                      "# TYPE softprompt_request_seconds histogram"]
            for endpoint, row in sorted(self.latency.items()):
                for b, n in zip(BUCKETS, row, strict=False):
                    lines.append(f'softprompt_request_seconds_bucket{{endpoint="{endpoint}",le="{b}"}} {int(n)}')
                lines.append(f'softprompt_request_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {int(row[-1])}')
                lines.append(f'softprompt_request_seconds_sum{{endpoint="{endpoint}"}} {row[-2]:.6f}')
                lines.append(f'softprompt_request_seconds_count{{endpoint="{endpoint}"}} {int(row[-1])}')
            lines += ["# HELP softprompt_time_to_first_token_seconds Time from a generation being queued to its "
                      "first token.", "# TYPE softprompt_time_to_first_token_seconds histogram"]
            for b, n in zip(BUCKETS, self.ttft, strict=False):
                lines.append(f'softprompt_time_to_first_token_seconds_bucket{{le="{b}"}} {int(n)}')
            lines += [f'softprompt_time_to_first_token_seconds_bucket{{le="+Inf"}} {int(self.ttft[-1])}',
                      f"softprompt_time_to_first_token_seconds_sum {self.ttft[-2]:.6f}",
                      f"softprompt_time_to_first_token_seconds_count {int(self.ttft[-1])}"]
            lines += ["# HELP softprompt_generated_tokens_total Tokens generated.",
                      "# TYPE softprompt_generated_tokens_total counter",
                      f"softprompt_generated_tokens_total {self.tokens_generated}"]
        for name, (help_, value) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
