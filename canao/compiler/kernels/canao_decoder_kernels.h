/* canao's decoder kernels: weight-only quantized GEMV (decode), dequantize-to-panel GEMM
 * (prefill), RMSNorm, RoPE, attention over the KV cache. Written against the vector layer
 * (vec_*.h, included first) for fp32 and with per-ISA integer dot products for the
 * quantized formats: AVX2 (vpmaddubsw; vpdpbusd where AVX512-VNNI is there), NEON (sdot) and a plain C fallback.
 *
 * Weight formats are GGUF's own blocks, so a Q4_1 / Q8_0 file is packed without passing
 * through fp32 (bytes per weight read per token is what decode speed is made of):
 *   Q8_0: 32 weights = fp16 d, 32 x int8             (34 bytes),  w = d * q
 *   Q4_1: 32 weights = fp16 d, fp16 m, 16 bytes      (20 bytes),  w = d * q + m, q in 0..15;
 *         byte j holds weight j (low nibble) and weight j + 16 (high nibble).
 *   Q4_K, Q5_K, Q6_K: ggml's k-quants, super-blocks of 256 weights (canao/models/kquants.py
 *         describes the layouts); a Q4_K / Q5_K sub-block of 32 is d * sc * q - dmin * m, a Q6_K
 *         sub-block of 16 is d * sc * (q - 32).
 * Activations entering a quantized GEMV are quantized per 32-block to int8 (xq, scale xd)
 * with xs = xd * sum(xq) for the offset terms (Q4_1's m, the k-quants' mins), as llama.cpp's Q8_1;
 * a k-quant sub-block of 32 meets exactly one activation block. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 32
#define Q8_0_BYTES 34
#define Q4_1_BYTES 20
#define QK_K 256
#define Q4_K_BYTES 144
#define Q5_K_BYTES 176
#define Q6_K_BYTES 210
enum { WT_F32 = 0, WT_Q8_0 = 1, WT_Q4_1 = 2, WT_Q4_K = 3, WT_Q5_K = 4, WT_Q6_K = 5 };

static inline int block_weights(int type) { return type >= WT_Q4_K ? QK_K : QK; }
static inline long block_bytes(int type) {
    static const long bytes[] = {4 * QK, Q8_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES};
    return bytes[type];
}

/* the eight 6-bit scales and mins of a Q4_K / Q5_K super-block's 12 bytes (ggml's get_scale_min_k4) */
static inline void kq_scales(const uint8_t *s, int *sc, int *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* the 32 weights (as q, before offsets) of k-quant sub-block s of a super-block: Q4_K / Q5_K 0..31, Q6_K q - 32 */
static inline void kq_sub_weights(int type, const uint8_t *blk, int s, int8_t *q) {
    if (type == WT_Q6_K) {
        const int h = s / 4, t = s % 4;
        const uint8_t *ql = blk + 64 * h + 32 * (t & 1), *qh = blk + 128 + 32 * h;
        for (int l = 0; l < 32; l++)
            q[l] = (int8_t)((((ql[l] >> (4 * (t >> 1))) & 15) | (((qh[l] >> (2 * t)) & 3) << 4)) - 32);
        return;
    }
    const uint8_t *qs = blk + (type == WT_Q5_K ? 48 : 16) + 32 * (s / 2);
    for (int l = 0; l < 32; l++) {
        q[l] = (int8_t)((qs[l] >> (4 * (s & 1))) & 15);
        if (type == WT_Q5_K) q[l] |= (int8_t)(((blk[16 + l] >> s) & 1) << 4);
    }
}

static inline float fp16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#elif defined(__aarch64__)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else {  /* subnormal: normalise */
            int e = -1;
            uint32_t m = man;
            do { e++; m <<= 1; } while (!(m & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* ---- the KV cache's element: fp32, or fp16 (KV_F16: half the bytes attention reads per step) */
#ifndef KV_F16
#define KV_F16 0
#endif
#if KV_F16
static inline uint16_t f32_to_fp16(float x) {  /* round to nearest even */
#if defined(__F16C__)
    return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
#elif defined(__aarch64__)
    __fp16 f = (__fp16)x;
    uint16_t h;
    memcpy(&h, &f, 2);
    return h;
#else
#error "an fp16 KV cache needs F16C (x86-64-v3) or AArch64"
#endif
}
typedef uint16_t kv_t;
static inline vf kv_load_n(const kv_t *p, int n) { return vload_h_n(p, n); }
static inline void kv_store_row(kv_t *dst, const float *src, int n) { for (int i = 0; i < n; i++) dst[i] = f32_to_fp16(src[i]); }
#else
typedef float kv_t;
static inline vf kv_load_n(const kv_t *p, int n) { return vload_n(p, n); }
static inline void kv_store_row(kv_t *dst, const float *src, int n) { memcpy(dst, src, (size_t)n * sizeof(float)); }
#endif

/* ---- activations: fp32 row -> int8 blocks ------------------------------------------ */

static void quantize_row_q8(const float *x, int k, int8_t *q, float *d, float *s) {
    for (int b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int v = (int)lrintf(xb[j] * inv);
            q[b * QK + j] = (int8_t)v;
            sum += v;
        }
        d[b] = scale;
        s[b] = scale * (float)sum;
    }
}

/* ---- one row of a quantized matrix times a quantized activation -------------------- */

#if defined(__AVX2__)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256i unpack_nibbles(const uint8_t *p) {  /* 16 bytes -> 32 values 0..15 in weight order */
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0f));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f));
    return _mm256_set_m128i(hi, lo);
}
/* 32 u8 x s8 products summed in fours into 8 int32: one vpdpbusd with VNNI (AVX512-VL), else
 * vpmaddubsw + vpmaddwd (pair sums stay below 2*128*127, so neither form saturates: same result) */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

