"""Latency predictor vs canao-compiled measurements on held-out candidates.

python benchmarks/compress_predictor.py --teacher ../shared/models/minilm-l6-h384-squad --n 30 --seq 384 --threads 1 \
    --precisions fp32,int8 --db runs/latency-db.json --out runs/predictor.json
Measures n candidate shapes of the teacher's search space in each precision (cached in --db),
fits the predictor on 70 % of each precision's measurements, reports its error on the held-out
30 % (of the p95 and of the median), then the same with more and more of the measurements to
show how many a new device needs.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canao.compress.oracle import LatencyOracle, host_id  # noqa: E402
from canao.compress.predictor import LatencyPredictor, calibration_set, holdout_error  # noqa: E402
from canao.compress.space import SearchSpace  # noqa: E402
from canao.models.bert import BertConfig  # noqa: E402
from canao.models.checkpoint import read_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="canao")
    ap.add_argument("--db", default="runs/latency-db.json")
    ap.add_argument("--out", default="runs/predictor.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    teacher = BertConfig.from_hf(read_config(Path(a.teacher)))
    space = SearchSpace.from_teacher(teacher, seq=a.seq, precisions=a.precisions.split(","))
    oracle = LatencyOracle(teacher, a.threads, a.backend, a.db, runs=20, rounds=a.rounds,
                           progress=lambda arch, m: print(f"{arch.key()}: p50 {m['median_ms']:.2f} p95 {m['p95_ms']:.2f} ms "
                                                          f"(compile {m['compile_s']:.1f}s)", file=sys.stderr, flush=True))
    t0 = time.time()
    samples = [(arch, oracle.measure(arch)) for arch in calibration_set(space, a.n, a.seed)]
    res = {"host": host_id(), "backend": a.backend, "threads": a.threads, "seq": a.seq, "n": len(samples),
           "measure_s": time.time() - t0}
    pred = LatencyPredictor(teacher, threads=a.threads)
    res["holdout"] = holdout_error(pred, samples, seed=a.seed)
    res["predictor"] = pred.to_dict()
    res["by_size"] = {}  # the error with fewer calibration shapes (same held-out rule)
    shapes = sorted({s.shape_key() for s, _ in samples}, key=[s.shape_key() for s, _ in samples].index)
    for k in (6, 10, 15, 20, 30):
        if k < len(shapes):
            keep = set(shapes[:k])
            sub = [(s, m) for s, m in samples if s.shape_key() in keep]
            res["by_size"][k] = holdout_error(LatencyPredictor(teacher, threads=a.threads), sub, seed=a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
