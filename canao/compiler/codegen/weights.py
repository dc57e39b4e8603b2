"""Weights as the kernels read them: one blob (weights.bin after its header), every array 64-byte aligned
and addressed from C as an offset into W; the packings per precision.

    fp32   pack_panels:      [K, N] -> [N/nr][K][nr] floats (a microkernel streams one panel)
    bf16   to_bf16(panels):  the same panels as bf16 bits (widened to fp32 in registers)
    bf16   pack_bf16_pairs:  [N/nr][K/2][nr][2] (vdpbf16ps: a column's two K values per lane)
    int8   quantize_int8:    [N/nr][K/4][nr][4] per-column symmetric int8, column sums, column scales
"""

from __future__ import annotations

import numpy as np


class WeightBlob:
    """The packed weights; each array is stored once per key."""

    def __init__(self):
        self.data = bytearray()
        self.offsets: dict[str, int] = {}  # key -> float offset in W

    def _store(self, key: str, raw: bytes) -> int:
        if key not in self.offsets:
            self.data += b"\0" * (-len(self.data) % 64)
            self.offsets[key] = len(self.data) // 4
            self.data += raw
        return self.offsets[key]

    def floats(self, key: str, arr: np.ndarray) -> str:
        """A float32 array; C: a `const float *`."""
        if key in self.offsets:
            return f"(W + {self.offsets[key]})"
        return f"(W + {self._store(key, np.ascontiguousarray(arr, np.float32).tobytes())})"

    def typed(self, key: str, arr: np.ndarray, ctype: str) -> str:
        """Any array (int8 panels, int32 column sums, bf16 bits) as it is; C: a typed pointer."""
        if key in self.offsets:
            return f"((const {ctype} *)(W + {self.offsets[key]}))"
        return f"((const {ctype} *)(W + {self._store(key, np.ascontiguousarray(arr).tobytes())}))"


def pack_panels(w: np.ndarray, nr: int) -> np.ndarray:
    """[K, N] -> [ceil(N/nr), K, nr], zero-padded: a microkernel reads one panel sequentially."""
    k, n = w.shape
    panels = -(-n // nr)
    padded = np.zeros((k, panels * nr), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, nr).transpose(1, 0, 2))


def quantize_int8(w: np.ndarray, nr: int, wmax: int, act_offset: int = 128):
    """Per-column symmetric int8 in [-wmax, wmax], packed [N/nr][K/4][nr][4] (4 K values of a column
    in one 32-bit lane); the column sums times the activation offset (128 for u8 activations, 0 where
    the dot product is s8 x s8); the column scales."""
    k, n = w.shape
    scale = np.abs(w).max(axis=0) / wmax
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -wmax, wmax).astype(np.int8)
    kp, panels = -(-k // 4) * 4, -(-n // nr)
    qp = np.zeros((kp, panels * nr), np.int8)
    qp[:k, :n] = q
    packed = np.ascontiguousarray(qp.reshape(kp // 4, 4, panels, nr).transpose(2, 0, 3, 1))
    colsum = (act_offset * qp.astype(np.int32).sum(axis=0)).astype(np.int32)
    scales = np.ones(panels * nr, np.float32)
    scales[:n] = scale
    return packed, colsum, scales


def to_bf16(w: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def pack_bf16_pairs(w: np.ndarray, nr: int) -> np.ndarray:
    """[K, N] -> bf16 [N/nr][K/2][nr][2] (vdpbf16ps reads a column's two K values per lane)."""
    k, n = w.shape
    kp, panels = -(-k // 2) * 2, -(-n // nr)
    padded = np.zeros((kp, panels * nr), np.float32)
    padded[:k, :n] = w
    return np.ascontiguousarray(to_bf16(padded).reshape(kp // 2, 2, panels, nr).transpose(2, 0, 3, 1))
