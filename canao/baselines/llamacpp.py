"""llama.cpp decode baseline (llama-cpp-python, in a separate virtual environment).

llama-cpp-python 0.3.36 ships as an sdist that compiles llama.cpp with cmake and a C++
compiler, so it lives in its own venv ($CANAO_CACHE/venvs/llamacpp) built once on first
use: CPU only, -march=native, no BLAS, no OpenMP (ggml's own thread pool, so the
thread count we ask for is the thread count it uses). The benchmark talks to a
worker in that venv over JSON lines:

    python -m canao.baselines.llamacpp serve     (JSON lines on stdin/stdout)

Timings use the low-level API (llama_decode on a batch, llama_get_logits_ith, argmax
in numpy), so sampling and detokenizing are not in them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .venv_worker import JsonLinesWorker, ManagedVenv, serve_json_lines

VERSION = "0.3.36"
PINS = (f"llama-cpp-python=={VERSION}", "numpy==2.4.6", "jinja2==3.1.6")
# CPU-only native build; the bundled multimodal (mtmd) library is not needed here.
CMAKE_ARGS = ("-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF "
              "-DGGML_METAL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
              "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
# its own numpy, not the main environment's: the venv does not see canao's packages
VENV = ManagedVenv("llamacpp", PINS, see_main_packages=False, build_stamp=CMAKE_ARGS, needs_tools=("cmake", "c++"),
                   build_env={"CMAKE_ARGS": CMAKE_ARGS, "FORCE_CMAKE": "1",
                              "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
                   install_hint="run `python -m canao.baselines.llamacpp build` once online",
                   size_note=", compiles llama.cpp: several minutes")
MODULE = "canao.baselines.llamacpp"


def venv_dir() -> Path:
    return VENV.folder


def venv_ready() -> bool:
    return VENV.ready()


def ensure_venv(log=None) -> Path:
    """The venv's python, building llama-cpp-python into a fresh venv when missing (minutes)."""
    return VENV.ensure(log)


class Worker(JsonLinesWorker):
    """A llama.cpp worker process in the venv. Timings are taken inside it, without the pipe."""

    def __init__(self, log=None):
        super().__init__(VENV, MODULE, log=log, stderr=venv_dir() / "worker.log")
        self.info = self.ask({"cmd": "version"})
        self.version = f"llama-cpp-python {self.info['version']}"

    def load(self, path: str | os.PathLike, n_ctx: int, n_batch: int = 512) -> dict:
        """Load a GGUF (read into memory, no mmap) with a context of n_ctx positions; replaces the last one."""
        return self.ask({"cmd": "load", "path": str(path), "n_ctx": n_ctx, "n_batch": n_batch})

    def threads(self, n: int) -> None:
        self.ask({"cmd": "threads", "n": n})

    def decode_ms(self, prompt: list[int], steps: int, warmup: int) -> list[float]:
        return self.ask({"cmd": "decode", "prompt": prompt, "steps": steps, "warmup": warmup})["ms"]

    def ttft_ms(self, prompt: list[int], runs: int) -> list[float]:
        return self.ask({"cmd": "ttft", "prompt": prompt, "runs": runs})["ms"]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.ask({"cmd": "greedy", "prompt": prompt, "n": n})["ids"]

    def logits(self, prompt: list[int]) -> list[float]:
        """The last position's logits after `prompt`, from an empty cache (for parity checks)."""
        return self.ask({"cmd": "logits", "prompt": prompt})["logits"]


# -- in the venv -----------------------------------------------------------------------


class _Engine:
    """llama.cpp through the low-level C API: llama_decode on a batch, logits of the last token."""

    def __init__(self, path: str, n_ctx: int, n_batch: int):
        import ctypes

        import llama_cpp as lc
        import numpy as np

        self.lc, self.np = lc, np
        mp = lc.llama_model_default_params()
        mp.load_mode = lc.LLAMA_LOAD_MODE_NONE  # read into memory: no page faults in the timings
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()  # llama.cpp's defaults (flash attention: auto)
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = 1
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.mem = lc.llama_get_memory(self.ctx)
        self.ctypes = ctypes
        self.pos = 0

    def set_threads(self, n: int) -> None:
        self.lc.llama_set_n_threads(self.ctx, n, n)

    def reset(self) -> None:
        self.lc.llama_memory_clear(self.mem, True)
        self.pos = 0

    def feed(self, ids):
        n = len(ids)
        if n > self.n_batch or self.pos + n > self.n_ctx:
            raise ValueError(f"{n} tokens at position {self.pos} exceed n_batch {self.n_batch} / n_ctx {self.n_ctx}")
        b = self.batch
        b.n_tokens = n
        for i, tok in enumerate(ids):
            b.token[i] = tok
            b.pos[i] = self.pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i == n - 1
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.pos += n
        ptr = self.lc.llama_get_logits_ith(self.ctx, -1)
        return self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def free(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def _serve_main() -> None:
    import llama_cpp as lc

    from . import protocol

    @lc.llama_log_callback
    def quiet(level, text, _):  # errors only, to the worker log
        if level == 3:  # GGML_LOG_LEVEL_ERROR (this build logs the model dump as WARN)
            sys.stderr.write(text.decode(errors="replace"))

    lc.llama_log_set(quiet, None)
    lc.llama_backend_init()
    engine = None

    def handle(msg: dict) -> dict:
        nonlocal engine
        cmd = msg["cmd"]
        if cmd == "version":
            return {"version": lc.__version__, "system_info": lc.llama_print_system_info().decode().strip()}
        if cmd == "load":
            if engine is not None:
                engine.free()
                engine = None
            engine = _Engine(msg["path"], msg["n_ctx"], msg["n_batch"])
            return {"n_vocab": engine.n_vocab}
        if engine is None:
            raise RuntimeError("no model loaded")
        if cmd == "threads":
            engine.set_threads(msg["n"])
            return {"ok": True}
        if cmd == "decode":
            return {"ms": protocol.decode_ms(engine, msg["prompt"], msg["steps"], msg["warmup"])}
        if cmd == "ttft":
            return {"ms": protocol.ttft_ms(engine, msg["prompt"], msg["runs"])}
        if cmd == "greedy":
            return {"ids": protocol.greedy(engine, msg["prompt"], msg["n"])}
        if cmd == "logits":
            engine.reset()
            return {"logits": engine.feed(msg["prompt"]).tolist()}
        raise RuntimeError(f"unknown command {cmd}")

    serve_json_lines(handle)


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        ensure_venv()
    elif sys.argv[1:] == ["serve"]:
        _serve_main()
    else:
        sys.exit("usage: python -m canao.baselines.llamacpp build|serve")
