"""The GEMM renderer: a register-blocked tile loop specialised to the matmul's shape, schedule (from
the tuner) and weight format, with the fused epilogue applied to the accumulators before the only
store. One class per format (GEMM_FORMATS): how it packs the weights, its loop, its scratch.

    f32      fp32 panels, A packed per row tile, K in blocks (tile_source)
    bf16     bf16 panels widened to fp32 in registers (targets without a bf16 dot product)
    bf16dot  bf16 activations x bf16 weight pairs (vdpbf16ps), fp32 accumulation
    int8     u8/s8 activations quantized per row x per-column int8 weights, int32 accumulation
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import CanaoError
from ..targets import Target
from .address import cexpr
from .plan import ARGS, rows_guard
from .weights import pack_bf16_pairs, pack_panels, quantize_int8, to_bf16


@dataclass
class Schedule:
    """How one GEMM runs (the tuner searches these per kernel signature)."""
    mr: int        # tile rows
    nr: int        # tile columns (a multiple of the vector length)
    kc: int = 384  # K block: a panel's block (kc x nr floats) stays in L1/L2


def tile_source(mr: int, nr: int, vl: int, bf16: bool = False) -> str:
    """The register tile: mr x nr accumulators; one K step = nr/vl loads, mr broadcasts, mr*nr/vl FMAs.
    A comes packed [K][mr] (one sequential stream for the broadcasts, whatever the row stride).
    bf16: the panel holds bf16 weights, widened to fp32 as they are loaded."""
    nv = nr // vl
    wtype, suffix, load = ("uint16_t", "_bf16", "vload_bf16") if bf16 else ("float", "", "vload")
    lines = [f"/* {mr} x {nr} register tile: acc = Ap[K][{mr}] x panel[K][{nr}] */",
             f"static inline __attribute__((always_inline)) void tile_{mr}x{nr}{suffix}"
             f"(const float *Ap, const {wtype} *w, int K, vf acc[{mr}][{nv}]) {{"]
    for r in range(mr):
        lines.append("    " + " ".join(f"vf c{r}_{j} = vzero();" for j in range(nv)))
    lines.append("#pragma GCC unroll 4")
    lines.append(f"    for (int k = 0; k < K; k++, w += {nr}, Ap += {mr}) {{")
    lines.append("        " + " ".join(f"vf b{j} = {load}(w + {j * vl});" for j in range(nv)))
    for r in range(mr):
        body = " ".join(f"c{r}_{j} = vfma(x{r}, b{j}, c{r}_{j});" for j in range(nv))
        lines.append(f"        vf x{r} = vset1(Ap[{r}]); {body}")
    lines.append("    }")
    for r in range(mr):
        lines.append("    " + " ".join(f"acc[{r}][{j}] = c{r}_{j};" for j in range(nv)))
    lines.append("}")
    return "\n".join(lines)


def packed_a_floats(sch: Schedule, k: int, rows: int) -> int:
    """Per-thread scratch for a row block's A, packed per row tile: [rows/mr][kc][mr] floats."""
    return (-(-rows // sch.mr) * sch.mr) * min(k, sch.kc) + 64


def _pair_tile(mr: int, nr: int, vl: int, int8: bool) -> str:
    """Tiles whose K step covers a group of activations broadcast as one 32-bit value:
    int8 (4 u8 activations x 4 s8 weights per lane, s32 accumulators) or bf16 pairs (vdpbf16ps)."""
    nv = nr // vl
    g, at, wt, acc_t, zero, dot, name = (4, "uint8_t", "int8_t", "vi", "vizero()", "vdot_u8s8", "tileq") if int8 else \
        (2, "uint16_t", "uint16_t", "vf", "vzero()", "vdot_bf16", "tilebd")
    lines = [f"/* {mr} x {nr} {'int8' if int8 else 'bf16-pair'} tile over K/{g} steps (rows past m repeat the last) */",
             f"static inline __attribute__((always_inline)) void {name}_{mr}x{nr}"
             f"(const {at} *A, long lda, int m, const {wt} *w, int KG, {acc_t} acc[{mr}][{nv}]) {{"]
    for r in range(mr):
        lines.append(f"    const {at} *a{r} = A + (long)MIN({r}, m - 1) * lda;")
    for r in range(mr):
        lines.append("    " + " ".join(f"{acc_t} c{r}_{j} = {zero};" for j in range(nv)))
    lines.append("#pragma GCC unroll 4")
    lines.append(f"    for (int k = 0; k < KG; k++, w += {g * nr}) {{")
    lines.append("        " + " ".join(f"vi b{j} = viload(w + {j * g * vl});" for j in range(nv)))
    for r in range(mr):
        body = " ".join(f"c{r}_{j} = {dot}(c{r}_{j}, x{r}, b{j});" for j in range(nv))
        lines.append(f"        vi x{r} = vibcast4(a{r} + {g} * k); {body}")
    lines.append("    }")
    for r in range(mr):
        lines.append("    " + " ".join(f"acc[{r}][{j}] = c{r}_{j};" for j in range(nv)))
    lines.append("}")
    return "\n".join(lines)


TILE_SOURCES = {
    "f32": tile_source,
    "bf16": lambda mr, nr, vl: tile_source(mr, nr, vl, bf16=True),
    "int8": lambda mr, nr, vl: _pair_tile(mr, nr, vl, True),
    "bf16dot": lambda mr, nr, vl: _pair_tile(mr, nr, vl, False),
}


def gemm_mode(precision: str, target: Target, n: int) -> str:
    """f32 | bf16 (weights only) | bf16dot | int8. Outputs narrower than a vector (the QA head) stay fp32."""
    if precision == "fp32" or n < target.vl:
        return "f32"
    if precision == "bf16":
        return "bf16dot" if target.bf16_dot else "bf16"
    return "int8"


def prefetch_setup(mr: int, panel_bytes: str, indent: int) -> str:
    """Before the panel loop: how many cache lines of the next panel each row tile prefetches."""
    pad = " " * indent
    return (f"{pad}const int tiles = (int)((r1 - r0 + {mr - 1}) / {mr});\n"
            f"{pad}const long pf_lines = ({panel_bytes} + 63) / 64, pf_step = (pf_lines + tiles - 1) / tiles;\n")


def prefetch_next(mr: int, next_panel: str, indent: int) -> str:
    """In the row-tile loop: this tile's slice of the next panel into L2. The weights are read once per
    forward pass, from memory: without it the first tile of every panel waits for them."""
    pad = " " * indent
    return (f"{pad}if (p + 1 < NP) {{\n"
            f"{pad}    const char *nxt = (const char *)({next_panel});\n"
            f"{pad}    const long l0 = (i0 - r0) / {mr} * pf_step;\n"
            f"{pad}    for (long l = l0; l < MIN(l0 + pf_step, pf_lines); l++) __builtin_prefetch(nxt + l * 64, 0, 2);\n"
            f"{pad}}}\n")


def gemm_loop_int8(sch: Schedule, k: int, n: int, pre_code: str = "", expr: str = "x") -> str:
    """int8 GEMM over rows r0..r1: quantize the block's activation rows (per-row scale) into the thread's
    scratch, then s32 tiles; the epilogue removes the +128 offset's column sums and rescales."""
    kp = -(-k // 4) * 4
    return f"""    const int K = {k}, KP = {kp}, N = {n}, NP = (N + {sch.nr - 1}) / {sch.nr};
    float *SA = scratch;
    uint8_t *AQ = (uint8_t *)(scratch + (r1 - r0 + 15) / 16 * 16);
    for (long r = r0; r < r1; r++) SA[r - r0] = quantize_row_u8(A + r * lda, K, AQ + (r - r0) * KP, KP);
{prefetch_setup(sch.mr, f"(long)KP * {sch.nr}", 4)}    for (int p = 0; p < NP; p++)
        for (long i0 = r0; i0 < r1; i0 += {sch.mr}) {{
            const int m = (int)MIN({sch.mr}, r1 - i0);
{prefetch_next(sch.mr, f"P + (long)(p + 1) * KP * {sch.nr}", 12)}            vi acc[{sch.mr}][{sch.nr} / VL];
            tileq_{sch.mr}x{sch.nr}(AQ + (i0 - r0) * KP, KP, m, P + (long)p * KP * {sch.nr}, KP / 4, acc);
#pragma GCC unroll {sch.mr}
            for (int r = 0; r < {sch.mr}; r++) {{
                if (r >= m) break;
                const long row = i0 + r;
                const vf sa = vset1(SA[row - r0]);
{pre_code}
#pragma GCC unroll 8
                for (int j = 0; j < {sch.nr} / VL; j++) {{
                    const int c = p * {sch.nr} + j * VL, n = N - c;
                    if (n <= 0) break;
                    vf x = vmul(vcvt_i32(visub(acc[r][j], viload(CS + c))), vmul(sa, vload(SW + c)));
                    x = {expr};
                    vstore_n(C + row * ldc + c, x, n);
                }}
            }}
        }}
"""


def gemm_loop_bf16dot(sch: Schedule, k: int, n: int, pre_code: str = "", expr: str = "x") -> str:
    """bf16 x bf16 GEMM over rows r0..r1 (vdpbf16ps): the block's activation rows become bf16 in scratch."""
    kp = -(-k // 2) * 2
    return f"""    const int K = {k}, KP = {kp}, N = {n}, NP = (N + {sch.nr - 1}) / {sch.nr};
    uint16_t *AB = (uint16_t *)scratch;
    for (long r = r0; r < r1; r++) convert_row_bf16(A + r * lda, K, AB + (r - r0) * KP, KP);
{prefetch_setup(sch.mr, f"(long)KP * {sch.nr} * 2", 4)}    for (int p = 0; p < NP; p++)
        for (long i0 = r0; i0 < r1; i0 += {sch.mr}) {{
            const int m = (int)MIN({sch.mr}, r1 - i0);
{prefetch_next(sch.mr, f"P + (long)(p + 1) * KP * {sch.nr}", 12)}            vf acc[{sch.mr}][{sch.nr} / VL];
            tilebd_{sch.mr}x{sch.nr}(AB + (i0 - r0) * KP, KP, m, P + (long)p * KP * {sch.nr}, KP / 2, acc);
#pragma GCC unroll {sch.mr}
            for (int r = 0; r < {sch.mr}; r++) {{
                if (r >= m) break;
                const long row = i0 + r;
{pre_code}
#pragma GCC unroll 8
                for (int j = 0; j < {sch.nr} / VL; j++) {{
                    const int c = p * {sch.nr} + j * VL, n = N - c;
                    if (n <= 0) break;
                    vf x = acc[r][j];
                    x = {expr};
                    vstore_n(C + row * ldc + c, x, n);
                }}
            }}
        }}
"""


def gemm_loop(sch: Schedule, k: int, n: int, pre_code: str = "", expr: str = "x", tile_suffix: str = "") -> str:
    """The body of a GEMM over rows r0..r1: C = epilogue(A[rows, K] x P), given A, lda, P, C, ldc in scope."""
    kc = min(k, sch.kc)
    nv_expr = f"{sch.nr} / VL"
    esize = 2 if tile_suffix == "_bf16" else 4
    return f"""    const int K = {k}, N = {n}, NP = (N + {sch.nr - 1}) / {sch.nr};
    float *AP = scratch;  /* the block's A, packed per row tile: [tile][{kc}][{sch.mr}] */
    for (int k0 = 0; k0 < K; k0 += {kc}) {{
        const int kc = MIN({kc}, K - k0), last = k0 + kc == K;
        for (long i0 = r0; i0 < r1; i0 += {sch.mr}) {{
            const int m = (int)MIN({sch.mr}, r1 - i0);
            float *dst = AP + (i0 - r0) / {sch.mr} * {kc * sch.mr}L;
            for (int r = 0; r < {sch.mr}; r++) {{  /* rows past m repeat the last */
                const float *src = A + (i0 + MIN(r, m - 1)) * lda + k0;
                for (int k = 0; k < kc; k++) dst[k * {sch.mr} + r] = src[k];
            }}
        }}
{prefetch_setup(sch.mr, f"(long)kc * {sch.nr} * {esize}", 8)}        for (int p = 0; p < NP; p++)
            for (long i0 = r0; i0 < r1; i0 += {sch.mr}) {{
                const int m = (int)MIN({sch.mr}, r1 - i0);
{prefetch_next(sch.mr, f"P + ((long)(p + 1) * K + k0) * {sch.nr}", 16)}                vf acc[{sch.mr}][{nv_expr}];
                tile_{sch.mr}x{sch.nr}{tile_suffix}(AP + (i0 - r0) / {sch.mr} * {kc * sch.mr}L, P + ((long)p * K + k0) * {sch.nr}, kc, acc);
#pragma GCC unroll {sch.mr}
                for (int r = 0; r < {sch.mr}; r++) {{
                    if (r >= m) break;
                    const long row = i0 + r;
{pre_code}
#pragma GCC unroll 8
                    for (int j = 0; j < {nv_expr}; j++) {{
                        const int c = p * {sch.nr} + j * VL, n = N - c;
                        if (n <= 0) break;
                        vf x = acc[r][j];
                        if (k0 > 0) x = vadd(x, vload_n(C + row * ldc + c, n));
                        if (last) x = {expr};
                        vstore_n(C + row * ldc + c, x, n);
                    }}
                }}
            }}
    }}
"""


class _Format:
    """A weight format's part of a GEMM: its packed weights (C declarations of P and what else the loop
    reads), the loop over rows r0..r1, the per-thread scratch it needs, and a line for the C comment."""
    tile_kind = ""

    def weights(self, gen, w_name: str, w, sch: Schedule) -> str:
        raise NotImplementedError

    def loop(self, sch: Schedule, k: int, n: int, pre_code: str, expr: str) -> str:
        raise NotImplementedError

    def scratch_floats(self, sch: Schedule, k: int, max_seq: int) -> int:
        raise NotImplementedError

    def describe(self, target: Target) -> str:
        raise NotImplementedError


class _F32(_Format):
    tile_kind = "f32"

    def weights(self, gen, w_name, w, sch):
        return f"    const float *P = {gen.addr.weight(w_name, sch.nr)};\n"

    def loop(self, sch, k, n, pre_code, expr):
        return gemm_loop(sch, k, n, pre_code, expr)

    def scratch_floats(self, sch, k, max_seq):
        return packed_a_floats(sch, k, max_seq)

    def describe(self, target):
        return "fp32"


class _Bf16(_F32):
    """As fp32, with the panels in bf16 (half the weight bytes)."""
    tile_kind = "bf16"

    def weights(self, gen, w_name, w, sch):
        return f"    const uint16_t *P = {gen.blob.typed(w_name + f'@b{sch.nr}', to_bf16(pack_panels(w, sch.nr)), 'uint16_t')};\n"

    def loop(self, sch, k, n, pre_code, expr):
        return gemm_loop(sch, k, n, pre_code, expr, "_bf16")

    def describe(self, target):
        return "bf16 weights widened to fp32 in registers, fp32 activations and accumulation"


class _Bf16Dot(_Format):
    tile_kind = "bf16dot"

    def weights(self, gen, w_name, w, sch):
        return f"    const uint16_t *P = {gen.blob.typed(w_name + f'@bp{sch.nr}', pack_bf16_pairs(w, sch.nr), 'uint16_t')};\n"

    def loop(self, sch, k, n, pre_code, expr):
        return gemm_loop_bf16dot(sch, k, n, pre_code, expr)

    def scratch_floats(self, sch, k, max_seq):
        return max_seq * (-(-k // 2)) + 32

    def describe(self, target):
        return "bf16 activations x bf16 weights (vdpbf16ps), fp32 accumulation"


class _Int8(_Format):
    tile_kind = "int8"

    def weights(self, gen, w_name, w, sch):
        panels, colsum, scales = quantize_int8(w, sch.nr, gen.t.int8_wmax, gen.t.int8_act_offset)
        return (f"    const int8_t *P = {gen.blob.typed(w_name + f'@q{sch.nr}', panels, 'int8_t')};\n"
                f"    const int32_t *CS = {gen.blob.typed(w_name + f'@cs{sch.nr}', colsum, 'int32_t')};\n"
                f"    const float *SW = {gen.blob.typed(w_name + f'@sw{sch.nr}', scales, 'float')};\n")

    def loop(self, sch, k, n, pre_code, expr):
        return gemm_loop_int8(sch, k, n, pre_code, expr)

    def scratch_floats(self, sch, k, max_seq):
        return 2 * max_seq + 32 + max_seq * (-(-k // 4))

    def describe(self, target):
        act = (f"u8 = q + {target.int8_act_offset}, minus the column sums" if target.int8_act_offset
               else "s8, no offset")
        return (f"int8: weights per-column symmetric in [-{target.int8_wmax}, {target.int8_wmax}], activations per row "
                f"({act}), int32 accumulation")


GEMM_FORMATS = {"f32": _F32(), "bf16": _Bf16(), "bf16dot": _Bf16Dot(), "int8": _Int8()}


def gemm_schedule(gen, op) -> Schedule:
    """The tuner's schedule for this GEMM, else the target's default (the int8 tile for the dot-product formats)."""
    kk, n = gen.g.consts[op.inputs[1]].shape
    if gemm_mode(gen.precision, gen.t, n) in ("f32", "bf16") or op.output in gen.schedules:
        return gen.schedules.get(op.output) or Schedule(gen.t.gemm_mr, gen.t.gemm_nr)
    return Schedule(*gen.t.int8_tile, kk)


def render_matmul(gen, k, plan) -> tuple[str, tuple[str, int, int], int]:
    """(the kernel's C, the register tile it uses (kind, mr, nr), the per-thread scratch floats it needs)."""
    g, op, addr = gen.g, k.op, gen.addr
    a_name, w_name = op.inputs[:2]
    kk, n = g.consts[w_name].shape
    fmt = GEMM_FORMATS[gemm_mode(gen.precision, gen.t, n)]
    sch = gemm_schedule(gen, op)
    out_shape = g.tensors[op.output].shape
    a_ptr, a_cs = addr.row_access(a_name, out_shape[:-1] + (kk,), "", plan, op.source)
    if a_cs != 1 and kk != 1:
        raise CanaoError(f"codegen: {op.source}: matmul input is not contiguous along K")
    rd = addr.row_dim(g.tensors[a_name].shape, op.source)
    lda = cexpr(gen.views[a_name].strides[rd]) if rd is not None else "0"
    c_view = gen.views[op.output]
    ldc = cexpr(c_view.strides[addr.row_dim(out_shape, op.source)]) if addr.row_dim(out_shape, "") is not None else "0"
    pre: list[str] = []
    leaves = {0: "x"}
    leaves.update(addr.leaf_loads(op, {i + 1: name for i, name in enumerate(op.inputs[2:])}, out_shape, "row", plan, pre))
    expr = addr.vexpr(op.attrs.get("epilogue", ("in", 0)), leaves)
    pre_code = "\n".join(" " * 20 + p for p in pre)
    kc = min(kk, sch.kc)
    weights = fmt.weights(gen, w_name, g.consts[w_name], sch)
    body = fmt.loop(sch, kk, n, pre_code, expr)
    header = f"""/* {op.output}: [{addr.rows_expr(out_shape)} x {kk}] x [{kk} x {n}] (packed {sch.nr}-column panels), epilogue {op.attrs.get('epilogue', 'none')}
 * from {op.source}
 * {fmt.describe(gen.t)}
 * schedule: {sch.mr}x{sch.nr} tiles, K in blocks of {kc}; rows r0..r1 (a row block: its A block stays in L2,
 * a panel's K block in L1 while every tile of the block uses it). */
static void {k.name}({ARGS}) {{
{rows_guard(k, addr.rows_expr(out_shape))}    const long lda = {lda}, ldc = {ldc};
    const float *A = {a_ptr};
{weights}    float *C = {addr.ptr(c_view, plan)};
    (void)S; (void)scratch;
"""
    return header + body + "}", (fmt.tile_kind, sch.mr, sch.nr), fmt.scratch_floats(sch, kk, gen.max_seq)


def matmul_label(gen, kn) -> str:
    """What CANAO_PROFILE prints for a GEMM: its name, shape, tile and epilogue."""
    kk, n = gen.g.consts[kn.op.inputs[1]].shape
    sch = gemm_schedule(gen, kn.op)
    epi = " " + kn.op.attrs["epilogue"][0] if kn.op.attrs.get("epilogue") else ""
    return f"{kn.name} K{kk} N{n} {sch.mr}x{sch.nr}/{min(kk, sch.kc)}{epi}"
