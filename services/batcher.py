"""/predict's batching: the requests that arrive while the model is busy run together in its next batch.

A request that finds the model idle runs at once; it never waits for company. While a batch runs,
later requests queue, and the next batch takes the queued requests in order, up to `max_texts` texts
(a larger request runs alone). Batches grow with load and shrink back to one request without it.
Inference runs on one thread of its own, so the worker's event loop stays free for HTTP.

Load shedding: a request whose predicted wait (the texts queued ahead of it, at the measured cost of
a text) exceeds `max_wait_s` is refused with `Unavailable` (503) rather than queued.

Why not BentoML's adaptive batching: it holds a lone request while it waits for others, by a wait it
learns from past batches, and at low load that cost 9-22 ms p50 where a text takes 3 ms
(`benchmarks/serving.py`, c=1). On CPU a text costs about the same alone as in a batch of 32, so
waiting does not pay there; on a GPU the batches that form under load are the ones that do.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tuneloop.errors import Unavailable

T = TypeVar("T")

COST_SMOOTHING = 0.2  # weight of the latest batch in the running seconds-per-text estimate


@dataclass
class _Request(Generic[T]):
    texts: Sequence[str]
    answer: asyncio.Future[list[T]] = field(repr=False)


class Batcher(Generic[T]):
    """Runs `run(texts) -> one result per text` over the texts of concurrent `submit` calls."""

    def __init__(self, run: Callable[[list[str]], list[T]], max_texts: int, max_wait_s: float) -> None:
        self._run = run
        self.max_texts = max_texts
        self.max_wait_s = max_wait_s
        self._queue: deque[_Request[T]] = deque()
        self._queued_texts = 0
        self._running = False
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.seconds_per_text = 0.0  # measured; 0 until the first batch, so nothing is shed before then

    async def submit(self, texts: Sequence[str]) -> list[T]:
        """One result per text, in order; raises what `run` raised for its batch, or Unavailable."""
        if self._closed:
            raise Unavailable("the service is shutting down; retry on another replica")
        wait_s = (self._queued_texts + len(texts)) * self.seconds_per_text
        if self._running and wait_s > self.max_wait_s:
            raise Unavailable(
                f"overloaded: this request would wait about {wait_s * 1000:.0f} ms, over serve.max_latency_ms="
                f"{self.max_wait_s * 1000:.0f}; retry with backoff, or add replicas"
            )
        loop = asyncio.get_running_loop()
        request: _Request[T] = _Request(texts, loop.create_future())
        self._queue.append(request)
        self._queued_texts += len(texts)
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await request.answer

    def close(self) -> None:
        """Refuse new requests; let the batch in progress finish."""
        self._closed = True
        self._executor.shutdown(wait=True)

    def _next_batch(self) -> list[_Request[T]]:
        batch: list[_Request[T]] = []
        texts = 0
        while self._queue and (not batch or texts + len(self._queue[0].texts) <= self.max_texts):
            request = self._queue.popleft()
            self._queued_texts -= len(request.texts)
            if not request.answer.done():  # a client that went away is not worth a model run
                batch.append(request)
                texts += len(request.texts)
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while batch := self._next_batch():
                texts = [text for request in batch for text in request.texts]
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._executor, self._run, texts)
                except Exception as exc:  # every request of the batch gets the error; the next batch runs
                    for request in batch:
                        if not request.answer.done():
                            request.answer.set_exception(exc)
                    continue
                cost = (time.perf_counter() - started) / len(texts)
                self.seconds_per_text += COST_SMOOTHING * (cost - self.seconds_per_text) if self.seconds_per_text else cost
                offset = 0
                for request in batch:
                    if not request.answer.done():
                        request.answer.set_result(results[offset : offset + len(request.texts)])
                    offset += len(request.texts)
        finally:
            self._running = False
