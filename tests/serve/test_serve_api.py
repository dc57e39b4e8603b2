"""The JSON API against the real QA teacher and the real SmolLM2, on small inputs."""

from __future__ import annotations

import json
import threading
import time

import pytest

from serve_helpers import CONTEXT, GEN_TOKENS, PROMPT, QUESTION


def _sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        name = next(line[7:] for line in lines if line.startswith("event: "))
        data = json.loads("".join(line[6:] for line in lines if line.startswith("data: ")))
        events.append((name, data))
    return events


def _assert_error(res, status: int, code: str | None = None):
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    body = res.json()
    assert set(body) == {"error", "message"}
    assert body["message"] and "\n" not in body["message"] and "Traceback" not in body["message"]
    if code:
        assert body["error"] == code, body
    return body


# ----------------------------------------------------------------------------- QA


def test_qa_answers_with_span_and_timings(client, qa_reference):
    res = client.post("/api/qa", json={"context": CONTEXT, "question": QUESTION})
    assert res.status_code == 200, res.text
    r = res.json()
    assert r["model"] == "teacher"
    assert r["answer"] == qa_reference["answer"] == "Gustave Eiffel"
    assert CONTEXT[r["start_char"]:r["end_char"]] == r["answer"]
    for key in ("tokenize_ms", "model_ms", "decode_ms", "total_ms", "queue_ms"):
        assert isinstance(r[key], float) and r[key] >= 0, key
    assert r["total_ms"] >= r["model_ms"]
    assert r["windows"] == 1 and r["tokens"] > 10


def test_qa_second_model_by_id(client, qa_reference):
    res = client.post("/api/qa", json={"context": CONTEXT, "question": QUESTION, "model": "student-4x"})
    assert res.status_code == 200, res.text
    assert res.json()["model"] == "student-4x"
    assert res.json()["answer"] == qa_reference["answer"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"context": CONTEXT, "question": "   "}, 400, "empty_question"),
        ({"context": "", "question": QUESTION}, 400, "empty_context"),
        ({"context": CONTEXT}, 400, "missing_question"),
        ({"context": CONTEXT, "question": 42}, 400, "invalid_field"),
        ({"context": CONTEXT, "question": QUESTION, "extra": 1}, 400, "unknown_field"),
        ({"context": "word " * 1001, "question": QUESTION}, 413, "context_too_long"),
        ({"context": CONTEXT, "question": "why " * 200}, 413, "question_too_long"),
        ({"context": CONTEXT, "question": QUESTION, "model": "nope"}, 404, "unknown_model"),
    ],
)
def test_qa_bad_requests(client, body, status, code):
    _assert_error(client.post("/api/qa", json=body), status, code)


def test_qa_empty_question_message_is_clear(client):
    body = _assert_error(client.post("/api/qa", json={"context": CONTEXT, "question": ""}), 400)
    assert "question" in body["message"] and "empty" in body["message"]


