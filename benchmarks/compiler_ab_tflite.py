"""Interleaved fp32 latency of canao artifacts against one TFLite model, in one process, 1 thread.

Run with the TFLite venv's python (it sees the main environment's packages):
    ~/.cache/canao/venvs/litert/bin/python benchmarks/compiler_ab_tflite.py SEQ RUNS THREADS TFLITE ARTIFACT...
TFLITE may contain SEQ (replaced by the sequence length): the cached conversions of `canao bench`
live in ~/.cache/canao/litert/<hash>-<seq>-fp32.tflite. With 1 thread both engines run on the
calling thread, so its CPU time (time.thread_time) leaves out what other processes took from the
core; wall time is printed too. Ratios are each engine's median over TFLite's.
"""

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from canao.compiler.encoder_runtime import CompiledModel  # noqa: E402


def main(argv):
    seq, runs, threads, tfl, arts = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4:]
    models = [CompiledModel(a, threads=threads) for a in arts]
    it = Interpreter(model_path=tfl.replace("SEQ", str(seq)), num_threads=threads)
    it.allocate_tensors()
    ids = np.random.default_rng(0).integers(1000, 20000, (1, seq)).astype(np.int64)
    tt, mask = np.zeros_like(ids), np.ones_like(ids)

    def tflite():
        for d in it.get_input_details():  # inputs in the export's order: ids, token types, mask
            n = d["name"]
            v = ids if "input_ids" in n or n.endswith("_0") else tt if "token" in n or n.endswith("_1") else mask
            it.set_tensor(d["index"], v.astype(d["dtype"]))
        it.invoke()

    fns = [("tflite", tflite)] + [(a, (lambda m: lambda: m.run(ids, tt, mask))(m)) for a, m in zip(arts, models)]
    for _, f in fns:
        for _ in range(3):
            f()
    cpu, wall = [[] for _ in fns], [[] for _ in fns]
    for _ in range(runs):
        for i, (_, f) in enumerate(fns):
            t0, c0 = time.perf_counter(), time.thread_time()
            f()
            wall[i].append((time.perf_counter() - t0) * 1e3)
            cpu[i].append((time.thread_time() - c0) * 1e3)
    c0, w0 = statistics.median(cpu[0]), statistics.median(wall[0])
    for i, (name, _) in enumerate(fns):
        c, w = statistics.median(cpu[i]), statistics.median(wall[i])
        print(f"seq {seq} T{threads} {name}: cpu {c:.2f} ms ({c / c0:.3f}x tflite)  wall {w:.2f} ms ({w / w0:.3f}x tflite)")


if __name__ == "__main__":
    main(sys.argv[1:])
