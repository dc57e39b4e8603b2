"""ExecuTorch (XNNPACK) baseline for `canao bench`, in a separate virtual environment.

executorch 1.5.1 brings torchao, coremltools, pandas, scikit-learn and more (about 520 MB),
so it lives in its own venv (canao.baselines.venv_worker) ($CANAO_CACHE/venvs/executorch, created on first use with
pinned versions) that sees the main environment's packages (torch 2.13 CPU) behind its
own: executorch does not require torch in its metadata, and its runtime bindings load
against the torch already imported. The parent saves the weights (safetensors + JSON
config); a worker in the venv exports the model with torch.export at a static [1, seq],
lowers it to XNNPACK (to_edge_transform_and_lower + XnnpackPartitioner; int8: XNNPACK
quantizer, dynamic per-row activations, per-channel int8 weights), caches the .pte by
content, and runs it with the ExecuTorch runtime bindings on request.

Threads: the bindings expose one process-wide threadpool (_unsafe_reset_threadpool(n));
the worker resets it to the requested count before each setting.

    python -m canao.baselines.executorch_engine convert WEIGHTS_DIR SEQ PRECISION OUT.pte
    python -m canao.baselines.executorch_engine serve          (JSON lines on stdin/stdout)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .venv_worker import EncoderWorker, ManagedVenv, convert_in_venv, export_qa_weights, serve_json_lines

PINS = ("executorch==1.5.1", "torchao==0.18.0")
INSTALL_HINT = "run `canao bench --engines executorch` once online to create it"
VENV = ManagedVenv("executorch", PINS, install_hint=INSTALL_HINT, size_note=", about 520 MB, a few minutes")
MODULE = "canao.baselines.executorch_engine"


def venv_dir() -> Path:
    return VENV.folder


def ensure_venv(log=None) -> Path:
    """The venv's python, creating the venv (pinned packages) when it is missing. CANAO_OFFLINE=1 forbids
    creating it (no network): a clear error instead of a pip failure."""
    return VENV.ensure(log)


def convert(model, seq: int, precision: str, log=None) -> Path:
    """A .pte of `model` at a static [1, seq] lowered to XNNPACK, fp32 or int8, cached by content."""
    from ..paths import cache_dir

    folder = cache_dir() / "executorch"
    weights = export_qa_weights(model, folder)
    out = folder / f"{weights.name}-{seq}-{precision}.pte"
    if out.exists():
        return out
    return convert_in_venv(VENV, MODULE, weights, [str(seq), precision], out,
                           "exporting and lowering to XNNPACK", log=log)


class Worker(EncoderWorker):
    """A serving worker in the venv: load(key, path), threads(n), run(key, ids, tt, mask) -> forward ms."""

    def __init__(self, log=None):
        super().__init__(VENV, MODULE, log=log)
        self.version = self.ask({"cmd": "version"})["version"]

    def load(self, key: str, path: Path) -> None:
        self.ask({"cmd": "load", "key": key, "path": str(path)})

    def threads(self, n: int) -> int:
        """Resets the runtime's threadpool; the count it reports back."""
        return self.ask({"cmd": "threads", "n": n})["threads"]


# -- in the venv -----------------------------------------------------------------------


def _convert_main(weights: str, seq: str, precision: str, out: str) -> None:
    import torch

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from .venv_worker import load_exported_qa_model

    model = load_exported_qa_model(weights)
    ids = torch.ones((1, int(seq)), dtype=torch.long)
    # three distinct tensors: torch.export folds an input passed twice into one placeholder (ids as mask)
    args = (ids, torch.zeros_like(ids), torch.ones_like(ids))
    with torch.no_grad():
        if precision == "int8":
            import executorch.backends.xnnpack.quantizer.xnnpack_quantizer as xq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = xq.XNNPACKQuantizer()
            quantizer.set_global(xq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
            m = prepare_pt2e(torch.export.export(model, args).module(), quantizer)
            m(*args)  # dynamic activations: no calibration data needed, one pass to trace the observers
            model = convert_pt2e(m)
        exported = torch.export.export(model, args)
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(program.buffer)
    os.replace(tmp, out)


def _serve_main() -> None:
    import torch
    from importlib.metadata import version

    # the runtime and torchao log to fd 1 from C++: keep the protocol on a private copy of stdout
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from executorch.extension.pybindings import portable_lib

    models = {}

    def handle(msg: dict) -> dict:
        if msg["cmd"] == "version":
            return {"version": f"executorch {version('executorch')} (XNNPACK), torch {torch.__version__}"}
        if msg["cmd"] == "load":
            m = portable_lib._load_for_executorch(msg["path"])
            width = int(m.method_meta("forward").input_tensor_meta(0).sizes()[1])
            models[msg["key"]] = (m, width)
            return {"ok": True}
        if msg["cmd"] == "threads":
            portable_lib._unsafe_reset_threadpool(int(msg["n"]))
            return {"threads": int(portable_lib._threadpool_get_thread_count())}
        m, width = models[msg["key"]]
        xs = []
        for name in ("ids", "tt", "mask"):
            v = torch.tensor(msg[name], dtype=torch.long)
            x = torch.zeros((1, width), dtype=torch.long)
            x[:, : v.shape[1]] = v  # padded to the program's static length (mask 0 past the input)
            xs.append(x)
        t0 = time.perf_counter()
        start, end = m.forward(tuple(xs))
        reply = {"ms": (time.perf_counter() - t0) * 1e3}
        if msg.get("logits"):
            n = len(msg["ids"][0])
            reply["start"], reply["end"] = start[:, :n].tolist(), end[:, :n].tolist()
        return reply

    serve_json_lines(handle, out=proto)


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        _convert_main(*sys.argv[2:6])
    else:
        _serve_main()
