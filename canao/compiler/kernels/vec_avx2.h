/* Vector layer for AVX2 + FMA: 8 fp32 lanes. Kernels are written against these names. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define VL 8
typedef __m256 vf;

static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }  /* a*b + c */
static inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
/* lanes where a > b keep x, others become 0 */
static inline vf vkeep_gt(vf x, vf a, vf b) { return _mm256_and_ps(x, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
static inline vf vpow2i(vf n) {  /* 2^n for integral n in the normal range */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
}
static inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

static inline __m256i vtail_mask(int n) {
    static const int bits[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(bits + 8 - n));
}
/* the first n lanes (n <= VL); the rest read as 0 and are never written */
static inline vf vload_n(const float *p, int n) { return n >= VL ? vload(p) : _mm256_maskload_ps(p, vtail_mask(n)); }
static inline void vstore_n(float *p, vf v, int n) { if (n >= VL) vstore(p, v); else _mm256_maskstore_ps(p, vtail_mask(n), v); }
/* n (<= VL) fp16 values as fp32 lanes (F16C), the rest 0 */
static inline vf vload_h_n(const uint16_t *p, int n) {
    if (n >= VL) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t t[VL] = {0};
    memcpy(t, p, (size_t)n * 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}
static inline vf vfirst_n(vf v, int n) { return n >= VL ? v : _mm256_and_ps(v, _mm256_castsi256_ps(vtail_mask(n))); }

static inline float vhsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* the sums of a, b, c and d into out[0..3] */
static inline void vhsum4(vf a, vf b, vf c, vf d, float *out) {
    const vf ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d), abcd = _mm256_hadd_ps(ab, cd);
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}
static inline float vhmax(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- integer and bf16 layer (int8 and bf16 GEMMs) ---------------------------------- */
#include <stdint.h>
#include <string.h>
typedef __m256i vi;
static inline vi vizero(void) { return _mm256_setzero_si256(); }
static inline vi viload(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi viload_n(const int32_t *p, int n) { return n >= VL ? viload(p) : _mm256_maskload_epi32(p, vtail_mask(n)); }
static inline vi visub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
static inline vf vcvt_i32(vi x) { return _mm256_cvtepi32_ps(x); }
/* 4 consecutive bytes broadcast to every 32-bit lane */
static inline vi vibcast4(const void *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
/* acc[lane] += sum of 4 u8 x s8 products. vpmaddubsw saturates its pair sums at 16 bits, so the
 * weights are quantized to [-63, 63] on this target (Target.int8_wmax): 2*255*63 < 32767. */
static inline vi vdot_u8s8(vi acc, vi a, vi w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), _mm256_set1_epi16(1)));
}
/* x (already scaled, |x| <= 127.5) -> round(x) + 128 as bytes, VL of them */
static inline void vstore_u8(uint8_t *p, vf x) {
    __m256i i = _mm256_add_epi32(_mm256_cvtps_epi32(x), _mm256_set1_epi32(128));
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    i = _mm256_shuffle_epi8(i, pick);
    const int32_t lo = _mm256_extract_epi32(i, 0), hi = _mm256_extract_epi32(i, 4);
    memcpy(p, &lo, 4);
    memcpy(p + 4, &hi, 4);
}
/* VL bf16 values (upper halves of fp32) widened to fp32 */
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
