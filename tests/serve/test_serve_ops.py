"""Operating the server: Prometheus metrics, /health (503 while the models load), the API key, and
the per-request time limit."""

from __future__ import annotations

import json
import re

import pytest
from starlette.testclient import TestClient

from serve_helpers import CONTEXT, PROMPT, QUESTION


def _metric(text: str, name: str, **labels) -> float:
    """The value of one sample of the Prometheus text exposition (0 if absent)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


def test_metrics_count_requests_latency_queues_and_tokens(client):
    before = client.get("/metrics").text
    assert client.post("/api/qa", json={"context": CONTEXT, "question": QUESTION}).status_code == 200
    assert client.post("/api/qa", json={"context": CONTEXT}).status_code == 400
    gen = client.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "stream": False}).json()
    res = client.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    after = res.text
    for status in ("200", "400"):
        assert _metric(after, "canao_requests_total", route="/api/qa", status=status) == \
            _metric(before, "canao_requests_total", route="/api/qa", status=status) + 1
    assert _metric(after, "canao_request_seconds_count", route="/api/qa") >= 2
    assert _metric(after, "canao_request_seconds_bucket", route="/api/qa", le="+Inf") >= 2
    assert _metric(after, "canao_generated_tokens_total", model="smollm2") - \
        _metric(before, "canao_generated_tokens_total", model="smollm2") == gen["generated_tokens"]
    assert _metric(after, "canao_decode_tokens_per_second_count", model="smollm2") >= 1
    assert "canao_queue_depth" in after and _metric(after, "canao_queue_depth", kind="qa", model="teacher") == 0
    assert _metric(after, "canao_model_calls_total", kind="qa", model="teacher", outcome="served") >= 1


@pytest.fixture(scope="module")
def guarded(qa_pipeline, generator):
    from canao.serve import Limits, create_app

    # a tiny time limit: every generation runs past it at its first token
    app = create_app({"teacher": qa_pipeline}, {"smollm2": generator}, Limits(max_request_s=1e-6), api_key="s3cret")
    return TestClient(app, raise_server_exceptions=False)


def test_an_api_key_guards_the_api_but_not_the_page_or_health(guarded):
    assert guarded.get("/health").status_code == 200 and guarded.get("/").status_code == 200
    res = guarded.get("/api/models")
    assert res.status_code == 401 and res.json()["error"] == "invalid_api_key"
    assert guarded.get("/api/models", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/metrics").status_code == 401
    res = guarded.get("/v1/models")
    assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape
    assert guarded.get("/api/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert guarded.get("/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200


def test_a_generation_past_the_time_limit_is_stopped(guarded):
    auth = {"authorization": "Bearer s3cret"}
    res = guarded.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 20, "stream": False}, headers=auth)
    assert res.status_code == 504 and res.json()["error"] == "time_limit"
    res = guarded.post("/api/generate", json={"prompt": PROMPT, "max_new_tokens": 20}, headers=auth)
    events = [line for line in res.text.splitlines() if line.startswith("event: ")]
    assert events[-1] == "event: error" and '"time_limit"' in res.text.split("event: error")[-1]
    res = guarded.post("/v1/chat/completions", headers=auth,
                       json={"model": "smollm2", "messages": [{"role": "user", "content": PROMPT}]})
    assert res.status_code == 504 and "limit" in res.json()["error"]["message"]


def test_health_is_503_while_the_models_load_then_200(app):
    from canao.serve.command import _Loading

    front = _Loading()
    with TestClient(front) as client:  # with the lifespan, as uvicorn runs it
        res = client.get("/health")
        assert res.status_code == 503 and res.json() == {"status": "loading"} and res.headers["retry-after"] == "5"
        res = client.post("/api/qa", json={"context": CONTEXT, "question": QUESTION})
        assert res.status_code == 503 and res.json()["error"] == "loading"
        front.app = app  # the loader thread's hand-over
        res = client.get("/health")
        assert res.status_code == 200 and json.loads(res.text)["models"]["qa"] == ["teacher", "teacher-b"]
