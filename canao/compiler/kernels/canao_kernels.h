/* canao's hand-written kernels, on top of the vector layer (vec_*.h, included first).
 * Each has a plain definition in canao/compiler/reference.py that the tests compare with. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* Added to each quantized activation: 128 (u8) where the dot product takes unsigned activations
 * (x86 vpmaddubsw/vpdpbusd); a vector layer with a signed dot product defines 0 (vec_neon.h). */
#ifndef CANAO_ACT_OFFSET
#define CANAO_ACT_OFFSET 128
#endif

/* exp(x - m) for the softmax, given nm = -m*log2(e) (x <= m): 2^y, y = x*log2(e) - m*log2(e) split
 * into n + f (|f| <= 1/2), 2^f by a degree-5 fit (relative error 2.2e-7), 2^n into the exponent.
 * Differences below -87.3 give exactly 0, so masked attention scores vanish as in PyTorch. */
static inline vf vexp_shifted(vf x, vf nm) {
    const vf y = vfma(x, vset1(1.44269504088896341f), nm);
    const vf n = vround(vmax(y, vset1(-126.0f)));
    const vf f = vsub(vmax(y, vset1(-126.0f)), n);
    vf p = vset1(0.0013266970636323094f);
    p = vfma(p, f, vset1(0.009675459936261177f));
    p = vfma(p, f, vset1(0.05550742521882057f));
    p = vfma(p, f, vset1(0.24022121727466583f));
    p = vfma(p, f, vset1(0.6931469440460205f));
    p = vfma(p, f, vset1(1.0000001192092896f));
    return vkeep_gt(vmul(p, vpow2i(n)), y, vset1(-87.3f * 1.44269504088896341f));
}

/* erf(z) = z P(z^2) / Q(z^2) on [-4, 4], +-1 beyond (where float erf rounds to +-1): Eigen's float
 * rational approximation, no exp; GELU's absolute error stays below 1.1e-6 on [-10, 10], half the
 * cost of the erf = 1 - t P(t) exp(-z^2) form (A&S 7.1.26) this replaced */
static inline vf verf(vf x) {
    const vf z = vmax(vmin(x, vset1(4.0f)), vset1(-4.0f)), z2 = vmul(z, z);
    vf p = vset1(-2.72614225801306e-10f);
    p = vfma(p, z2, vset1(2.77068142495902e-08f));
    p = vfma(p, z2, vset1(-2.10102402082508e-06f));
    p = vfma(p, z2, vset1(-5.69250639462346e-05f));
    p = vfma(p, z2, vset1(-7.34990630326855e-04f));
    p = vfma(p, z2, vset1(-2.95459980854025e-03f));
    p = vfma(p, z2, vset1(-1.60960333262415e-02f));
    vf q = vset1(-1.45660718464996e-05f);
    q = vfma(q, z2, vset1(-2.13374055278905e-04f));
    q = vfma(q, z2, vset1(-1.68282697438203e-03f));
    q = vfma(q, z2, vset1(-7.37332916720468e-03f));
    q = vfma(q, z2, vset1(-1.42647390514189e-02f));
    return vdiv(vmul(z, p), q);
}

/* exact (erf) GELU, as torch.nn.functional.gelu */
static inline vf vgelu(vf x) {
    const vf hx = vmul(x, vset1(0.5f));
    return vfma(hx, verf(vmul(x, vset1(0.70710678118654752f))), hx);
}

static inline float sgelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

/* LayerNorm of one row already written to y (n floats), in place; gamma = beta = NULL: no affine
 * (folded into the next linear). */
static inline void layernorm_row(float *y, int n, const float *gamma, const float *beta, float eps) {
    vf s = vzero();
    for (int c = 0; c < n; c += VL) s = vadd(s, vload_n(y + c, n - c));
    vf mean = vset1(vhsum(s) / n);
    vf q = vzero();
    for (int c = 0; c < n; c += VL) {
        vf d = vfirst_n(vsub(vload_n(y + c, n - c), mean), n - c);
        q = vfma(d, d, q);
    }
    vf rstd = vset1(1.0f / sqrtf(vhsum(q) / n + eps));
    for (int c = 0; c < n; c += VL) {
        vf d = vmul(vsub(vload_n(y + c, n - c), mean), rstd);
        vstore_n(y + c, gamma ? vfma(d, vload_n(gamma + c, n - c), vload_n(beta + c, n - c)) : d, n - c);
    }
}

