/* All T steps of a multi-level IF neuron in one pass over memory (float32, CPU).
 *
 * The membrane arithmetic of the tensor path of multilevel.py, operation for operation, and the
 * same level (reached without a division, see level_of), so results are equal bit for bit:
 * m = v + x (v - x for the Neg half), k = the exact floor of the real m / lam clamped to
 * [0, levels], out = k * lam, reset by subtraction. With communication only the larger half's
 * level is computed: the other's is 0 (Lemma 4.1, which the tensor path's exchange relies on too).
 * Build with -ffp-contract=off: a multiply-add fused where the source has none would round
 * differently.
 *
 * x and out are [T, B, P] contiguous (out may be x: step t of x is read before it is written);
 * lam and fanout are [P] (fanout may be NULL); spikes and synops are [T], added to; total (NULL:
 * not wanted) is [B, P], the sum of the outputs over the steps, added in float32 from 0 step by step.
 *
 * forms (see multilevel.py): with MEANS_IN, x holds the running means of the currents, and step t's
 * current is (t + 1) * x[t] - t * x[t-1], each product rounded (compensation_kernel.c's step
 * difference, operation for operation); with MEANS_OUT, out gets the running means of the outputs,
 * s[t] / (t + 1) with s the float32 sum from 0 (its running mean). So a compensated op and the
 * neuron beside it exchange running means with the results of per-step values, bit for bit.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 512

enum { UNSIGNED = 0, SIGNED = 1, COMMUNICATE = 2 };
enum { MEANS_IN = 1, MEANS_OUT = 2 };

typedef struct {
    const float *x, *lam;
    const int32_t *fanout, *lut;  /* lut: binary spikes of each level */
    float *out, *total;
    int64_t T, B, P, levels;
    int mode, forms, nibbles;  /* nibbles: lut[k] = lo[k & 15] + hi[k >> 4] for every level */
    uint8_t lo[16], hi[16];
} job_t;

#ifdef __FMA__
static inline int above(float k, float lam, float m) { return fmaf(k, lam, -m) > 0.0f; }
#else  /* k * lam is exact in double: k has at most 16 significant bits, lam 24 */
static inline int above(float k, float lam, float m) { return (double)k * (double)lam > (double)m; }
#endif

/* The exact floor of the real m / lam, clamped to [0, levels]; selects, not branches, so that
 * the loops vectorize; NaN stays NaN.  inv is 1 / lam shrunk by 2^-21 (see run_block), a normal
 * float (the caller keeps lam within 2^-100..2^100): m * inv is below m / lam for m > 0, by less
 * than 2^-20 relative, and the quotient is at most 2^16 where the clamp does not decide, so the
 * truncation is at most one too small, never too large; the exact sign of (k + 1) * lam - m
 * corrects it. (The scalar form also checks k * lam - m, which then never steps down.) */
static inline float level_of(float m, float lam, float inv, float levels) {
    float q = m * inv;
    float c = q < 0.0f ? 0.0f : q;
    float k = truncf(c > levels ? levels : c);
    k = above(k, lam, m) & (k > 0.0f) ? k - 1.0f : k;
    return !above(k + 1.0f, lam, m) & (k < levels) ? k + 1.0f : k;
}

static inline int32_t index_of(float k) { return k == k ? (int32_t)k : 0; }

#if defined(__AVX2__) && defined(__FMA__)
/* level_of on 8 lanes, select for select (NaN stays NaN), with the step up only: the truncated
 * quotient is never too large (see level_of). */
static inline __m256 level8(__m256 m, __m256 lam, __m256 inv, __m256 levels) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 c = _mm256_min_ps(levels, _mm256_max_ps(zero, _mm256_mul_ps(m, inv)));
    const __m256 k = _mm256_round_ps(c, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), k1 = _mm256_add_ps(k, one);
    const __m256 up = _mm256_andnot_ps(_mm256_cmp_ps(_mm256_fmsub_ps(k1, lam, m), zero, _CMP_GT_OQ),
                                       _mm256_cmp_ps(k, levels, _CMP_LT_OQ));
    return _mm256_blendv_ps(k, k1, up);
}

