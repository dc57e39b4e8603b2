"""A hand-written OpenAPI 3.1 description of the demo's JSON API (served at /openapi.json).

Written out rather than generated so that it documents the request bodies, the
limits actually in force, the loaded model ids and the server-sent events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import Limits


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_schema(limits: "Limits", qa_ids: list[str], lm_ids: list[str]) -> dict:
    def model_field(ids: list[str]) -> dict:
        field = {"type": "string", "description": "model id from GET /api/models (default: the first)"}
        if ids:
            field["enum"] = list(ids)
        return field

    errors = {
        "400": _error("invalid request: empty or missing field, bad JSON, value out of range, unknown field"),
        "404": _error("unknown model id, or no model of this kind loaded"),
        "413": _error("request body or a text field longer than the limit"),
        "415": _error("body not sent as application/json"),
        "503": {**_error("the model's queue is full: retry after the Retry-After seconds"),
                "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
        "500": _error("internal error (details only in the server log)"),
    }
    ms = {"type": "number", "description": "milliseconds"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "canao demo API",
            "version": "1",
            "description": "Real-time extractive question answering and text generation on this machine's CPU. "
                           "Every error is JSON: {\"error\": code, \"message\": one line}.",
        },
        "paths": {
            "/api/qa": {
                "post": {
                    "summary": "Answer a question about a passage",
                    "operationId": "answerQuestion",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/QARequest"}}}},
                    "responses": {"200": {"description": "the answer span and the time of each stage",
                                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/QAResponse"}}}},
                                  **errors},
                }
            },
            "/api/generate": {
                "post": {
                    "summary": "Generate text, streamed as server-sent events",
                    "operationId": "generate",
                    "description": "With stream=true (default) the answer is text/event-stream: one `start` event "
                                   "(the settings in force), a `token` event per text piece ({text, n, t_ms}), then "
                                   "`done` (GenerateResult) or `error` (Error). With stream=false, one JSON GenerateResult.",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}},
                    "responses": {
                        "200": {"description": "the generated text",
                                "content": {"text/event-stream": {"schema": {"type": "string"}},
                                            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateResult"}}}},
                        **errors,
                    },
                }
            },
            "/api/models": {
                "get": {
                    "summary": "The loaded models and the request limits",
                    "operationId": "listModels",
                    "responses": {"200": {"description": "models by kind",
                                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Models"}}}}},
                }
            },
            "/api/health": {
                "get": {"summary": "Liveness and queue depths", "operationId": "health",
                        "responses": {"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}}
            },
            **{path: {method: {
                "summary": summary + " (OpenAI's API: see its reference; n = 1, no tools, logprobs or penalties)",
                "operationId": op,
                **({"requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": [field], "properties": {
                        field: {"type": "array" if field == "messages" else "string"},
                        "model": model_field(lm_ids),
                        "max_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens},
                        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
                        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
                        "seed": {"type": "integer"}, "stop": {"type": ["string", "array"]},
                        "stream": {"type": "boolean", "default": False}}}}}}} if method == "post" else {}),
                "responses": {"200": {"description": "OpenAI's response object (JSON), or its chunks as server-sent "
                                                     "`data:` lines ending with `data: [DONE]`",
                                      "content": {"application/json": {"schema": {"type": "object"}},
                                                  "text/event-stream": {"schema": {"type": "string"}}}}},
            }} for path, method, summary, op, field in (
                ("/v1/chat/completions", "post", "Chat completion", "openaiChatCompletions", "messages"),
                ("/v1/completions", "post", "Text completion", "openaiCompletions", "prompt"),
                ("/v1/models", "get", "The generation models", "openaiModels", ""))},
            "/openapi.json": {
                "get": {"summary": "This description", "operationId": "openapi",
                        "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error", "message"],
                    "properties": {"error": {"type": "string", "description": "machine-readable code, e.g. busy, empty_question, too_large"},
                                   "message": {"type": "string", "description": "one line, safe to show to the user"}},
                },
                "QARequest": {
                    "type": "object", "required": ["context", "question"], "additionalProperties": False,
                    "properties": {
                        "context": {"type": "string", "minLength": 1, "maxLength": limits.max_context_chars, "description": "the passage"},
                        "question": {"type": "string", "minLength": 1, "maxLength": limits.max_question_chars},
                        "model": model_field(qa_ids),
                    },
                },
                "QAResponse": {
                    "type": "object",
                    "properties": {
                        "model": {"type": "string"},
                        "answer": {"type": "string"},
                        "start_char": {"type": "integer", "description": "answer = context[start_char:end_char]"},
                        "end_char": {"type": "integer"},
                        "score": {"type": "number"},
                        "tokens": {"type": "integer", "description": "tokens run through the model, all windows"},
                        "windows": {"type": "integer"},
                        "tokenize_ms": ms, "model_ms": ms, "decode_ms": ms, "total_ms": ms,
                        "queue_ms": {"type": "number", "description": "time spent waiting for the model"},
                    },
                },
                "GenerateRequest": {
                    "type": "object", "required": ["prompt"], "additionalProperties": False,
                    "properties": {
                        "prompt": {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars},
                        "model": model_field(lm_ids),
                        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens,
                                           "default": min(128, limits.max_new_tokens)},
                        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0, "description": "0 = greedy"},
                        "top_k": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 0, "description": "0 = off"},
                        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
                        "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1, "default": 0},
                        "chat": {"type": "boolean", "default": True, "description": "wrap the prompt in the model's chat template"},
                        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                                 "description": f"up to {limits.max_stop_strings} stop strings of at most {limits.max_stop_chars} characters"},
                        "stream": {"type": "boolean", "default": True},
                    },
                },
                "GenerateResult": {
                    "type": "object",
                    "properties": {
                        "model": {"type": "string"},
                        "text": {"type": "string"},
                        "prompt_tokens": {"type": ["integer", "null"]},
                        "generated_tokens": {"type": "integer"},
                        "ttft_ms": {"type": "number", "description": "time to first token"},
                        "tokens_per_s": {"type": "number"},
                        "total_ms": ms,
                        "stop_reason": {"type": "string"},
                        "queue_ms": {"type": "number"},
                    },
                },
                "Models": {
                    "type": "object",
                    "properties": {
                        "qa": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                        "lm": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                        "limits": {"type": "object"},
                    },
                },
                "Model": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "default": {"type": "boolean"},
                        "info": {"type": "object", "description": "engine, precision, layers, hidden, parameters, size_mb, ..."},
                        "queued": {"type": "integer"},
                        "capacity": {"type": "integer"},
                    },
                },
            }
        },
    }