/* ---- one row of a quantized matrix against the int8 activations of n tokens --------------
 * (n <= GEMV_TOKENS: a decode step of several sequences reads each weight row once; token j's
 * activations at xq + j * kq, scales at xd / xs + j * kb). On AVX2 each block is unpacked once and
 * dotted with every token's activations while it is in registers; two chains per token (even and
 * odd blocks) hide the FMA latency. Always inlined and called with a constant n (gemv_rows), so the
 * accumulators stay in registers; the single-row dot is the n = 1 case, so a sequence decoded in a
 * batch gets bitwise the logits it gets alone. */
#define GEMV_TOKENS 8

#if defined(__AVX2__)
/* Two unpacked blocks (bi, bi + 1: QK weights each, in q0 and q1, scales d0, d1) against every token's
 * activations: into the even and odd accumulators, and the blocks' min terms m0, m1 times each token's
 * activation sums into offset (Q4_1 adds it, the k-quants subtract it). Shared by dot_q4_1_n and
 * dot_qk_n, so both do the same arithmetic in the same order. */
static inline __attribute__((always_inline)) void blocks_x_tokens(__m256i q0, __m256i q1, float d0, float d1, float m0,
                                                                  float m1, int bi, const int8_t *xq, const float *xd,
                                                                  const float *xs, int n, long kq, long kb,
                                                                  __m256 *acc0, __m256 *acc1, float *offset) {
    for (int j = 0; j < n; j++) {
        const int8_t *a = xq + j * kq + bi * QK;
        const float *dj = xd + j * kb + bi, *sj = xs + j * kb + bi;
        const __m256i p0 = dot_u8s8(q0, _mm256_loadu_si256((const __m256i *)a));
        const __m256i p1 = dot_u8s8(q1, _mm256_loadu_si256((const __m256i *)(a + QK)));
        acc0[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * dj[0]), acc0[j]);
        acc1[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * dj[1]), acc1[j]);
        offset[j] += m0 * sj[0] + m1 * sj[1];
    }
}

static inline __attribute__((always_inline)) void dot_q4_1_n(const uint8_t *w, const int8_t *xq, const float *xd,
                                                             const float *xs, int nb, int n, long kq, long kb, float *y) {
    __m256 acc0[GEMV_TOKENS], acc1[GEMV_TOKENS];
    float offset[GEMV_TOKENS];
    for (int j = 0; j < n; j++) acc0[j] = acc1[j] = _mm256_setzero_ps(), offset[j] = 0.0f;
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + b * Q4_1_BYTES, *w1 = w0 + Q4_1_BYTES;
        const __m256i q0 = unpack_nibbles(w0 + 4), q1 = unpack_nibbles(w1 + 4);
        const float d0 = fp16_to_f32(w0), d1 = fp16_to_f32(w1), m0 = fp16_to_f32(w0 + 2), m1 = fp16_to_f32(w1 + 2);
        blocks_x_tokens(q0, q1, d0, d1, m0, m1, b, xq, xd, xs, n, kq, kb, acc0, acc1, offset);
    }
    for (; b < nb; b++) {
        const uint8_t *w0 = w + b * Q4_1_BYTES;
        const __m256i q0 = unpack_nibbles(w0 + 4);
        const float d0 = fp16_to_f32(w0), m0 = fp16_to_f32(w0 + 2);
        for (int j = 0; j < n; j++) {
            const __m256i p0 = dot_u8s8(q0, _mm256_loadu_si256((const __m256i *)(xq + j * kq + b * QK)));
            acc0[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * xd[j * kb + b]), acc0[j]);
            offset[j] += m0 * xs[j * kb + b];
        }
    }
    for (int j = 0; j < n; j++) y[j] = hsum256(_mm256_add_ps(acc0[j], acc1[j])) + offset[j];
}