static inline void store_index8(int32_t *dst, __m256 k) {  /* index_of */
    const __m256i valid = _mm256_castps_si256(_mm256_cmp_ps(k, k, _CMP_ORD_Q));
    _mm256_storeu_si256((__m256i *)dst, _mm256_and_si256(_mm256_cvttps_epi32(k), valid));
}

/* One step of run_block's loops for the first n - n % 8 positions, the same operations in the
 * same order; returns how many positions it did. */
static int64_t step8(int mode, const float *x, const float *lam, const float *inv, float levels, float *vp,
                     float *vn, float *out, int32_t *kp, int32_t *kn, int64_t n) {
    const __m256 lv = _mm256_set1_ps(levels);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 xi = _mm256_loadu_ps(x + i), l8 = _mm256_loadu_ps(lam + i), v8 = _mm256_loadu_ps(inv + i);
        const __m256 mp = _mm256_add_ps(_mm256_loadu_ps(vp + i), xi);
        if (mode == COMMUNICATE) {  /* only the larger half can fire (see run_block) */
            const __m256 mn = _mm256_sub_ps(_mm256_loadu_ps(vn + i), xi), pos = _mm256_cmp_ps(mp, mn, _CMP_GE_OQ);
            const __m256 k = level8(_mm256_blendv_ps(mn, mp, pos), l8, v8, lv), mag = _mm256_mul_ps(k, l8);
            const __m256 o = _mm256_blendv_ps(_mm256_sub_ps(_mm256_setzero_ps(), mag), mag, pos);
            store_index8(kp + i, k);
            _mm256_storeu_ps(out + i, o);
            _mm256_storeu_ps(vp + i, _mm256_sub_ps(mp, o));
            _mm256_storeu_ps(vn + i, _mm256_add_ps(mn, o));
            continue;
        }
        const __m256 k = level8(mp, l8, v8, lv);
        const __m256 op = _mm256_mul_ps(k, l8);
        store_index8(kp + i, k);
        if (mode == UNSIGNED) {
            _mm256_storeu_ps(vp + i, _mm256_sub_ps(mp, op));
            _mm256_storeu_ps(out + i, op);
            continue;
        }
        const __m256 mn = _mm256_sub_ps(_mm256_loadu_ps(vn + i), xi), l = level8(mn, l8, v8, lv);
        const __m256 on = _mm256_mul_ps(l, l8), o = _mm256_sub_ps(op, on);
        store_index8(kn + i, l);
        _mm256_storeu_ps(out + i, o);
        _mm256_storeu_ps(vp + i, _mm256_sub_ps(mp, op));
        _mm256_storeu_ps(vn + i, _mm256_sub_ps(mn, on));
    }
    return i;
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__)
/* level8 on 16 lanes (AVX-512: a CPU with 512-bit units, AMD Zen 5 here, does twice the lanes
 * per instruction), the same operations: masks for the selects. */
static inline __m512 level16(__m512 m, __m512 lam, __m512 inv, __m512 levels) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 c = _mm512_min_ps(levels, _mm512_max_ps(zero, _mm512_mul_ps(m, inv)));
    const __m512 k = _mm512_roundscale_ps(c, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 k1 = _mm512_add_ps(k, _mm512_set1_ps(1.0f));
    const __mmask16 up = _mm512_cmp_ps_mask(k, levels, _CMP_LT_OQ)
                         & ~_mm512_cmp_ps_mask(_mm512_fmsub_ps(k1, lam, m), zero, _CMP_GT_OQ);
    return _mm512_mask_blend_ps(up, k, k1);
}

static inline void store_index16(int32_t *dst, __m512 k) {  /* index_of */
    _mm512_storeu_si512(dst, _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(k, k, _CMP_ORD_Q), _mm512_cvttps_epi32(k)));
}

