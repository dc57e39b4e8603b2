"""Thin ctypes binding of an artifact's C API (canao.h)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..errors import CanaoError
from .artifact import WEIGHTS, load_library, open_build

_ERR = 512


class CompiledModel:
    """A loaded artifact. `run` has the PyTorch model's signature and returns float32 arrays."""

    def __init__(self, folder: str | Path, threads: int | None = None, check: bool = True):
        self.path, self.manifest = open_build(Path(folder), check=check)  # x86-64 artifacts: this CPU's build
        self.max_seq = int(self.manifest["max_seq"])
        self._lib = load_library(self.path)
        lib = self._lib
        lib.canao_open.restype = ctypes.c_void_p
        lib.canao_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.canao_run.restype = ctypes.c_int
        lib.canao_run.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 4,
                                  ctypes.c_char_p, ctypes.c_int]
        lib.canao_set_threads.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.canao_close.argtypes = [ctypes.c_void_p]
        self.num_outputs = ctypes.c_long.in_dll(lib, "canao_num_outputs").value
        self.threads = threads or int(self.manifest.get("threads") or os.cpu_count() or 1)
        err = ctypes.create_string_buffer(_ERR)
        self._handle = lib.canao_open(str(self.path / WEIGHTS).encode(), self.threads, err, _ERR)
        if not self._handle:
            raise CanaoError(f"{self.path}: {err.value.decode()}")

    def set_threads(self, threads: int) -> None:
        self.threads = threads
        self._lib.canao_set_threads(self._handle, threads)

    def run(self, input_ids, token_type_ids=None, attention_mask=None, as_torch: bool | None = None):
        """(start_logits, end_logits), each [batch, seq] float32 (torch tensors when given torch inputs)."""
        torch_in = as_torch if as_torch is not None else type(input_ids).__module__.startswith("torch")
        ids = _int64(input_ids)
        tt = np.zeros_like(ids) if token_type_ids is None else _int64(token_type_ids)
        mask = np.ones_like(ids) if attention_mask is None else _int64(attention_mask)
        if ids.ndim == 1:
            ids, tt, mask = ids[None], tt[None], mask[None]
        if not (ids.shape == tt.shape == mask.shape):
            raise CanaoError(f"input shapes differ: {ids.shape}, {tt.shape}, {mask.shape}")
        batch, seq = ids.shape
        outs = [np.empty((batch, seq), np.float32) for _ in range(self.num_outputs)]
        ptrs = (ctypes.c_void_p * self.num_outputs)(*[o.ctypes.data for o in outs])
        err = ctypes.create_string_buffer(_ERR)
        rc = self._lib.canao_run(self._handle, batch, seq, ids.ctypes.data, tt.ctypes.data, mask.ctypes.data,
                                 ctypes.cast(ptrs, ctypes.c_void_p), err, _ERR)
        if rc != 0:
            raise CanaoError(err.value.decode())
        if torch_in:
            import torch

            return tuple(torch.from_numpy(o) for o in outs)
        return tuple(outs)

    __call__ = run

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.canao_close(self._handle)
            self._handle = None

    def __del__(self):
        self.close()


def _int64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.int64)
