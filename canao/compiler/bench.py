"""Latency of the same weights on canao and other engines, interleaved in one run.

Each engine gets the same tokens and thread count; after warm-up the engines take
turns run by run, so load from other processes hits them alike. Reported: median
and p90 milliseconds of at least 20 runs per engine and setting.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import CanaoError

ENGINES = ("canao", "pytorch", "onnxruntime")


class _Canao:
    def __init__(self, model, artifact: Path):
        from . import load_artifact

        self.m = load_artifact(artifact)
        self.version = "canao " + self.m.manifest["target"]["name"]

    def prepare(self, threads):
        self.m.set_threads(threads)

    def __call__(self, ids, tt, mask):
        return self.m.run(ids, tt, mask)


class _Torch:
    def __init__(self, model, artifact):
        self.model = model.eval()
        self.version = f"torch {torch.__version__}"

    def prepare(self, threads):
        torch.set_num_threads(threads)

    def __call__(self, ids, tt, mask):
        with torch.inference_mode():
            return self.model(torch.from_numpy(ids), torch.from_numpy(tt), torch.from_numpy(mask))


class _Ort:
    def __init__(self, model, artifact):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CanaoError("onnxruntime is not installed: pip install 'canao[bench]'") from None
        self.ort = ort
        self.path = Path(tempfile.mkdtemp()) / "model.onnx"
        ids = torch.ones((1, 16), dtype=torch.long)
        names = ["input_ids", "token_type_ids", "attention_mask"]
        torch.onnx.export(model.eval(), (ids, ids * 0, ids), str(self.path), input_names=names,
                          output_names=["start", "end"], dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
                          dynamo=False, opset_version=17)
        self.version = f"onnxruntime {ort.__version__}"

    def prepare(self, threads):
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        # no spinning after a run: engines take turns, an idle pool must not steal the next one's cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = self.ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, ids, tt, mask):
        return self.sess.run(None, {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask})


FACTORIES = {"canao": _Canao, "pytorch": _Torch, "onnxruntime": _Ort}


def run_bench(model, artifact: Path, engines: list[str], seqs: list[int], threads: list[int],
              runs: int = 20, warmup: int = 3, progress=None) -> dict:
    unknown = [e for e in engines if e not in FACTORIES]
    if unknown:
        raise CanaoError(f"unknown engine(s) {unknown}; available: {', '.join(FACTORIES)}")
    if runs < 20:
        raise CanaoError("use at least 20 runs so medians mean something")
    runners = {e: FACTORIES[e](model, artifact) for e in engines}
    gen = np.random.default_rng(0)
    results = []
    for th in threads:
        for seq in seqs:
            ids = gen.integers(1000, model.config.vocab_size, (1, seq)).astype(np.int64)
            tt = np.zeros_like(ids)
            mask = np.ones_like(ids)
            times = {e: [] for e in engines}
            for e, r in runners.items():
                r.prepare(th)
                for _ in range(warmup):
                    r(ids, tt, mask)
            for _ in range(runs):
                for e, r in runners.items():  # interleaved: background load hits every engine alike
                    t0 = time.perf_counter()
                    r(ids, tt, mask)
                    times[e].append((time.perf_counter() - t0) * 1e3)
            for e in engines:
                ts = sorted(times[e])
                results.append({"engine": e, "version": runners[e].version, "precision": "fp32", "seq": seq,
                                "threads": th, "median_ms": statistics.median(ts),
                                "p90_ms": ts[int(0.9 * (len(ts) - 1))], "runs": runs})
            if progress:
                progress(f"threads {th} seq {seq}: " + ", ".join(
                    f"{r['engine']} {r['median_ms']:.1f} ms" for r in results[-len(engines):]))
    return {"cpu": _cpu_name(), "machine": platform.machine(), "results": results}


def markdown(report: dict) -> str:
    engines = list(dict.fromkeys(r["engine"] for r in report["results"]))
    lines = [f"CPU: {report['cpu']}", "",
             "| seq | threads | " + " | ".join(f"{e} ms" for e in engines) + " | canao / others |",
             "| --- | --- | " + " | ".join("---" for _ in engines) + " | --- |"]
    keys = list(dict.fromkeys((r["seq"], r["threads"]) for r in report["results"]))
    for seq, th in keys:
        row = {r["engine"]: r["median_ms"] for r in report["results"] if r["seq"] == seq and r["threads"] == th}
        ratio = ", ".join(f"{row['canao'] / row[e]:.2f}x {e}" for e in engines if e != "canao" and "canao" in row)
        lines.append(f"| {seq} | {th} | " + " | ".join(f"{row[e]:.1f}" for e in engines) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
