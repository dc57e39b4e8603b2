"""SmolLM2 decode speed on the PyTorch path (canao.models.llama), tokens/s at 1 and 2 threads.

One decode step = one new token attending to a 64-token context through the KV cache.
Warm-up first, then the median (and p90) of the timed steps; the cache is rewound to the
same position before every step so each one sees exactly context 64. Prints one JSON object.

    python benchmarks/generate_speed.py [--model smollm2] [--steps 30] [--threads 1,2] [--dtype float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canao.compiler.targets import cpu_model  # noqa: E402
from canao.models.decoders import load_decoder  # noqa: E402



@torch.inference_mode()
def time_decode(model, context: int, steps: int, warmup: int) -> list[float]:
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(max_len=context + 1)
    model(ids[:, :context], cache, 0, last_only=True)  # prefill the 64-token context
    step = ids[:, context:]
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        model(step, cache, context, last_only=True)  # rewritten at the same position every step
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtype", default="float32", help="comma list of float32, bfloat16")
    args = parser.parse_args()
    if args.steps < 20:
        parser.error("--steps must be at least 20 (medians of fewer runs are noise)")

    model, info = load_decoder(args.model)
    results = []
    for dtype in args.dtype.split(","):
        model.to(getattr(torch, dtype))
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            times = sorted(time_decode(model, args.context, args.steps, args.warmup))
            median = statistics.median(times)
            results.append({
                "engine": "canao-pytorch", "phase": "decode", "precision": dtype, "threads": threads,
                "seq": args.context, "median_ms": median, "p90_ms": times[int(0.9 * (len(times) - 1))],
                "tokens_per_s": 1000.0 / median, "steps": len(times),
            })
    print(json.dumps({
        "model": info["path"], "architecture": info["architecture"], "params": info["params"],
        "weights": info["weight_types"], "cpu": cpu_model(), "cores": os.cpu_count(),
        "torch": torch.__version__, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