/* step8 on 16 lanes; returns how many positions it did (a multiple of 16). */
static int64_t step16(int mode, const float *x, const float *lam, const float *inv, float levels, float *vp,
                      float *vn, float *out, int32_t *kp, int32_t *kn, int64_t n) {
    const __m512 lv = _mm512_set1_ps(levels), zero = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 xi = _mm512_loadu_ps(x + i), l16 = _mm512_loadu_ps(lam + i), v16 = _mm512_loadu_ps(inv + i);
        const __m512 mp = _mm512_add_ps(_mm512_loadu_ps(vp + i), xi);
        if (mode == COMMUNICATE) {
            const __m512 mn = _mm512_sub_ps(_mm512_loadu_ps(vn + i), xi);
            const __mmask16 pos = _mm512_cmp_ps_mask(mp, mn, _CMP_GE_OQ);
            const __m512 k = level16(_mm512_mask_blend_ps(pos, mn, mp), l16, v16, lv), mag = _mm512_mul_ps(k, l16);
            const __m512 o = _mm512_mask_blend_ps(pos, _mm512_sub_ps(zero, mag), mag);
            store_index16(kp + i, k);
            _mm512_storeu_ps(out + i, o);
            _mm512_storeu_ps(vp + i, _mm512_sub_ps(mp, o));
            _mm512_storeu_ps(vn + i, _mm512_add_ps(mn, o));
            continue;
        }
        const __m512 k = level16(mp, l16, v16, lv), op = _mm512_mul_ps(k, l16);
        store_index16(kp + i, k);
        if (mode == UNSIGNED) {
            _mm512_storeu_ps(vp + i, _mm512_sub_ps(mp, op));
            _mm512_storeu_ps(out + i, op);
            continue;
        }
        const __m512 mn = _mm512_sub_ps(_mm512_loadu_ps(vn + i), xi), l = level16(mn, l16, v16, lv);
        const __m512 on = _mm512_mul_ps(l, l16);
        store_index16(kn + i, l);
        _mm512_storeu_ps(out + i, _mm512_sub_ps(op, on));
        _mm512_storeu_ps(vp + i, _mm512_sub_ps(mp, op));
        _mm512_storeu_ps(vn + i, _mm512_sub_ps(mn, on));
    }
    return i;
}
#endif

/* Adds the binary spikes of levels kp[i] and kn[i] (kn NULL: none) to *s, and the same weighted by f[i] (if any) to
 * *w.  Where the table splits into two 16-entry nibble tables, two in-register byte shuffles per 8
 * positions replace the table gathers, which took 40 % of the kernel's time on an AMD EPYC. */
static void count(const job_t *j, const int32_t *kp, const int32_t *kn, const int32_t *f, int64_t n,
                  int64_t *s, int64_t *w) {
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (j->nibbles) {  /* the AVX2 loop below on 16 lanes; it counts the rest */
        const __m512i lo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)j->lo));
        const __m512i hi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)j->hi));
        const __m512i nibble = _mm512_set1_epi32(15), byte = _mm512_set1_epi32(255);
        __m512i sv = _mm512_setzero_si512(), we = _mm512_setzero_si512(), wo = _mm512_setzero_si512();
        for (; i + 16 <= n; i += 16) {
            __m512i c = _mm512_setzero_si512();
            for (int side = 0; side < (kn ? 2 : 1); side++) {
                __m512i k = _mm512_loadu_si512((side ? kn : kp) + i);
                __m512i bits = _mm512_add_epi32(_mm512_shuffle_epi8(lo, _mm512_and_si512(k, nibble)),
                                                _mm512_shuffle_epi8(hi, _mm512_srli_epi32(k, 4)));
                c = _mm512_add_epi32(c, _mm512_and_si512(bits, byte));
            }
            sv = _mm512_add_epi32(sv, c);
            if (f) {
                __m512i fan = _mm512_loadu_si512(f + i);
                we = _mm512_add_epi64(we, _mm512_mul_epi32(c, fan));
                wo = _mm512_add_epi64(wo, _mm512_mul_epi32(_mm512_srli_epi64(c, 32), _mm512_srli_epi64(fan, 32)));
            }
        }
        *s += _mm512_reduce_add_epi32(sv);
        *w += _mm512_reduce_add_epi64(we) + _mm512_reduce_add_epi64(wo);
    }