static inline __attribute__((always_inline)) void dot_q8_0_n(const uint8_t *w, const int8_t *xq, const float *xd, int nb,
                                                             int n, long kq, long kb, float *y) {
    __m256 acc0[GEMV_TOKENS], acc1[GEMV_TOKENS];
    for (int j = 0; j < n; j++) acc0[j] = acc1[j] = _mm256_setzero_ps();
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + b * Q8_0_BYTES, *w1 = w0 + Q8_0_BYTES;
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)(w0 + 2));
        const __m256i q1 = _mm256_loadu_si256((const __m256i *)(w1 + 2));
        /* |w| x (a with w's sign): the u8 x s8 product wants one unsigned operand; |w| once per block */
        const __m256i u0 = _mm256_sign_epi8(q0, q0), u1 = _mm256_sign_epi8(q1, q1);
        const float d0 = fp16_to_f32(w0), d1 = fp16_to_f32(w1);
        for (int j = 0; j < n; j++) {
            const int8_t *a = xq + j * kq + b * QK;
            const float *dj = xd + j * kb + b;
            const __m256i p0 = dot_u8s8(u0, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)a), q0));
            const __m256i p1 = dot_u8s8(u1, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(a + QK)), q1));
            acc0[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * dj[0]), acc0[j]);
            acc1[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(d1 * dj[1]), acc1[j]);
        }
    }
    for (; b < nb; b++) {
        const uint8_t *w0 = w + b * Q8_0_BYTES;
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)(w0 + 2));
        const __m256i u0 = _mm256_sign_epi8(q0, q0);
        const float d0 = fp16_to_f32(w0);
        for (int j = 0; j < n; j++) {
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(xq + j * kq + b * QK));
            const __m256i p0 = dot_u8s8(u0, _mm256_sign_epi8(a0, q0));
            acc0[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(d0 * xd[j * kb + b]), acc0[j]);
        }
    }
    for (int j = 0; j < n; j++) y[j] = hsum256(_mm256_add_ps(acc0[j], acc1[j]));
}

static inline float dot_q8_0(const uint8_t *w, const int8_t *xq, const float *xd, int nb) {
    float y;
    dot_q8_0_n(w, xq, xd, nb, 1, 0, 0, &y);
    return y;
}

static inline float dot_q4_1(const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb) {
    float y;
    dot_q4_1_n(w, xq, xd, xs, nb, 1, 0, 0, &y);
    return y;
}

/* Q4_K / Q5_K: per sub-block of 32, d * sc * (q . a) - dmin * m * xs; two chains (even and odd
 * sub-blocks) per token. Q5_K ORs bit s of qh[l] into weight l of sub-block s as 16. */
static inline __attribute__((always_inline)) void dot_qk_n(const uint8_t *w, int five, const int8_t *xq, const float *xd,
                                                           const float *xs, int nb, int n, long kq, long kb, float *y) {
    __m256 acc0[GEMV_TOKENS], acc1[GEMV_TOKENS];
    float offset[GEMV_TOKENS];
    for (int j = 0; j < n; j++) acc0[j] = acc1[j] = _mm256_setzero_ps(), offset[j] = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(16);
    const long bytes = five ? Q5_K_BYTES : Q4_K_BYTES;
    for (int sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + sb * bytes, *qs = blk + (five ? 48 : 16);
        const float d = fp16_to_f32(blk), dmin = fp16_to_f32(blk + 2);
        int sc[8], mn[8];
        kq_scales(blk + 4, sc, mn);
        const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
        for (int p = 0; p < 4; p++) {  /* 32 bytes: sub-block 2p in the low nibbles, 2p + 1 in the high */
            const __m256i b = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
            __m256i q0 = _mm256_and_si256(b, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
            if (five) {
                const __m256i s0 = _mm256_set1_epi8((char)(1 << (2 * p))), s1 = _mm256_set1_epi8((char)(2 << (2 * p)));
                q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, s0), s0), bit4));
                q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, s1), s1), bit4));
            }
            const float d0 = d * (float)sc[2 * p], d1 = d * (float)sc[2 * p + 1];
            const float m0 = dmin * (float)mn[2 * p], m1 = dmin * (float)mn[2 * p + 1];
            const int bi = sb * 8 + 2 * p;
            blocks_x_tokens(q0, q1, d0, d1, m0, m1, bi, xq, xd, xs, n, kq, kb, acc0, acc1, offset);
        }
    }
    for (int j = 0; j < n; j++) y[j] = hsum256(_mm256_add_ps(acc0[j], acc1[j])) - offset[j];
}

