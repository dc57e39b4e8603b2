"""One worker thread per loaded model, behind a bounded admission count.

A model instance is not safe to call from two threads at once (KV caches,
scratch buffers, torch's own thread pool), so every call to it runs on that
model's single worker thread, under its lock. Requests that arrive while the
worker is busy wait in its queue; once `1 + max_queue` calls are admitted
(running or waiting), further requests are turned away at once with `Busy`,
so memory stays bounded however many clients pile on.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class Busy(Exception):
    """The model's queue is full; the client should retry later."""


class Cancelled(Exception):
    """Raised inside a worker call when its client went away."""


class ModelWorker:
    def __init__(self, kind: str, model_id: str, model: Any, max_queue: int):
        self.kind, self.id, self.model = kind, model_id, model
        self.capacity = 1 + max(0, int(max_queue))
        self.lock = threading.Lock()  # held while the model computes
        self._count_lock = threading.Lock()
        self._admitted = 0  # calls running or waiting
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"canao-{kind}-{model_id}")
        self.served = 0  # calls completed
        self.rejected = 0  # turned away busy
        self.cancelled = 0  # stopped because the client left

    @property
    def load(self) -> int:
        return self._admitted

    def admit(self) -> None:
        """Reserve a place in the queue, or raise Busy. Pair with `submit` (which releases it)."""
        with self._count_lock:
            if self._admitted >= self.capacity:
                self.rejected += 1
                raise Busy(f"the {self.kind} model '{self.id}' is busy ({self._admitted} requests queued): retry shortly")
            self._admitted += 1

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
                    queue_ms = (time.perf_counter() - submitted) * 1e3
                    result = fn(self.model, *args, **kwargs)
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

        def dropped(f) -> None:  # cancelled while queued (its client left): job() never runs to release
            if f.cancelled():
                self.cancelled += 1
                self.release()

        future.add_done_callback(dropped)
        return asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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
