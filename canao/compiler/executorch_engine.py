"""ExecuTorch (XNNPACK) baseline for `canao bench`, in a separate virtual environment.

executorch 1.5.1 brings torchao, coremltools, pandas, scikit-learn and more (about 520 MB),
so it lives in its own venv ($CANAO_CACHE/venvs/executorch, created on first use with
pinned versions) that sees the main environment's packages (torch 2.13 CPU) behind its
own: executorch does not require torch in its metadata, and its runtime bindings load
against the torch already imported. The parent saves the weights (safetensors + JSON
config); a worker in the venv exports the model with torch.export at a static [1, seq],
lowers it to XNNPACK (to_edge_transform_and_lower + XnnpackPartitioner; int8: XNNPACK
quantizer, dynamic per-row activations, per-channel int8 weights), caches the .pte by
content, and runs it with the ExecuTorch runtime bindings on request.

Threads: the bindings expose one process-wide threadpool (_unsafe_reset_threadpool(n));
the worker resets it to the requested count before each setting.

    python -m canao.compiler.executorch_engine convert WEIGHTS_DIR SEQ PRECISION OUT.pte
    python -m canao.compiler.executorch_engine serve          (JSON lines on stdin/stdout)
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

PINS = ("executorch==1.5.1", "torchao==0.18.0")
REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "run `canao bench --engines executorch` once online to create it"


def venv_dir() -> Path:
    from .build import cache_dir

    return cache_dir() / "venvs" / "executorch"


def offline() -> bool:
    return os.environ.get("CANAO_OFFLINE", "") not in ("", "0")


def ensure_venv(log=None) -> Path:
    """The venv's python, creating the venv (pinned packages) when it is missing.
    CANAO_OFFLINE=1 forbids creating it (no network): a clear error instead of a pip failure."""
    from ..errors import CanaoError

    v = venv_dir()
    py = v / "bin" / "python"
    marker = v / ".canao-ready"
    if marker.exists() and marker.read_text() == " ".join(PINS):
        return py
    if offline():
        raise CanaoError(f"executorch: its venv {v} is missing and CANAO_OFFLINE is set; {INSTALL_HINT} "
                         f"({' '.join(PINS)}, about 520 MB)")
    if log:
        log(f"executorch: creating {v} with {' '.join(PINS)} (once, a few minutes)")
    proc = subprocess.run([sys.executable, "-m", "venv", str(v)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CanaoError(f"executorch: could not create the venv {v}: {proc.stderr.strip()[-300:]}")
    vsite = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                           text=True, check=True).stdout.strip()
    # the main environment's packages (torch, safetensors, numpy) after the venv's own
    (Path(vsite) / "zz_canao_main.pth").write_text(site.getsitepackages()[0] + "\n")
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CanaoError(f"executorch: could not install {' '.join(PINS)} into {v} ({INSTALL_HINT}): "
                         f"{proc.stderr.strip()[-400:]}")
    marker.write_text(" ".join(PINS))
    return py


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def save_weights(model, folder: Path) -> Path:
    """The model's weights (safetensors) and config (JSON) in folder/<digest>/, named by content."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = json.dumps(vars(model.config), sort_keys=True, default=str)
    digest = hashlib.sha256(config.encode())
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].numpy().tobytes())
    out = folder / digest.hexdigest()[:20]
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"))
        (out / "config.json").write_text(config)  # written last: marks the folder complete
    return out


def convert(model, seq: int, precision: str, log=None) -> Path:
    """A .pte of `model` at a static [1, seq] lowered to XNNPACK, fp32 or int8, cached by content."""
    from ..errors import CanaoError
    from .build import cache_dir

    folder = cache_dir() / "executorch"
    weights = save_weights(model, folder)
    out = folder / f"{weights.name}-{seq}-{precision}.pte"
    if out.exists():
        return out
    py = ensure_venv(log)
    if log:
        log(f"executorch: exporting and lowering to {out.name} (XNNPACK; a minute or two)")
    t0 = time.perf_counter()
    proc = subprocess.run([str(py), "-m", "canao.compiler.executorch_engine", "convert", str(weights), str(seq),
                           precision, str(out)], capture_output=True, text=True, env=_env())
    if proc.returncode != 0 or not out.exists():
        raise CanaoError(f"executorch: conversion failed: {proc.stderr.strip()[-800:]}")
    if log:
        log(f"executorch: lowered in {time.perf_counter() - t0:.0f} s")
    return out


class Worker:
    """A serving worker in the venv: load(key, path), threads(n), run(key, ids, tt, mask) -> forward ms."""

    def __init__(self, log=None):
        py = ensure_venv(log)
        self.proc = subprocess.Popen([str(py), "-m", "canao.compiler.executorch_engine", "serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=_env())
        self.version = self._ask({"cmd": "version"})["version"]

    def _ask(self, msg: dict) -> dict:
        from ..errors import CanaoError

        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise CanaoError("executorch worker exited")
        reply = json.loads(line)
        if "error" in reply:
            raise CanaoError(f"executorch worker: {reply['error']}")
        return reply

    def load(self, key: str, path: Path) -> None:
        self._ask({"cmd": "load", "key": key, "path": str(path)})

    def threads(self, n: int) -> int:
        """Resets the runtime's threadpool; the count it reports back."""
        return self._ask({"cmd": "threads", "n": n})["threads"]

    def run(self, key: str, ids, tt, mask) -> float:
        return self._ask({"cmd": "run", "key": key, "ids": ids.tolist(), "tt": tt.tolist(), "mask": mask.tolist()})["ms"]

    def logits(self, key: str, ids, tt, mask):
        """(start, end) logits as numpy arrays, cut to the input's length."""
        import numpy as np

        r = self._ask({"cmd": "run", "key": key, "ids": ids.tolist(), "tt": tt.tolist(), "mask": mask.tolist(),
                       "logits": True})
        return np.asarray(r["start"], np.float32), np.asarray(r["end"], np.float32)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


# -- in the venv -----------------------------------------------------------------------


def _convert_main(weights: str, seq: str, precision: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from ..models.bert import BertConfig, BertForQuestionAnswering

    config = json.loads((Path(weights) / "config.json").read_text())
    model = BertForQuestionAnswering(BertConfig(**config)).eval()
    model.load_state_dict(load_file(str(Path(weights) / "model.safetensors")))
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
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "version":
                reply = {"version": f"executorch {version('executorch')} (XNNPACK), torch {torch.__version__}"}
            elif msg["cmd"] == "load":
                m = portable_lib._load_for_executorch(msg["path"])
                width = int(m.method_meta("forward").input_tensor_meta(0).sizes()[1])
                models[msg["key"]] = (m, width)
                reply = {"ok": True}
            elif msg["cmd"] == "threads":
                portable_lib._unsafe_reset_threadpool(int(msg["n"]))
                reply = {"threads": int(portable_lib._threadpool_get_thread_count())}
            else:
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
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        _convert_main(*sys.argv[2:6])
    else:
        _serve_main()
