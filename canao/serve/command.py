"""`canao serve`: bind at once (GET /health answers 503 "loading"), load the models once, then serve the
demo app, its JSON API and OpenAI's API under uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import CanaoError
from .app import LOOPBACK_HOSTS, Limits, create_app

_NAMED = re.compile(r"^([A-Za-z0-9_.-]{1,40})=(.+)$")


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_common

    p = sub.add_parser("serve", help="the real-time demo: a local web app and JSON API for QA and generation")
    p.add_argument("--qa-model", action="append", default=[], metavar="M",
                   help="QA checkpoint folder, artifact or shipped student name; repeat to switch between models on "
                        "the page (NAME=PATH names it). Without --qa-model and --lm-model: the shipped "
                        "minilm-squad-4x student compiled to int8 and smollm2 compiled from its Q4_1 GGUF (once, "
                        "cached), both on canao's own runtime")
    p.add_argument("--lm-model", action="append", default=[], metavar="M",
                   help="generation model: a GGUF file, a folder, a compiled decoder artifact, or 'smollm2' "
                        "(PyTorch); repeatable, NAME=PATH names it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=Limits.max_queue,
                   help="requests that may wait per model; beyond that the answer is 503 busy")
    p.add_argument("--max-new-tokens", type=int, default=Limits.max_new_tokens,
                   help="the most tokens one generation request may ask for")
    p.add_argument("--max-context-chars", type=int, default=Limits.max_context_chars,
                   help="the longest passage a QA request may send")
    p.add_argument("--max-wait", type=float, default=Limits.max_wait_s,
                   help="refuse (503 + Retry-After) a request whose estimated wait in its model's queue is longer "
                        "(seconds)")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch,
                   help="the most QA requests answered together in one batch")
    p.add_argument("--lm-slots", type=int, default=4,
                   help="generations a compiled decoder runs at once, each with its own KV cache, their decode "
                        "steps batched (default 4; PyTorch models run one at a time)")
    p.add_argument("--request-timeout", type=float, default=Limits.max_request_s,
                   help="seconds after which a generation still running is stopped (504 / an error event)")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY) on the API, /v1 and /metrics; default "
                        "$CANAO_API_KEY. Recommended with a --host other than this machine")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_common(p)
    p.set_defaults(func=cmd_serve)


def split_spec(spec: str) -> tuple[str | None, str]:
    """'teacher=/path/model' -> ('teacher', '/path/model'); a plain path or name -> (None, spec)."""
    m = _NAMED.match(spec)
    if m and not Path(spec).exists():
        return m.group(1), m.group(2)
    return None, spec


def _unique(name: str, taken: dict) -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name}-{n}", n + 1
    return out


def load_models(qa_specs: list[str], lm_specs: list[str], threads: int | None = None, quiet: bool = False,
                lm_slots: int = 1):
    """Load every model once (each load warms up); returns ({id: QAPipeline}, {id: Generator}).
    lm_slots: concurrent generations of each compiled decoder (PyTorch models: one)."""

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    qa, lm = {}, {}
    if qa_specs:
        from ..apps.qa import QAPipeline

        for spec in qa_specs:
            name, path = split_spec(spec)
            t0 = time.perf_counter()
            model = QAPipeline.load(path, threads=threads)
            key = _unique(name or Path(path.rstrip("/")).name or "qa", qa)
            qa[key] = model
            say(f"canao serve: QA model '{key}' loaded from {path} in {time.perf_counter() - t0:.1f} s")
    if lm_specs:
        from ..apps.generate import Generator
        from ..compiler.decoder.decoder_runtime import is_decoder_artifact
        from ..paths import resolve_model_path

        for spec in lm_specs:
            name, path = split_spec(spec)
            t0 = time.perf_counter()
            compiled = is_decoder_artifact(resolve_model_path(path))
            model = Generator.load(path, threads=threads, slots=lm_slots if compiled else 1)
            key = _unique(name or Path(path.rstrip("/")).name.removesuffix(".gguf") or "lm", lm)
            lm[key] = model
            say(f"canao serve: generation model '{key}' loaded from {path} in {time.perf_counter() - t0:.1f} s")
    return qa, lm


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_models(threads: int | None = None) -> tuple[list[str], list[str]]:
    """What `canao serve` runs without model arguments: the shipped 4x student compiled to int8 and
    SmolLM2 compiled from its Q4_1 GGUF, both through canao's own runtime (compiled once, cached)."""
    from ..apps.zoo import DEFAULT_LM, DEFAULT_QA, compiled_decoder, compiled_student

    return ([f"{DEFAULT_QA}={compiled_student(DEFAULT_QA, threads=threads)}"],
            [f"{DEFAULT_LM}={compiled_decoder(DEFAULT_LM, threads=threads)}"])


