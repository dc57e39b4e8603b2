"""The engines a QA encoder is measured on, behind one interface: load, run, time.

    engine = open_engine(name, model, precision, artifact=None)   # load (converts / exports as needed)
    engine.setup(seq, inputs)       # the lengths it will see (static-shape engines convert one model per length)
    engine.prepare(threads)         # the thread count for what follows
    engine.run(ids, tt, mask)       # -> (start, end) float32 numpy, [1, n]
    engine.time_ms(ids, tt, mask)   # -> milliseconds of one forward pass (inside the worker for venv engines)
    engine.close()

canao itself (a compiled artifact) and PyTorch eager are engines here too, so a benchmark treats
every engine alike. ONNX Runtime (dynamic int8: onnxruntime.quantization, int8 weights, per-row
activations quantized at run time) and OpenVINO run in this process; TFLite / LiteRT and
ExecuTorch (XNNPACK) run in workers in their own venvs (canao.baselines.venv_worker).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import CanaoError


class EncoderEngine:
    name = ""
    precisions: tuple[str, ...] = ("fp32",)
    padded_to: int | None = None  # the static length inputs are padded to, where the engine pads
    version = ""

    def setup(self, seq, inputs=()) -> None:
        """seq: an int length or a SQuAD setting; inputs: the (ids, tt, mask) that will run."""

    def prepare(self, threads: int) -> None:
        raise NotImplementedError

    def run(self, ids, tt, mask):
        raise NotImplementedError

    def time_ms(self, ids, tt, mask) -> float:
        t0 = time.perf_counter()
        self.run(ids, tt, mask)
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        pass


class CanaoEngine(EncoderEngine):
    name, precisions = "canao", ("fp32", "bf16", "int8")

    def __init__(self, model, precision: str | None = "fp32", artifact: Path | None = None):
        """precision None: whatever the artifact was compiled in (model is not used: the artifact is the model)."""
        from ..compiler import load_artifact

        if artifact is None:
            raise CanaoError("the canao engine needs a compiled artifact")
        self.m = load_artifact(artifact)
        compiled = self.m.manifest["precision"]
        if precision not in (None, compiled):
            raise CanaoError(f"{artifact} is a {compiled} artifact, not {precision}")
        self.version = f"canao {self.m.manifest['target']['name']} {compiled}"

    def prepare(self, threads):
        self.m.set_threads(threads)

    def run(self, ids, tt, mask):
        return self.m.run(ids, tt, mask)


class TorchEngine(EncoderEngine):
    name = "pytorch"

    def __init__(self, model, precision: str = "fp32", artifact=None):
        import torch

        self.torch, self.model = torch, model.eval()
        self.version = f"torch {torch.__version__}"

    def prepare(self, threads):
        self.torch.set_num_threads(threads)

    def run(self, ids, tt, mask):
        t = self.torch
        with t.inference_mode():
            start, end = self.model(t.from_numpy(ids), t.from_numpy(tt), t.from_numpy(mask))
        return start.numpy(), end.numpy()


def export_onnx(model, path: Path) -> Path:
    """The encoder as ONNX (TorchScript exporter, opset 17), dynamic batch and sequence axes."""
    import torch

    names = ["input_ids", "token_type_ids", "attention_mask"]
    ids = torch.ones((1, 16), dtype=torch.long)
    torch.onnx.export(model.eval(), (ids, ids * 0, ids), str(path), input_names=names,
                      output_names=["start", "end"], dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
                      dynamo=False, opset_version=17)
    return path


class OnnxRuntimeEngine(EncoderEngine):
    name, precisions = "onnxruntime", ("fp32", "int8")

    def __init__(self, model, precision: str = "fp32", artifact=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CanaoError("onnxruntime is not installed: pip install 'canao[bench]'") from None
        self.ort = ort
        self.folder = Path(tempfile.mkdtemp(prefix="canao-ort-"))
        self.path = export_onnx(model, self.folder / "model.onnx")
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

    def run(self, ids, tt, mask):
        start, end = self.sess.run(None, {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask})
        return start, end

    def close(self):
        shutil.rmtree(self.folder, ignore_errors=True)  # the exported .onnx files


class _StaticShapeWorkerEngine(EncoderEngine):
    """An engine with static input shapes, in a venv worker: one converted model per length; an input runs
    on the shortest loaded length that holds it (padded there by the worker, outputs cut back to it).
    backend: the module (in this package) with the engine's convert() and Worker."""
    backend = ""

    def __init__(self, model, precision: str = "fp32", artifact=None, log=None):
        import importlib

        self.model, self.precision = model, precision
        self.backend_module = importlib.import_module(f".{self.backend}", __package__)
        if log:
            self._log = log
        self.worker = self.backend_module.Worker(log=self._log)
        self.version = f"{self.worker.version} {precision}"
        self.paths, self.widths = {}, []

    def _log(self, line):
        print(line, file=sys.stderr)

    def _convert(self, width: int):
        if width not in self.paths:
            self.paths[width] = self.backend_module.convert(self.model, width, self.precision, log=self._log)
        return self.paths[width]

    def _width(self, ids) -> int:
        n = ids.shape[1]
        fits = [w for w in self.widths if w >= n]
        if not fits:
            raise CanaoError(f"{self.name}: an input of {n} tokens is longer than its longest model "
                             f"({max(self.widths)}); set it up with that length first")
        return self.padded_to or min(fits)

    def close(self):
        self.worker.close()