/* The attention's K and V, packed once per layer by the row blocks that produce them (so no
 * thread waits for it), in the layouts its two products stream:
 *  - K^T in panels of ATT_KP keys: kt[((h*np + p)*D + d)*ATT_KP + l] = k[h*kh + (p*ATT_KP + l)*ks + d],
 *    np = ceil(S / ATT_KP): the score tile reads one contiguous panel per ATT_KP keys. Lanes past S
 *    in the last panel are never written; their scores are set to -inf before the softmax.
 *  - V^T, one row per head column: vt[(h*D + d)*sv + j] = v[h*vh + j*vs + d], sv = S rounded up to
 *    whole vectors, lanes past S zero (the P.V dot products run over whole vectors). */
#define ATT_KP (2 * VL)
static inline long att_panels(long S) { return (S + ATT_KP - 1) / ATT_KP; }

static void attention_pack_kv(long S, int H, int D, const float *k, long kh, long ks, float *kt,
                              const float *v, long vh, long vs, float *vt, long r0, long r1) {
    const long np = att_panels(S), sv = (S + VL - 1) / VL * VL;
    for (int h = 0; h < H; h++) {
        const float *kh_ = k + h * kh, *vh_ = v + h * vh;
        float *vth = vt + (long)h * D * sv;
        for (long j = r0; j < r1;) {
            const long l0 = j % ATT_KP;
            float *panel = kt + ((long)h * np + j / ATT_KP) * D * ATT_KP;
            if (l0 % VL == 0 && j + VL <= r1) {  /* VL keys at once: whole vector stores */
                for (int d = 0; d < D; d++) {
                    float *kd = panel + (long)d * ATT_KP + l0, *vd = vth + (long)d * sv + j;
#pragma GCC unroll 16
                    for (int l = 0; l < VL; l++) kd[l] = kh_[(j + l) * ks + d];
#pragma GCC unroll 16
                    for (int l = 0; l < VL; l++) vd[l] = vh_[(j + l) * vs + d];
                }
                j += VL;
            } else {
                for (int d = 0; d < D; d++) {
                    panel[(long)d * ATT_KP + l0] = kh_[j * ks + d];
                    vth[(long)d * sv + j] = vh_[j * vs + d];
                }
                j++;
            }
        }
        if (r1 == S)
            for (int d = 0; d < D; d++)
                for (long j = S; j < sv; j++) vth[(long)d * sv + j] = 0.0f;
    }
}

/* Fused attention of query rows [r0, r1), all heads: out = softmax(q k^T + key_bias) v.
 * Element (h, s, d) of q lives at q[h*qh + s*qs + d]; likewise out; kt and vt are
 * attention_pack_kv's layouts; key_bias may be NULL. ATT_QG groups of ATT_QB query rows share
 * each sweep over the keys. The scores (ATT_QG*ATT_QB rows x np*ATT_KP) and the packed query rows
 * live in the thread's scratch (in L1), never in the arena: the score matrix is never stored.
 *  - scores: a register tile of ATT_QB rows x ATT_KP keys, the query rows packed [D][ATT_QB] so
 *    one pointer feeds the broadcasts (as the GEMMs' packed A);
 *  - softmax per row, unnormalised, keys past S weighted 0;
 *  - P.V as dot products over the keys of ATT_PR score rows x 4 rows of V^T, reduced 4 at a time. */
#define ATT_QB 6
#define ATT_QG 3
#define ATT_ROWS (ATT_QB * ATT_QG)
#define ATT_PR 2

