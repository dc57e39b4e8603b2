"""OpenVINO baseline for `canao bench`: the CPU plugin, in this process.

openvino 2026.4.1 needs only numpy and openvino-telemetry, so it installs with the main
environment (the `bench` extra). The model goes through ONNX (the same TorchScript export
the ONNX Runtime engine uses, dynamic batch and sequence axes) and OpenVINO's ONNX
frontend; the compiled model keeps a dynamic sequence length, so real SQuAD questions
run unpadded. Compiled for latency on one stream with a fixed thread count and fp32
inference precision (the CPU plugin would otherwise pick bf16 on AMX/AVX512-BF16 CPUs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .encoder_engines import export_onnx

INSTALL_HINT = "pip install 'canao[bench]' (openvino==2026.4.1)"


def _openvino():
    from ..errors import CanaoError

    try:
        import openvino
    except ImportError:
        raise CanaoError(f"openvino is not installed: {INSTALL_HINT}") from None
    return openvino


class OpenVINOModel:
    """model -> OpenVINO CPU; (ids, tt, mask) int64 numpy [1, n] -> (start, end) float32 numpy [1, n]."""

    def __init__(self, model, threads: int = 1, precision: str = "fp32"):
        from ..errors import CanaoError

        ov = _openvino()
        if precision != "fp32":
            raise CanaoError(f"openvino engine runs fp32 only, not {precision}")
        self.core = ov.Core()
        self.folder = Path(tempfile.mkdtemp(prefix="canao-openvino-"))
        self.ir = self.core.read_model(str(export_onnx(model, self.folder / "model.onnx")))
        self.version = f"openvino {ov.get_version().split('-')[0]}"
        self.compile(threads)

    def compile(self, threads: int) -> None:
        import openvino.properties as props
        import openvino.properties.hint as hints

        config = {hints.inference_precision: "f32", hints.performance_mode: hints.PerformanceMode.LATENCY,
                  props.num_streams: 1, props.inference_num_threads: threads,
                  # no pinning: the other engines do not pin either, and the cores are shared
                  hints.enable_cpu_pinning: False}
        self.compiled = self.core.compile_model(self.ir, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.threads = int(self.compiled.get_property(props.inference_num_threads))

    def __call__(self, ids, tt, mask):
        r = self.request.infer({"input_ids": ids, "token_type_ids": tt, "attention_mask": mask})
        return r[self.compiled.output(0)], r[self.compiled.output(1)]


def logits(model, ids, tt, mask, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    return OpenVINOModel(model, threads)(ids, tt, mask)
