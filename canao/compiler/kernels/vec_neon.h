/* Vector layer for AArch64 NEON (ARMv8.2-A + dotprod): 4 fp32 lanes. Same names as vec_avx2.h. */
#include <arm_neon.h>
#include <stdint.h>
#include <string.h>

#define VL 4
typedef float32x4_t vf;

static inline vf vzero(void) { return vdupq_n_f32(0.0f); }
static inline vf vset1(float x) { return vdupq_n_f32(x); }
static inline vf vload(const float *p) { return vld1q_f32(p); }
static inline void vstore(float *p, vf v) { vst1q_f32(p, v); }
static inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
static inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
static inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }  /* a*b + c, fused */
static inline vf vabs(vf a) { return vabsq_f32(a); }
/* lanes where a > b keep x, others become 0 */
static inline vf vkeep_gt(vf x, vf a, vf b) {
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(x), vcgtq_f32(a, b)));
}
static inline vf vpow2i(vf n) {  /* 2^n for integral n in the normal range */
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vreinterpretq_f32_s32(e);
}
static inline vf vround(vf x) { return vrndnq_f32(x); }  /* nearest, ties to even (as _MM_FROUND_TO_NEAREST_INT) */

/* the first n lanes (n <= VL); the rest read as 0 and are never written. NEON has no masked
 * loads: a partial vector goes through a small stack buffer, so nothing past p[n-1] is touched. */
static inline vf vload_n(const float *p, int n) {
    if (n >= VL) return vload(p);
    float t[VL] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < n; i++) t[i] = p[i];
    return vld1q_f32(t);
}
/* n (<= VL) fp16 values as fp32 lanes, the rest 0 */
static inline vf vload_h_n(const uint16_t *p, int n) {
    if (n >= VL) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
    uint16_t t[VL] = {0};
    memcpy(t, p, (size_t)n * 2);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(t)));
}
static inline void vstore_n(float *p, vf v, int n) {
    if (n >= VL) { vstore(p, v); return; }
    float t[VL];
    vst1q_f32(t, v);
    for (int i = 0; i < n; i++) p[i] = t[i];
}
static inline vf vfirst_n(vf v, int n) {
    if (n >= VL) return v;
    static const uint32_t bits[2 * VL] = {~0u, ~0u, ~0u, ~0u, 0, 0, 0, 0};
    const int k = n < 0 ? 0 : n;
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), vld1q_u32(bits + VL - k)));
}
static inline float vhsum(vf v) { return vaddvq_f32(v); }
/* the sums of a, b, c and d into out[0..3] (pairwise adds: lane i = the sum of the i-th input) */
static inline void vhsum4(vf a, vf b, vf c, vf d, float *out) {
    vst1q_f32(out, vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d)));
}
static inline float vhmax(vf v) { return vmaxvq_f32(v); }

/* ---- integer and bf16 layer (int8 and bf16 GEMMs) ---------------------------------- */
/* sdot multiplies signed bytes by signed bytes, so the int8 activations are stored as s8 with no
 * offset (the x86 layers add 128 for vpmaddubsw's unsigned operand and subtract the weights' column
 * sums afterwards; here those sums are 0: Target("aarch64").int8_act_offset). */
#define CANAO_ACT_OFFSET 0
typedef int32x4_t vi;
static inline vi vizero(void) { return vdupq_n_s32(0); }
static inline vi viload(const void *p) { return vld1q_s32((const int32_t *)p); }
static inline vi viload_n(const int32_t *p, int n) {
    if (n >= VL) return viload(p);
    int32_t t[VL] = {0, 0, 0, 0};
    for (int i = 0; i < n; i++) t[i] = p[i];
    return vld1q_s32(t);
}
static inline vi visub(vi a, vi b) { return vsubq_s32(a, b); }
static inline vf vcvt_i32(vi x) { return vcvtq_f32_s32(x); }
/* 4 consecutive bytes broadcast to every 32-bit lane */
static inline vi vibcast4(const void *p) { int32_t v; memcpy(&v, p, 4); return vdupq_n_s32(v); }
/* acc[lane] += sum of 4 s8 x s8 products (sdot): activations a (s8, CANAO_ACT_OFFSET = 0), weights w,
 * no intermediate saturation, so the weights use the full [-127, 127] (Target.int8_wmax) */
static inline vi vdot_u8s8(vi acc, vi a, vi w) {
    return vdotq_s32(acc, vreinterpretq_s8_s32(a), vreinterpretq_s8_s32(w));
}
/* x (already scaled, |x| <= 127.5) -> round(x) + CANAO_ACT_OFFSET as bytes, VL of them */
static inline void vstore_u8(uint8_t *p, vf x) {
    const int16x4_t h = vqmovn_s32(vaddq_s32(vcvtnq_s32_f32(x), vdupq_n_s32(CANAO_ACT_OFFSET)));
    const int8x8_t b = vqmovn_s16(vcombine_s16(h, h));
    const int32_t v = vget_lane_s32(vreinterpret_s32_s8(b), 0);
    memcpy(p, &v, 4);
}
/* VL bf16 values (upper halves of fp32) widened to fp32 */
static inline vf vload_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
