"""The server's Prometheus metrics (prometheus_client), in a registry of their own so that several servers can
live in one process (tests) without clashing.

    nanopali_requests_total{endpoint, status}        every answered request, by HTTP status
    nanopali_request_seconds{endpoint}               latency from arrival to the last byte of the answer
    nanopali_time_to_first_token_seconds             arrival -> first piece of text
    nanopali_queue_wait_seconds                      arrival -> joining the batch
    nanopali_queue_length / nanopali_batch_rows      rows waiting / decoding now
    nanopali_batch_size                              rows in each decode step
    nanopali_generated_tokens_total                  rate() of it is tokens/s; nanopali_tokens_per_second is the
                                                     last 10 s as the server measured it
    nanopali_rows_ended_total{reason}                stop, length, cancelled, timeout, error
    nanopali_rejected_total{reason}                  queue_full, too_large, unauthorized
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
WINDOW_S = 10.0


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("nanopali_requests", "Answered requests", ["endpoint", "status"], registry=registry)
        self.latency = Histogram("nanopali_request_seconds", "Request latency, arrival to last byte", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("nanopali_time_to_first_token_seconds", "Arrival to the first piece of text",
                                     buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("nanopali_queue_wait_seconds", "Arrival to joining the batch",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_length = Gauge("nanopali_queue_length", "Rows waiting to join the batch", registry=registry)
        self.batch_rows = Gauge("nanopali_batch_rows", "Rows decoding now", registry=registry)
        self.batch_size = Histogram("nanopali_batch_size", "Rows in each decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.tokens = Counter("nanopali_generated_tokens", "Generated tokens", registry=registry)
        self.tokens_per_second = Gauge("nanopali_tokens_per_second", f"Generated tokens/s over the last {WINDOW_S:g} s",
                                       registry=registry)
        self.ended = Counter("nanopali_rows_ended", "Rows that ended, by reason", ["reason"], registry=registry)
        self.rejected = Counter("nanopali_rejected", "Requests refused before any work", ["reason"], registry=registry)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def step(self, rows: int, tokens: int) -> None:
        """One decode step of `rows` rows that produced `tokens` tokens (called by the engine thread)."""
        self.batch_size.observe(rows)
        self.tokens.inc(tokens)
        self._rate(tokens)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        self._rate(0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _rate(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            if tokens:
                self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            self.tokens_per_second.set(sum(n for _, n in self._recent) / WINDOW_S)