static inline __attribute__((always_inline)) void dot_q4_k_n(const uint8_t *w, const int8_t *xq, const float *xd,
                                                             const float *xs, int nb, int n, long kq, long kb, float *y) {
    dot_qk_n(w, 0, xq, xd, xs, nb, n, kq, kb, y);
}

static inline __attribute__((always_inline)) void dot_q5_k_n(const uint8_t *w, const int8_t *xq, const float *xd,
                                                             const float *xs, int nb, int n, long kq, long kb, float *y) {
    dot_qk_n(w, 1, xq, xd, xs, nb, n, kq, kb, y);
}

/* Q6_K: q - 32 fits int8, so |q - 32| x (a with its sign) as Q8_0; the products' 8 lanes are weights
 * 0..15 (lanes 0-3) and 16..31 (lanes 4-7) of a sub-block of 32, whose two int8 scales multiply them
 * as integers (|sum| < 2^24: exact in fp32) before d * xd. */
static inline __attribute__((always_inline)) void dot_q6_k_n(const uint8_t *w, const int8_t *xq, const float *xd,
                                                             const float *xs, int nb, int n, long kq, long kb, float *y) {
    (void)xs;
    __m256 acc0[GEMV_TOKENS], acc1[GEMV_TOKENS];
    for (int j = 0; j < n; j++) acc0[j] = acc1[j] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30), k32 = _mm256_set1_epi8(32);
    for (int sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + sb * Q6_K_BYTES;
        const int8_t *sc = (const int8_t *)blk + 192;
        const float d = fp16_to_f32(blk + 208);
        for (int h = 0; h < 2; h++) {  /* 128 weights: four sub-blocks of 32 from 64 ql and 32 qh bytes */
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30)),
                _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30)),
            };
            for (int s = 0; s < 4; s++) {
                const __m256i qs = _mm256_sub_epi8(q[s], k32), u = _mm256_sign_epi8(qs, qs);
                const int i = 4 * h + s, bi = sb * 8 + i;
                const __m256i scl = _mm256_setr_epi32(sc[2 * i], sc[2 * i], sc[2 * i], sc[2 * i], sc[2 * i + 1],
                                                      sc[2 * i + 1], sc[2 * i + 1], sc[2 * i + 1]);
                for (int j = 0; j < n; j++) {
                    const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + j * kq + bi * QK));
                    const __m256i p = _mm256_mullo_epi32(dot_u8s8(u, _mm256_sign_epi8(a, qs)), scl);
                    const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[j * kb + bi]));
                    if (s & 1) acc1[j] = _mm256_add_ps(acc1[j], t);
                    else acc0[j] = _mm256_add_ps(acc0[j], t);
                }
            }
        }
    }
    for (int j = 0; j < n; j++) y[j] = hsum256(_mm256_add_ps(acc0[j], acc1[j]));
}
#else
static inline float dot_q8_0(const uint8_t *w, const int8_t *xq, const float *xd, int nb) {
#if defined(__ARM_FEATURE_DOTPROD)
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * Q8_0_BYTES;
        int32x4_t p = vdotq_s32(vdupq_n_s32(0), vld1q_s8((const int8_t *)wb + 2), vld1q_s8(xq + b * QK));
        p = vdotq_s32(p, vld1q_s8((const int8_t *)wb + 18), vld1q_s8(xq + b * QK + 16));
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), fp16_to_f32(wb) * xd[b]);
    }
    return vaddvq_f32(acc);
#else
    float sum = 0.0f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * Q8_0_BYTES;
        const int8_t *q = (const int8_t *)wb + 2;
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += q[j] * xq[b * QK + j];
        sum += (float)isum * fp16_to_f32(wb) * xd[b];
    }
    return sum;
#endif
}

