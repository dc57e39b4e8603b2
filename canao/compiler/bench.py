"""Latency of the same weights on canao and other engines, interleaved in one run.

Each engine gets the same tokens and thread count; after warm-up the engines take
turns run by run, so load from other processes hits them alike. Reported: median
and p90 milliseconds of at least 20 runs per engine and setting.

Engines run in one or more precisions: canao fp32/bf16/int8 (one artifact each),
ONNX Runtime fp32 and int8 (onnxruntime.quantization dynamic: int8 weights, per-row
activation quantization at run time), PyTorch fp32, TFLite fp32/int8 and ExecuTorch
(XNNPACK) fp32/int8 in their own venvs, OpenVINO (CPU plugin) fp32. A sequence setting is a length
(random tokens, no padding), or "squad": real SQuAD dev questions with their
contexts at their real lengths, one question per run, in the same order for every
engine (static-shape engines run them padded to 384, as their QA apps do), or
"squad-unpadded": the same questions, with TFLite given a model converted at each
question's exact length (one conversion per distinct length, cached), so every engine
does the same work.
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
from .targets import cpu_model

ENGINES = ("canao", "pytorch", "onnxruntime", "tflite", "executorch", "openvino")
SQUAD_SETTINGS = ("squad", "squad-unpadded")


class _Canao:
    precisions = ("fp32", "bf16", "int8")

    def __init__(self, model, artifact: Path, precision: str = "fp32"):
        from . import load_artifact

        self.m = load_artifact(artifact)
        if self.m.manifest["precision"] != precision:
            raise CanaoError(f"{artifact} is a {self.m.manifest['precision']} artifact, not {precision}")
        self.version = f"canao {self.m.manifest['target']['name']} {precision}"

    def prepare(self, threads):
        self.m.set_threads(threads)

    def __call__(self, ids, tt, mask):
        return self.m.run(ids, tt, mask)


class _Torch:
    precisions = ("fp32",)

    def __init__(self, model, artifact, precision="fp32"):
        self.model = model.eval()
        self.version = f"torch {torch.__version__}"

    def prepare(self, threads):
        torch.set_num_threads(threads)

    def __call__(self, ids, tt, mask):
        with torch.inference_mode():
            return self.model(torch.from_numpy(ids), torch.from_numpy(tt), torch.from_numpy(mask))


class _Ort:
    precisions = ("fp32", "int8")

    def __init__(self, model, artifact, precision="fp32"):
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
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q = self.path.with_name("model.int8.onnx")
            quantize_dynamic(str(self.path), str(q), weight_type=QuantType.QInt8, per_channel=True)
            self.path = q
        self.version = f"onnxruntime {ort.__version__} {precision}"

    def prepare(self, threads):
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        # no spinning after a run: engines take turns, an idle pool must not steal the next one's cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = self.ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, ids, tt, mask):
        return self.sess.run(None, {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask})


class _TFLite:
    """TFLite/LiteRT (XNNPACK) in its own venv (canao.compiler.litert). Shapes are static: one
    model per length; real SQuAD inputs run padded to 384, the way TFLite QA apps run them
    ("squad"), or each on a model of its own length ("squad-unpadded")."""
    precisions = ("fp32", "int8")

    def __init__(self, model, artifact, precision="fp32"):
        import sys

        from . import litert

        self.model, self.precision, self.litert = model, precision, litert
        self.log = lambda line: print(line, file=sys.stderr)
        self.worker = litert.Worker()
        self.version = f"{self.worker.version} {precision}"
        self.paths, self.loaded = {}, set()

    def setup(self, seq, inputs=()):
        # squad-unpadded: one static model per distinct input length, so nothing is padded
        self.widths = sorted({a[0].shape[1] for a in inputs}) if seq == "squad-unpadded" else \
            [384 if seq == "squad" else int(seq)]
        for w in self.widths:
            if w not in self.paths:
                self.paths[w] = self.litert.convert(self.model, w, self.precision, log=self.log)
        self.width = self.widths[-1]
        self.padded_to = self.width if seq == "squad" else None

    def prepare(self, threads):
        self.threads = threads
        for w in self.widths:
            key = f"{w}-{threads}"
            if key not in self.loaded:
                self.worker.load(key, self.paths[w], threads)
                self.loaded.add(key)
                zeros = np.zeros((1, w), np.int64)
                self.worker.run(key, zeros, zeros, zeros + 1)  # first invoke: XNNPACK sets up there
        self.key = f"{self.width}-{threads}"

    def __call__(self, ids, tt, mask):
        key = f"{self.padded_to or ids.shape[1]}-{self.threads}"  # the model of this input's length, or the padded one
        self.last_ms = self.worker.run(key, ids, tt, mask)  # timed inside the worker, without the pipe


class _ExecuTorch:
    """ExecuTorch (XNNPACK delegate) in its own venv (canao.compiler.executorch_engine). Static shapes like
    TFLite: one program per length, real SQuAD inputs padded to 384."""
    precisions = ("fp32", "int8")

    def __init__(self, model, artifact, precision="fp32"):
        import sys

        from . import executorch_engine

        self.model, self.precision, self.et = model, precision, executorch_engine
        self.log = lambda line: print(line, file=sys.stderr)
        self.worker = executorch_engine.Worker(log=self.log)
        self.version = f"{self.worker.version} {precision}"
        self.paths, self.loaded = {}, set()

    def setup(self, seq, inputs=()):
        if seq == "squad-unpadded":
            raise CanaoError("executorch: --seq squad-unpadded needs a program per length; bench it with --seq squad")
        self.width = 384 if seq == "squad" else int(seq)
        if self.width not in self.paths:
            self.paths[self.width] = self.et.convert(self.model, self.width, self.precision, log=self.log)
            self.worker.load(str(self.width), self.paths[self.width])
        self.padded_to = self.width if seq == "squad" else None

    def prepare(self, threads):
        self.worker.threads(threads)  # one threadpool per process, reset for each setting

    def __call__(self, ids, tt, mask):
        self.last_ms = self.worker.run(str(self.width), ids, tt, mask)  # timed inside the worker


class _OpenVINO:
    """OpenVINO CPU plugin (canao.compiler.openvino_engine), fp32, dynamic sequence length."""
    precisions = ("fp32",)

    def __init__(self, model, artifact, precision="fp32"):
        from .openvino_engine import OpenVINOModel

        self.m = OpenVINOModel(model, threads=1, precision=precision)
        self.version = f"{self.m.version} {precision}"

    def prepare(self, threads):
        if threads != self.m.threads:
            self.m.compile(threads)

    def __call__(self, ids, tt, mask):
        return self.m(ids, tt, mask)


FACTORIES = {"canao": _Canao, "pytorch": _Torch, "onnxruntime": _Ort, "tflite": _TFLite, "executorch": _ExecuTorch,
             "openvino": _OpenVINO}


def squad_inputs(tokenizer, squad_file: Path, count: int, max_seq: int = 384) -> list[tuple]:
    """The first `count` dev questions with their contexts, tokenized, cut at max_seq (no padding)."""
    from .verify import squad_cases

    cases = squad_cases(tokenizer, squad_file, max_seq, count=count)
    return [(ids.numpy(), tt.numpy(), mask.numpy()) for _, ids, tt, mask in cases]


def run_bench(model, artifact, engines: list[str], seqs: list, threads: list[int],
              runs: int = 20, warmup: int = 3, progress=None, precisions: list[str] = ("fp32",),
              squad: list[tuple] | None = None) -> dict:
    """artifact: a path (fp32) or {precision: path}. seqs: ints, or "squad" (needs `squad` inputs)."""
    unknown = [e for e in engines if e not in FACTORIES]
    if unknown:
        raise CanaoError(f"unknown engine(s) {unknown}; available: {', '.join(FACTORIES)}")
    if runs < 20:
        raise CanaoError("use at least 20 runs so medians mean something")
    artifacts = artifact if isinstance(artifact, dict) else {"fp32": artifact}
    runners, skipped = {}, []
    for e in engines:
        for prec in precisions:
            if prec not in FACTORIES[e].precisions:
                skipped.append(f"{e} {prec}")
                continue
            runners[(e, prec)] = FACTORIES[e](model, artifacts.get(prec), prec) if e == "canao" else \
                FACTORIES[e](model, None, prec)
    gen = np.random.default_rng(0)
    results = []
    for th in threads:
        for seq in seqs:
            if seq in SQUAD_SETTINGS:
                if not squad:
                    raise CanaoError(f"--seq {seq} needs SQuAD dev questions (--data) and a checkpoint with a tokenizer")
                inputs = [squad[i % len(squad)] for i in range(runs)]
            else:
                ids = gen.integers(1000, model.config.vocab_size, (1, seq)).astype(np.int64)
                inputs = [(ids, np.zeros_like(ids), np.ones_like(ids))] * runs
            times = {k: [] for k in runners}
            for k, r in runners.items():
                if hasattr(r, "setup"):
                    r.setup(seq, inputs)
                r.prepare(th)
                for w in range(warmup):
                    r(*inputs[w % len(inputs)])
            for args in inputs:
                for k, r in runners.items():  # interleaved: background load hits every engine alike
                    t0 = time.perf_counter()
                    r(*args)
                    times[k].append(getattr(r, "last_ms", None) or (time.perf_counter() - t0) * 1e3)
            tokens = float(np.mean([a[0].shape[1] for a in inputs]))
            for (e, prec), ts_raw in times.items():
                ts = sorted(ts_raw)
                results.append({"engine": e, "version": runners[(e, prec)].version, "precision": prec, "seq": seq,
                                "mean_tokens": tokens, "threads": th, "median_ms": statistics.median(ts),
                                "mean_ms": statistics.fmean(ts), "p90_ms": ts[int(0.9 * (len(ts) - 1))], "runs": runs,
                                "padded_to": getattr(runners[(e, prec)], "padded_to", None)})
            if progress:
                progress(f"threads {th} seq {seq}: " + ", ".join(
                    f"{r['engine']} {r['precision']} {r['median_ms']:.1f} ms" for r in results[-len(runners):]))
    return {"cpu": cpu_model(), "machine": platform.machine(), "results": results, "skipped": skipped,
            "note": "engines interleaved run by run; median/p90 over runs; squad rows: one real dev question per run"}


def markdown(report: dict) -> str:
    engines = list(dict.fromkeys(f"{r['engine']} {r['precision']}" for r in report["results"]))
    lines = [f"CPU: {report['cpu']}", "",
             "| seq | threads | " + " | ".join(f"{e} ms" for e in engines) + " | canao / others |",
             "| --- | --- | " + " | ".join("---" for _ in engines) + " | --- |"]
    keys = list(dict.fromkeys((r["seq"], r["threads"]) for r in report["results"]))
    for seq, th in keys:
        rows = [r for r in report["results"] if r["seq"] == seq and r["threads"] == th]
        row = {f"{r['engine']} {r['precision']}": r["median_ms"] for r in rows}
        ratios = []
        for c in (e for e in engines if e.startswith("canao ") and e in row):
            ratios += [f"{c} {row[c] / row[e]:.2f}x {e}" for e in engines if not e.startswith("canao ") and e in row]
        label = f"{seq} ({rows[0]['mean_tokens']:.0f} tok)" if seq in SQUAD_SETTINGS else seq
        lines.append(f"| {label} | {th} | " + " | ".join(f"{row[e]:.1f}" if e in row else "-" for e in engines)
                     + f" | {'; '.join(ratios)} |")
    return "\n".join(lines) + "\n"

