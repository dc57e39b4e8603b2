"""The demo's ASGI app: a JSON API over loaded QA pipelines and generators, and the page.

    POST /api/qa         {"context", "question", "model"?}           -> answer, span, stage timings
    POST /api/generate   {"prompt", "max_new_tokens"?, ..., "stream"?} -> server-sent events (or JSON)
    POST /v1/chat/completions, /v1/completions, GET /v1/models   OpenAI's API (openai_api.py)
    GET  /api/models     the loaded models, their size/precision, and the request limits
    GET  /api/health     liveness and queue depths
    GET  /health         200 once the models are loaded (`canao serve` answers 503 "loading" before)
    GET  /metrics        Prometheus text format (metrics.py)
    GET  /openapi.json   an OpenAPI 3.1 description of the above
    GET  /               the page (static/index.html, app.js, style.css)

Every error is JSON, `{"error": code, "message": one line}`, with a 4xx status for
a bad request (400 invalid, 401 without the API key where one is set, 404 unknown model, 413 too
large, 415 not JSON), 503 when the model's bounded queue is full, 504 when a generation runs past
the time limit, and 500 (no trace) otherwise; under /v1/ in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import threading
import time
from contextlib import asynccontextmanager
from types import SimpleNamespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..errors import CanaoError
from .openai_api import openai_error, openai_routes
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, RequestMetrics, ServerMetrics
from .openapi import openapi_schema
from .workers import BatchingWorker, Busy, Cancelled, ModelWorker, generation_call

log = logging.getLogger("canao.serve")

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Larger requests get a 4xx answer, never a model call."""

    max_body_bytes: int = 1 << 20
    max_context_chars: int = 20_000
    max_question_chars: int = 500
    max_prompt_chars: int = 4_000
    max_new_tokens: int = 256
    max_stop_strings: int = 4
    max_stop_chars: int = 32
    max_queue: int = 8  # per model, beyond the request it is running
    max_request_s: float = 300.0  # a generation still running this long after its request arrived is stopped
    max_wait_s: float = 10.0  # refuse (503 + Retry-After) a request whose estimated wait in the queue is longer
    max_batch: int = 16  # QA requests answered together in one batch


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, dict(headers or {})


def _jsonable(value: Any) -> Any:
    """numpy scalars -> Python, non-finite floats -> None, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(_jsonable(content), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSON:
    return JSON({"error": code, "message": public_text(message)}, status_code=status, headers=dict(headers or {}))


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/[^\s/:'\",;()]+)+/([^\s/:'\",;()]+)")


def public_text(text: str) -> str:
    """`text` with every absolute path cut to its last part: the server's folders are nobody's business."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(_jsonable(data), ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- request parsing


