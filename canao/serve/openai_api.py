"""OpenAI's API over the loaded generation models, so existing clients, chat UIs and agent frameworks
can talk to canao:

    POST /v1/chat/completions  {"model", "messages", "max_tokens"?, "temperature"?, "top_p"?, "seed"?,
                                "stop"?, "stream"?, "stream_options"?: {"include_usage"}}
    POST /v1/completions       the same with "prompt" (raw text, no chat template) instead of "messages"
    GET  /v1/models            the generation models

Responses and stream chunks have OpenAI's shapes (`chat.completion`, `chat.completion.chunk`,
`text_completion`, server-sent `data:` lines ending with `data: [DONE]`, `usage`), and errors its
`{"error": {"message", "type", "param", "code"}}`. Defaults are OpenAI's (temperature 1). What canao
cannot do (n > 1, logprobs, tools, penalties) is refused with a 400 that says so, never ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# fields clients send that change nothing here when left at OpenAI's defaults
_IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
_UNSUPPORTED_UNLESS = {"n": 1, "logprobs": False, "top_logprobs": None, "echo": False, "best_of": 1,
                       "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "tools": None,
                       "tool_choice": None, "functions": None, "function_call": None, "response_format": None,
                       "suffix": None}
_COMMON = ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
           "stream_options")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def openai_routes(ctx) -> list[Route]:
    """ctx: the app's pieces the endpoints share (see app.create_app): lm workers, their generation calls,
    limits, the ApiError class, run_to_end / stream_pieces / read_json / the field checkers."""

    def pick(data: dict):
        if not ctx.lm:
            raise ctx.ApiError(404, "model_not_found", "this server has no generation model loaded")
        name = data.get("model") or next(iter(ctx.lm))
        if not isinstance(name, str) or name not in ctx.lm:
            raise ctx.ApiError(404, "model_not_found",
                               f"The model '{name}' does not exist; the loaded ones are {', '.join(ctx.lm)}")
        return name, ctx.lm[name]

    def settings_of(data: dict, allowed: tuple[str, ...]) -> dict:
        unknown = sorted(set(data) - set(allowed) - set(_IGNORED) - set(_UNSUPPORTED_UNLESS))
        if unknown:
            raise ctx.ApiError(400, "unknown_parameter", f"Unrecognized request argument supplied: {unknown[0]}")
        for key, default in _UNSUPPORTED_UNLESS.items():
            if key in data and data[key] not in (default, None):
                raise ctx.ApiError(400, "unsupported_parameter",
                                   f"'{key}' is not supported by canao's server (leave it at {default!r})")
        limit = ctx.limits.max_new_tokens
        max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
        settings = {
            "max_new_tokens": ctx.number({"max_tokens": max_tokens}, "max_tokens", min(128, limit), 1, limit,
                                         integer=True),
            "temperature": float(ctx.number(data, "temperature", 1.0, 0.0, 2.0, integer=False)),
            "top_p": float(ctx.number(data, "top_p", 1.0, 0.0, 1.0, integer=False)),
            "seed": ctx.number(data, "seed", 0, 0, 2**32 - 1, integer=True),
        }
        if settings["top_p"] <= 0.0:
            raise ctx.ApiError(400, "invalid_top_p", "'top_p' must be above 0 (1 keeps every token)")
        stop = ctx.stop(data)
        if stop:
            settings["stop"] = stop
        return settings

    def usage(result: dict) -> dict:
        prompt = int(result.get("prompt_tokens") or 0)
        done = int(result.get("generated_tokens") or 0)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    async def complete(request: Request, chat: bool) -> Response:
        data = await ctx.read_json(request)
        name, worker = pick(data)
        if chat:
            settings = settings_of(data, (*_COMMON, "messages"))
            messages = data.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ctx.ApiError(400, "invalid_messages", "'messages' must be a non-empty list of "
                                                            "{\"role\", \"content\"} objects")
            size = sum(len(json.dumps(m)) for m in messages)
            if size > ctx.limits.max_prompt_chars * 2:
                raise ctx.ApiError(413, "messages_too_long", f"the messages hold {size} characters; the limit is "
                                                             f"{ctx.limits.max_prompt_chars * 2}: shorten them")
            prompt: Any = messages
        else:
            settings = settings_of(data, (*_COMMON, "prompt"))
            prompt = data.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ctx.ApiError(400, "invalid_prompt", "'prompt' must be a string (one prompt per request)")
            prompt = ctx.text({"prompt": prompt}, "prompt", limit=ctx.limits.max_prompt_chars, what="a prompt")
            settings["chat"] = False  # a completion continues the text as it is
        stream = ctx.boolean(data, "stream", False)
        options = data.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ctx.ApiError(400, "invalid_stream_options", "'stream_options' must be an object")
        call = ctx.calls[name]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "system_fingerprint": ctx.fingerprint(name)}
        if not stream:
            result, _ = await ctx.run_to_end(request, worker, call, prompt, settings, ctx.limits.max_request_s)
            reason = FINISH.get(result.get("stop_reason"), "stop")
            choice = ({"index": 0, "message": {"role": "assistant", "content": result["text"]}, "logprobs": None,
                       "finish_reason": reason} if chat else
                      {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": reason})
            return ctx.json({**head, "choices": [choice], "usage": usage(result)})
        events, cancel = ctx.stream_pieces(worker, call, prompt, settings, ctx.limits.max_request_s)
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(delta: str | None, reason: str | None = None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            return _data({**chunk_head, "choices": [choice]})

        async def lines():
            if chat:
                yield chunk(None, first=True)
            async for kind, payload in events:
                if kind == "token":
                    yield chunk(payload[0])
                elif kind == "done":
                    result, _ = payload
                    yield chunk(None, FINISH.get(result.get("stop_reason"), "stop"))
                    if options.get("include_usage"):
                        yield _data({**chunk_head, "choices": [], "usage": usage(result)})
                else:  # OpenAI streams an error object, then ends the stream
                    yield _data({"error": {"message": payload["message"], "type": "server_error"
                                           if payload["error"] == "internal" else "invalid_request_error",
                                           "param": None, "code": payload["error"]}})
            yield "data: [DONE]\n\n"

        return ctx.event_stream(lines(), cancel)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def models(request: Request) -> Response:
        return ctx.json({"object": "list", "data": [{"id": k, "object": "model", "created": 0, "owned_by": "canao"}
                                                    for k in ctx.lm]})

    return [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"])]


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def openai_error(status: int, code: str, message: str) -> dict:
    """OpenAI's error body: clients read error.message (and error.type, error.code)."""
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_exceeded",
            503: "server_error", 500: "server_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


__all__ = ["openai_routes", "openai_error"]