def test_body_format_limits(client):
    _assert_error(client.post("/api/qa", content=b"{not json", headers={"content-type": "application/json"}),
                  400, "invalid_json")
    _assert_error(client.post("/api/qa", content=b"[1, 2]", headers={"content-type": "application/json"}),
                  400, "invalid_json")
    _assert_error(client.post("/api/qa", content=b"\xff\xfe", headers={"content-type": "application/json"}),
                  400, "invalid_json")
    _assert_error(client.post("/api/qa", content=json.dumps({"context": CONTEXT, "question": QUESTION}),
                              headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    big = json.dumps({"context": "x" * (2 << 20), "question": QUESTION})
    _assert_error(client.post("/api/qa", content=big, headers={"content-type": "application/json"}), 413, "too_large")
    deep = b"[" * 100_000 + b"]" * 100_000  # 200 kB: deeper than the JSON parser's stack (a 500 before)
    body = _assert_error(client.post("/api/qa", content=deep, headers={"content-type": "application/json"}),
                         400, "invalid_json")
    assert "nests too deeply" in body["message"]


def test_unknown_routes_and_methods_are_json(client):
    _assert_error(client.get("/api/nothing"), 404, "not_found")
    _assert_error(client.get("/api/qa"), 405, "method_not_allowed")


def test_busy_is_a_clean_503_and_the_queue_is_bounded(qa_pipeline):
    """max_queue=0: one request may run; while it holds the model, the next is refused at once."""
    from starlette.testclient import TestClient

    from canao.serve import Limits, create_app

    app = create_app({"teacher": qa_pipeline}, None, Limits(max_queue=0))
    worker = app.state.qa_workers["teacher"]
    client = TestClient(app, raise_server_exceptions=False)
    first: dict = {}
    with worker.lock:  # the model is "busy": the admitted request waits on this lock
        t = threading.Thread(target=lambda: first.update(res=client.post(
            "/api/qa", json={"context": CONTEXT, "question": QUESTION})))
        t.start()
        deadline = time.monotonic() + 20
        while worker.load < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.load == 1
        t0 = time.perf_counter()
        res = client.post("/api/qa", json={"context": CONTEXT, "question": QUESTION})
        assert time.perf_counter() - t0 < 5  # turned away, not queued
        body = _assert_error(res, 503, "busy")
        assert "busy" in body["message"]
        assert res.headers["retry-after"] == "1"
    t.join(timeout=30)
    assert first["res"].status_code == 200 and first["res"].json()["answer"] == "Gustave Eiffel"
    assert worker.load == 0 and worker.rejected == 1


def test_internal_errors_hide_the_trace(qa_pipeline, monkeypatch):
    from starlette.testclient import TestClient

    from canao.serve import create_app

    def boom(*args):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(qa_pipeline, "answer", boom)
    monkeypatch.setattr(qa_pipeline, "answer_batch", boom)  # the server's batching path
    client = TestClient(create_app({"teacher": qa_pipeline}, None), raise_server_exceptions=False)
    res = client.post("/api/qa", json={"context": CONTEXT, "question": QUESTION})
    body = _assert_error(res, 500, "internal")
    assert "secret" not in res.text and "RuntimeError" not in res.text


def test_foreign_host_is_refused(qa_pipeline):
    from starlette.testclient import TestClient

    from canao.serve import create_app

    client = TestClient(create_app({"teacher": qa_pipeline}, None, allowed_hosts=["127.0.0.1", "localhost"]),
                        base_url="http://127.0.0.1:8000")
    assert client.get("/api/health").status_code == 200
    _assert_error(client.get("/api/health", headers={"host": "attacker.example"}), 400, "invalid_host")


# ----------------------------------------------------------------------------- models, schema, page


def test_models_lists_both_kinds_with_size_and_precision(client):
    r = client.get("/api/models").json()
    assert [m["id"] for m in r["qa"]] == ["teacher", "student-4x"]
    assert [m["id"] for m in r["lm"]] == ["smollm2"]
    assert r["qa"][0]["default"] and not r["qa"][1]["default"]
    info = r["qa"][0]["info"]
    assert info["precision"] == "fp32" and info["size_mb"] > 1 and info["layers"] == 6
    assert r["lm"][0]["info"]["size_mb"] > 1 and r["lm"][0]["info"]["precision"] == "q4_1"  # the compiled weights
    assert r["limits"]["max_new_tokens"] == 64
    assert "/" not in json.dumps([m["info"] for m in r["qa"] + r["lm"]])  # no server paths, only names


def test_error_messages_name_files_without_server_paths():
    from canao.serve.app import error_response

    res = error_response(400, "bad_input", "model not found: /srv/secret/models/x.gguf (give a checkpoint folder)")
    body = json.loads(res.body)
    assert body["message"] == "model not found: x.gguf (give a checkpoint folder)"


def test_openapi_describes_every_api_route(client, app):
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    api_routes = {r.path for r in app.routes if getattr(r, "path", "").startswith(("/api/", "/openapi", "/v1/"))}
    assert api_routes <= set(schema["paths"])
    assert schema["components"]["schemas"]["QARequest"]["properties"]["context"]["maxLength"] == 5_000
    assert schema["components"]["schemas"]["GenerateRequest"]["properties"]["max_new_tokens"]["maximum"] == 64
    assert schema["components"]["schemas"]["QARequest"]["properties"]["model"]["enum"] == ["teacher", "student-4x"]
    # every $ref resolves
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    for ref in refs:
        assert ref.split("/")[-1] in schema["components"]["schemas"], ref


def test_page_and_static_files(client):
    res = client.get("/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in res.text and "/static/style.css" in res.text
    assert "script-src 'self'" in res.headers["content-security-policy"]
    assert res.headers["x-content-type-options"] == "nosniff"
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert client.get("/static/../app.py").status_code == 404


# ----------------------------------------------------------------------------- generation


def test_generate_streams_server_sent_events(client, gen_reference):
    res = client.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": GEN_TOKENS})
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/event-stream")
    events = _sse(res.text)
    names = [e for e, _ in events]
    assert names[0] == "start" and names[-1] == "done" and set(names[1:-1]) == {"token"}
    tokens = [d["text"] for e, d in events if e == "token"]
    assert len(tokens) >= 2
    done = events[-1][1]
    assert "".join(tokens) == done["text"] == gen_reference["text"]
    assert done["model"] == "smollm2" and done["generated_tokens"] == gen_reference["generated_tokens"]
    assert done["ttft_ms"] > 0 and done["tokens_per_s"] > 0 and done["prompt_tokens"] > 0
    assert done["stop_reason"] in ("length", "eos")


def test_generate_json_when_not_streaming(client, gen_reference):
    res = client.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": GEN_TOKENS, "stream": False})
    assert res.status_code == 200, res.text
    r = res.json()
    assert r["text"] == gen_reference["text"] and r["model"] == "smollm2"
    assert {"ttft_ms", "tokens_per_s", "total_ms", "queue_ms", "generated_tokens"} <= set(r)


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"prompt": PROMPT, "max_new_tokens": 65}, 400, "invalid_max_new_tokens"),
        ({"prompt": PROMPT, "max_new_tokens": 0}, 400, "invalid_max_new_tokens"),
        ({"prompt": PROMPT, "max_new_tokens": 2.5}, 400, "invalid_field"),
        ({"prompt": PROMPT, "max_new_tokens": True}, 400, "invalid_field"),
        ({"prompt": " "}, 400, "empty_prompt"),
        ({"prompt": "x" * 1001}, 413, "prompt_too_long"),
        ({"prompt": PROMPT, "temperature": -1}, 400, "invalid_temperature"),
        ({"prompt": PROMPT, "top_p": 0}, 400, "invalid_top_p"),
        ({"prompt": PROMPT, "top_k": -3}, 400, "invalid_top_k"),
        ({"prompt": PROMPT, "stop": ["a"] * 9}, 400, "invalid_stop"),
        ({"prompt": PROMPT, "chat": "yes"}, 400, "invalid_field"),
        ({"prompt": PROMPT, "model": "gpt-9"}, 404, "unknown_model"),
    ],
)
def test_generate_bad_requests(client, body, status, code):
    _assert_error(client.post("/api/generate", json=body), status, code)


