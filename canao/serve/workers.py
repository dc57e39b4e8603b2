"""One worker thread per loaded model, behind a bounded admission count.

A model instance is not safe to call from two threads at once (KV caches,
scratch buffers, torch's own thread pool), so every call to it runs on that
model's single worker thread, under its lock. Requests that arrive while the
worker is busy wait in its queue; a request is turned away at once with `Busy`
(and a Retry-After) when `1 + max_queue` calls are already admitted (running or
waiting), so memory stays bounded however many clients pile on, or when its
estimated wait (calls ahead x the recent time per call) would exceed `max_wait_s`.

QA models that answer batches (`answer_batch`) get a BatchingWorker: the requests
that queue up while one batch computes run together as the next batch. A generator
with several slots (`slots` > 1: a compiled decoder that batches the decode steps of
concurrent generations itself) gets that many worker threads and no lock.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class Busy(Exception):
    """The model's queue is full; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised inside a worker call when its client went away."""


class ModelWorker:
    def __init__(self, kind: str, model_id: str, model: Any, max_queue: int, max_wait_s: float | None = None,
                 concurrency: int = 1):
        self.kind, self.id, self.model = kind, model_id, model
        self.concurrency = max(1, int(concurrency))  # calls the model runs at once (its slots)
        self.capacity = self.concurrency + max(0, int(max_queue))
        self.max_wait_s = max_wait_s
        self.call_s = 0.0  # recent time per call (exponential average), for the wait estimate
        # held while the model computes; a model with slots keeps its own order
        self.lock = threading.Lock() if self.concurrency == 1 else contextlib.nullcontext()
        self._count_lock = threading.Lock()
        self._admitted = 0  # calls running or waiting
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"canao-{kind}-{model_id}")
        self.served = 0  # calls completed
        self.rejected = 0  # turned away busy
        self.cancelled = 0  # stopped because the client left

    @property
    def load(self) -> int:
        return self._admitted

    def expected_wait_s(self) -> float:
        """Rounds of calls ahead of a new one (its slots run `concurrency` at once) x the recent time per call."""
        return math.ceil(max(0, self._admitted - self.concurrency + 1) / self.concurrency) * self.call_s

    def admit(self) -> None:
        """Reserve a place in the queue, or raise Busy. Pair with `submit` (which releases it)."""
        with self._count_lock:
            wait = self.expected_wait_s()
            if self._admitted >= self.capacity or (self.max_wait_s is not None and wait > self.max_wait_s):
                self.rejected += 1
                raise Busy(f"the {self.kind} model '{self.id}' is busy ({self._admitted} requests queued, about "
                           f"{wait:.1f} s of work): retry shortly", retry_after=max(1, math.ceil(wait)))
            self._admitted += 1

    def _timed(self, seconds: float, calls: int = 1) -> None:
        per_call = seconds / max(1, calls)
        self.call_s = per_call if self.call_s == 0 else 0.8 * self.call_s + 0.2 * per_call

    def release(self) -> None:
        with self._count_lock:
            self._admitted -= 1

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> "asyncio.Future[tuple[Any, float]]":
        """Run fn(model, ...) on the worker thread after `admit`; resolves to (result, queue_ms)."""
        submitted = time.perf_counter()

        def job():
            queue_ms = 0.0
            try:
                with self.lock:
                    started = time.perf_counter()
                    queue_ms = (started - submitted) * 1e3
                    result = fn(self.model, *args, **kwargs)
                    self._timed(time.perf_counter() - started)
                self.served += 1
                return result, queue_ms
            except Cancelled:  # its client went away; nobody waits for a result
                self.cancelled += 1
                return None, queue_ms
            finally:
                self.release()

        try:
            future = self._executor.submit(job)
        except BaseException:
            self.release()
            raise
        return self._watched(future)

    def _watched(self, future: concurrent.futures.Future) -> "asyncio.Future":
        """The event loop's view of a queued call; one cancelled before it ran (its client left) never
        runs to release its place, so the place is released here."""

        def dropped(f) -> None:
            if f.cancelled():
                self.cancelled += 1
                self.release()

        future.add_done_callback(dropped)
        return asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class BatchingWorker(ModelWorker):
    """A QA worker that runs waiting requests together: `model.answer_batch(items)` -> one result (or
    exception) per item. There is no collection window: a lone request runs at once, and the requests
    that arrive while a batch computes are taken together (up to max_batch) by the worker's next turn.
    on_batch(n) is called with each batch's size (metrics)."""

    def __init__(self, kind: str, model_id: str, model: Any, max_queue: int, max_wait_s: float | None = None,
                 max_batch: int = 16, on_batch: Callable[[int], None] | None = None):
        super().__init__(kind, model_id, model, max_queue, max_wait_s)
        self.max_batch = max(1, int(max_batch))
        self.on_batch = on_batch
        self._pending: collections.deque = collections.deque()

    def submit_item(self, item: Any) -> "asyncio.Future[tuple[Any, float]]":
        """After `admit`: answer `item` in the next batch; resolves to (result, queue_ms)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        entry = (item, future, time.perf_counter())
        with self._count_lock:
            self._pending.append(entry)
        try:
            self._executor.submit(self._turn)
        except BaseException:  # shut down: the request never runs
            with self._count_lock:
                self._pending.remove(entry)
            self.release()
            raise
        return self._watched(future)

    def _turn(self) -> None:
        with self._count_lock:
            batch = []
            while self._pending and len(batch) < self.max_batch:
                entry = self._pending.popleft()
                if entry[1].set_running_or_notify_cancel():  # False: cancelled while waiting
                    batch.append(entry)
        if not batch:
            return  # an earlier turn took this turn's request
        try:
            with self.lock:
                started = time.perf_counter()
                results = self.model.answer_batch([item for item, _, _ in batch])
                self._timed(time.perf_counter() - started, len(batch))
        except BaseException as exc:  # noqa: BLE001 - every waiting client gets it
            results = [exc] * len(batch)
            started = time.perf_counter()
        for (_, future, submitted), result in zip(batch, results):
            self.served += not isinstance(result, BaseException)
            self.release()  # before the client hears back, as ModelWorker.submit's jobs do
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result((result, (started - submitted) * 1e3))
        if self.on_batch is not None:
            self.on_batch(len(batch))


def generation_call(gen: Any) -> Callable[..., dict]:
    """A uniform `call(gen, prompt, on_token, **settings) -> stats` over the generator's API.

    Prefers `generate(..., on_token=...)`, which reports the generator's own
    counts and timings; falls back to iterating `stream(...)` and timing it here.
    Settings the generator does not accept are dropped.
    """
    gen_params = _params(getattr(gen, "generate", None))
    if gen_params is not None and "on_token" in gen_params:

        def call(g, prompt, on_token, **settings):
            kwargs = {k: v for k, v in settings.items() if _accepts(gen_params, k)}
            return dict(g.generate(prompt, on_token=on_token, **kwargs))

        return call

    stream_params = _params(getattr(gen, "stream", None)) or {}

    def call_stream(g, prompt, on_token, **settings):
        kwargs = {k: v for k, v in settings.items() if _accepts(stream_params, k)}
        t0 = time.perf_counter()
        first = None
        pieces = []
        for piece in g.stream(prompt, **kwargs):
            if first is None:
                first = time.perf_counter()
            pieces.append(piece)
            on_token(piece)
        t1 = time.perf_counter()
        n = len(pieces)
        decode_s = t1 - (first or t1)
        return {
            "text": "".join(pieces),
            "prompt_tokens": None,
            "generated_tokens": n,
            "ttft_ms": ((first or t1) - t0) * 1e3,
            "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            "total_ms": (t1 - t0) * 1e3,
            "stop_reason": "length" if n >= kwargs.get("max_new_tokens", 1 << 30) else "stop",
        }

    return call_stream


def _params(fn) -> dict | None:
    if fn is None:
        return None
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _accepts(params: dict, name: str) -> bool:
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
