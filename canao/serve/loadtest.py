"""A bounded load test of a running `canao serve`: N QA requests from C concurrent clients, or C
concurrent generations (--generate).

    canao serve --qa-model teacher=../shared/models/minilm-l6-h384-squad --threads 1 --max-queue 4 &
    python -m canao.serve.loadtest --url http://127.0.0.1:8000 --requests 200 --clients 8 --json
    python -m canao.serve.loadtest --url http://127.0.0.1:8000 --generate --clients 4 --max-tokens 64 --json

Generation: each prompt is first generated alone (greedy: the reference text and one stream's
tokens/s, prefill included), then the clients generate together, one prompt each; a
generation is `ok` when its text equals the reference. The aggregate rate (all tokens / wall
time) over one stream's rate says how much the server's concurrent slots add.

Each client keeps one connection and sends its requests one after another. A
response counts as `ok` when it is 200 and gives the same answer span as the
same question asked alone (the reference, asked first), `busy` when it is a clean
503 {"error": "busy"} with Retry-After (the client then waits `--backoff` seconds),
and `bad` otherwise. Latency is measured at the client, per request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit

from .. import timing

CASES = [
    ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
     "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
     "Who is the tower named after?"),
    ("The Amazon rainforest covers much of the Amazon basin of South America. The majority of the forest is "
     "contained within Brazil, with 60% of the rainforest, followed by Peru with 13%.",
     "Which country contains most of the forest?"),
    ("BERT, published by researchers at Google in 2018, is an encoder-only transformer. It is pre-trained with "
     "masked language modelling and is widely fine-tuned for extractive question answering.",
     "When was BERT published?"),
]


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100): a latency some request really had."""
    return timing.percentile(values, p, nearest_rank=True)


class _Client:
    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: dict) -> tuple[int, dict, dict]:
        data = json.dumps(body).encode()
        for attempt in (0, 1):  # one reconnect if the server closed a kept-alive connection
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                res = self.conn.getresponse()
                raw = res.read()
                headers = {k.lower(): v for k, v in res.getheaders()}
                if headers.get("connection", "").lower() == "close":
                    self.close()
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = {"_raw": raw[:200].decode("utf-8", "replace")}
                return res.status, payload, headers
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_load(url: str, cases=None, requests: int = 200, clients: int = 8, model: str | None = None,
             backoff: float = 0.2, timeout: float = 60.0, references: list[dict] | None = None) -> dict:
    """Send `requests` QA requests from `clients` threads; returns counts, latencies and failures.

    references: the expected {"answer", "start_char", "end_char"} per case; by default each
    case is asked once, alone, before the load starts.
    """
    cases = list(cases or CASES)
    url = url.rstrip("/")
    bodies = [{"context": c, "question": q, **({"model": model} if model else {})} for c, q in cases]
    if references is None:
        warm = _Client(url, timeout)
        references = []
        for body in bodies:
            status, payload, _ = warm.post("/api/qa", body)
            if status != 200:
                raise RuntimeError(f"reference request failed: HTTP {status} {payload}")
            references.append(payload)
        warm.close()

    lock = threading.Lock()
    next_index = [0]
    records: list[dict] = []

    def worker() -> None:
        client = _Client(url, timeout)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= requests:
                        return
                    next_index[0] += 1
                k = i % len(bodies)
                t0 = time.perf_counter()
                try:
                    status, payload, headers = client.post("/api/qa", bodies[k])
                except Exception as exc:  # noqa: BLE001 - a failed request is a result here
                    status, payload, headers = -1, {"_exception": repr(exc)}, {}
                ms = (time.perf_counter() - t0) * 1e3
                ref = references[k]
                if status == 200 and all(payload.get(f) == ref.get(f) for f in ("answer", "start_char", "end_char")):
                    outcome = "ok"
                elif (status == 503 and payload.get("error") == "busy" and payload.get("message")
                      and "retry-after" in headers):
                    outcome = "busy"
                else:
                    outcome = "bad"
                rec = {"i": i, "case": k, "status": status, "outcome": outcome, "ms": ms,
                       "server_total_ms": payload.get("total_ms"), "queue_ms": payload.get("queue_ms")}
                if outcome == "bad":
                    rec["payload"] = payload
                with lock:
                    records.append(rec)
                if outcome == "busy" and backoff > 0:
                    time.sleep(backoff)
        finally:
            client.close()

    t_start = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"load-client-{c}") for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start

    ok = [r["ms"] for r in records if r["outcome"] == "ok"]
    busy = [r["ms"] for r in records if r["outcome"] == "busy"]
    server = [r["server_total_ms"] for r in records if r["outcome"] == "ok" and r["server_total_ms"] is not None]
    queue = [r["queue_ms"] for r in records if r["outcome"] == "ok" and r["queue_ms"] is not None]
    allms = [r["ms"] for r in records]
    return {
        "url": url,
        "requests": len(records),
        "clients": clients,
        "ok": len(ok),
        "busy": len(busy),
        "bad": sum(r["outcome"] == "bad" for r in records),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall if wall > 0 else 0.0,
        "p50_ms": percentile(ok, 50),
        "p99_ms": percentile(ok, 99),
        "max_ms": max(ok) if ok else None,
        "p50_all_ms": percentile(allms, 50),
        "p99_all_ms": percentile(allms, 99),
        "busy_p50_ms": percentile(busy, 50),
        "busy_p99_ms": percentile(busy, 99),
        "server_total_p50_ms": percentile(server, 50),
        "queue_p50_ms": percentile(queue, 50),
        "failures": [r for r in records if r["outcome"] == "bad"][:10],
    }


PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works.",
           "List three facts about the moon.", "Describe the smell of rain in a city.",
           "What makes a good cup of tea?", "Give advice to someone learning to swim."]


def run_generation_load(url: str, prompts=None, clients: int = 4, max_tokens: int = 64, model: str | None = None,
                        timeout: float = 300.0) -> dict:
    """`clients` concurrent greedy generations (POST /v1/completions), after each prompt alone."""
    prompts = list(prompts or PROMPTS)
    url = url.rstrip("/")

    def body(prompt):
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **({"model": model} if model else {})}

    def ask(client, prompt) -> dict:
        t0 = time.perf_counter()
        try:
            status, payload, _ = client.post("/v1/completions", body(prompt))
        except Exception as exc:  # noqa: BLE001 - a failed request is a result here
            status, payload = -1, {"_exception": repr(exc)}
        s = time.perf_counter() - t0
        ok = status == 200 and payload.get("choices")
        return {"status": status, "s": s, "text": payload["choices"][0]["text"] if ok else None,
                "tokens": payload["usage"]["completion_tokens"] if ok else 0, **({} if ok else {"payload": payload})}

    alone_client = _Client(url, timeout)
    ask(alone_client, prompts[0])  # warm-up
    alone = [ask(alone_client, prompts[i % len(prompts)]) for i in range(clients)]
    alone_client.close()
    results: list = [None] * clients

    def worker(i: int) -> None:
        client = _Client(url, timeout)
        try:
            results[i] = ask(client, prompts[i % len(prompts)])
        finally:
            client.close()

    t_start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), name=f"gen-client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    single = sum(a["tokens"] for a in alone) / sum(a["s"] for a in alone)
    aggregate = sum(r["tokens"] for r in results) / wall
    ok = [r["status"] == 200 and r["text"] == a["text"] for r, a in zip(results, alone)]
    return {
        "url": url, "clients": clients, "max_tokens": max_tokens, "ok": sum(ok), "bad": len(ok) - sum(ok),
        "wall_s": wall, "tokens": sum(r["tokens"] for r in results), "alone_tokens": sum(a["tokens"] for a in alone),
        "single_stream_tokens_per_s": single, "aggregate_tokens_per_s": aggregate,
        "aggregate_over_single": aggregate / single if single else None,
        "p50_s": percentile([r["s"] for r in results], 50), "max_s": max(r["s"] for r in results),
        "failures": [{"client": i, **{k: v for k, v in r.items() if k != "text"}, "text": r["text"],
                      "alone": a["text"]} for i, (r, a, good) in enumerate(zip(results, alone, ok)) if not good],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m canao.serve.loadtest", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", "-n", type=int, default=200)
    ap.add_argument("--clients", "-c", type=int, default=8)
    ap.add_argument("--model", help="QA model id (default: the server's first)")
    ap.add_argument("--backoff", type=float, default=0.2, help="seconds a client waits after a 503 busy")
    ap.add_argument("--generate", action="store_true", help="concurrent generations instead of QA requests")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per generation (--generate)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.generate:
        result = run_generation_load(args.url, clients=args.clients, max_tokens=args.max_tokens, model=args.model)
        print(json.dumps(result) if args.json else
              f"{result['clients']} concurrent generations: {result['ok']} ok, {result['bad']} bad; aggregate "
              f"{result['aggregate_tokens_per_s']:.1f} tokens/s = {result['aggregate_over_single']:.2f}x one stream's "
              f"{result['single_stream_tokens_per_s']:.1f}")
        return 0 if result["bad"] == 0 else 1
    result = run_load(args.url, requests=args.requests, clients=args.clients, model=args.model, backoff=args.backoff)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['requests']} requests from {result['clients']} clients in {result['wall_s']:.1f} s: "
              f"{result['ok']} ok, {result['busy']} busy (503), {result['bad']} bad; "
              f"ok latency p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
    return 0 if result["bad"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
