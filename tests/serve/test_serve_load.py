"""Bounded load: 200 QA requests from 8 concurrent clients against a real `canao serve` on 127.0.0.1,
and 4 concurrent generations on a compiled decoder with 4 slots.

The server runs as its own process, started through the command line exactly as a
user would (`python -m canao.cli serve ...`), with a short queue (--max-queue 4) so
that 8 clients overflow it: every response must be the right answer or a clean
503 busy. p50/p99 are printed and written to <pytest tmp>/load/load_test.json (and
to $CANAO_LOADTEST_JSON when set).

    pytest tests/serve/test_serve_load.py -s
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from canao.serve.loadtest import CASES, run_generation_load, run_load

REQUESTS, CLIENTS, MAX_QUEUE = 200, 8, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise RuntimeError(f"canao serve exited with {proc.returncode}: {proc.log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("canao serve did not come up in time")


def _serve(tmp_path_factory, *args):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "stderr.log", "w+")
    cmd = [sys.executable, "-m", "canao.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    yield from _serve(tmp_path_factory, "--qa-model", f"teacher={teacher_dir}", "--threads", "1",
                      "--max-queue", str(MAX_QUEUE))


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    from canao.compiler.decoder import compile_decoder

    folder = compile_decoder("smollm2", tmp_path_factory.mktemp("smol") / "q4_1", precision="q4_1", max_seq=256)
    yield from _serve(tmp_path_factory, "--lm-model", f"smol={folder['artifact']}", "--lm-slots", "4",
                      "--threads", "2")


def test_load_correct_or_busy(server, qa_pipeline, tmp_path_factory, capsys):
    url, proc = server
    # the expected answers come from the pipeline in this process, not from the server
    references = [qa_pipeline.answer(c, q) for c, q in CASES]
    result = run_load(url, CASES, requests=REQUESTS, clients=CLIENTS, references=references)

    out = tmp_path_factory.mktemp("load") / "load_test.json"
    out.write_text(json.dumps(result, indent=2))
    if os.environ.get("CANAO_LOADTEST_JSON"):
        Path(os.environ["CANAO_LOADTEST_JSON"]).write_text(json.dumps(result, indent=2))
    with capsys.disabled():
        print(f"\nload test: {result['requests']} requests, {CLIENTS} clients, queue {MAX_QUEUE}: "
              f"{result['ok']} ok, {result['busy']} busy (503), {result['bad']} bad, {result['wall_s']:.1f} s; "
              f"ok latency p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms "
              f"(server compute p50 {result['server_total_p50_ms']:.1f} ms); busy answers p50 "
              f"{(result['busy_p50_ms'] or 0):.1f} ms -> {out}")

    assert result["bad"] == 0, result["failures"]
    assert result["requests"] == REQUESTS and result["ok"] + result["busy"] == REQUESTS
    assert result["ok"] >= REQUESTS // 10, "almost nothing got through"
    assert result["p50_ms"] > 0 and result["p99_ms"] >= result["p50_ms"]
    if result["busy"]:  # refusing is cheap: a 503 must not wait for the model
        assert result["busy_p50_ms"] < result["p50_ms"]

    # the server is still healthy, its queue has drained, and it stops cleanly on Ctrl+C
    with urllib.request.urlopen(url + "/api/health", timeout=5) as res:
        health = json.load(res)
    assert health["queues"]["qa/teacher"]["queued"] == 0
    assert health["queues"]["qa/teacher"]["served"] == result["ok"]
    assert health["queues"]["qa/teacher"]["rejected"] == result["busy"]
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    summary = json.loads(stdout)
    assert summary["url"] == url + "/" and summary["served"]["qa/teacher"] == result["ok"]


def test_concurrent_generations_share_decode_steps(lm_server, capsys):
    """4 clients generate at once on a compiled decoder with 4 slots: each gets the text its prompt gets
    alone (greedy), and the server advanced them together (mean batch of its decode steps above 1)."""
    url, _ = lm_server
    result = run_generation_load(url, clients=4, max_tokens=24)
    with capsys.disabled():
        print(f"\ngeneration load: 4 clients, 24 tokens each: {result['ok']} ok, {result['bad']} bad; aggregate "
              f"{result['aggregate_tokens_per_s']:.1f} tokens/s = {result['aggregate_over_single']:.2f}x one stream's "
              f"{result['single_stream_tokens_per_s']:.1f}")
    assert result["bad"] == 0 and result["ok"] == 4, result["failures"]
    assert result["tokens"] == result["alone_tokens"] > 4  # the same lengths too (some end at EOS)
    with urllib.request.urlopen(url + "/metrics", timeout=5) as res:
        text = res.read().decode()
    counts = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("canao_decode_steps_total", "canao_decode_step_tokens_total"))}
    assert counts["canao_decode_step_tokens_total"] / counts["canao_decode_steps_total"] > 1.0, counts