#endif
#ifdef __AVX2__
    if (j->nibbles) {
        const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)j->lo));
        const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)j->hi));
        const __m256i nibble = _mm256_set1_epi32(15), byte = _mm256_set1_epi32(255);
        __m256i sv = _mm256_setzero_si256(), we = _mm256_setzero_si256(), wo = _mm256_setzero_si256();
        for (; i + 8 <= n; i += 8) {
            __m256i c = _mm256_setzero_si256();
            for (int side = 0; side < (kn ? 2 : 1); side++) {  /* levels are below 256: bytes 1-3 of each lane are 0 */
                __m256i k = _mm256_loadu_si256((const __m256i *)((side ? kn : kp) + i));
                __m256i bits = _mm256_add_epi32(_mm256_shuffle_epi8(lo, _mm256_and_si256(k, nibble)),
                                                _mm256_shuffle_epi8(hi, _mm256_srli_epi32(k, 4)));
                c = _mm256_add_epi32(c, _mm256_and_si256(bits, byte));
            }
            sv = _mm256_add_epi32(sv, c);  /* at most 2 * 255 * BLOCK / 8 per lane */
            if (f) {  /* exact 64-bit products of the even, then the odd lanes */
                __m256i fan = _mm256_loadu_si256((const __m256i *)(f + i));
                we = _mm256_add_epi64(we, _mm256_mul_epi32(c, fan));
                wo = _mm256_add_epi64(wo, _mm256_mul_epi32(_mm256_srli_epi64(c, 32), _mm256_srli_epi64(fan, 32)));
            }
        }
        int32_t sl[8];
        int64_t wl[8];
        _mm256_storeu_si256((__m256i *)sl, sv);
        _mm256_storeu_si256((__m256i *)wl, we);
        _mm256_storeu_si256((__m256i *)(wl + 4), wo);
        for (int q = 0; q < 8; q++) *s += sl[q], *w += wl[q];
    }
#endif
    for (; i < n; i++) {
        int32_t c = j->lut[kp[i]] + (kn ? j->lut[kn[i]] : 0);
        *s += c;
        if (f) *w += (int64_t)c * f[i];
    }
}

