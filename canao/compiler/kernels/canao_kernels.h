/* canao's hand-written kernels, on top of the vector layer (vec_*.h, included first).
 * Each has a plain definition in canao/compiler/reference.py that the tests compare with. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define MIN(a, b) ((a) < (b) ? (a) : (b))

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

/* Fused attention for all heads: out = softmax(q k^T + key_bias) v per head.
 * Element (h, s, d) of q lives at q[h*qh + s*qs + d]; likewise k, v, out.
 * Work items are (head, block of query rows); a scores block of QB rows lives in
 * the thread's scratch (L1), never in the arena. key_bias may be NULL. */
#define ATT_QB 4
static void attention(int S, int H, int D,
                      const float *q, long qh, long qs, const float *k, long kh, long ks,
                      const float *v, long vh, long vs, float *out, long oh, long os,
                      const float *key_bias, float *scratch_all, long scratch_floats) {
    const int sp = (S + VL - 1) / VL * VL;          /* keys padded to whole vectors */
    const int nthreads = omp_get_num_threads();
    const int chunks = (H >= nthreads) ? 1 : (nthreads + H - 1) / H;
    const int rows_per_chunk = ((S + chunks - 1) / chunks + ATT_QB - 1) / ATT_QB * ATT_QB;
    float *kt = scratch_all + omp_get_thread_num() * scratch_floats;   /* D x sp: K^T of one head */
    float *sc = kt + (long)D * sp;                                     /* ATT_QB x sp scores */
    int packed_head = -1;
#pragma omp for schedule(static)
    for (int item = 0; item < H * chunks; item++) {
        const int h = item / chunks, r_begin = (item % chunks) * rows_per_chunk;
        const int r_end = MIN(S, r_begin + rows_per_chunk);
        const float *kh_ = k + h * kh, *vh_ = v + h * vh;
        if (packed_head != h) {
            for (int d = 0; d < D; d++) {
                for (int j = 0; j < S; j++) kt[(long)d * sp + j] = kh_[(long)j * ks + d];
                for (int j = S; j < sp; j++) kt[(long)d * sp + j] = 0.0f;
            }
            packed_head = h;
        }
        for (int i0 = r_begin; i0 < r_end; i0 += ATT_QB) {
            const int m = MIN(ATT_QB, r_end - i0);
            const float *qr[ATT_QB];
            for (int r = 0; r < ATT_QB; r++) qr[r] = q + h * qh + (long)MIN(i0 + r, S - 1) * qs;
            /* scores = q k^T + bias, ATT_QB rows x sp keys */
            for (int j = 0; j < sp; j += VL) {
                vf acc[ATT_QB];
                for (int r = 0; r < ATT_QB; r++) acc[r] = vzero();
                for (int d = 0; d < D; d++) {
                    vf kv = vload(kt + (long)d * sp + j);
#pragma GCC unroll 8
                    for (int r = 0; r < ATT_QB; r++) acc[r] = vfma(vset1(qr[r][d]), kv, acc[r]);
                }
                vf b = key_bias ? vload_n(key_bias + j, S - j) : vzero();
                for (int r = 0; r < ATT_QB; r++) vstore(sc + r * sp + j, vadd(acc[r], b));
            }
            /* row softmax; padded keys are excluded from the max and get weight 0 */
            float inv[ATT_QB];
            for (int r = 0; r < m; r++) {
                float *row = sc + r * sp;
                for (int j = S; j < sp; j++) row[j] = -INFINITY;
                vf mx = vset1(-INFINITY);
                for (int j = 0; j < sp; j += VL) mx = vmax(mx, vload(row + j));
                vf vmx = vset1(vhmax(mx)), sum = vzero();
                for (int j = 0; j < sp; j += VL) {
                    vf e = vexp(vsub(vload(row + j), vmx));
                    vstore(row + j, e);
                    sum = vadd(sum, e);
                }
                inv[r] = 1.0f / vhsum(sum);
            }
            /* out = p v, two vectors of head columns at a time */
            for (int d0 = 0; d0 < D; d0 += 2 * VL) {
                const int n0 = D - d0, n1 = D - d0 - VL;
                vf acc[ATT_QB][2];
                for (int r = 0; r < ATT_QB; r++) acc[r][0] = acc[r][1] = vzero();
                for (int j = 0; j < S; j++) {
                    const float *vr = vh_ + (long)j * vs + d0;
                    vf v0 = vload_n(vr, n0), v1 = n1 > 0 ? vload_n(vr + VL, n1) : vzero();
#pragma GCC unroll 8
                    for (int r = 0; r < ATT_QB; r++) {
                        vf p = vset1(sc[r * sp + j]);
                        acc[r][0] = vfma(p, v0, acc[r][0]);
                        acc[r][1] = vfma(p, v1, acc[r][1]);
                    }
                }
                for (int r = 0; r < m; r++) {
                    float *o = out + h * oh + (long)(i0 + r) * os + d0;
                    vstore_n(o, vmul(acc[r][0], vset1(inv[r])), n0);
                    if (n1 > 0) vstore_n(o + VL, vmul(acc[r][1], vset1(inv[r])), n1);
                }
            }
        }
    }
}
