"""Thin ctypes binding of an encoder artifact's C API (canao.h)."""

from __future__ import annotations

import ctypes

import numpy as np

from ..errors import CanaoError
from .native import NativeArtifact


class CompiledModel(NativeArtifact):
    """A loaded artifact. `run` has the PyTorch model's signature and returns float32 arrays."""
    PREFIX = "canao"
    SIGNATURES = {"canao_run": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, *[ctypes.c_void_p] * 4,
                                               ctypes.c_char_p, ctypes.c_int])}

    def __init__(self, folder, threads: int | None = None, check: bool = True):
        super().__init__(folder, threads, check)
        self.max_seq = int(self.manifest["max_seq"])
        self.num_outputs = ctypes.c_long.in_dll(self._lib, "canao_num_outputs").value

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
        self._call("canao_run", batch, seq, ids.ctypes.data, tt.ctypes.data, mask.ctypes.data,
                   ctypes.cast(ptrs, ctypes.c_void_p))
        if torch_in:
            import torch

            return tuple(torch.from_numpy(o) for o in outs)
        return tuple(outs)

    __call__ = run


def _int64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.int64)
