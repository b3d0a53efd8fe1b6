"""Prometheus metrics: vLLM's names (docs: "Production Metrics") under the `serve:` prefix."""
from __future__ import annotations


class Metrics:
    """vLLM's metric names (docs: "Production Metrics") under our own prefix, in a registry
    of their own: prometheus_client's global registry refuses a second app in one process."""

    def __init__(self, prefix: str = "serve"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()

        def name(s):
            return f"{prefix}:{s}"
        latency = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
        self.running = Gauge(name("num_requests_running"), "Requests in the running batch", registry=r)
        self.waiting = Gauge(name("num_requests_waiting"), "Requests waiting for a row", registry=r)
        self.ttft = Histogram(name("time_to_first_token_seconds"), "Arrival to first generated token",
                              buckets=latency, registry=r)
        self.itl = Histogram(name("inter_token_latency_seconds"), "Time between consecutive tokens of a request",
                             buckets=latency, registry=r)
        self.e2e = Histogram(name("e2e_request_latency_seconds"), "Arrival to last token", buckets=latency,
                             registry=r)
        self.queue_time = Histogram(name("request_queue_time_seconds"), "Arrival to admission into the batch",
                                    buckets=latency, registry=r)
        self.prompt_tokens = Counter(name("prompt_tokens"), "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(name("generation_tokens"), "Tokens generated", registry=r)
        self.success = Counter(name("request_success"), "Finished requests by finish reason",
                               ["finished_reason"], registry=r)
        self.batch_size = Histogram(name("iteration_batch_size"), "Rows in the batch at each decode step",
                                    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.safety_flags = Counter(name("safety_flags"), "Moderation flags by category and stage",
                                    ["category", "stage"], registry=r)
        self.rate_limited = Counter(name("rate_limited_requests"), "Requests refused with 429, by reason",
                                    ["reason"], registry=r)
        self.feedback = Counter(name("feedback"), "Feedback received, by rating", ["rating"], registry=r)
        self.http_errors = Counter(name("http_errors"), "Error responses by status code", ["status"], registry=r)
