"""ggml's k-quants (Q4_K, Q5_K, Q6_K) in numpy: a quantizer and a dequantizer with ggml's block layouts.

A super-block is 256 weights of one row:
  Q4_K: fp16 d, fp16 dmin, scales[12] (eight 6-bit scales and eight 6-bit mins), qs[128]   (144 bytes)
        sub-block s (32 weights) = d * sc[s] * q - dmin * m[s], q in 0..15; qs byte 32j + l holds
        weight l of sub-block 2j (low nibble) and of sub-block 2j + 1 (high nibble)
  Q5_K: as Q4_K with qh[32] before qs: bit s of qh[l] is bit 4 of weight l of sub-block s  (176 bytes)
  Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one per 16 weights), fp16 d
        (210 bytes); w = d * sc[i // 16] * (q - 32), q in 0..63
The quantizer follows ggml's recipe (make_qkx2_quants for the scale+min formats, make_qx_quants
for Q6_K: a few candidate scales per sub-block, each refit by weighted least squares), vectorised
over every sub-block of the matrix at once.
"""

from __future__ import annotations

import numpy as np

from ..errors import CanaoError

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
FORMATS = tuple(BLOCK_BYTES)
ROWS_PER_CHUNK = 1 << 14  # super-blocks quantized at once (bounds the temporaries to a few tens of MB)


def _fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


def _scale_min_fit(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [n, 32]: (scale, min) with x ~ scale * q - min, q in 0..nmax (make_qkx2_quants:
    weights av|x| + |x|, 21 candidate scales, each refit by weighted least squares). A candidate's
    error comes from its sums (sum w (s q + m - x)^2 expanded), not from another pass over x."""
    w = np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + np.abs(x)
    lo = np.minimum(x.min(axis=1, keepdims=True), 0.0)
    hi = x.max(axis=1, keepdims=True)
    span = hi - lo
    flat = span[:, 0] <= 0
    span = np.where(span > 0, span, 1.0)
    wx = w * x
    sw, swx, swx2 = (v.sum(1, dtype=np.float64) for v in (w, wx, wx * x))

    def fit(q):
        wq = w * q
        return wq.sum(1, dtype=np.float64), (wq * q).sum(1, dtype=np.float64), (wq * x).sum(1, dtype=np.float64)

    def error(scale, mn, sl, sl2, sxl):
        return scale * scale * sl2 + 2 * scale * mn * sl + mn * mn * sw - 2 * scale * sxl - 2 * mn * swx + swx2

    best_scale, best_min = span[:, 0].astype(np.float64) / nmax, lo[:, 0].astype(np.float64)
    best_err = error(best_scale, best_min, *fit(np.clip(np.rint((x - lo) * (nmax / span)), 0, nmax)))
    for step in range(21):
        sl, sl2, sxl = fit(np.clip(np.rint((x - lo) * ((-1.0 + 0.1 * step + nmax) / span)), 0, nmax))
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1.0)
        scale = (sw * sxl - swx * sl) / det
        mn = (sl2 * swx - sl * sxl) / det
        pos = mn > 0  # the min is an offset below zero only: refit the scale alone
        scale = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), scale)
        mn = np.where(pos, 0.0, mn)
        err = error(scale, mn, sl, sl2, sxl)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mn, best_min)
    best_scale = np.where(flat, 0.0, best_scale)
    return best_scale.astype(np.float32), (-best_min).astype(np.float32)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block [n, 8] -> ggml's 12 bytes [n, 12]."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 15) | ((lm[:, 4:8] & 15) << 4)
    return out


def _unpack_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(np.uint8)
    ls = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    lm = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return ls.astype(np.float32), lm.astype(np.float32)


def _quantize_qk(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Super-blocks x [n, 256] -> (d, dmin as fp16 [n], packed scales [n, 12], q [n, 256] in 0..nmax)."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scale, mn = (v.reshape(n, 8) for v in _scale_min_fit(sub, nmax))
    max_scale, max_min = scale.max(1), mn.max(1)
    inv_s = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_m = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1.0), 0.0)
    ls = np.clip(np.rint(scale * inv_s[:, None]), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(mn * inv_m[:, None]), 0, 63).astype(np.uint8)
    d, dmin = _fp16(max_scale / 63.0), _fp16(max_min / 63.0)
    # the weights are requantized against the scales as stored (6-bit, times the fp16 d / dmin)
    dl = (d.astype(np.float32)[:, None] * ls).repeat(32, axis=1)
    dm = (dmin.astype(np.float32)[:, None] * lm).repeat(32, axis=1)
    q = np.where(dl > 0, np.rint((x + dm) / np.where(dl > 0, dl, 1.0)), 0.0)
    return d, dmin, _pack_scales(ls, lm), np.clip(q, 0, nmax).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q [n, 256] (4 low bits used) -> qs [n, 128]: byte 32j + l = q[64j + l] | q[64j + 32 + l] << 4."""
    g = (q & 15).reshape(-1, 4, 2, 32)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(-1, 128)


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _quantize_qk(x, 15)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales,
                           _nibbles(q)], axis=1)


