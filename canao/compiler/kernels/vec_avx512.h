/* Vector layer for AVX-512 (F/BW/VL/DQ): 16 fp32 lanes. Same names as vec_avx2.h. */
#include <immintrin.h>
#include <stdint.h>

#define VL 16
typedef __m512 vf;

static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline vf vkeep_gt(vf x, vf a, vf b) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), x); }
static inline vf vpow2i(vf n) {
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(e);
}
static inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

static inline __mmask16 vtail_mask(int n) { return n >= VL ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
static inline vf vload_n(const float *p, int n) { return n >= VL ? vload(p) : _mm512_maskz_loadu_ps(vtail_mask(n), p); }
static inline void vstore_n(float *p, vf v, int n) { if (n >= VL) vstore(p, v); else _mm512_mask_storeu_ps(p, vtail_mask(n), v); }
/* n (<= VL) fp16 values as fp32 lanes, the rest 0 */
static inline vf vload_h_n(const uint16_t *p, int n) {
    return _mm512_cvtph_ps(n >= VL ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(vtail_mask(n), p));
}
static inline vf vfirst_n(vf v, int n) { return n >= VL ? v : _mm512_maskz_mov_ps(vtail_mask(n), v); }
static inline float vhsum(vf v) { return _mm512_reduce_add_ps(v); }
/* the sums of a, b, c and d into out[0..3] */
static inline void vhsum4(vf a, vf b, vf c, vf d, float *out) {
    out[0] = _mm512_reduce_add_ps(a); out[1] = _mm512_reduce_add_ps(b);
    out[2] = _mm512_reduce_add_ps(c); out[3] = _mm512_reduce_add_ps(d);
}
static inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }

/* ---- integer and bf16 layer (int8 and bf16 GEMMs) ---------------------------------- */
#include <stdint.h>
#include <string.h>
typedef __m512i vi;
static inline vi vizero(void) { return _mm512_setzero_si512(); }
static inline vi viload(const void *p) { return _mm512_loadu_si512(p); }
static inline vi viload_n(const int32_t *p, int n) { return n >= VL ? viload(p) : _mm512_maskz_loadu_epi32(vtail_mask(n), p); }
static inline vi visub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
static inline vf vcvt_i32(vi x) { return _mm512_cvtepi32_ps(x); }
static inline vi vibcast4(const void *p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
#ifdef __AVX512VNNI__
/* acc[lane] += sum of 4 u8 x s8 products, in one instruction (vpdpbusd), no saturation */
static inline vi vdot_u8s8(vi acc, vi a, vi w) { return _mm512_dpbusd_epi32(acc, a, w); }
#else
static inline vi vdot_u8s8(vi acc, vi a, vi w) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, w), _mm512_set1_epi16(1)));
}
#endif
static inline void vstore_u8(uint8_t *p, vf x) {
    const __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(x), _mm512_set1_epi32(128));
    _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(i));
}
static inline vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#ifdef __AVX512BF16__
/* acc += a[2k] * w[2k] + a[2k+1] * w[2k+1] per lane (vdpbf16ps); a is a broadcast bf16 pair */
static inline vf vdot_bf16(vf acc, vi a, vi w) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)w); }
#endif
