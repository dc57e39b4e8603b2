"""1 vs 2 threads of canao artifacts, interleaved (and optionally two artifacts side by side).

    python benchmarks/compiler_threads.py --arch bert-base --seq 128 --runs 21 [--artifacts A B ...]

Without --artifacts it compiles the architecture (random weights) into out/threads/.
Every run cycles through every (artifact, threads) pair, so background load hits them
alike; prints median/p90 ms per pair and the 2T/1T ratio, one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canao.compiler import compile_model, load_artifact  # noqa: E402
from canao.models.bert import BertConfig, BertForQuestionAnswering  # noqa: E402

ARCHS = {
    "bert-base": dict(hidden_size=768, layer_heads=[12] * 12, layer_ffn=[3072] * 12, head_dim=64),
    "minilm": dict(hidden_size=384, layer_heads=[12] * 6, layer_ffn=[1536] * 6, head_dim=32),
}


def build(arch: str, out: Path, max_seq: int, **kw) -> Path:
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(**ARCHS[arch])).eval()
    compile_model(model, out, max_seq=max_seq, **kw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="bert-base", choices=sorted(ARCHS))
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--artifacts", nargs="*", help="PATH or PATH@CANAO_BLOCK_ROWS=64,... (runtime settings)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    specs = args.artifacts or [str(build(args.arch, Path("out/threads") / f"{args.arch}-{args.seq}", args.seq))]
    paths, models = [], []
    for spec in specs:  # PATH or PATH@VAR=VALUE,... (runtime settings such as CANAO_BLOCK_ROWS=64)
        path, _, env = spec.partition("@")
        saved = dict(os.environ)
        os.environ.update(dict(kv.split("=", 1) for kv in env.split(",") if kv))
        models.append(load_artifact(path))
        os.environ.clear()
        os.environ.update(saved)
        paths.append(spec)
    threads = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (1, args.seq)).astype(np.int64)
    tt, mask = np.zeros_like(ids), np.ones_like(ids)
    pairs = [(i, t) for i in range(len(models)) for t in threads]
    times = {p: [] for p in pairs}
    for i, t in pairs:  # warm-up
        models[i].set_threads(t)
        for _ in range(2):
            models[i].run(ids, tt, mask)
    for _ in range(args.runs):
        for i, t in pairs:
            models[i].set_threads(t)
            t0 = time.perf_counter()
            models[i].run(ids, tt, mask)
            times[(i, t)].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for (i, t), ts in times.items():
        ts = sorted(ts)
        rows.append({"artifact": str(paths[i]), "threads": t, "median_ms": statistics.median(ts),
                     "p90_ms": ts[int(0.9 * (len(ts) - 1))]})
    report = {"arch": args.arch, "seq": args.seq, "runs": args.runs, "results": rows}
    if args.json:
        print(json.dumps(report))
    else:
        for r in rows:
            print(f"{r['artifact']:40s} {r['threads']}T  median {r['median_ms']:8.2f} ms  p90 {r['p90_ms']:8.2f} ms")
        for i in range(len(models)):
            med = {r["threads"]: r["median_ms"] for r in rows if r["artifact"] == str(paths[i])}
            if 1 in med and 2 in med:
                print(f"{paths[i]}: 2T/1T = {med[2] / med[1]:.2f}")


if __name__ == "__main__":
    main()
