"""`canao serve`'s defaults under load: QA from 1, 8 and 32 clients, and 4 concurrent generations.

Starts `canao serve` (the 4x student compiled to int8, SmolLM2 compiled from Q4_1 with its slots) on a
free port with --threads 2 and --max-queue 64 (so that only the wait limit refuses), runs
canao.serve.loadtest against it, stops it, and prints the issue's ratios; JSON to --out.

    python benchmarks/serve_load.py [--out benchmarks/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canao.serve.loadtest import run_generation_load, run_load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "canao.cli", "serve", "--port", str(port), "--threads", "2",
                             "--max-queue", "64", "--log-level", "warning"])
    try:
        for _ in range(900):  # the first start compiles the default models (minutes)
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        out = {"qa_1": run_load(url, requests=60, clients=1), "qa_8": run_load(url, requests=200, clients=8),
               "qa_32": run_load(url, requests=200, clients=32),
               "gen_4": run_generation_load(url, clients=4, max_tokens=64)}
    finally:
        proc.terminate()
        proc.wait(30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    q1, g = out["qa_1"], out["gen_4"]
    print(f"QA 1 client: p50 {q1['p50_ms']:.1f} ms, p99 {q1['p99_ms']:.1f} ms, {q1['throughput_rps']:.1f} requests/s")
    for key in ("qa_8", "qa_32"):
        r = out[key]
        print(f"QA {r['clients']} clients: {r['ok']} ok, {r['busy']} busy, {r['bad']} bad; p50 {r['p50_ms']:.1f} ms, p99 "
              f"{r['p99_ms']:.1f} ms ({r['p99_ms'] / q1['p50_ms']:.2f}x the single request's p50); "
              f"{r['throughput_rps']:.1f} requests/s ({r['throughput_rps'] / q1['throughput_rps']:.2f}x one at a time)")
    print(f"generation, 4 streams x 64 tokens: {g['ok']} ok, {g['bad']} bad; {g['aggregate_tokens_per_s']:.1f} tokens/s = "
          f"{g['aggregate_over_single']:.2f}x one stream's {g['single_stream_tokens_per_s']:.1f}")


if __name__ == "__main__":
    main()
