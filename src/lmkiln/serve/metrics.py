"""What /metrics reports, in Prometheus' text format: requests by route and status, tokens in and out,
time to first token, request latency, the queue and batch as they are now, the prefix cache's hits,
and model versions (the active one, swaps loaded and refused)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServeMetrics:
    def __init__(
        self,
        queue_depth: Callable[[], int],
        batch_size: Callable[[], int],
        prefix_caches: Callable[[], list] = list,
    ) -> None:
        self.registry = r = CollectorRegistry()  # one per app: tests and several servers never share counts
        self.requests = Counter("lmkiln_requests", "HTTP requests to /v1", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lmkiln_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("lmkiln_completion_tokens", "tokens generated", registry=r)
        self.finishes = Counter("lmkiln_sequences_finished", "sequences ended, by reason", ["reason"], registry=r)
        self.ttft = Histogram(
            "lmkiln_time_to_first_token_seconds",
            "from submission to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "lmkiln_request_duration_seconds",
            "whole request, streaming included",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.log_records = Counter(
            "lmkiln_request_log_records", "requests logged (written) or not (dropped)", ["status"], registry=r
        )
        self.content_filtered = Counter(
            "lmkiln_content_filtered", "replies cut before a blocked phrase (--blocklist)", registry=r
        )
        self.swaps = Counter(
            "lmkiln_model_swaps",
            "new versions asked for: loaded, or refused by the load checks",
            ["result"],
            registry=r,
        )
        self.version = Info("lmkiln_model_version", "the version new requests go to", registry=r)
        Gauge("lmkiln_queue_depth", "requests waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("lmkiln_batch_size", "sequences in the running batch", registry=r).set_function(batch_size)

        def total(attr: str) -> Callable[[], float]:
            return lambda: sum(getattr(c, attr) for c in prefix_caches())

        def hit_rate() -> float:
            queried = total("queried")()
            return total("hit")() / queried if queried else 0.0

        prefix = {
            "queried_tokens": ("prompt tokens looked up in the prefix cache", total("queried")),
            "hit_tokens": ("prompt tokens whose keys and values came from the prefix cache", total("hit")),
            "hit_rate": ("hit tokens / queried tokens since the start", hit_rate),
            "bytes": ("memory the prefix cache holds", total("nbytes")),
        }
        for name, (doc, value) in prefix.items():
            Gauge(f"lmkiln_prefix_cache_{name}", doc, registry=r).set_function(value)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def logged(self, written: bool) -> None:
        self.log_records.labels("written" if written else "dropped").inc()

    def filtered(self) -> None:
        self.content_filtered.inc()

    def activated(self, label: str) -> None:
        self.version.info({"version": label})

    def swapped(self, loaded: bool) -> None:
        self.swaps.labels("loaded" if loaded else "refused").inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, seq, reason: str) -> None:
        self.prompt_tokens.inc(len(seq.prompt))
        self.completion_tokens.inc(seq.generated)
        self.finishes.labels(reason.split(":")[0]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