static inline __attribute__((always_inline)) void att_score_tile(const float *qp, const float *panel, int D,
                                                                 const float *key_bias, long S, long j,
                                                                 float *sc, long sp, vf *rmax) {
    vf c00 = vzero(), c01 = vzero(), c10 = vzero(), c11 = vzero(), c20 = vzero(), c21 = vzero();
    vf c30 = vzero(), c31 = vzero(), c40 = vzero(), c41 = vzero(), c50 = vzero(), c51 = vzero();
#pragma GCC unroll 4
    for (int d = 0; d < D; d++, qp += ATT_QB, panel += ATT_KP) {
        const vf k0 = vload(panel), k1 = vload(panel + VL);
        vf x = vset1(qp[0]); c00 = vfma(x, k0, c00); c01 = vfma(x, k1, c01);
        x = vset1(qp[1]); c10 = vfma(x, k0, c10); c11 = vfma(x, k1, c11);
        x = vset1(qp[2]); c20 = vfma(x, k0, c20); c21 = vfma(x, k1, c21);
        x = vset1(qp[3]); c30 = vfma(x, k0, c30); c31 = vfma(x, k1, c31);
        x = vset1(qp[4]); c40 = vfma(x, k0, c40); c41 = vfma(x, k1, c41);
        x = vset1(qp[5]); c50 = vfma(x, k0, c50); c51 = vfma(x, k1, c51);
    }
    const vf cs[ATT_QB][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    const vf b0 = key_bias ? vload_n(key_bias + j, (int)(S - j)) : vzero();
    const vf b1 = key_bias ? vload_n(key_bias + j + VL, (int)(S - j - VL)) : vzero();
    const int full0 = j + VL <= S, full1 = j + 2 * VL <= S;
#pragma GCC unroll 8
    for (int r = 0; r < ATT_QB; r++) {
        const vf s0 = vadd(cs[r][0], b0), s1 = vadd(cs[r][1], b1);
        vstore(sc + r * sp + j, s0);
        vstore(sc + r * sp + j + VL, s1);
        if (full0) rmax[r] = vmax(rmax[r], s0);
        if (full1) rmax[r] = vmax(rmax[r], s1);
    }
}

/* out[r][c] = p_r . vt_c over n floats (whole vectors), for ATT_PR score rows and 4 rows of V^T */
static inline __attribute__((always_inline)) void att_pv_tile(const float *p0, const float *p1, const float *v0,
                                                              const float *v1, const float *v2, const float *v3,
                                                              long n, float out[ATT_PR][4]) {
    vf a00 = vzero(), a01 = vzero(), a02 = vzero(), a03 = vzero();
    vf a10 = vzero(), a11 = vzero(), a12 = vzero(), a13 = vzero();
#pragma GCC unroll 2
    for (long j = 0; j < n; j += VL) {
        const vf x0 = vload(p0 + j), x1 = vload(p1 + j);
        vf w = vload(v0 + j); a00 = vfma(x0, w, a00); a10 = vfma(x1, w, a10);
        w = vload(v1 + j); a01 = vfma(x0, w, a01); a11 = vfma(x1, w, a11);
        w = vload(v2 + j); a02 = vfma(x0, w, a02); a12 = vfma(x1, w, a12);
        w = vload(v3 + j); a03 = vfma(x0, w, a03); a13 = vfma(x1, w, a13);
    }
    vhsum4(a00, a01, a02, a03, out[0]);
    vhsum4(a10, a11, a12, a13, out[1]);
}

/* A row of scores before its softmax: keys S..sv set to -inf, and vexp_shifted's shift (-max*log2(e))
 * from the row's running max over whole vectors (rmax) and its partial last vector. */
static inline vf att_row_shift(float *row, long S, long sv, vf rmax) {
    for (long jj = S; jj < sv; jj++) row[jj] = -INFINITY;
    if (S % VL) rmax = vmax(rmax, vload(row + S / VL * VL));  /* the partial vector, its tail now -inf */
    return vset1(-vhmax(rmax) * 1.44269504088896341f);
}

static void attention_rows(long S, int H, int D, const float *q, long qh, long qs, const float *kt,
                           const float *vt, float *out, long oh, long os, const float *key_bias, float *scratch,
                           long r0, long r1) {
    const long np = att_panels(S), sp = np * ATT_KP, sv = (S + VL - 1) / VL * VL;
    float *sc = scratch, *qp = scratch + (long)ATT_ROWS * sp;
    for (int h = 0; h < H; h++) {
        const float *kth = kt + (long)h * np * D * ATT_KP, *vth = vt + (long)h * D * sv;
        for (long i0 = r0; i0 < r1; i0 += ATT_ROWS) {
            const int m = (int)MIN(ATT_ROWS, r1 - i0), groups = (m + ATT_QB - 1) / ATT_QB;
            /* query rows packed [group][D][ATT_QB]; rows past m repeat the last */
            for (int r = 0; r < groups * ATT_QB; r++) {
                const float *qr = q + h * qh + (i0 + MIN(r, m - 1)) * qs;
                float *dst = qp + (long)(r / ATT_QB) * D * ATT_QB + r % ATT_QB;
                for (int d = 0; d < D; d++) dst[d * ATT_QB] = qr[d];
            }
            vf rmax[ATT_ROWS];
            for (int r = 0; r < ATT_ROWS; r++) rmax[r] = vset1(-INFINITY);
            for (long p = 0; p < np; p++)
                for (int g = 0; g < groups; g++)
                    att_score_tile(qp + (long)g * D * ATT_QB, kth + p * D * ATT_KP, D, key_bias, S, p * ATT_KP,
                                   sc + (long)g * ATT_QB * sp, sp, rmax + g * ATT_QB);
            float inv[ATT_ROWS];
            for (int r = 0; r < m; r++) {
                float *row = sc + r * sp;
                const vf nm = att_row_shift(row, S, sv, rmax[r]);
                vf sum = vzero();
                for (long jj = 0; jj < sv; jj += VL) {
                    const vf e = vexp_shifted(vload(row + jj), nm);
                    vstore(row + jj, e);
                    sum = vadd(sum, e);
                }
                inv[r] = 1.0f / vhsum(sum);
            }
            for (int c0 = 0; c0 < D; c0 += 4) {
                const float *vc[4];
                for (int c = 0; c < 4; c++) vc[c] = vth + (long)MIN(c0 + c, D - 1) * sv;
                for (int r = 0; r < m; r += ATT_PR) {
                    float o[ATT_PR][4];  /* a last odd row pairs with itself */
                    att_pv_tile(sc + r * sp, sc + MIN(r + 1, m - 1) * sp, vc[0], vc[1], vc[2], vc[3], sv, o);
                    for (int i = 0; i < ATT_PR && r + i < m; i++) {
                        float *dst = out + h * oh + (i0 + r + i) * os + c0;
                        for (int c = 0; c < 4 && c0 + c < D; c++) dst[c] = o[i][c] * inv[r + i];
                    }
                }
            }
        }
    }
}

/* Quantize one activation row for the int8 GEMMs: q[k] = round(x[k] / scale) + CANAO_ACT_OFFSET,
 * scale = max|x| / 127, K rounded up to kp (a multiple of 4) with q = CANAO_ACT_OFFSET (zero). Returns scale. */
static inline float quantize_row_u8(const float *x, int K, uint8_t *q, int kp) {
    vf mx = vzero();
    for (int c = 0; c < K; c += VL) mx = vmax(mx, vabs(vload_n(x + c, K - c)));
    const float amax = vhmax(mx);
    const float scale = amax > 0 ? amax / 127.0f : 1.0f;
    const vf inv = vset1(1.0f / scale);
    int c = 0;
    for (; c + VL <= K; c += VL) vstore_u8(q + c, vmul(vload(x + c), inv));
    for (; c < K; c++) q[c] = (uint8_t)(lrintf(x[c] * (1.0f / scale)) + CANAO_ACT_OFFSET);
    for (; c < kp; c++) q[c] = CANAO_ACT_OFFSET;
    return scale;
}

/* One activation row as bf16 (round to nearest even), K padded to kp with zeros, for vdpbf16ps. */
static inline void convert_row_bf16(const float *x, int K, uint16_t *q, int kp) {
    int c = 0;
    for (; c < K; c++) {
        uint32_t u;
        memcpy(&u, x + c, 4);
        q[c] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    for (; c < kp; c++) q[c] = 0;
}


/* ---- int8 attention (int8 models): Q.K^T and P.V as u8 x s8 dot products (vpdpbusd on VNNI,
 * vpmaddubsw + vpmaddwd on AVX2/AVX-512, sdot on NEON), the softmax in fp32. The products are 2
 * of every 3 attention FLOPs... and, at 384 tokens, a third of a small int8 student's time in fp32.
 * Layouts per head, derived from S (the buffers are sized for the maximum length):
 *  - K: int8 panels of ATT_KP keys with 4 head columns per 32-bit lane,
 *    k8[((h*np + p)*D4 + g)*ATT_KP*4 + l*4 + c] = round(k[p*ATT_KP + l][4g + c] / ksc[key]),
 *    one scale per key (ksc[h*sp + key]) and its quantized sum times the queries' offset
 *    (ksum[h*sp + key], taken off after the dot product, as the GEMMs' column sums);
 *  - V^T: int8 rows per head column over the keys, v8[(h*D + d)*sv4 + j], one scale per key
 *    (vsc[h*sv4 + j]), folded into the probabilities before they are quantized (per row), so
 *    each key keeps its own range although the keys are packed by different row blocks;
 *    sv4 = S rounded up to whole integer vectors (ATT_KB keys), lanes past S zero.
 * Queries are quantized per row and head (u8, quantize_row_u8); probabilities to [0, ATT_PMAX]
 * with no offset (they are never negative). */
#define ATT_KB (4 * VL)
#define ATT_PMAX (CANAO_ACT_OFFSET ? 255.0f : 127.0f) /* u8 where the dot product is u8 x s8, else s8 */
static inline long att_sv4(long S) { return (S + ATT_KB - 1) / ATT_KB * ATT_KB; }
static inline int att_d4(int D) { return (D + 3) / 4; }
static inline long att_round64(long n) { return (n + 63) / 64 * 64; }

typedef struct { int8_t *k8; float *ksc; int32_t *ksum; } att_keys_i8;
typedef struct { int8_t *v8; float *vsc; } att_values_i8;
static inline att_keys_i8 att_keys_layout(char *base, long S, int H, int D) {
    const long sp = att_panels(S) * ATT_KP;
    att_keys_i8 r;
    r.k8 = (int8_t *)base;
    r.ksc = (float *)(base + att_round64((long)H * sp * att_d4(D) * 4));
    r.ksum = (int32_t *)(r.ksc + (long)H * sp);
    return r;
}
static inline att_values_i8 att_values_layout(char *base, long S, int H, int D) {
    att_values_i8 r;
    r.v8 = (int8_t *)base;
    r.vsc = (float *)(base + att_round64((long)H * D * att_sv4(S)));
    return r;
}
#define ATT_MAX_D 256 /* head size limit of the int8 attention (codegen falls back to fp32 above it) */

/* q[0..n) = round(x[c] * inv) as s8 (0 past D); returns their sum. n: D rounded up to whole vectors. */
static inline int32_t att_quantize_s8(const float *x, int D, int n, float inv, int8_t *q) {
    const vf s = vset1(inv);
    for (int c = 0; c < n; c += VL) vstore_u8((uint8_t *)q + c, vmul(vload_n(x + c, D - c), s));
    int32_t sum = 0;
    for (int c = 0; c < n; c++) {  /* vstore_u8 added CANAO_ACT_OFFSET: flipping the top bit takes 128 off */
        q[c] = (int8_t)((uint8_t)q[c] ^ (uint8_t)CANAO_ACT_OFFSET);
        sum += q[c];
    }
    return sum;
}

/* Keys and values of rows [r0, r1) into the int8 layouts above; wmax: the target's int8 range.
 * VL keys at a time, so V^T is written VL contiguous bytes per head column. */
static void attention_pack_kv_i8(long S, int H, int D, const float *k, long kh, long ks, const float *v, long vh,
                                 long vs, char *kbuf, char *vbuf, float wmax, long r0, long r1) {
    const long np = att_panels(S), sp = np * ATT_KP, sv4 = att_sv4(S);
    const int D4 = att_d4(D), n = (D + VL - 1) / VL * VL;
    const att_keys_i8 K = att_keys_layout(kbuf, S, H, D);
    const att_values_i8 V = att_values_layout(vbuf, S, H, D);
    int8_t kq[ATT_MAX_D], vq[VL][ATT_MAX_D];
    for (int h = 0; h < H; h++) {
        int8_t *vth = V.v8 + (long)h * D * sv4;
        for (long j0 = r0; j0 < r1; j0 += VL) {
            const int nk = (int)MIN(VL, r1 - j0);
            for (int l = 0; l < nk; l++) {
                const long j = j0 + l;
                const float *kr = k + h * kh + j * ks, *vr = v + h * vh + j * vs;
                vf km = vzero(), vm = vzero();
                for (int c = 0; c < D; c += VL) {
                    km = vmax(km, vabs(vload_n(kr + c, D - c)));
                    vm = vmax(vm, vabs(vload_n(vr + c, D - c)));
                }
                const float ka = vhmax(km), va = vhmax(vm);
                const int32_t sum = att_quantize_s8(kr, D, n, ka > 0 ? wmax / ka : 0.0f, kq);
                int8_t *panel = K.k8 + ((long)h * np + j / ATT_KP) * D4 * ATT_KP * 4 + (j % ATT_KP) * 4;
                for (int g = 0; g < D4; g++) memcpy(panel + (long)g * ATT_KP * 4, kq + 4 * g, 4);
                K.ksc[h * sp + j] = ka / wmax;
                K.ksum[h * sp + j] = CANAO_ACT_OFFSET * sum;
                att_quantize_s8(vr, D, n, va > 0 ? wmax / va : 0.0f, vq[l]);
                V.vsc[h * sv4 + j] = va / wmax;
            }
            for (int d = 0; d < D; d++) {
                int8_t *dst = vth + (long)d * sv4 + j0;
                for (int l = 0; l < nk; l++) dst[l] = vq[l][d];
            }
        }
        if (r1 == S) {  /* keys past S: zero weight (their scores are set to -inf, their values to 0) */
            for (long j = S; j < sp; j++) K.ksc[h * sp + j] = 0.0f, K.ksum[h * sp + j] = 0;
            for (long j = S; j < sv4; j++) {
                V.vsc[h * sv4 + j] = 0.0f;
                for (int d = 0; d < D; d++) vth[(long)d * sv4 + j] = 0;
            }
        }
    }
}

static inline __attribute__((always_inline)) void att_score_tile_i8(const uint8_t *qp, const int8_t *panel, int D4,
                                                                    const float *qsc, const float *ksc,
                                                                    const int32_t *ksum, const float *key_bias,
                                                                    long S, long j, float *sc, long sp, vf *rmax) {
    vi c00 = vizero(), c01 = vizero(), c10 = vizero(), c11 = vizero(), c20 = vizero(), c21 = vizero();
    vi c30 = vizero(), c31 = vizero(), c40 = vizero(), c41 = vizero(), c50 = vizero(), c51 = vizero();
#pragma GCC unroll 4
    for (int g = 0; g < D4; g++, qp += ATT_QB * 4, panel += ATT_KP * 4) {
        const vi k0 = viload(panel), k1 = viload(panel + 4 * VL);
        vi x = vibcast4(qp); c00 = vdot_u8s8(c00, x, k0); c01 = vdot_u8s8(c01, x, k1);
        x = vibcast4(qp + 4); c10 = vdot_u8s8(c10, x, k0); c11 = vdot_u8s8(c11, x, k1);
        x = vibcast4(qp + 8); c20 = vdot_u8s8(c20, x, k0); c21 = vdot_u8s8(c21, x, k1);
        x = vibcast4(qp + 12); c30 = vdot_u8s8(c30, x, k0); c31 = vdot_u8s8(c31, x, k1);
        x = vibcast4(qp + 16); c40 = vdot_u8s8(c40, x, k0); c41 = vdot_u8s8(c41, x, k1);
        x = vibcast4(qp + 20); c50 = vdot_u8s8(c50, x, k0); c51 = vdot_u8s8(c51, x, k1);
    }
    const vi cs[ATT_QB][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    const vf s0 = vload(ksc + j), s1 = vload(ksc + j + VL);
    const vi z0 = viload(ksum + j), z1 = viload(ksum + j + VL);
    const vf b0 = key_bias ? vload_n(key_bias + j, (int)(S - j)) : vzero();
    const vf b1 = key_bias ? vload_n(key_bias + j + VL, (int)(S - j - VL)) : vzero();
    const int full0 = j + VL <= S, full1 = j + 2 * VL <= S;
#pragma GCC unroll 8
    for (int r = 0; r < ATT_QB; r++) {
        const vf qs = vset1(qsc[r]);
        const vf t0 = vfma(vcvt_i32(visub(cs[r][0], z0)), vmul(s0, qs), b0);
        const vf t1 = vfma(vcvt_i32(visub(cs[r][1], z1)), vmul(s1, qs), b1);
        vstore(sc + r * sp + j, t0);
        vstore(sc + r * sp + j + VL, t1);
        if (full0) rmax[r] = vmax(rmax[r], t0);
        if (full1) rmax[r] = vmax(rmax[r], t1);
    }
}

/* out[r][c] = p_r . v_c over n keys (whole integer vectors), ATT_PR probability rows x 4 rows of V^T */
static inline __attribute__((always_inline)) void att_pv_tile_i8(const uint8_t *p0, const uint8_t *p1,
                                                                 const int8_t *v0, const int8_t *v1,
                                                                 const int8_t *v2, const int8_t *v3, long n,
                                                                 float out[ATT_PR][4]) {
    vi a00 = vizero(), a01 = vizero(), a02 = vizero(), a03 = vizero();
    vi a10 = vizero(), a11 = vizero(), a12 = vizero(), a13 = vizero();
#pragma GCC unroll 2
    for (long j = 0; j < n; j += ATT_KB) {
        const vi x0 = viload(p0 + j), x1 = viload(p1 + j);
        vi w = viload(v0 + j); a00 = vdot_u8s8(a00, x0, w); a10 = vdot_u8s8(a10, x1, w);
        w = viload(v1 + j); a01 = vdot_u8s8(a01, x0, w); a11 = vdot_u8s8(a11, x1, w);
        w = viload(v2 + j); a02 = vdot_u8s8(a02, x0, w); a12 = vdot_u8s8(a12, x1, w);
        w = viload(v3 + j); a03 = vdot_u8s8(a03, x0, w); a13 = vdot_u8s8(a13, x1, w);
    }
    vhsum4(vcvt_i32(a00), vcvt_i32(a01), vcvt_i32(a02), vcvt_i32(a03), out[0]);
    vhsum4(vcvt_i32(a10), vcvt_i32(a11), vcvt_i32(a12), vcvt_i32(a13), out[1]);
}

/* attention_rows with int8 products; kbuf / vbuf: attention_pack_kv_i8's buffers. Scratch: the
 * fp32 scores (ATT_ROWS x sp), then ATT_ROWS rows of quantized probabilities (sv4 bytes each),
 * the packed quantized queries ([group][D4][ATT_QB][4] bytes) and one row of them unpacked. */
static void attention_rows_i8(long S, int H, int D, const float *q, long qh, long qs, const char *kbuf,
                              const char *vbuf, float *out, long oh, long os, const float *key_bias,
                              float *scratch, long r0, long r1) {
    const long np = att_panels(S), sp = np * ATT_KP, sv = (S + VL - 1) / VL * VL, sv4 = att_sv4(S);
    const int D4 = att_d4(D);
    const att_keys_i8 K = att_keys_layout((char *)kbuf, S, H, D);
    const att_values_i8 V = att_values_layout((char *)vbuf, S, H, D);
    float *sc = scratch;
    uint8_t *pr = (uint8_t *)(sc + (long)ATT_ROWS * sp);
    uint8_t *qp = pr + (long)ATT_ROWS * sv4, *qrow = qp + (long)ATT_ROWS * D4 * 4;
    const vf offset = vset1((float)CANAO_ACT_OFFSET);
    for (int h = 0; h < H; h++) {
        const int8_t *kth = K.k8 + (long)h * np * D4 * ATT_KP * 4, *vth = V.v8 + (long)h * D * sv4;
        const float *ksc = K.ksc + (long)h * sp, *vsc = V.vsc + (long)h * sv4;
        const int32_t *ksum = K.ksum + (long)h * sp;
        for (long i0 = r0; i0 < r1; i0 += ATT_ROWS) {
            const int m = (int)MIN(ATT_ROWS, r1 - i0), groups = (m + ATT_QB - 1) / ATT_QB;
            float qsc[ATT_ROWS];
            /* query rows quantized and packed [group][D4][ATT_QB][4]; rows past m repeat the last */
            for (int r = 0; r < groups * ATT_QB; r++) {
                qsc[r] = quantize_row_u8(q + h * qh + (i0 + MIN(r, m - 1)) * qs, D, qrow, D4 * 4);
                uint8_t *dst = qp + (long)(r / ATT_QB) * D4 * ATT_QB * 4 + (r % ATT_QB) * 4;
                for (int g = 0; g < D4; g++) memcpy(dst + (long)g * ATT_QB * 4, qrow + 4 * g, 4);
            }
            vf rmax[ATT_ROWS];
            for (int r = 0; r < ATT_ROWS; r++) rmax[r] = vset1(-INFINITY);
            for (long p = 0; p < np; p++)
                for (int g = 0; g < groups; g++)
                    att_score_tile_i8(qp + (long)g * D4 * ATT_QB * 4, kth + p * D4 * ATT_KP * 4, D4,
                                      qsc + g * ATT_QB, ksc, ksum, key_bias, S, p * ATT_KP,
                                      sc + (long)g * ATT_QB * sp, sp, rmax + g * ATT_QB);
            float scale[ATT_ROWS];
            for (int r = 0; r < m; r++) {
                float *row = sc + r * sp;
                const vf nm = att_row_shift(row, S, sv, rmax[r]);
                vf sum = vzero(), pm = vzero();
                for (long jj = 0; jj < sv; jj += VL) {  /* exp, and the probability times its value scale */
                    const vf e = vexp_shifted(vload(row + jj), nm);
                    sum = vadd(sum, e);
                    const vf t = vmul(e, vload(vsc + jj));
                    vstore(row + jj, t);
                    pm = vmax(pm, t);
                }
                const float top = vhmax(pm), ps = top > 0 ? top / ATT_PMAX : 1.0f;
                const vf inv = vset1(1.0f / ps);
                uint8_t *pq = pr + r * sv4;
                for (long jj = 0; jj < sv; jj += VL) vstore_u8(pq + jj, vsub(vmul(vload(row + jj), inv), offset));
                memset(pq + sv, 0, (size_t)(sv4 - sv));
                scale[r] = ps / vhsum(sum);
            }
            for (int c0 = 0; c0 < D; c0 += 4) {
                const int8_t *vc[4];
                for (int c = 0; c < 4; c++) vc[c] = vth + (long)MIN(c0 + c, D - 1) * sv4;
                for (int r = 0; r < m; r += ATT_PR) {
                    float o[ATT_PR][4];
                    att_pv_tile_i8(pr + r * sv4, pr + MIN(r + 1, m - 1) * sv4, vc[0], vc[1], vc[2], vc[3], sv4, o);
                    for (int i = 0; i < ATT_PR && r + i < m; i++) {
                        float *dst = out + h * oh + (i0 + r + i) * os + c0;
                        for (int c = 0; c < 4 && c0 + c < D; c++) dst[c] = o[i][c] * scale[r + i];
                    }
                }
            }
        }
    }
}