static inline float dot_q4_1(const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb) {
#if defined(__ARM_FEATURE_DOTPROD)
    float32x4_t acc = vdupq_n_f32(0.0f);
    float offset = 0.0f;
    const uint8x16_t mask = vdupq_n_u8(0x0f);
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * Q4_1_BYTES;
        const uint8x16_t bytes = vld1q_u8(wb + 4);
        /* nibbles 0..15 fit int8: sdot against the signed activations */
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(bytes, mask));
        const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4));
        int32x4_t p = vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(xq + b * QK));
        p = vdotq_s32(p, hi, vld1q_s8(xq + b * QK + 16));
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), fp16_to_f32(wb) * xd[b]);
        offset += fp16_to_f32(wb + 2) * xs[b];
    }
    return vaddvq_f32(acc) + offset;
#else
    float sum = 0.0f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * Q4_1_BYTES;
        int isum = 0;
        for (int j = 0; j < 16; j++) {
            isum += (wb[4 + j] & 0x0f) * xq[b * QK + j];
            isum += (wb[4 + j] >> 4) * xq[b * QK + j + 16];
        }
        sum += (float)isum * fp16_to_f32(wb) * xd[b] + fp16_to_f32(wb + 2) * xs[b];
    }
    return sum;
#endif
}

static inline void dot_q4_1_n(const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb, int n,
                              long kq, long kb, float *y) {
    for (int j = 0; j < n; j++) y[j] = dot_q4_1(w, xq + j * kq, xd + j * kb, xs + j * kb, nb);
}

static inline void dot_q8_0_n(const uint8_t *w, const int8_t *xq, const float *xd, int nb, int n, long kq, long kb,
                              float *y) {
    for (int j = 0; j < n; j++) y[j] = dot_q8_0(w, xq + j * kq, xd + j * kb, nb);
}

#if defined(__ARM_FEATURE_DOTPROD)
/* 32 weights (two int8 x 16) . 32 activations, in 4 int32 lanes (sdot) */
static inline int32x4_t sdot32(int8x16_t q0, int8x16_t q1, const int8_t *a) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), q0, vld1q_s8(a)), q1, vld1q_s8(a + 16));
}

/* Q6_K: q - 32 as int8 against the activations, each 16-weight half times its scale as integers */
static inline float dot_q6_k(const uint8_t *w, const int8_t *xq, const float *xd, int nb) {
    const uint8x16_t m4 = vdupq_n_u8(0x0f), m30 = vdupq_n_u8(0x30);
    const int8x16_t k32 = vdupq_n_s8(32);
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + sb * Q6_K_BYTES;
        const int8_t *sc = (const int8_t *)blk + 192;
        const float d = fp16_to_f32(blk + 208);
        for (int h = 0; h < 2; h++) {  /* 128 weights: four sub-blocks of 32 from 64 ql and 32 qh bytes */
            uint8x16_t q[4][2];
            for (int half = 0; half < 2; half++) {
                const uint8x16_t l0 = vld1q_u8(blk + 64 * h + 16 * half), l1 = vld1q_u8(blk + 64 * h + 32 + 16 * half);
                const uint8x16_t hb = vld1q_u8(blk + 128 + 32 * h + 16 * half);
                q[0][half] = vorrq_u8(vandq_u8(l0, m4), vandq_u8(vshlq_n_u8(hb, 4), m30));
                q[1][half] = vorrq_u8(vandq_u8(l1, m4), vandq_u8(vshlq_n_u8(hb, 2), m30));
                q[2][half] = vorrq_u8(vshrq_n_u8(l0, 4), vandq_u8(hb, m30));
                q[3][half] = vorrq_u8(vshrq_n_u8(l1, 4), vandq_u8(vshrq_n_u8(hb, 2), m30));
            }
            for (int s = 0; s < 4; s++) {
                const int i = 4 * h + s, b = sb * 8 + i;
                const int32x4_t lo = vdotq_s32(vdupq_n_s32(0), vsubq_s8(vreinterpretq_s8_u8(q[s][0]), k32), vld1q_s8(xq + b * QK));
                const int32x4_t hi = vdotq_s32(vdupq_n_s32(0), vsubq_s8(vreinterpretq_s8_u8(q[s][1]), k32),
                                               vld1q_s8(xq + b * QK + 16));
                const int32x4_t p = vmlaq_n_s32(vmulq_n_s32(lo, sc[2 * i]), hi, sc[2 * i + 1]);
                acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), d * xd[b]);
            }
        }
    }
    return vaddvq_f32(acc);
}