def _quantize_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _quantize_qk(x, 31)
    high = (q >> 4).reshape(-1, 8, 32)
    qh = np.zeros((x.shape[0], 32), np.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qh,
                           _nibbles(q)], axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    # make_qx_quants: the scale from the largest |x| (sign kept), 19 candidates, weights x^2
    amax_at = np.abs(sub).argmax(1)
    peak = sub[np.arange(sub.shape[0]), amax_at]
    nz = peak != 0
    peak_safe = np.where(nz, peak, 1.0)[:, None]
    w = sub * sub
    best_scale = np.zeros(sub.shape[0], np.float32)
    best_score = np.full(sub.shape[0], -1.0)
    for step in range(-9, 10):
        q = np.clip(np.rint(sub * (-(32 + 0.1 * step) / peak_safe)), -32, 31)
        sxl, sl2 = (w * sub * q).sum(1), (w * q * q).sum(1)
        ok = sl2 > 0
        score = np.where(ok, sxl * sxl / np.where(ok, sl2, 1.0), -1.0)  # least squares: maximise sxl^2 / sl2
        better = ok & (score > best_score)
        best_score = np.where(better, score, best_score)
        best_scale = np.where(better, sxl / np.where(ok, sl2, 1.0), best_scale)
    best_scale = np.where(nz, best_scale, 0.0).reshape(n, 16)
    at = np.abs(best_scale).argmax(1)
    max_scale = best_scale[np.arange(n), at]
    has = max_scale != 0
    iscale = np.where(has, -128.0 / np.where(has, max_scale, 1.0), 0.0)
    sc = np.clip(np.rint(best_scale * iscale[:, None]), -128, 127).astype(np.int8)
    d = _fp16(np.where(has, 1.0 / np.where(has, iscale, 1.0), 0.0))
    dl = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).repeat(16, axis=1)
    q = np.where(dl != 0, np.rint(x / np.where(dl != 0, dl, 1.0)), 0.0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # [half][quarter][l]
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),
                         (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], axis=2).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


_QUANTIZERS = {"Q4_K": _quantize_q4_k, "Q5_K": _quantize_q5_k, "Q6_K": _quantize_q6_k}


# llama.cpp's mixes: the base format, with Q6_K on the V and down projections of some layers (use_more_bits)
# and on the output matrix; the mix also keeps tensors a file already holds in any of its formats
MIXES = {"q4_k_m": ("Q4_K", "Q6_K"), "q5_k_m": ("Q5_K", "Q6_K"), "q6_k": ("Q6_K",)}
# where rows are not a multiple of 256 weights, as llama.cpp (which uses Q5_0 / Q5_1, which canao lacks, for
# Q4_K / Q5_K)
FALLBACK = {"Q4_K": "Q4_1", "Q5_K": "Q8_0", "Q6_K": "Q8_0"}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get Q6_K in its _M mixes."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mix_format(mix: str, gguf_name: str, k: int, n_layers: int) -> str:
    """The format llama.cpp's mix gives the matrix named gguf_name ("blk.3.attn_v.weight", "output.weight")
    with rows of k weights."""
    parts = gguf_name.split(".")
    fmt = MIXES[mix][0]
    if parts[-2] == "output" or (parts[-2] in ("attn_v", "ffn_down") and use_more_bits(int(parts[1]), n_layers)):
        fmt = "Q6_K"
    return fmt if k % QK_K == 0 else FALLBACK[fmt]


def check_rows(name: str, k: int, fmt: str) -> None:
    if k % QK_K:
        raise CanaoError(f"{name}: rows of {k} weights cannot be stored as {fmt} (k-quants need a multiple of "
                         f"{QK_K}); use --precision q8_0 or q4_1")


def quantize(w: np.ndarray, fmt: str, name: str = "matrix") -> np.ndarray:
    """A float matrix [rows, k] -> [rows, k / 256 * block bytes] uint8 of fmt's blocks."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    check_rows(name, w.shape[-1], fmt)
    blocks = w.reshape(-1, QK_K)
    out = np.concatenate([_QUANTIZERS[fmt](blocks[i:i + ROWS_PER_CHUNK]) for i in range(0, len(blocks), ROWS_PER_CHUNK)])
    return out.reshape(w.shape[0], -1)


def dequantize(rows: np.ndarray, fmt: str) -> np.ndarray:
    """[rows, k / 256 * block bytes] uint8 -> [rows, k] float32."""
    b = np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, BLOCK_BYTES[fmt])
    n = b.shape[0]
    if fmt == "Q6_K":
        ql, qh = b[:, :128].reshape(n, 2, 2, 32), b[:, 128:192].reshape(n, 2, 32)
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        q = np.stack([(ql[:, :, 0] & 15) | ((qh & 3) << 4), (ql[:, :, 1] & 15) | (((qh >> 2) & 3) << 4),
                      (ql[:, :, 0] >> 4) | (((qh >> 4) & 3) << 4), (ql[:, :, 1] >> 4) | (((qh >> 6) & 3) << 4)],
                     axis=2).reshape(n, 256).astype(np.float32) - 32
        out = (d * sc).repeat(16, axis=1) * q
    else:
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        ls, lm = _unpack_scales(b[:, 4:16])
        qs = b[:, -128:].reshape(n, 4, 32)
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(n, 256)
        if fmt == "Q5_K":
            qh = b[:, 16:48]
            q = q | (np.stack([(qh >> s) & 1 for s in range(8)], axis=1).reshape(n, 256) << 4)
        out = (d * ls).repeat(32, axis=1) * q.astype(np.float32) - (dmin * lm).repeat(32, axis=1)
    return out.reshape(rows.shape[0], -1).astype(np.float32)
