"""Decode baselines for SmolLM2-135M: llama.cpp Q4_1 and Q8_0, ONNX Runtime fp32 (and others).

For each context (prompt length) and thread count, every engine is asked in turn
(interleaved, --rounds times) for:
  - decode: per-token ms of 32 greedy single-token steps after a prefill of `context`
    tokens (a warm-up round first; step i attends to context + i positions);
  - TTFT: prefill of a `context`-token prompt up to the first logits, from an empty
    cache (median of 5 after a warm-up).
The headline table is decode at contexts 64 and 512 and TTFT at 128. All engines see the
same token ids (a fixed English text tokenized by canao's tokenizer, repeated to length),
and each reports the greedy ids it generates for decode_bench.GREEDY_PROMPT, compared with
canao's PyTorch model (float32 weights dequantized from the same Q4_1 file).

The memory-bandwidth floor is the time to stream the bytes one decode step must read
(every weight matrix once, the tied embedding again as the output layer, and the KV cache
at that context) at the read bandwidth a C loop streaming a weights file measures on this
machine with the same thread count (benchmarks/stream_read.c).

The engines and their measurement are `canao bench`'s (canao.baselines.decode_bench); this
script adds the bandwidth floor, the PyTorch greedy reference and the headline tables.

    python benchmarks/decode_baselines.py [--engines llamacpp-q4_1,llamacpp-q8_0,ort-fp32]
        [--contexts 64,128,512] [--threads 1,2] [--rounds 1] [--out benchmarks/results/decode_baselines]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canao.baselines import decode_bench, protocol  # noqa: E402
from canao.compiler.targets import cpu_model  # noqa: E402
from canao.paths import builtin_model  # noqa: E402

MODEL = "smollm2"
HEADLINE_DECODE = (64, 512)
HEADLINE_TTFT = 128
GREEDY_TOKENS = decode_bench.GREEDY_TOKENS

_tokenizer = None


def tokenizer():
    global _tokenizer
    if _tokenizer is None:
        from canao.models.bpe_tokenizer import BPETokenizer
        from canao.models.gguf_loader import open_gguf

        _tokenizer = BPETokenizer.from_gguf(open_gguf(builtin_model(MODEL)))
    return _tokenizer


def prompt(context: int) -> list[int]:
    """The shared benchmark prompt: `context` token ids of the benchmark text, repeated as needed."""
    return decode_bench.prompt_ids(tokenizer(), context)


def greedy_prompt() -> list[int]:
    return tokenizer().encode(decode_bench.GREEDY_PROMPT)


# ------------------------------------------------------------------ engines (canao.baselines.decode_bench)


def engine(name: str, precision: str):
    """An engine of `canao bench` on SmolLM2's Q4_1 file (llama.cpp q8_0: canao's re-quantization of it)."""
    def make(n_ctx: int):
        types = {"Q4_1": 1}  # SmolLM2's file is Q4_1: llama.cpp reads it as it is
        return decode_bench.make_engine(name, precision, builtin_model(MODEL), n_ctx, weight_types=types, log=log)
    return make


ENGINES = {
    "canao-q4_1": engine("canao", "q4_1"),
    "canao-q8_0": engine("canao", "q8_0"),
    "canao-fp32": engine("canao", "fp32"),
    "llamacpp-q4_1": engine("llama.cpp", "q4_1"),
    "llamacpp-q8_0": engine("llama.cpp", "q8_0"),
    "ort-fp32": engine("onnxruntime", "fp32"),
    "pytorch-fp32": engine("pytorch", "fp32"),
}
DEFAULT_ENGINES = "canao-q4_1,llamacpp-q4_1,canao-q8_0,llamacpp-q8_0,ort-fp32"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ bandwidth floor


def read_bandwidth_gbs(threads: int, path: Path | None = None, passes: int = 10) -> float:
    """Best-of-passes read bandwidth (GB/s) of `threads` threads streaming their own parts of a weights
    file with 32-byte loads, as the decode step reads its weights: benchmarks/stream_read.c, built once
    with -march=native (default file: SmolLM2's GGUF, 100 MB)."""
    import subprocess

    from canao.paths import cache_dir

    exe = cache_dir() / "bench-decoders" / "stream_read"
    source = Path(__file__).with_name("stream_read.c")
    if not exe.exists() or exe.stat().st_mtime < source.stat().st_mtime:
        exe.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-O3", "-march=native", "-pthread", str(source), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), str(path or builtin_model(MODEL)), str(threads), str(passes)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout)


def bytes_per_token(engine_name: str, engine, context: int, cfg) -> float:
    """Weights read once per token (+ the tied embedding as lm_head) and the KV cache at `context`."""
    kv = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * context * engine.kv_bytes_per_elem
    if engine.weight_path is not None:
        if engine.weight_bytes is None:  # opening a GGUF parses its tokenizer: once
            from canao.models.gguf_loader import open_gguf

            engine.weight_bytes = sum(int(t.n_bytes) for t in open_gguf(engine.weight_path).tensors.values())
        # the embedding is both a row lookup (negligible) and the output matmul (all of it)
        return engine.weight_bytes + kv
    params = (cfg["num_layers"] * (cfg["hidden_size"] * cfg["head_dim"] * 2 * (cfg["num_heads"] + cfg["num_kv_heads"])
                                   + 3 * cfg["hidden_size"] * cfg["intermediate_size"] + 2 * cfg["hidden_size"])
              + cfg["vocab_size"] * cfg["hidden_size"] + cfg["hidden_size"])
    return params * 4 + kv


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--contexts", default="64,128,512")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions, pooled")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_baselines"))
    parser.add_argument("--refloor", metavar="JSON", help="only re-measure the bandwidth and rewrite the floors "
                        "of an earlier result (JSON and .md)")
    args = parser.parse_args()
    if args.refloor:
        return refloor(Path(args.refloor))
    names = args.engines.split(",")
    for n in names:
        if n not in ENGINES:
            parser.error(f"unknown engine {n}; choose from {', '.join(ENGINES)}")
    contexts = [int(c) for c in args.contexts.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    n_ctx = max(contexts) + protocol.DECODE_STEPS + protocol.DECODE_WARMUP + 8

    from canao.models.decoders import load_causal_lm

    model, _, info = load_causal_lm(MODEL)
    cfg = info["config"]
    gp = greedy_prompt()
    import torch

    with torch.inference_mode():  # the reference greedy ids: canao's PyTorch model, fp32 from the same file
        cache, ref = model.new_cache(256), []
        logits = model(torch.tensor([gp]), cache, 0, last_only=True)
        for i in range(GREEDY_TOKENS):
            ref.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[ref[-1]]]), cache, len(gp) + i, last_only=True)
    del model, cache

    engines = {}
    for n in names:
        log(f"setting up {n}")
        engines[n] = ENGINES[n](n_ctx)
    greedy = {n: e.greedy(gp, GREEDY_TOKENS) for n, e in engines.items()}

    raw = {}  # (engine, context, threads) -> {"decode_ms": [...], "ttft_ms": [...]}
    versions = {}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for context in contexts:
            for th in threads:
                for n, e in engines.items():  # interleaved: engines take turns at each point
                    out = e.measure(prompt(context), th)
                    versions[n] = e.version
                    slot = raw.setdefault((n, context, th), {"decode_ms": [], "ttft_ms": []})
                    slot["decode_ms"] += out["decode_ms"]
                    slot["ttft_ms"] += out["ttft_ms"]
                    log(f"round {r + 1} ctx {context} threads {th} {n}: decode {statistics.median(out['decode_ms']):.2f} "
                        f"ms/token, ttft {statistics.median(out['ttft_ms']):.1f} ms")
    bench_s = time.perf_counter() - t_start

    bandwidth = {th: read_bandwidth_gbs(th) for th in threads}
    results = []
    for (n, context, th), slot in raw.items():
        d, t = protocol.summary(slot["decode_ms"]), protocol.summary(slot["ttft_ms"])
        nbytes = bytes_per_token(n, engines[n], context, cfg)
        results.append({
            "engine": n, "version": versions[n], "context": context, "threads": th,
            "decode_median_ms": d["median_ms"], "decode_p90_ms": d["p90_ms"], "decode_steps": d["runs"],
            "tokens_per_s": 1000.0 / d["median_ms"],
            "ttft_median_ms": t["median_ms"], "ttft_p90_ms": t["p90_ms"], "ttft_runs": t["runs"],
            "bytes_per_token": nbytes, "bandwidth_floor_ms": nbytes / (bandwidth[th] * 1e9) * 1e3,
        })
    report = {
        "model": info["path"], "params": info["params"], "weights": info["weight_types"],
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
        "read_bandwidth_gbs": bandwidth, "contexts": contexts, "threads": threads, "rounds": args.rounds,
        "decode_steps": protocol.DECODE_STEPS, "decode_warmup": protocol.DECODE_WARMUP, "ttft_runs": protocol.TTFT_RUNS,
        "greedy_prompt": decode_bench.GREEDY_PROMPT, "greedy_prompt_ids": gp, "greedy_reference_pytorch": ref,
        "greedy": greedy, "greedy_match_prefix": {n: _prefix(ids, ref) for n, ids in greedy.items()},
        "versions": versions, "bench_seconds": bench_s, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def refloor(path: Path) -> None:
    rep = json.loads(path.read_text())
    bandwidth = {int(th): read_bandwidth_gbs(int(th)) for th in rep["threads"]}
    rep["read_bandwidth_gbs"] = bandwidth
    for r in rep["results"]:
        r["bandwidth_floor_ms"] = r["bytes_per_token"] / (bandwidth[r["threads"]] * 1e9) * 1e3
    path.write_text(json.dumps(rep, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(rep))
    print(markdown(rep))


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def markdown(rep: dict) -> str:
    rows = {(r["engine"], r["context"], r["threads"]): r for r in rep["results"]}
    engines = list(dict.fromkeys(r["engine"] for r in rep["results"]))
    lines = [
        "# Decode baselines: SmolLM2-135M-Instruct",
        "",
        f"CPU: {rep['cpu']} ({rep['cores']} cores; load average at the end {', '.join(f'{x:.1f}' for x in rep['load_average'])}). "
        f"Read bandwidth (C streaming loop over a weights file): " + ", ".join(f"{k} thread(s) {v:.1f} GB/s" for k, v in rep["read_bandwidth_gbs"].items()) + ".",
        f"Decode: median of {rep['decode_steps']} greedy steps per round after a warm-up round, {rep['rounds']} interleaved "
        f"round(s); TTFT: prefill to first logits, median of {rep['ttft_runs']} per round.",
        "",
        "| engine | threads | tok/s @64 | ms/tok @64 | floor ms @64 | tok/s @512 | ms/tok @512 | floor ms @512 | TTFT 128 (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in engines:
        for th in rep["threads"]:
            cells = [n, str(th)]
            for c in HEADLINE_DECODE:
                r = rows.get((n, c, th))
                cells += [f"{r['tokens_per_s']:.1f}", f"{r['decode_median_ms']:.2f}", f"{r['bandwidth_floor_ms']:.2f}"] if r else ["-"] * 3
            r = rows.get((n, HEADLINE_TTFT, th))
            cells.append(f"{r['ttft_median_ms']:.1f}" if r else "-")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "All points (median ms; p90 in parentheses):", "",
              "| engine | context | threads | decode ms/tok | tok/s | TTFT ms | bytes/token (MB) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rep["results"], key=lambda r: (r["engine"], r["context"], r["threads"])):
        lines.append(f"| {r['engine']} | {r['context']} | {r['threads']} | {r['decode_median_ms']:.2f} ({r['decode_p90_ms']:.2f}) | "
                     f"{r['tokens_per_s']:.1f} | {r['ttft_median_ms']:.1f} ({r['ttft_p90_ms']:.1f}) | {r['bytes_per_token'] / 1e6:.1f} |")
    lines += ["", f"Greedy ids for {rep['greedy_prompt']!r} (prompt ids {rep['greedy_prompt_ids']}):", "",
              f"- pytorch-fp32 reference: {rep['greedy_reference_pytorch']}"]
    for n, ids in rep["greedy"].items():
        lines.append(f"- {n}: {ids} (first {rep['greedy_match_prefix'][n]} match the reference)")
    lines += ["", "Versions: " + "; ".join(f"{k}: {v}" for k, v in rep["versions"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
