"""TFLite / LiteRT baseline for `canao bench`, in a separate virtual environment.

litert-torch (the PyTorch -> .tflite converter) and ai-edge-quantizer pull jax,
scipy, pydantic and older typing_extensions; they live in their own venv
($CANAO_CACHE/venvs/litert, created on first use with pinned versions) that sees the
main environment's packages (torch 2.13) behind its own. The benchmark talks to a
worker process (canao.baselines.venv_worker) in that venv: it converts the model (same weights, saved by the
parent) once per sequence length and precision (cached by content), then runs the
interpreter (XNNPACK, N threads) on request and reports each invoke's milliseconds
(and, when asked with "logits": true, the start/end logits as JSON lists).

    python -m canao.baselines.litert convert WEIGHTS_DIR SEQ PRECISION OUT.tflite
    python -m canao.baselines.litert serve          (JSON lines on stdin/stdout)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .venv_worker import EncoderWorker, ManagedVenv, convert_in_venv, export_qa_weights, serve_json_lines

PINS = ("ai-edge-litert==2.3.0", "litert-torch==0.10.0", "ai-edge-quantizer==0.10.0")
VENV = ManagedVenv("litert", PINS, install_hint="run `canao bench --engines tflite` once online to create it")
MODULE = "canao.baselines.litert"
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "3"}


def venv_dir() -> Path:
    return VENV.folder


def ensure_venv(log=None) -> Path:
    """The venv's python, creating the venv (pinned packages) when it is missing."""
    return VENV.ensure(log)


def convert(model, seq: int, precision: str, log=None) -> Path:
    """A .tflite of `model` at a static [1, seq], fp32 or int8 (dynamic-range: ai-edge-quantizer
    dynamic_wi8_afp32), cached by the weights' digest."""
    from ..paths import cache_dir

    folder = cache_dir() / "litert"
    weights = export_qa_weights(model, folder)  # safetensors + JSON in a content-named folder: nothing is unpickled
    # v2: converted with three distinct example tensors (v1 passed ids twice: wrong logits)
    out = folder / f"{weights.name}-{seq}-{precision}-v2.tflite"
    if out.exists():
        return out
    return convert_in_venv(VENV, MODULE, weights, [str(seq), precision], out, "converting with litert-torch",
                           log=log, env=QUIET_TF)


class Worker(EncoderWorker):
    """A serving worker in the venv: load(key, path, threads), run(key, ids, tt, mask) -> invoke ms,
    logits(key, ids, tt, mask) -> (start, end)."""

    def __init__(self, log=None):
        super().__init__(VENV, MODULE, log=log, env=QUIET_TF)
        self.version = self.ask({"cmd": "version"})["version"]

    def load(self, key: str, path: Path, threads: int) -> None:
        self.ask({"cmd": "load", "key": key, "path": str(path), "threads": threads})


# -- in the venv -----------------------------------------------------------------------


def _convert_main(weights: str, seq: str, precision: str, out: str) -> None:
    import torch
    import litert_torch

    from .venv_worker import load_exported_qa_model

    model = load_exported_qa_model(weights)
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

    def handle(msg: dict) -> dict:
        if msg["cmd"] == "version":
            return {"version": f"ai-edge-litert {version('ai-edge-litert')} (XNNPACK), litert-torch {version('litert-torch')}"}
        if msg["cmd"] == "load":
            it = Interpreter(model_path=msg["path"], num_threads=msg["threads"])
            it.allocate_tensors()
            models[msg["key"]] = it
            return {"ok": True}
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
        return reply

    serve_json_lines(handle)


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        _convert_main(*sys.argv[2:6])
    else:
        _serve_main()