class _Loading:
    """The ASGI app uvicorn serves from the start: until the models are loaded, GET /health answers 503
    {"status": "loading"} and every other request 503 with Retry-After; then everything goes to the app."""

    def __init__(self):
        self.app = None

    async def __call__(self, scope, receive, send):
        from starlette.responses import JSONResponse

        if scope["type"] == "lifespan":  # the app is not there at startup: its workers are shut down here
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    for w in getattr(getattr(self.app, "state", None), "workers", []):
                        w.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            body = ({"status": "loading"} if scope.get("path") == "/health" else
                    {"error": "loading", "message": "the server is still loading its models; retry shortly"})
            await JSONResponse(body, status_code=503, headers={"retry-after": "5"})(scope, receive, send)


def cmd_serve(args) -> dict:
    if not args.qa_model and not args.lm_model:
        args.qa_model, args.lm_model = default_models(args.threads)
    if not 0 <= args.port <= 65535:
        raise CanaoError(f"--port {args.port} is not a TCP port (0-65535)")
    if args.max_queue < 0 or args.max_new_tokens < 1 or args.max_context_chars < 1:
        raise CanaoError("--max-queue must be >= 0, --max-new-tokens and --max-context-chars >= 1")
    if not args.request_timeout > 0 or not args.max_wait > 0 or args.max_batch < 1 or args.lm_slots < 1:
        raise CanaoError("--request-timeout and --max-wait must be above 0 seconds, --max-batch and --lm-slots at "
                         "least 1")
    try:
        import uvicorn
    except ImportError:
        raise CanaoError("canao serve needs starlette and uvicorn: pip install 'canao[serve]'") from None

    limits = Limits(max_queue=args.max_queue, max_new_tokens=args.max_new_tokens,
                    max_context_chars=args.max_context_chars, max_request_s=args.request_timeout,
                    max_wait_s=args.max_wait, max_batch=args.max_batch)
    api_key = args.api_key or os.environ.get("CANAO_API_KEY") or None
    local = is_loopback(args.host)
    allowed = [*LOOPBACK_HOSTS, args.host] if local else None
    if not local and not api_key:
        print(f"canao serve: warning: binding {args.host} makes the server reachable from other machines and it "
              "has no API key: anyone there can use it (set --api-key or $CANAO_API_KEY)", file=sys.stderr)
    # graceful: on Ctrl+C / SIGTERM uvicorn stops accepting and lets running requests finish (up to 30 s)
    front = _Loading()
    server = uvicorn.Server(uvicorn.Config(front, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=30, lifespan="on"))
    loaded: dict = {}

    def load() -> None:
        try:
            qa, lm = load_models(args.qa_model, args.lm_model, threads=args.threads, lm_slots=args.lm_slots)
            front.app = create_app(qa, lm, limits, allowed_hosts=allowed, api_key=api_key)
            loaded.update(qa=list(qa), lm=list(lm))
            print("canao serve: ready", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - reported after the server has stopped
            loaded["error"] = exc
            server.should_exit = True

    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"canao serve: open http://{shown}:{args.port}/ once ready (GET /health: 503 while loading; "
          f"Ctrl+C stops)", file=sys.stderr, flush=True)
    threading.Thread(target=load, name="canao-serve-load", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown: a normal stop here
        pass
    if "error" in loaded:
        exc = loaded["error"]
        raise exc if isinstance(exc, CanaoError) else CanaoError(f"loading the models failed: {exc}")
    workers = getattr(getattr(front.app, "state", None), "workers", [])
    return {
        "url": f"http://{shown}:{args.port}/",
        "qa_models": loaded.get("qa", []),
        "lm_models": loaded.get("lm", []),
        "limits": asdict(limits),
        "served": {f"{w.kind}/{w.id}": w.served for w in workers},
        "rejected_busy": sum(w.rejected for w in workers),
    }
