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

/* exp(x): Cephes-style range reduction + degree-6 polynomial, ~1 ulp on [-87, 88];
 * lanes below -87.3 give exactly 0 (so masked attention scores vanish as in PyTorch). */
static inline vf vexp(vf x) {
    vf xc = vmax(x, vset1(-87.3f));
    vf n = vround(vmul(xc, vset1(1.44269504088896341f)));
    vf r = vfma(n, vset1(-0.693359375f), xc);
    r = vfma(n, vset1(2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vkeep_gt(vmul(p, vpow2i(n)), x, vset1(-87.3f));
}

/* exp(x - m) for the softmax, given nm = -m*log2(e) (x <= m): 2^y, y = x*log2(e) - m*log2(e) split
 * into n + f (|f| <= 1/2), 2^f by a degree-5 fit (relative error 2.2e-7), 2^n into the exponent.
 * A quarter fewer operations than vexp(x - m); differences below -87.3 give exactly 0 as there. */
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

/* erf(x), Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7) */
static inline vf verf(vf x) {
    vf ax = vabs(x);
    vf t = vdiv(vset1(1.0f), vfma(vset1(0.3275911f), ax, vset1(1.0f)));
    vf p = vset1(1.061405429f);
    p = vfma(p, t, vset1(-1.453152027f));
    p = vfma(p, t, vset1(1.421413741f));
    p = vfma(p, t, vset1(-0.284496736f));
    p = vfma(p, t, vset1(0.254829592f));
    vf y = vsub(vset1(1.0f), vmul(vmul(p, t), vexp(vsub(vzero(), vmul(ax, ax)))));
    return vcopysign(y, x);
}

/* exact (erf) GELU, as torch.nn.functional.gelu */
static inline vf vgelu(vf x) {
    return vmul(vmul(vset1(0.5f), x), vadd(vset1(1.0f), verf(vmul(x, vset1(0.70710678118654752f)))));
}

static inline float sgelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

/* LayerNorm of one row already written to y (n floats), in place. */
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
        vstore_n(y + c, vfma(d, vload_n(gamma + c, n - c), vload_n(beta + c, n - c)), n - c);
    }
}

/* K^T and V of key rows [r0, r1), for the fused attention of the next phase:
 * kt[(h*D + d)*sp + j] = k[h*kh + j*ks + d] and vp[(h*sp + j)*D + d] = v[h*vh + j*vs + d],
 * sp = S rounded up to whole vectors. V is copied so that the P.V loop streams one head's
 * values contiguously (in the QKV buffer its rows lie a row stride apart: they alias the
 * same few L1 sets and defeat the prefetcher). Run by the row block that produced K and V,
 * so no thread waits for it. K^T is written VL keys at a time: whole lines, not scattered floats. */
static void attention_pack_kv(long S, int H, int D, const float *k, long kh, long ks, float *kt,
                              const float *v, long vh, long vs, float *vp, long r0, long r1) {
    const long sp = (S + VL - 1) / VL * VL;
    for (int h = 0; h < H; h++) {
        const float *kh_ = k + h * kh;
        float *kth = kt + (long)h * D * sp;
        long j = r0;
        for (; j + VL <= r1; j += VL)
            for (int d = 0; d < D; d++) {
                float *dst = kth + (long)d * sp + j;
#pragma GCC unroll 16
                for (int l = 0; l < VL; l++) dst[l] = kh_[(j + l) * ks + d];
            }
        for (; j < r1; j++)
            for (int d = 0; d < D; d++) kth[(long)d * sp + j] = kh_[j * ks + d];
        for (j = r0; j < r1; j++) memcpy(vp + ((long)h * sp + j) * D, v + h * vh + j * vs, (size_t)D * sizeof(float));
    }
}

/* Fused attention of query rows [r0, r1), all heads: out = softmax(q k^T + key_bias) v.
 * Element (h, s, d) of q lives at q[h*qh + s*qs + d]; likewise v and out; kt is
 * attention_pack_kv's layout; v is its packed copy (vh = sp*D, vs = D). A block of ATT_QB rows' scores lives in the thread's
 * scratch (L1), never in the arena. key_bias may be NULL. Padded keys (S..sp) hold
 * whatever the arena held: their scores are overwritten with -inf before the max. */
