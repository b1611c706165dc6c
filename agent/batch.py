"""Micro-batcher: take up to ``max_batch`` items, waiting at most ``max_wait_ms`` after the first one.

A lone slice (nothing else queued) is analysed at once: at scanner rates below our throughput waiting only
adds latency. When more is queued (a burst, a backlog) the batch fills from the queue and waits up to
``max_wait_ms`` for stragglers, so under load the batches grow and throughput rises, without an unbounded queue in RAM (the queue carries spool paths, not pixels).
"""

from __future__ import annotations

import queue
import time


class MicroBatcher:
    def __init__(self, source: "queue.Queue", max_batch: int = 16, max_wait_ms: float = 8.0):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.q = source
        self.max_batch = int(max_batch)
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0

    def next(self, idle_timeout: float) -> list:
        """A batch (possibly empty after ``idle_timeout`` seconds without any item)."""
        try:
            first = self.q.get(timeout=idle_timeout)
        except queue.Empty:
            return []
        items = [first]
        deadline = time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            try:  # whatever is already queued is taken at once
                items.append(self.q.get_nowait())
                continue
            except queue.Empty:
                pass
            if len(items) == 1:  # nothing else waiting: the scanner is slower than us, analyse at once
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                items.append(self.q.get(timeout=left))
            except queue.Empty:
                break
        return items