static void run_block(const job_t *j, int64_t b, int64_t p0, int64_t n, double *spikes, double *synops) {
    float vp[BLOCK], vn[BLOCK], inv[BLOCK], sum[BLOCK], scaled[BLOCK], current[BLOCK];
    int32_t kp[BLOCK], kn[BLOCK];
    const float *lam = j->lam + p0;
    const float levels = (float)j->levels;
    for (int64_t i = 0; i < n; i++) {
        vp[i] = vn[i] = lam[i] * 0.5f;  /* eq. 13 */
        inv[i] = 1.0f / lam[i] * (1.0f - 0x1p-21f);  /* below 1 / lam: see level_of */
        sum[i] = scaled[i] = 0.0f;
    }
    const int sums = j->total || (j->forms & MEANS_OUT);
    for (int64_t t = 0; t < j->T; t++) {
        const int64_t row = (t * j->B + b) * j->P + p0;
        const float *x = j->x + row, steps = (float)(t + 1);
        float *out = j->out + row;
        for (int64_t i = 0; i < n && t + 1 < j->T; i += 16)  /* the next step's inputs: far away */
            __builtin_prefetch(x + j->B * j->P + i);
        if (j->forms & MEANS_IN) {  /* read before out (which may be x) is written; 1 * x - 0 is x */
            for (int64_t i = 0; i < n; i++) {
                const float s = x[i] * steps;
                current[i] = s - scaled[i];
                scaled[i] = s;
            }
            x = current;
        }
        int64_t i0 = 0;  /* positions done 16, then 8 at a time; the loops below do the rest */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__)
        i0 = step16(j->mode, x, lam, inv, levels, vp, vn, out, kp, kn, n);
#endif
#if defined(__AVX2__) && defined(__FMA__)
        i0 += step8(j->mode, x + i0, lam + i0, inv + i0, levels, vp + i0, vn + i0, out + i0, kp + i0, kn + i0, n - i0);
#endif
        if (j->mode == UNSIGNED) {
            for (int64_t i = i0; i < n; i++) {
                float m = vp[i] + x[i], k = level_of(m, lam[i], inv[i], levels), o = k * lam[i];
                vp[i] = m - o; out[i] = o; kp[i] = index_of(k);
            }
        } else if (j->mode == SIGNED) {
            for (int64_t i = i0; i < n; i++) {
                float mp = vp[i] + x[i], k = level_of(mp, lam[i], inv[i], levels), op = k * lam[i];
                float mn = vn[i] - x[i], l = level_of(mn, lam[i], inv[i], levels), on = l * lam[i];
                vp[i] = mp - op; vn[i] = mn - on; out[i] = op - on; kp[i] = index_of(k); kn[i] = index_of(l);
            }
        } else {  /* eq. 21: both halves reset by the net output (see multilevel.py). With it
                   * v_P + v_N = lam (Lemma 4.1), so m_P + m_N = lam and the smaller half is below lam:
                   * its level is 0, and only the larger half's is computed (out = 0 - its output on
                   * the Neg side, as op - on gives it; the spikes are that level's). */
            for (int64_t i = i0; i < n; i++) {
                float mp = vp[i] + x[i], mn = vn[i] - x[i];
                int pos = mp >= mn;
                float k = level_of(pos ? mp : mn, lam[i], inv[i], levels), mag = k * lam[i];
                float o = pos ? mag : 0.0f - mag;
                vp[i] = mp - o; vn[i] = mn + o; out[i] = o; kp[i] = index_of(k);
            }
        }
        for (int64_t i = 0; i < n && sums; i++) sum[i] += out[i];  /* (out is still in L1) */
        for (int64_t i = 0; i < n && (j->forms & MEANS_OUT); i++) out[i] = sum[i] / steps;
        int64_t s = 0, w = 0;  /* integers: exact in any order, so equal to the tensor path's sums */
        count(j, kp, j->mode == SIGNED ? kn : NULL, j->fanout ? j->fanout + p0 : NULL, n, &s, &w);
        spikes[t] += (double)s;
        synops[t] += (double)w;
    }
    for (int64_t i = 0; i < n && j->total; i++) j->total[b * j->P + p0 + i] = sum[i];
}

/* Work items are (sample, block of BLOCK positions), shared out by OpenMP: compiled with
 * -fopenmp after torch is loaded, this is torch's own libgomp and thread pool, whose workers are
 * still spinning from the last torch op (threads of our own would fight them for the cores). */
void hmt_neuron_forward(const float *x, float *out, float *total, int64_t T, int64_t B, int64_t P,
                        const float *lam, const int32_t *fanout, const int32_t *lut, int64_t levels, int mode,
                        int forms, int threads, double *spikes, double *synops) {
    job_t j = {x, lam, fanout, lut, out, total, T, B, P, levels, mode, forms, levels < 256};
    for (int q = 0; q < 16 && j.nibbles; q++) {  /* the split, and bytes that hold it */
        j.lo[q] = (uint8_t)(q <= levels ? lut[q] : 0);
        j.hi[q] = (uint8_t)(16 * q <= levels ? lut[16 * q] - lut[0] : 0);
    }
    for (int64_t k = 0; k <= levels && j.nibbles; k++)
        j.nibbles = lut[k] >= 0 && lut[k] < 256 && lut[k] == j.lo[k & 15] + j.hi[k >> 4];
    const int64_t blocks = (P + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : spikes[:T], synops[:T])
    for (int64_t item = 0; item < B * blocks; item++) {
        const int64_t p0 = (item % blocks) * BLOCK;
        run_block(&j, item / blocks, p0, P - p0 < BLOCK ? P - p0 : BLOCK, spikes, synops);
    }
}