#ifndef ATT_QB
#define ATT_QB 6
#endif
static void attention_rows(long S, int H, int D, const float *q, long qh, long qs, const float *kt,
                           const float *v, long vh, long vs, float *out, long oh, long os,
                           const float *key_bias, float *sc, long r0, long r1) {
    const long sp = (S + VL - 1) / VL * VL;
    for (int h = 0; h < H; h++) {
        const float *kth = kt + (long)h * D * sp, *vh_ = v + h * vh;
        for (long i0 = r0; i0 < r1; i0 += ATT_QB) {
            const int m = (int)MIN(ATT_QB, r1 - i0);
            const float *qr[ATT_QB];
            for (int r = 0; r < ATT_QB; r++) qr[r] = q + h * qh + MIN(i0 + r, r1 - 1) * qs;
            /* scores = q k^T + bias, ATT_QB rows x sp keys, two key vectors at a time; each row's
             * running max over the vectors wholly below S (the padded keys' lanes hold garbage) */
            vf rmax[ATT_QB];
            for (int r = 0; r < ATT_QB; r++) rmax[r] = vset1(-INFINITY);
            long j = 0;
            for (; j + 2 * VL <= sp; j += 2 * VL) {
                vf a0[ATT_QB], a1[ATT_QB];
                for (int r = 0; r < ATT_QB; r++) a0[r] = a1[r] = vzero();
                for (int d = 0; d < D; d++) {
                    const vf k0 = vload(kth + (long)d * sp + j), k1 = vload(kth + (long)d * sp + j + VL);
#pragma GCC unroll 8
                    for (int r = 0; r < ATT_QB; r++) {
                        const vf x = vset1(qr[r][d]);
                        a0[r] = vfma(x, k0, a0[r]);
                        a1[r] = vfma(x, k1, a1[r]);
                    }
                }
                const vf b0 = key_bias ? vload_n(key_bias + j, (int)(S - j)) : vzero();
                const vf b1 = key_bias ? vload_n(key_bias + j + VL, (int)(S - j - VL)) : vzero();
                const int full0 = j + VL <= S, full1 = j + 2 * VL <= S;
                for (int r = 0; r < ATT_QB; r++) {
                    const vf s0 = vadd(a0[r], b0), s1 = vadd(a1[r], b1);
                    vstore(sc + r * sp + j, s0);
                    vstore(sc + r * sp + j + VL, s1);
                    if (full0) rmax[r] = vmax(rmax[r], s0);
                    if (full1) rmax[r] = vmax(rmax[r], s1);
                }
            }
            for (; j < sp; j += VL) {
                vf acc[ATT_QB];
                for (int r = 0; r < ATT_QB; r++) acc[r] = vzero();
                for (int d = 0; d < D; d++) {
                    const vf kv = vload(kth + (long)d * sp + j);
#pragma GCC unroll 8
                    for (int r = 0; r < ATT_QB; r++) acc[r] = vfma(vset1(qr[r][d]), kv, acc[r]);
                }
                const vf b = key_bias ? vload_n(key_bias + j, (int)(S - j)) : vzero();
                const int full = j + VL <= S;
                for (int r = 0; r < ATT_QB; r++) {
                    const vf s0 = vadd(acc[r], b);
                    vstore(sc + r * sp + j, s0);
                    if (full) rmax[r] = vmax(rmax[r], s0);
                }
            }
            /* row softmax; padded keys are excluded from the max and get weight 0 */
            float inv[ATT_QB];
            for (int r = 0; r < ATT_QB; r++) {
                float *row = sc + r * sp;
                for (long jj = S; jj < sp; jj++) row[jj] = -INFINITY;
                if (r >= m) { inv[r] = 0.0f; continue; }
                vf mx = rmax[r];
                if (S % VL) mx = vmax(mx, vload(row + S / VL * VL));  /* the partial vector, padding now -inf */
                const vf nm = vset1(-vhmax(mx) * 1.44269504088896341f);
                vf sum = vzero();
                for (long jj = 0; jj < sp; jj += VL) {
                    vf e = vexp_shifted(vload(row + jj), nm);
                    vstore(row + jj, e);
                    sum = vadd(sum, e);
                }
                inv[r] = 1.0f / vhsum(sum);
            }
            /* out = p v, two vectors of head columns at a time (accumulators in registers:
             * every loop over rows has a constant trip count) */
            for (int d0 = 0; d0 < D; d0 += 2 * VL) {
                const int n0 = D - d0, n1 = D - d0 - VL;
                vf acc0[ATT_QB], acc1[ATT_QB];
#pragma GCC unroll 8
                for (int r = 0; r < ATT_QB; r++) acc0[r] = acc1[r] = vzero();
                if (n1 >= VL) {
                    for (long jj = 0; jj < S; jj++) {
                        const float *vr = vh_ + jj * vs + d0;
                        const vf v0 = vload(vr), v1 = vload(vr + VL);
#pragma GCC unroll 8
                        for (int r = 0; r < ATT_QB; r++) {
                            const vf p = vset1(sc[r * sp + jj]);
                            acc0[r] = vfma(p, v0, acc0[r]);
                            acc1[r] = vfma(p, v1, acc1[r]);
                        }
                    }
                } else {
                    for (long jj = 0; jj < S; jj++) {
                        const float *vr = vh_ + jj * vs + d0;
                        const vf v0 = vload_n(vr, n0), v1 = n1 > 0 ? vload_n(vr + VL, n1) : vzero();
#pragma GCC unroll 8
                        for (int r = 0; r < ATT_QB; r++) {
                            const vf p = vset1(sc[r * sp + jj]);
                            acc0[r] = vfma(p, v0, acc0[r]);
                            acc1[r] = vfma(p, v1, acc1[r]);
                        }
                    }
                }
#pragma GCC unroll 8
                for (int r = 0; r < ATT_QB; r++) {
                    if (r >= m) break;
                    float *o = out + h * oh + (i0 + r) * os + d0;
                    vstore_n(o, vmul(acc0[r], vset1(inv[r])), n0);
                    if (n1 > 0) vstore_n(o + VL, vmul(acc1[r], vset1(inv[r])), n1);
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
