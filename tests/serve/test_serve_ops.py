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
        assert res.status_code == 200 and json.loads(res.text)["models"]["qa"] == ["teacher", "student-4x"]


def test_answer_batch_equals_one_at_a_time_and_keeps_bad_items_apart(qa_pipeline):
    from canao.errors import CanaoError

    items = [(CONTEXT, QUESTION), (CONTEXT, ""), ("Paris is the capital of France.", "What is the capital of France?"),
             (CONTEXT * 3, "When was the tower built?")]
    batch = qa_pipeline.answer_batch(items)
    assert isinstance(batch[1], CanaoError) and "question is empty" in str(batch[1])
    for i in (0, 2, 3):
        one = qa_pipeline.answer(*items[i])
        assert batch[i]["answer"] == one["answer"] and abs(batch[i]["score"] - one["score"]) < 1e-3
        assert batch[i]["windows"] == one["windows"] and batch[i]["batch"] == 3


def test_requests_that_wait_together_run_as_one_batch(qa_pipeline, monkeypatch):
    """While one batch computes, the requests that arrive queue up and run together as the next batch."""
    import threading
    import time

    from canao.serve import create_app

    gate, real = threading.Event(), qa_pipeline.answer_batch

    def slow_first(items):  # the first batch holds the model until the others have queued
        gate.wait(10)
        return real(items)

    monkeypatch.setattr(qa_pipeline, "answer_batch", slow_first)
    client = TestClient(create_app({"teacher": qa_pipeline}, None), raise_server_exceptions=False)
    results = []

    def ask():
        results.append(client.post("/api/qa", json={"context": CONTEXT, "question": QUESTION}).json())

    threads = [threading.Thread(target=ask) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(30)
    assert len(results) == 5 and {r["answer"] for r in results} == {qa_pipeline.answer(CONTEXT, QUESTION)["answer"]}
    assert sorted(r["batch"] for r in results) == [1, 4, 4, 4, 4]  # one alone, then the four that waited
    text = client.get("/metrics").text
    assert _metric(text, "canao_batch_size_count", model="teacher") == 2
    assert _metric(text, "canao_batch_size_sum", model="teacher") == 5


def test_a_request_whose_wait_would_exceed_the_limit_is_refused_with_retry_after(qa_pipeline):
    import asyncio

    from canao.serve.workers import BatchingWorker, Busy

    worker = BatchingWorker("qa", "teacher", qa_pipeline, max_queue=100, max_wait_s=2.0)
    worker.call_s = 0.9  # as measured on earlier calls
    worker.admit()
    worker.admit()
    worker.admit()  # 2 ahead: 1.8 s
    with pytest.raises(Busy, match="3 requests queued, about 2.7 s of work") as info:
        worker.admit()
    assert info.value.retry_after == 3 and worker.rejected == 1

    async def one():
        return await worker.submit_item((CONTEXT, QUESTION))

    for _ in range(3):
        worker.release()
    worker.admit()
    result, queue_ms = asyncio.run(one())
    assert result["answer"] and worker.load == 0 and worker.served == 1 and worker.call_s != 0.9
    worker.shutdown()
