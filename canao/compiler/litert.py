"""TFLite / LiteRT baseline for `canao bench`, in a separate virtual environment.

litert-torch (the PyTorch -> .tflite converter) and ai-edge-quantizer pull jax,
scipy, pydantic and older typing_extensions; they live in their own venv
($CANAO_CACHE/venvs/litert, created on first use with pinned versions) that sees the
main environment's packages (torch 2.13) behind its own. The benchmark talks to a
worker process in that venv: it converts the model (same weights, saved by the
parent) once per sequence length and precision (cached by content), then runs the
interpreter (XNNPACK, N threads) on request and reports each invoke's milliseconds
(and, when asked with "logits": true, the start/end logits as JSON lists).

    python -m canao.compiler.litert convert STATE.pt SEQ PRECISION OUT.tflite
    python -m canao.compiler.litert serve          (JSON lines on stdin/stdout)
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

PINS = ("ai-edge-litert==2.3.0", "litert-torch==0.10.0", "ai-edge-quantizer==0.10.0")
REPO_ROOT = Path(__file__).resolve().parents[2]


def venv_dir() -> Path:
    from .build import cache_dir

    return cache_dir() / "venvs" / "litert"


def ensure_venv(log=None) -> Path:
    """The venv's python, creating the venv (pinned packages) when it is missing."""
    from ..errors import CanaoError

    v = venv_dir()
    py = v / "bin" / "python"
    marker = v / ".canao-ready"
    if marker.exists() and marker.read_text() == " ".join(PINS):
        return py
    if log:
        log(f"litert: creating {v} with {' '.join(PINS)} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(v)], check=True)
    vsite = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                           text=True, check=True).stdout.strip()
    # the main environment's packages (torch) after the venv's own
    (Path(vsite) / "zz_canao_main.pth").write_text(site.getsitepackages()[0] + "\n")
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CanaoError(f"litert: could not install {' '.join(PINS)}: {proc.stderr.strip()[-500:]}")
    marker.write_text(" ".join(PINS))
    return py


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


def convert(model, seq: int, precision: str, log=None) -> Path:
    """A .tflite of `model` at a static [1, seq], fp32 or int8 (dynamic-range: ai-edge-quantizer
    dynamic_wi8_afp32), cached by the weights' digest."""
    from ..errors import CanaoError
    from .build import cache_dir

    from .executorch_engine import save_weights

    folder = cache_dir() / "litert"
    weights = save_weights(model, folder)  # safetensors + JSON in a content-named folder: nothing is unpickled
    # v2: converted with three distinct example tensors (v1 passed ids twice: wrong logits)
    out = folder / f"{weights.name}-{seq}-{precision}-v2.tflite"
    if out.exists():
        return out
    py = ensure_venv(log)
    if log:
        log(f"litert: converting to {out.name} (litert-torch; a minute or two)")
    t0 = time.perf_counter()
    proc = subprocess.run([str(py), "-m", "canao.compiler.litert", "convert", str(weights), str(seq), precision, str(out)],
                          capture_output=True, text=True, env=_env())
    if proc.returncode != 0 or not out.exists():
        raise CanaoError(f"litert: conversion failed: {proc.stderr.strip()[-800:]}")
    if log:
        log(f"litert: converted in {time.perf_counter() - t0:.0f} s")
    return out


class Worker:
    """A serving worker in the venv: load(path, threads), run(ids, tt, mask) -> invoke ms,
    logits(ids, tt, mask) -> (start, end)."""

    def __init__(self):
        py = ensure_venv()
        self.proc = subprocess.Popen([str(py), "-m", "canao.compiler.litert", "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
        self.version = self._ask({"cmd": "version"})["version"]

    def _ask(self, msg: dict) -> dict:
        from ..errors import CanaoError

        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise CanaoError("litert worker exited")
        reply = json.loads(line)
        if "error" in reply:
            raise CanaoError(f"litert worker: {reply['error']}")
        return reply

    def load(self, key: str, path: Path, threads: int) -> None:
        self._ask({"cmd": "load", "key": key, "path": str(path), "threads": threads})

    def run(self, key: str, ids, tt, mask) -> float:
        return self._ask({"cmd": "run", "key": key, "ids": ids.tolist(), "tt": tt.tolist(), "mask": mask.tolist()})["ms"]

    def logits(self, key: str, ids, tt, mask):
        """(start, end) logits as float32 arrays of shape (1, n), n the input's length (the model runs padded
        to its static length; the positions past the input are cut off)."""
        import numpy as np

        r = self._ask({"cmd": "run", "key": key, "ids": ids.tolist(), "tt": tt.tolist(), "mask": mask.tolist(),
                       "logits": True})
        return np.asarray(r["start"], np.float32), np.asarray(r["end"], np.float32)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


# -- in the venv -----------------------------------------------------------------------


def _convert_main(state_path: str, seq: str, precision: str, out: str) -> None:
    import torch
    import litert_torch

    from ..models.bert import BertConfig, BertForQuestionAnswering

    from safetensors.torch import load_file

    config = json.loads((Path(state_path) / "config.json").read_text())
    model = BertForQuestionAnswering(BertConfig(**config)).eval()
    model.load_state_dict(load_file(str(Path(state_path) / "model.safetensors")))
    # three distinct tensors: an input passed twice becomes one graph input (ids used as the mask)
    ids = torch.ones((1, int(seq)), dtype=torch.long)
    fp32 = out if precision == "fp32" else out + ".fp32.tflite"
    litert_torch.convert(model, (ids, torch.zeros_like(ids), torch.ones_like(ids))).export(fp32)
    if precision == "int8":
        from ai_edge_quantizer import quantizer, recipe

        qt = quantizer.Quantizer(fp32)
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        qt.quantize().export_model(out, overwrite=True)
        os.unlink(fp32)


def _serve_main() -> None:
    import numpy as np
    from importlib.metadata import version

    from ai_edge_litert.interpreter import Interpreter

    models = {}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "version":
                reply = {"version": f"ai-edge-litert {version('ai-edge-litert')} (XNNPACK), litert-torch {version('litert-torch')}"}
            elif msg["cmd"] == "load":
                it = Interpreter(model_path=msg["path"], num_threads=msg["threads"])
                it.allocate_tensors()
                models[msg["key"]] = it
                reply = {"ok": True}
            else:
                it = models[msg["key"]]
                ins = it.get_input_details()
                width = int(ins[0]["shape"][1])
                t0 = time.perf_counter()
                for d, name in zip(ins, ("ids", "tt", "mask")):
                    x = np.zeros((1, width), np.int32)
                    v = np.asarray(msg[name], np.int32)
                    x[:, : v.shape[1]] = v  # padded to the model's static length (mask 0 past the input)
                    it.set_tensor(d["index"], x)
                it.invoke()
                outs = [it.get_tensor(d["index"]) for d in it.get_output_details()]
                reply = {"ms": (time.perf_counter() - t0) * 1e3}
                if msg.get("logits"):  # outputs by signature name: output_0 = start, output_1 = end
                    order = sorted(range(len(outs)), key=lambda i: it.get_output_details()[i]["name"])
                    n = len(msg["ids"][0])
                    reply["start"], reply["end"] = (outs[i][:, :n].tolist() for i in order[:2])
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        _convert_main(*sys.argv[2:6])
    else:
        _serve_main()