/* Q4_K / Q5_K: nibbles (and Q5_K's fifth bits) as int8 against the activations, per sub-block of 32 */
static inline float dot_qk(int five, const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb) {
    const uint8x16_t m4 = vdupq_n_u8(0x0f), bit4 = vdupq_n_u8(16);
    float32x4_t acc = vdupq_n_f32(0.0f);
    float offset = 0.0f;
    for (int sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + sb * (five ? Q5_K_BYTES : Q4_K_BYTES), *qs = blk + (five ? 48 : 16);
        int sc[8], mn[8];
        kq_scales(blk + 4, sc, mn);
        const float d = fp16_to_f32(blk), dmin = fp16_to_f32(blk + 2);
        const uint8x16_t qh0 = vld1q_u8(blk + 16), qh1 = vld1q_u8(blk + 32);  /* Q5_K's qh (Q4_K: unused) */
        for (int p = 0; p < 4; p++) {  /* 32 bytes: sub-block 2p in the low nibbles, 2p + 1 in the high */
            const uint8x16_t b0 = vld1q_u8(qs + 32 * p), b1 = vld1q_u8(qs + 32 * p + 16);
            uint8x16_t lo0 = vandq_u8(b0, m4), lo1 = vandq_u8(b1, m4), hi0 = vshrq_n_u8(b0, 4), hi1 = vshrq_n_u8(b1, 4);
            if (five) {  /* bit s of qh moved to bit 4: a left shift by 4 - s (negative: right) */
                const int8x16_t sl = vdupq_n_s8((int8_t)(4 - 2 * p)), sh = vdupq_n_s8((int8_t)(3 - 2 * p));
                lo0 = vorrq_u8(lo0, vandq_u8(vshlq_u8(qh0, sl), bit4));
                lo1 = vorrq_u8(lo1, vandq_u8(vshlq_u8(qh1, sl), bit4));
                hi0 = vorrq_u8(hi0, vandq_u8(vshlq_u8(qh0, sh), bit4));
                hi1 = vorrq_u8(hi1, vandq_u8(vshlq_u8(qh1, sh), bit4));
            }
            const int b = sb * 8 + 2 * p;
            const int32x4_t p0 = sdot32(vreinterpretq_s8_u8(lo0), vreinterpretq_s8_u8(lo1), xq + b * QK);
            const int32x4_t p1 = sdot32(vreinterpretq_s8_u8(hi0), vreinterpretq_s8_u8(hi1), xq + (b + 1) * QK);
            acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p0), d * (float)sc[2 * p] * xd[b]);
            acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p1), d * (float)sc[2 * p + 1] * xd[b + 1]);
            offset += dmin * (float)mn[2 * p] * xs[b] + dmin * (float)mn[2 * p + 1] * xs[b + 1];
        }
    }
    return vaddvq_f32(acc) - offset;
}

static inline float dot_kq(int type, const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb) {
    return type == WT_Q6_K ? dot_q6_k(w, xq, xd, nb) : dot_qk(type == WT_Q5_K, w, xq, xd, xs, nb);
}
#else
/* plain C: each sub-block's weights as int8 (kq_sub_weights), integer dots, Q6_K's halves times their scales */
static inline float dot_kq(int type, const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb) {
    const long bytes = block_bytes(type);
    float sum = 0.0f, offset = 0.0f;
    for (int sb = 0; sb < nb / 8; sb++) {
        const uint8_t *blk = w + sb * bytes;
        const int8_t *s6 = (const int8_t *)blk + 192;
        int sc[8], mn[8];
        if (type != WT_Q6_K) kq_scales(blk + 4, sc, mn);
        const float d = fp16_to_f32(type == WT_Q6_K ? blk + 208 : blk);
        for (int s = 0; s < 8; s++) {
            int8_t q[32];
            kq_sub_weights(type, blk, s, q);
            const int b = sb * 8 + s;
            int lo = 0, hi = 0;
            for (int l = 0; l < 16; l++) lo += q[l] * xq[b * QK + l], hi += q[l + 16] * xq[b * QK + l + 16];
            if (type == WT_Q6_K) sum += (float)(lo * s6[2 * s] + hi * s6[2 * s + 1]) * (d * xd[b]);
            else {
                sum += (float)(lo + hi) * (d * (float)sc[s] * xd[b]);
                offset += fp16_to_f32(blk + 2) * (float)mn[s] * xs[b];
            }
        }
    }
    return sum - offset;
}
#endif

static inline void dot_q4_k_n(const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb, int n,
                              long kq, long kb, float *y) {
    for (int j = 0; j < n; j++) y[j] = dot_kq(WT_Q4_K, w, xq + j * kq, xd + j * kb, xs + j * kb, nb);
}