async def read_json(request: Request, limits: Limits) -> dict:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the request body as JSON (Content-Type: application/json)")
    too_large = ApiError(413, "too_large", f"the request body is larger than {limits.max_body_bytes} bytes")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_body_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise too_large
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON ({str(exc).splitlines()[0]})") from None
    except RecursionError:  # "[[[[...": a few kilobytes nest deeper than the parser's stack
        raise ApiError(400, "invalid_json", "the request body nests too deeply; send a flat JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return data


class ClientGone(Exception):
    """The client closed its connection while its request waited: nobody reads the answer."""


async def while_connected(request: Request, future: "asyncio.Future") -> Any:
    """Await a worker's job unless the client goes away first; then cancel it (a queued job never
    runs, so a client that gives up costs nothing) and raise ClientGone."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.1)
        if done:
            return future.result()
        if await request.is_disconnected():
            future.cancel()
            raise ClientGone()


def _only(data: dict, allowed: Sequence[str]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field '{unknown[0]}'; the fields are {', '.join(allowed)}")


def _text(data: dict, name: str, *, limit: int, what: str, required: bool = True, default: str = "") -> str:
    value = data.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"missing_{name}", f"'{name}' is missing: give {what}")
        return default
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"'{name}' must be a string")
    if required and not value.strip():
        raise ApiError(400, f"empty_{name}", f"'{name}' is empty: give {what}")
    if len(value) > limit:
        raise ApiError(413, f"{name}_too_long", f"'{name}' has {len(value)} characters; the limit is {limit}: shorten it")
    return value


def _number(data: dict, name: str, default, lo, hi, *, integer: bool):
    value = data.get(name, default)
    if value is None:
        value = default
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise ApiError(400, "invalid_field", f"'{name}' must be {kind}")
    if not lo <= value <= hi:
        raise ApiError(400, f"invalid_{name}", f"'{name}' is {value}; it must be between {lo} and {hi}")
    return value


def _stop(data: dict, limits: Limits) -> list[str] | None:
    stop = data.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > limits.max_stop_strings
            or not all(isinstance(s, str) and 0 < len(s) <= limits.max_stop_chars for s in stop)):
        raise ApiError(400, "invalid_stop", f"'stop' must be up to {limits.max_stop_strings} non-empty strings "
                                            f"of at most {limits.max_stop_chars} characters")
    return stop


def _bool(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, "invalid_field", f"'{name}' must be true or false")
    return value


# ----------------------------------------------------------------------------- generation on a worker


class TimeLimit(Cancelled):
    """Raised inside a generation that ran past Limits.max_request_s."""


def _time_limit_message(limit_s: float) -> str:
    return f"the generation ran past this server's limit of {limit_s:g} s per request; ask for fewer tokens"


async def run_to_end(request: Request, worker: ModelWorker, call, prompt, settings: dict,
                     limit_s: float | None = None) -> tuple[dict, float]:
    """(the generator's result, ms queued): one whole generation, stopped at its next token (or never
    started, when queued) if the client goes away, and with a 504 once it runs past limit_s (counted
    from now, queueing included)."""
    cancel, timed_out = threading.Event(), threading.Event()
    deadline = time.perf_counter() + limit_s if limit_s else None

    def on_token(piece: str) -> None:
        if cancel.is_set():
            raise Cancelled()
        if deadline is not None and time.perf_counter() > deadline:
            timed_out.set()
            raise TimeLimit()

    worker.admit()
    try:
        result = await while_connected(request, worker.submit(call, prompt, on_token, **settings))
    except CanaoError as exc:
        raise ApiError(400, "bad_input", str(exc).splitlines()[0]) from None
    except (asyncio.CancelledError, ClientGone):
        cancel.set()
        raise
    if timed_out.is_set():
        raise ApiError(504, "time_limit", _time_limit_message(limit_s))
    return result


def stream_pieces(worker: ModelWorker, call, prompt, settings: dict, limit_s: float | None = None):
    """(events, cancel): an async iterator of ("token", (piece, ms since the request)), then one
    ("done", (result, ms queued)) or ("error", {"error", "message"}); and the function that stops the
    generation at its next token (a response calls it when it closes, so a client that leaves stops it).
    A generation still running limit_s after now ends with a "time_limit" error."""
    cancel = threading.Event()
    deadline = time.perf_counter() + limit_s if limit_s else None
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    t0 = time.perf_counter()

    def push(kind: str, payload: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop has closed: nobody is listening
            cancel.set()

    def on_token(piece: str) -> None:
        if cancel.is_set():
            raise Cancelled()
        if deadline is not None and time.perf_counter() > deadline:
            raise TimeLimit()
        if piece:
            push("token", (piece, (time.perf_counter() - t0) * 1e3))

    def job(model):
        try:
            push("done", call(model, prompt, on_token, **settings))
        except TimeLimit:
            push("error", {"error": "time_limit", "message": _time_limit_message(limit_s)})
            raise
        except CanaoError as exc:
            push("error", {"error": "bad_input", "message": public_text(str(exc).splitlines()[0])})
        except Cancelled:
            raise
        except Exception:  # noqa: BLE001 - logged here, never shown to the client
            log.exception("generation failed")
            push("error", {"error": "internal", "message": "generation failed on the server; see its log"})

    worker.admit()
    future = worker.submit(job)

    async def events():
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "done":
                    _, queue_ms = await future
                    yield kind, (payload, queue_ms)
                    return
                yield kind, payload
                if kind == "error":
                    return
        finally:
            cancel.set()  # a no-op once finished; stops the worker if the client went away

    return events(), cancel.set


# ----------------------------------------------------------------------------- the app


class _Guard:
    """Pure ASGI middleware: refuse foreign Host headers (DNS rebinding) and set security headers."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy",
         b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
         b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ]

    PROTECTED = ("/api/", "/v1/", "/metrics")  # what an API key guards (the page, its files and /health stay open)

    def __init__(self, app, allowed_hosts: Sequence[str] | None, api_key: str | None = None):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed is not None:
            host = ""
            for key, value in scope.get("headers", []):
                if key == b"host":
                    host = value.decode("latin-1")
                    break
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
            if name.lower() not in self.allowed:
                response = error_response(400, "invalid_host", f"host '{host}' is not served here")
                return await response(scope, receive, send)
        if self.api_key and scope.get("path", "").startswith(self.PROTECTED) and not self._authorized(scope):
            message = "a valid API key is required: send it as 'Authorization: Bearer KEY'"
            body = (openai_error(401, "invalid_api_key", message) if scope["path"].startswith("/v1/")
                    else {"error": "invalid_api_key", "message": message})
            response = JSON(body, status_code=401, headers={"www-authenticate": "Bearer"})
            return await response(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + self.HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _authorized(self, scope) -> bool:
        for key, value in scope.get("headers", []):
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                return hmac.compare_digest(value[7:].strip(), self.api_key)
            if key == b"x-api-key":
                return hmac.compare_digest(value.strip(), self.api_key)
        return False


def _name_models(models, kind: str) -> dict[str, Any]:
    if models is None:
        return {}
    if isinstance(models, Mapping):
        return dict(models)
    named: dict[str, Any] = {}
    for model in models:
        info = _info(model)
        base = Path(str(info.get("model") or kind)).name.removesuffix(".gguf") or kind
        name, n = base, 2
        while name in named:
            name, n = f"{base}-{n}", n + 1
        named[name] = model
    return named


def _info(model: Any) -> dict:
    info = getattr(model, "info", None)
    if callable(info):
        try:
            info = info()
        except Exception:  # noqa: BLE001 - info is decoration, never fatal
            info = None
    info = dict(info) if isinstance(info, Mapping) else {}
    if "size_mb" not in info and isinstance(info.get("path"), str):  # e.g. a GGUF file: its size on disk
        try:
            info["size_mb"] = round(Path(info["path"]).stat().st_size / 2**20, 1)
        except OSError:
            pass
    # clients see a model's name, not where it lives on the server (nested too: a compiled model's
    # config names its source file)
    def public(v):
        if isinstance(v, str):
            return public_text(v)
        if isinstance(v, Mapping):
            return {k: public(x) for k, x in v.items()}
        return [public(x) for x in v] if isinstance(v, (list, tuple)) else v

    return public(info)


def create_app(
    qa_models: Mapping[str, Any] | Sequence[Any] | None = None,
    lm_models: Mapping[str, Any] | Sequence[Any] | None = None,
    limits: Limits | None = None,
    allowed_hosts: Sequence[str] | None = None,
    api_key: str | None = None,
) -> Starlette:
    """The demo app over loaded models.

    qa_models: QAPipeline-like objects (`answer(context, question)`, `info`);
    lm_models: Generator-like objects (`generate(..., on_token=)` or `stream(...)`, `info`).
    Either may be a {id: model} mapping or a list (ids from the model paths); the
    first of each is the default. allowed_hosts: Host names to answer (None = any). api_key: when
    set, the API (/api/, /v1/, /metrics) answers only requests that send it (Bearer or X-API-Key).
    """
    limits = limits or Limits()
    shared: dict[int, ModelWorker] = {}  # one worker (one lock) per model object, however many ids name it

    def worker(kind: str, key: str, model: Any) -> ModelWorker:
        if id(model) not in shared:
            if kind == "qa" and callable(getattr(model, "answer_batch", None)):
                shared[id(model)] = BatchingWorker(kind, key, model, limits.max_queue, limits.max_wait_s,
                                                   limits.max_batch, lambda n, k=key: metrics.batch.labels(k).observe(n))
            else:  # a generator with slots runs that many generations at once, batching their steps
                shared[id(model)] = ModelWorker(kind, key, model, limits.max_queue, limits.max_wait_s,
                                                concurrency=getattr(model, "slots", 1) if kind == "lm" else 1)
        return shared[id(model)]

    qa = {k: worker("qa", k, m) for k, m in _name_models(qa_models, "qa").items()}
    lm = {k: worker("lm", k, m) for k, m in _name_models(lm_models, "lm").items()}
    if not qa and not lm:
        raise CanaoError("nothing to serve: give at least one QA model or one generation model")
    metrics = ServerMetrics(shared.values())

    def counted(call, name: str):
        def run(*args, **kwargs):
            result = call(*args, **kwargs)
            metrics.generation(name, result)
            return result
        return run

    calls = {k: counted(generation_call(w.model), k) for k, w in lm.items()}
    infos = {("qa", k): _info(w.model) for k, w in qa.items()} | {("lm", k): _info(w.model) for k, w in lm.items()}
    schema = openapi_schema(limits, list(qa), list(lm))

    def pick(workers: dict[str, ModelWorker], data: dict, kind: str) -> tuple[str, ModelWorker]:
        if not workers:
            raise ApiError(404, "no_model", f"this server has no {kind} model loaded")
        name = data.get("model")
        if name is None:
            name = next(iter(workers))
        if not isinstance(name, str) or name not in workers:
            raise ApiError(404, "unknown_model", f"no {kind} model '{name}'; the loaded ones are {', '.join(workers)}")
        return name, workers[name]

    def describe(kind: str, workers: dict[str, ModelWorker]) -> list[dict]:
        return [{"id": k, "default": i == 0, "info": infos[(kind, k)], "queued": w.load, "capacity": w.capacity}
                for i, (k, w) in enumerate(workers.items())]

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def models(request: Request) -> Response:
        return JSON({"qa": describe("qa", qa), "lm": describe("lm", lm), "limits": asdict(limits)})

    async def health(request: Request) -> Response:
        return JSON({"status": "ok", "queues": {f"{w.kind}/{w.id}": {"queued": w.load, "served": w.served,
                                                                       "rejected": w.rejected, "cancelled": w.cancelled} for w in shared.values()}})

    async def openapi(request: Request) -> Response:
        return JSON(schema)

    async def ready(request: Request) -> Response:  # for supervisors: 200 once the models are loaded
        return JSON({"status": "ok", "models": {"qa": list(qa), "lm": list(lm)}})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def answer(request: Request) -> Response:
        data = await read_json(request, limits)
        _only(data, ("context", "question", "model"))
        name, worker = pick(qa, data, "QA")
        context = _text(data, "context", limit=limits.max_context_chars, what="the passage to answer from")
        question = _text(data, "question", limit=limits.max_question_chars, what="a question about the passage")
        worker.admit()
        try:
            job = worker.submit_item((context, question)) if isinstance(worker, BatchingWorker) else \
                worker.submit(lambda model: model.answer(context, question))
            result, queue_ms = await while_connected(request, job)
        except CanaoError as exc:
            raise ApiError(400, "bad_input", str(exc).splitlines()[0]) from None
        return JSON({"model": name, **result, "queue_ms": queue_ms})

    async def generate(request: Request) -> Response:
        data = await read_json(request, limits)
        _only(data, ("prompt", "model", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "chat",
                     "stop", "stream"))
        name, worker = pick(lm, data, "generation")
        prompt = _text(data, "prompt", limit=limits.max_prompt_chars, what="a prompt")
        settings = {
            "max_new_tokens": _number(data, "max_new_tokens", min(128, limits.max_new_tokens), 1,
                                      limits.max_new_tokens, integer=True),
            "temperature": float(_number(data, "temperature", 0.0, 0.0, 2.0, integer=False)),
            "top_k": _number(data, "top_k", 0, 0, 1000, integer=True),
            "top_p": float(_number(data, "top_p", 1.0, 0.0, 1.0, integer=False)),
            "seed": _number(data, "seed", 0, 0, 2**32 - 1, integer=True),
            "chat": _bool(data, "chat", True),
        }
        if settings["top_p"] <= 0.0:
            raise ApiError(400, "invalid_top_p", "'top_p' must be above 0 (1 keeps every token)")
        stop = _stop(data, limits)
        if stop:
            settings["stop"] = stop
        stream = _bool(data, "stream", True)
        if not stream:
            result, queue_ms = await run_to_end(request, worker, calls[name], prompt, settings, limits.max_request_s)
            return JSON({"model": name, **result, "queue_ms": queue_ms})
        events, cancel = stream_pieces(worker, calls[name], prompt, settings, limits.max_request_s)

        async def stream_events():
            n = 0
            yield _sse("start", {"model": name, "queued": worker.load - 1, **settings})
            async for kind, payload in events:
                if kind == "token":
                    n += 1
                    piece, t_ms = payload  # t_ms: when the model produced it, from the request's arrival
                    yield _sse("token", {"text": piece, "n": n, "t_ms": t_ms})
                elif kind == "done":
                    result, queue_ms = payload
                    yield _sse("done", {"model": name, **result, "queue_ms": queue_ms})
                else:
                    yield _sse("error", payload)

        response = _EventStream(stream_events(), media_type="text/event-stream",
                                headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        response.on_close = cancel
        return response

    def error(request: Request, status: int, code: str, message: str, headers=None) -> Response:
        if request.url.path.startswith("/v1/"):  # OpenAI's clients read OpenAI's error shape
            return JSON(openai_error(status, code, public_text(message)), status_code=status, headers=headers)
        return error_response(status, code, message, headers)

    async def api_error(request: Request, exc: ApiError) -> Response:
        return error(request, exc.status, exc.code, exc.message, exc.headers)

    async def gone(request: Request, exc: ClientGone) -> Response:  # nobody reads it; for the access log
        return error(request, 499, "client_closed", "the client closed the connection before the answer")

    async def busy(request: Request, exc: Busy) -> Response:
        return error(request, 503, "busy", str(exc), {"retry-after": str(exc.retry_after)})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        messages = {404: "no such page or API endpoint", 405: "method not allowed here"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(request, exc.status_code, code, messages.get(exc.status_code, str(exc.detail)), exc.headers)

    async def internal(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(request, 500, "internal", "internal server error; see the server's log")

    def event_stream(lines, cancel) -> Response:
        response = _EventStream(lines, media_type="text/event-stream",
                                headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        response.on_close = cancel
        return response

    shared_parts = SimpleNamespace(
        lm=lm, calls=calls, limits=limits, ApiError=ApiError, run_to_end=run_to_end, stream_pieces=stream_pieces,
        read_json=lambda request: read_json(request, limits), number=_number, boolean=_bool, text=_text,
        stop=lambda data: _stop(data, limits), json=JSON, event_stream=event_stream,
        fingerprint=lambda name: f"canao-{__version__}-{infos[('lm', name)].get('precision') or 'fp32'}")

    @asynccontextmanager
    async def lifespan(app):
        yield
        for w in shared.values():
            w.shutdown()

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/models", models, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/qa", answer, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/health", ready, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *openai_routes(shared_parts),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={ApiError: api_error, ClientGone: gone, Busy: busy, HTTPException: http_error, Exception: internal},
        lifespan=lifespan,
    )
    app.add_middleware(RequestMetrics, metrics=metrics, routes=[r.path for r in routes if isinstance(r, Route)])
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts, api_key=api_key)
    app.state.qa_workers, app.state.lm_workers, app.state.limits = qa, lm, limits
    app.state.workers = list(shared.values())
    return app


class _EventStream(StreamingResponse):
    """A streaming response that always closes its iterator, so a client that leaves stops the model."""

    on_close = None

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            if self.on_close is not None:
                self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