class TFLiteEngine(_StaticShapeWorkerEngine):
    """TFLite/LiteRT (XNNPACK) in its own venv (canao.baselines.litert). Real SQuAD inputs run padded to 384,
    the way TFLite QA apps run them ("squad"), or each on a model of its own length ("squad-unpadded")."""
    name, precisions, backend = "tflite", ("fp32", "int8"), "litert"

    def __init__(self, model, precision: str = "fp32", artifact=None, log=None):
        super().__init__(model, precision, artifact, log)
        self.loaded = set()

    def setup(self, seq, inputs=()):
        # squad-unpadded: one static model per distinct input length, so nothing is padded
        self.widths = sorted({a[0].shape[1] for a in inputs}) if seq == "squad-unpadded" else \
            [384 if seq == "squad" else int(seq)]
        for w in self.widths:
            self._convert(w)
        self.padded_to = self.widths[-1] if seq == "squad" else None

    def prepare(self, threads):
        self.threads = threads
        for w in self.widths:
            key = f"{w}-{threads}"
            if key not in self.loaded:
                self.worker.load(key, self.paths[w], threads)
                self.loaded.add(key)
                zeros = np.zeros((1, w), np.int64)
                self.worker.run(key, zeros, zeros, zeros + 1)  # first invoke: XNNPACK sets up there

    def _key(self, ids) -> str:
        return f"{self._width(ids)}-{self.threads}"

    def run(self, ids, tt, mask):
        return self.worker.logits(self._key(ids), ids, tt, mask)

    def time_ms(self, ids, tt, mask):
        return self.worker.run(self._key(ids), ids, tt, mask)  # timed inside the worker, without the pipe


class ExecuTorchEngine(_StaticShapeWorkerEngine):
    """ExecuTorch (XNNPACK delegate) in its own venv (canao.baselines.executorch_engine). Static shapes like
    TFLite: one program per length, real SQuAD inputs padded to 384."""
    name, precisions, backend = "executorch", ("fp32", "int8"), "executorch_engine"

    def setup(self, seq, inputs=()):
        if seq == "squad-unpadded":
            raise CanaoError("executorch: --seq squad-unpadded needs a program per length; bench it with --seq squad")
        width = 384 if seq == "squad" else int(seq)
        if width not in self.paths:
            self.worker.load(str(width), self._convert(width))
        self.widths = [width]
        self.padded_to = width if seq == "squad" else None

    def prepare(self, threads):
        self.worker.threads(threads)  # one threadpool per process, reset for each setting

    def run(self, ids, tt, mask):
        return self.worker.logits(str(self._width(ids)), ids, tt, mask)

    def time_ms(self, ids, tt, mask):
        return self.worker.run(str(self._width(ids)), ids, tt, mask)  # timed inside the worker


class OpenVINOEngine(EncoderEngine):
    """OpenVINO CPU plugin (canao.baselines.openvino_engine), fp32, dynamic sequence length."""
    name = "openvino"

    def __init__(self, model, precision: str = "fp32", artifact=None):
        from .openvino_engine import OpenVINOModel

        self.m = OpenVINOModel(model, threads=1, precision=precision)
        self.version = f"{self.m.version} {precision}"

    def prepare(self, threads):
        if threads != self.m.threads:
            self.m.compile(threads)

    def run(self, ids, tt, mask):
        return self.m(ids, tt, mask)


ENGINES = {e.name: e for e in (CanaoEngine, TorchEngine, OnnxRuntimeEngine, TFLiteEngine, ExecuTorchEngine,
                               OpenVINOEngine)}


def open_engine(name: str, model, precision: str = "fp32", artifact: Path | None = None) -> EncoderEngine:
    """Loads `model` on engine `name` in `precision` (canao: from its compiled `artifact`)."""
    if name not in ENGINES:
        raise CanaoError(f"unknown engine '{name}'; available: {', '.join(ENGINES)}")
    if precision not in ENGINES[name].precisions:
        raise CanaoError(f"{name} runs {', '.join(ENGINES[name].precisions)}, not {precision}")
    return ENGINES[name](model, precision, artifact)
