"""Micro-batching: one worker thread runs every pipeline call, merging compatible requests.

Requests wait in a bounded queue (bounded in images, so one large request cannot hide behind
its count). The worker takes the oldest request, gathers the waiting requests with the same
batch key (same backbone, adapter, method, steps, size, scales, guidance, attention, identity)
for up to ``wait_s`` or until ``max_batch_images``, and runs them as ONE pipeline call. Requests
with other keys keep their place in the queue. Because all calls happen on this one thread, a
pipeline is never called from two requests at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fastface.serve")


class QueueFull(Exception):
    """The queue holds as many images as allowed; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher is shutting down."""


@dataclass
class _Pending:
    work: Any  # engine.Work: .key, .request.num_images
    future: Future
    enqueued: float


class MicroBatcher:
    """Queue + worker thread; ``run(works) -> per-work results`` is the engine's batched call."""

    def __init__(
        self,
        run: Callable[[Sequence[Any]], list[Any]],
        *,
        max_batch_images: int = 16,
        wait_s: float = 0.01,
        queue_images: int = 64,
        enabled: bool = True,
        name: str = "fastface-worker",
    ) -> None:
        self._run = run
        self.max_batch_images = max_batch_images
        self.wait_s = wait_s
        self.queue_images = queue_images
        self.enabled = enabled
        self._pending: deque[_Pending] = deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._closed = False
        # Counters for /metrics (read under the condition's lock).
        self.batches = 0
        self.batched_requests = 0
        self.batched_images = 0
        self.busy_seconds = 0.0
        self._seconds_per_image = 1.0
        self._running_images = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- clients -------------------------------------------------------------------------------

    def submit(self, work: Any) -> Future:
        """Queue a work; raises QueueFull when its images do not fit, Closed after close()."""
        future: Future = Future()
        images = work.request.num_images
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._queued_images + images > self.queue_images:
                wait = (self._queued_images + self._running_images) * self._seconds_per_image
                raise QueueFull(
                    f"the queue is full ({self._queued_images} images waiting, limit {self.queue_images})",
                    max(1, int(wait + 0.999)),
                )
            self._pending.append(_Pending(work, future, time.monotonic()))
            self._queued_images += images
            self._cond.notify_all()
        return future

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {
                "queue_requests": len(self._pending),
                "queue_images": self._queued_images,
                "running_images": self._running_images,
                "batches": self.batches,
                "batched_requests": self.batched_requests,
                "batched_images": self.batched_images,
                "busy_seconds": self.busy_seconds,
            }

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            self._queued_images = 0
            self._cond.notify_all()
        for item in pending:
            item.future.cancel()
        self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------------

    def _take_compatible(self, key: tuple, batch: list[_Pending], images: int) -> int:
        """Move waiting works with ``key`` into ``batch`` while they fit; returns the image count."""
        keep: deque[_Pending] = deque()
        while self._pending:
            item = self._pending.popleft()
            n = item.work.request.num_images
            if item.work.key == key and images + n <= self.max_batch_images:
                batch.append(item)
                images += n
                self._queued_images -= n
            else:
                keep.append(item)
        self._pending = keep
        return images

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            first = self._pending.popleft()
            images = first.work.request.num_images
            self._queued_images -= images
            batch = [first]
            if self.enabled:
                deadline = time.monotonic() + self.wait_s
                while True:
                    images = self._take_compatible(first.work.key, batch, images)
                    remaining = deadline - time.monotonic()
                    if images >= self.max_batch_images or remaining <= 0 or self._closed:
                        break
                    self._cond.wait(remaining)
            self._running_images = images
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # A request that timed out (its future cancelled) before it started is dropped.
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.monotonic()
            try:
                results = self._run([item.work for item in live])
            except BaseException as exc:  # reported to every request of the batch, the server goes on
                if not isinstance(exc, Exception):
                    raise
                for item in live:
                    item.future.set_exception(exc)
            else:
                for item, result in zip(live, results):
                    item.future.set_result(result)
            elapsed = time.monotonic() - start
            images = sum(item.work.request.num_images for item in live)
            with self._cond:
                self.batches += 1
                self.batched_requests += len(live)
                self.batched_images += images
                self.busy_seconds += elapsed
                self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * (elapsed / max(images, 1))
                self._running_images = 0