static inline void dot_q5_k_n(const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb, int n,
                              long kq, long kb, float *y) {
    for (int j = 0; j < n; j++) y[j] = dot_kq(WT_Q5_K, w, xq + j * kq, xd + j * kb, xs + j * kb, nb);
}

static inline void dot_q6_k_n(const uint8_t *w, const int8_t *xq, const float *xd, const float *xs, int nb, int n,
                              long kq, long kb, float *y) {
    for (int j = 0; j < n; j++) y[j] = dot_kq(WT_Q6_K, w, xq + j * kq, xd + j * kb, xs + j * kb, nb);
}
#endif

static inline float dot_f32(const float *w, const float *x, int k) {
    vf acc0 = vzero(), acc1 = vzero();
    int c = 0;
    for (; c + 2 * VL <= k; c += 2 * VL) {
        acc0 = vfma(vload(w + c), vload(x + c), acc0);
        acc1 = vfma(vload(w + c + VL), vload(x + c + VL), acc1);
    }
    for (; c < k; c += VL) acc0 = vfma(vload_n(w + c, k - c), vload_n(x + c, k - c), acc0);
    return vhsum(vadd(acc0, acc1));
}

/* ---- dequantize rows into a transposed fp32 panel: panel[k * NR + r] = W[r0 + r][k] --- */

#define NR 16  /* output columns (weight rows) of one prefill panel */

/* one block of a quantized format (QK or QK_K weights) as floats */
static void dequant_block(int type, const uint8_t *blk, float *out) {
    if (type == WT_Q8_0) {
        const float d = fp16_to_f32(blk);
        for (int j = 0; j < QK; j++) out[j] = d * ((const int8_t *)blk)[2 + j];
    } else if (type == WT_Q4_1) {
        const float d = fp16_to_f32(blk), m = fp16_to_f32(blk + 2);
        for (int j = 0; j < 16; j++) {
            out[j] = d * (blk[4 + j] & 0x0f) + m;
            out[j + 16] = d * (blk[4 + j] >> 4) + m;
        }
    } else if (type == WT_Q6_K) {
        const int8_t *sc = (const int8_t *)blk + 192;
        const float d = fp16_to_f32(blk + 208);
        for (int s = 0; s < 8; s++) {
            int8_t q[32];
            kq_sub_weights(WT_Q6_K, blk, s, q);
            for (int l = 0; l < 32; l++) out[32 * s + l] = d * (float)sc[2 * s + l / 16] * (float)q[l];
        }
    } else {  /* Q4_K, Q5_K */
        int sc[8], mn[8];
        kq_scales(blk + 4, sc, mn);
        const float d = fp16_to_f32(blk), dmin = fp16_to_f32(blk + 2);
        for (int s = 0; s < 8; s++) {
            int8_t q[32];
            kq_sub_weights(type, blk, s, q);
            const float ds = d * (float)sc[s], dm = dmin * (float)mn[s];
            for (int l = 0; l < 32; l++) out[32 * s + l] = ds * (float)q[l] - dm;
        }
    }
}

static void dequant_panel(int type, const void *w, long row_bytes, int r0, int nrows, int k, float *panel) {
    for (int r = 0; r < NR; r++) {
        if (r >= nrows) {
            for (int c = 0; c < k; c++) panel[(long)c * NR + r] = 0.0f;
            continue;
        }
        const uint8_t *row = (const uint8_t *)w + (long)(r0 + r) * row_bytes;
        if (type == WT_F32) {
            const float *f = (const float *)row;
            for (int c = 0; c < k; c++) panel[(long)c * NR + r] = f[c];
            continue;
        }
        const int bw = block_weights(type);
        for (int b = 0; b < k / bw; b++) {
            float v[QK_K];
            dequant_block(type, row + b * block_bytes(type), v);
            for (int j = 0; j < bw; j++) panel[(long)(b * bw + j) * NR + r] = v[j];
        }
    }
}

/* y[t][c] = sum_k x[t][k] * panel[k][c] for tokens [0, n), columns c < ncols.
 * Register tile: MR tokens x NR columns of fp32 accumulators (AVX2: 6 x 2 vectors = 12 of the
 * 16 registers; NEON: 6 x 4 of 32; AVX-512: 6 x 1, plus the panel and broadcast registers). */