def test_generate_limit_message_names_the_limit(client):
    body = _assert_error(client.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 100000}), 400)
    assert "max_new_tokens" in body["message"] and "64" in body["message"]


def test_client_that_leaves_stops_the_generation(app, live_url):
    """Over a real socket: read two tokens of a long generation, hang up; the worker frees its slot."""
    import httpx

    worker = app.state.lm_workers["smollm2"]
    served, cancelled = worker.served, worker.cancelled
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", live_url + "/api/generate",
                         json={"prompt": "Count from one to one hundred.", "max_new_tokens": 64}) as res:
            assert res.status_code == 200
            tokens = 0
            for line in res.iter_lines():
                if line.startswith("event: token"):
                    tokens += 1
                    if tokens == 2:
                        break
    t0 = time.monotonic()
    while worker.load and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    assert worker.load == 0, "the generation kept running after its client left"
    assert time.monotonic() - t0 < 20  # 62 more tokens would take far longer than a token or two
    assert worker.served == served and worker.cancelled == cancelled + 1  # stopped, not completed


def test_a_queued_question_whose_client_left_is_never_computed(app, live_url):
    """Over a real socket: a QA request waits behind a busy worker, its client hangs up; the queued job
    is dropped (never runs) and its place in the queue is given back."""
    import http.client
    from urllib.parse import urlsplit

    worker = app.state.qa_workers["teacher"]
    served, cancelled = worker.served, worker.cancelled
    blocker = worker._executor.submit(time.sleep, 2.0)  # the worker's only thread is busy for 2 s
    url = urlsplit(live_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
    conn.request("POST", "/api/qa", body=json.dumps({"context": CONTEXT, "question": QUESTION}),
                 headers={"content-type": "application/json"})
    deadline = time.monotonic() + 5
    while worker.load == 0 and time.monotonic() < deadline:  # the request is queued
        time.sleep(0.02)
    assert worker.load == 1
    conn.sock.close()  # the client gives up while it waits
    blocker.result()
    deadline = time.monotonic() + 5
    while worker.load and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.load == 0 and worker.cancelled == cancelled + 1
    time.sleep(0.3)
    assert worker.served == served  # dropped, not answered for nobody
