"""Dynamic batching on the event loop, and where a batch's pass runs (a worker thread, or the loop)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Awaitable, Callable


class MicroBatcher:
    """Dynamic batching on the event loop: items are grouped and ``run`` takes them a batch at a
    time. An item queued while a batch runs waits for the next, which takes every item queued
    meanwhile, up to ``max_size``; with ``wait_s`` > 0 a batch that is not full waits up to that
    long for more. What ``@serve.batch`` does, without its per-call costs (a signature inspection
    per call, a gauge update and a task per wait): a sixth of a replica's busy event loop under
    load at 120 px (py-spy). ``run`` gets the items and returns one result each; an exception it raises
    goes to every caller of the batch."""

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]], max_size: int, wait_s: float = 0.0):
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self._queue: list[tuple[Any, asyncio.Future | None]] = []
        self._worker: asyncio.Task | None = None
        self._full = asyncio.Event()  # set when a full batch is queued (awaited only with wait_s)

    async def __call__(self, item: Any) -> Any:
        """``run``'s result for ``item``."""
        future = asyncio.get_running_loop().create_future()
        self._put(item, future)
        return await future

    def offer(self, item: Any) -> None:
        """Queues ``item`` for ``run`` without waiting for it (its result is dropped)."""
        self._put(item, None)

    async def drained(self) -> None:
        """Returns once every queued item has run."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    def _put(self, item: Any, future: asyncio.Future | None) -> None:
        self._queue.append((item, future))
        if len(self._queue) >= self.max_size:
            self._full.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            if self.wait_s > 0 and len(self._queue) < self.max_size:
                self._full.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.wait_s)
            taken, self._queue = self._queue[: self.max_size], self._queue[self.max_size :]
            taken = [(item, f) for item, f in taken if f is None or not f.done()]  # callers gone
            if not taken:
                continue
            results: list[Any] | None = None
            try:
                results = await self.run([item for item, _ in taken])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                error = exc
            for i, (_, future) in enumerate(taken):
                if future is None or future.done():
                    continue
                if results is None:
                    future.set_exception(error)
                else:
                    future.set_result(results[i])


class PassRunner:
    """Runs a batch's decoding and forward pass in a worker thread, or, for a lone image whose last
    lone pass took at most ``inline_max_s``, on the event loop itself.

    At low load a request is a lone batch, and the hop to a worker thread and back (a thread wake-up
    each way, and the GIL passed between two busy threads) cost 0.4-1.1 ms of p50 at concurrency 1
    and 0.3-1.0 ms of replica CPU a request on 2 cores (bench/RESULTS.md). Blocking the loop that
    long is harmless: requests arriving meanwhile would wait for the next batch anyway. A model whose
    pass takes longer stays in the thread (the first lone pass always runs there, to be timed), so the
    loop stays free for health checks and uploads; a photo far larger than the last blocks the loop
    once, for its own pass, and sends the next lone pass back to the thread.
    """

    def __init__(self, inline_max_s: float = 0.005) -> None:
        self.inline_max_s = inline_max_s
        self.lone_s = float("inf")  # the last lone pass, hop included when it ran in a thread

    async def __call__(self, fn: Callable[[Any], Any], arg: Any, *, lone: bool) -> Any:
        if not lone:
            return await asyncio.to_thread(fn, arg)
        t0 = time.perf_counter()
        try:
            if self.lone_s <= self.inline_max_s:
                return fn(arg)
            return await asyncio.to_thread(fn, arg)
        finally:
            self.lone_s = time.perf_counter() - t0
