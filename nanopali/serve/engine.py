"""The engine: one thread that owns the model and steps the continuous batch; requests reach it through a
bounded queue.

    engine = Engine(pali, max_batch=8, max_queue=64, metrics=metrics)
    engine.submit(row, on_done)   # raises QueueFull when max_queue rows already wait; on_done(row) when it ends
    row.cancel()                  # from any thread: the row leaves at the next step boundary

Between two decode steps the thread moves waiting rows into the batch (up to max_batch rows decode at once),
so a request that arrives while others decode joins them at the next step (inference/batching.py). The
batch keeps each failure in its row; anything else that goes wrong in a step (a bug) ends the rows of that
batch with the error and the engine carries on with a new batch, so no request can take the server down.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from nanopali.inference.batching import Row, end
from nanopali.pipeline import Pali
from nanopali.serve.metrics import Metrics

log = logging.getLogger("nanopali.serve")


class QueueFull(Exception):
    """max_queue rows are already waiting."""


class Engine:
    def __init__(self, pali: Pali, max_batch: int, max_queue: int, metrics: Metrics):
        self.pali, self.max_batch, self.max_queue, self.metrics = pali, max_batch, max_queue, metrics
        self.batch = pali.batch()
        self.waiting: collections.deque[tuple[Row, Callable[[Row], None], float]] = collections.deque()
        self.on_done: dict[Row, Callable[[Row], None]] = {}
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="nanopali-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def submit(self, row: Row, on_done: Callable[[Row], None]) -> None:
        """Queue a row (from Pali.row); on_done(row) is called on the engine thread once it has ended."""
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.append((row, on_done, time.monotonic()))
            self.metrics.queue_length.set(len(self.waiting))
            self.wake.notify()

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not len(self.batch) and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    break
                joining = []
                while self.waiting and len(self.batch) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
                self.metrics.queue_length.set(len(self.waiting))
            now = time.monotonic()
            for row, on_done, arrived in joining:
                self.on_done[row] = on_done
                self.metrics.queue_wait.observe(now - arrived)
            try:
                self._step([row for row, _, _ in joining])
            except Exception as e:  # a bug: end every row of this batch with it, go on with an empty batch
                log.exception("a decode step failed; its rows end with the error")
                for row in self.batch.abort(e):
                    self._done(row)
        with self.wake:
            waiting, self.on_done = list(self.waiting), {**self.on_done, **{row: f for row, f, _ in self.waiting}}
            self.waiting.clear()
        for row in self.batch.abort(RuntimeError("the server is shutting down"), [row for row, _, _ in waiting]):
            self._done(row)

    def _step(self, joining: list[Row]) -> None:
        for row in joining:  # checked by Pali.row already; should one fail anyway, it ends alone
            try:
                self.batch.add([row])
            except Exception as e:
                end(row, "error", e)
                self._done(row)
        before = {row: len(row.tokens) for row in self.batch.rows + self.batch.joining}
        rows = len(self.batch)
        ended = self.batch.step()
        self.metrics.batch_rows.set(len(self.batch))
        self.metrics.step(rows, sum(len(row.tokens) - n for row, n in before.items()))
        for row in ended:
            self._done(row)

    def _done(self, row: Row) -> None:
        self.metrics.ended.labels(row.finish_reason).inc()
        on_done = self.on_done.pop(row, None)
        if on_done is not None:
            on_done(row)