#define MR 6
static void panel_gemm(const float *x, long xs, int n, int k, const float *panel, float *y, long ys, int ncols) {
    for (int t0 = 0; t0 < n; t0 += MR) {
        const int mt = n - t0 < MR ? n - t0 : MR;
        vf acc[MR][NR / VL];
        for (int i = 0; i < MR; i++)
            for (int v = 0; v < NR / VL; v++) acc[i][v] = vzero();
        const float *xr = x + (long)t0 * xs;
        if (mt == MR) {
            for (int c = 0; c < k; c++) {
                vf b[NR / VL];
                for (int v = 0; v < NR / VL; v++) b[v] = vload(panel + (long)c * NR + v * VL);
                for (int i = 0; i < MR; i++) {
                    const vf a = vset1(xr[(long)i * xs + c]);
                    for (int v = 0; v < NR / VL; v++) acc[i][v] = vfma(a, b[v], acc[i][v]);
                }
            }
        } else {
            for (int c = 0; c < k; c++)
                for (int i = 0; i < mt; i++) {
                    const vf a = vset1(xr[(long)i * xs + c]);
                    for (int v = 0; v < NR / VL; v++) acc[i][v] = vfma(a, vload(panel + (long)c * NR + v * VL), acc[i][v]);
                }
        }
        for (int i = 0; i < mt; i++) {
            float out[NR];
            for (int v = 0; v < NR / VL; v++) vstore(out + v * VL, acc[i][v]);
            float *yr = y + (long)(t0 + i) * ys;
            for (int c = 0; c < ncols; c++) yr[c] = out[c];
        }
    }
}

/* ---- normalisation, rotary embedding, activation ----------------------------------- */

static void rmsnorm(const float *x, const float *g, float *y, int n, float eps) {
    vf s = vzero();
    for (int c = 0; c < n; c += VL) {
        const vf v = vload_n(x + c, n - c);
        s = vfma(v, v, s);
    }
    const float r = 1.0f / sqrtf(vhsum(s) / n + eps);
    for (int c = 0; c < n; c += VL) vstore_n(y + c, vmul(vmul(vload_n(x + c, n - c), vset1(r)), vload_n(g + c, n - c)), n - c);
}

/* half-rotation RoPE (as Hugging Face Llama) of one head vector, tables for this position */
static void rope_head(float *v, const float *cos_t, const float *sin_t, int half) {
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_t[i] - b * sin_t[i];
        v[i + half] = b * cos_t[i] + a * sin_t[i];
    }
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* GPT-2's GELU: the tanh approximation ("gelu_new"), or the exact erf form */
static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
static inline float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

/* LayerNorm with weight and bias (GPT-2) */
static void layernorm(const float *x, const float *g, const float *b, float *y, int n, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int c = 0; c < n; c++) mean += x[c];
    mean /= n;
    for (int c = 0; c < n; c++) var += (x[c] - mean) * (x[c] - mean);
    const float r = 1.0f / sqrtf(var / n + eps);
    for (int c = 0; c < n; c++) y[c] = (x[c] - mean) * r * g[c] + b[c];
}

/* a cached key . q: dot_f32 itself for an fp32 cache (its two chains, its rounding), the same chains
 * over fp16 keys */
static inline float kv_dot(const kv_t *kt, const float *q, int hd) {
#if KV_F16
    vf acc0 = vzero(), acc1 = vzero();
    int c = 0;
    for (; c + 2 * VL <= hd; c += 2 * VL) {
        acc0 = vfma(kv_load_n(kt + c, VL), vload(q + c), acc0);
        acc1 = vfma(kv_load_n(kt + c + VL, VL), vload(q + c + VL), acc1);
    }
    for (; c < hd; c += VL) acc0 = vfma(kv_load_n(kt + c, hd - c), vload_n(q + c, hd - c), acc0);
    return vhsum(vadd(acc0, acc1));
#else
    return dot_f32(kt, q, hd);
#endif
}

/* one query head over keys [0, n): out = softmax(q k^T * scale) v; scores is n floats */
static void attend(const float *q, const kv_t *k, const kv_t *v, long kv_stride, int n, int hd, float scale,
                   float *scores, float *out) {
    float mx = -INFINITY;
    for (int t = 0; t < n; t++) {
        const float s = kv_dot(k + (long)t * kv_stride, q, hd) * scale;
        scores[t] = s;
        mx = s > mx ? s : mx;
    }
    float sum = 0.0f;
    for (int t = 0; t < n; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    const float inv = 1.0f / sum;
    for (int c = 0; c < hd; c += VL) {
        vf acc = vzero();
        for (int t = 0; t < n; t++) acc = vfma(vset1(scores[t]), kv_load_n(v + (long)t * kv_stride + c, hd - c), acc);
        vstore_n(out + c, vmul(acc, vset1(inv)), hd - c);
    }
}
