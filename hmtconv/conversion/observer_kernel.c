/* One calibration batch into ActivationObserver's statistics (float32 in, CPU), in two passes.
 *
 * x is [outer, C, inner] contiguous (channel dim 1 of conv activations, the last dim of tokens).
 * Channels are shared out in blocks of about 16 floats of one row (a cache line) by OpenMP
 * (torch's own pool, see cpu_kernel.c); each block walks the rows in memory order.
 *
 * hmt_observe_batch: per channel, the sums of (x - shift) and (x - shift)^2 in double, shift being
 * one of the channel's own values (so M2 = s2 - s1^2 / n cancels little), and the largest
 * output (|x| or relu(x)); then Chan's merge into the observer's float64 buffers, per channel and
 * for the layer.  Equal to the tensor path's float64 var_mean to rounding, not bit for bit.
 *
 * hmt_histogram_add: bins of the log2 of the output activation, the tensor path's arithmetic
 * operation for operation (float32, no fused multiply-add: build with -ffp-contract=off), so the
 * counts are equal: bin = clamp(floor((log2v - min_exp) * bins_per_octave), -1, bins - 2) + 1,
 * added to hist_channel[c] (NULL: none) and to hist_layer; scratch is [threads, bins] zeros.
 * Bins are computed for up to 64 rows of a block first (the loop vectorizes), then counted: in
 * one loop the counts' read-modify-writes held up the arithmetic (2.3-3.4 ns a value, now 1-1.7).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 8  /* independent partial sums: the adds pipeline without reassociation */
#define WIDTH 16  /* channels of a block when rows are short: 16 floats, a cache line */

/* Sums of (x - sh) and (x - sh)^2 and the largest output over one row of a channel; the output
 * raised to at least floor written to clamped (the histograms' input). */
static void channel_row(const float *v, int64_t n, float sh, int is_signed, float floor, float *restrict clamped,
                        double *s1, double *s2, float *mx) {
    double a[LANES] = {0}, b[LANES] = {0};
    float m[LANES];
    for (int l = 0; l < LANES; l++) m[l] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        for (int l = 0; l < LANES; l++) {
            const float x = v[i + l], o = is_signed ? fabsf(x) : x;
            const double d = (double)x - (double)sh;
            a[l] += d;
            b[l] += d * d;
            m[l] = o > m[l] ? o : m[l];
            clamped[i + l] = o > floor ? o : floor;
        }
    }
    for (; i < n; i++) {
        const float x = v[i], o = is_signed ? fabsf(x) : x;
        const double d = (double)x - (double)sh;
        a[0] += d;
        b[0] += d * d;
        m[0] = o > m[0] ? o : m[0];
        clamped[i] = o > floor ? o : floor;
    }
    for (int l = 0; l < LANES; l++) {
        *s1 += a[l];
        *s2 += b[l];
        *mx = m[l] > *mx ? m[l] : *mx;
    }
}

static inline int64_t block_width(int64_t inner) { return inner >= WIDTH ? 1 : (WIDTH + inner - 1) / inner; }

/* This batch's count-free moments of each channel: mean, M2 and the largest output (clamped at
 * 0 for ReLU sites: the maximum of relu(x)); and every output raised to at least floor, in clamped
 * (x's layout). */
static void batch_moments(const float *restrict x, int64_t outer, int64_t C, int64_t inner, int is_signed,
                          float floor, float *restrict clamped, int threads, double *restrict mean,
                          double *restrict m2, double *restrict top) {
    const int64_t width = block_width(inner), blocks = (C + width - 1) / width;
    const double rows = (double)(outer * inner);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t c0 = blk * width, c1 = c0 + width < C ? c0 + width : C;
        double s1[WIDTH] = {0}, s2[WIDTH] = {0};
        float sh[WIDTH], mx[WIDTH];
        for (int64_t c = c0; c < c1; c++) {
            sh[c - c0] = x[c * inner];  /* one of the channel's own values */
            mx[c - c0] = -INFINITY;
        }
        for (int64_t o = 0; o < outer; o++) {
            if (inner == 1) {  /* tokens and [B, C]: the channels are the lanes */
                const float *row = x + o * C + c0;
                float *dst = clamped + o * C + c0;
                for (int64_t c = 0; c < c1 - c0; c++) {
                    const float v = row[c], out = is_signed ? fabsf(v) : v;
                    const double d = (double)v - (double)sh[c];
                    s1[c] += d;
                    s2[c] += d * d;
                    mx[c] = out > mx[c] ? out : mx[c];
                    dst[c] = out > floor ? out : floor;
                }
            } else {
                for (int64_t c = c0; c < c1; c++)
                    channel_row(x + (o * C + c) * inner, inner, sh[c - c0], is_signed, floor,
                                clamped + (o * C + c) * inner, s1 + (c - c0), s2 + (c - c0), mx + (c - c0));
            }
        }
        for (int64_t c = c0; c < c1; c++) {
            const int64_t k = c - c0;
            const double spread = s2[k] - s1[k] * s1[k] / rows;
            mean[c] = (double)sh[k] + s1[k] / rows;
            m2[c] = spread < 0.0 ? 0.0 : spread;  /* NaN stays NaN */
            top[c] = is_signed || mx[k] > 0.0f ? (double)mx[k] : 0.0;
        }
    }
}

/* Chan et al.'s pairwise update of (count, mean, M2) and the running maximum, as
 * ActivationObserver._merge_moments does it. */
static void merge(double n_b, double mean_b, double m2_b, double max_b, double *count, double *mean, double *m2,
                  double *max) {
    const double n_a = *count, n = n_a + n_b, delta = mean_b - *mean;
    *mean = *mean + delta * (n_b / n);
    *m2 = *m2 + m2_b + delta * delta * (n_a * n_b / n);
    *count = n;
    *max = max_b > *max ? max_b : *max;
}

/* One batch merged into the per-channel and per-layer (count, mean, M2, max) of an observer, and
 * its outputs raised to at least floor written to clamped, [outer, C, inner] like x (the
 * histograms take their log2: max(|x|, floor) or max(x, floor), exact, so equal to torch's abs and
 * clamp); returns 1, merging nothing, when x holds NaN or inf.  scratch is [3 * C] doubles. */
int hmt_observe_batch(const float *restrict x, int64_t outer, int64_t C, int64_t inner, int is_signed,
                      float floor, float *restrict clamped, int threads, double *restrict scratch,
                      double *count, double *mean, double *m2, double *max, double *ch_count, double *ch_mean,
                      double *ch_m2, double *ch_max) {
    double *b_mean = scratch, *b_m2 = scratch + C, *b_max = scratch + 2 * C;
    batch_moments(x, outer, C, inner, is_signed, floor, clamped, threads, b_mean, b_m2, b_max);
    for (int64_t c = 0; c < C; c++)
        if (!isfinite(b_m2[c]) || !isfinite(b_mean[c])) return 1;
    /* the layer's moments follow from the channels' (every channel has the same count) */
    const double rows = (double)(outer * inner);
    double sum = 0.0, within = 0.0, between = 0.0, top = -INFINITY;
    for (int64_t c = 0; c < C; c++) sum += b_mean[c];
    const double layer_mean = sum / (double)C;
    for (int64_t c = 0; c < C; c++) {
        const double d = b_mean[c] - layer_mean;
        within += b_m2[c];
        between += d * d;
        top = b_max[c] > top ? b_max[c] : top;
    }
    merge(rows * (double)C, layer_mean, within + rows * between, top, count, mean, m2, max);
    for (int64_t c = 0; c < C; c++)
        merge(rows, b_mean[c], b_m2[c], b_max[c], ch_count + c, ch_mean + c, ch_m2 + c, ch_max + c);
    return 0;
}

/* Selects, not branches (the tensors' zeros would make a branch a coin toss), and no fminf/fmaxf
 * (library calls for their NaN rules; the values here are finite). */
static inline int32_t bin_of(float v, float min_exp, float bpo, float top) {
    float p = floorf((v - min_exp) * bpo);
    p = p < -1.0f ? -1.0f : p;
    p = p > top ? top : p;
    return (int32_t)p + 1;
}

void hmt_histogram_add(const float *restrict log2v, int64_t outer, int64_t C, int64_t inner, float min_exp,
                       float bins_per_octave, int64_t bins, int threads, int64_t *hist_channel,
                       int64_t *restrict hist_layer, int64_t *restrict scratch) {
    const float top = (float)(bins - 2);
    const int64_t width = block_width(inner), blocks = (C + width - 1) / width;
    #pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int64_t *layer = scratch + omp_get_thread_num() * bins;  /* this thread's share of the layer's counts */
#else
        int64_t *layer = scratch;
#endif
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t c0 = blk * width, c1 = c0 + width < C ? c0 + width : C;
            int32_t k[WIDTH * 64];  /* bins of up to 64 rows of the block, computed 8 at a time */
            if (inner == 1) {  /* tokens: a row of the block is c1 - c0 channels */
                const int64_t w = c1 - c0;
                for (int64_t o0 = 0; o0 < outer; o0 += 64) {
                    const int64_t rows = outer - o0 < 64 ? outer - o0 : 64;
                    for (int64_t r = 0; r < rows; r++)
                        for (int64_t c = 0; c < w; c++)
                            k[r * w + c] = bin_of(log2v[(o0 + r) * C + c0 + c], min_exp, bins_per_octave, top);
                    for (int64_t r = 0; r < rows; r++)
                        for (int64_t c = 0; c < w; c++) {
                            layer[k[r * w + c]]++;
                            if (hist_channel) hist_channel[(c0 + c) * bins + k[r * w + c]]++;
                        }
                }
            } else {
                for (int64_t o = 0; o < outer; o++)
                    for (int64_t c = c0; c < c1; c++) {
                        const float *v = log2v + (o * C + c) * inner;
                        int64_t *channel = hist_channel ? hist_channel + c * bins : NULL;
                        for (int64_t i0 = 0; i0 < inner; i0 += WIDTH * 64) {
                            const int64_t n = inner - i0 < WIDTH * 64 ? inner - i0 : WIDTH * 64;
                            for (int64_t i = 0; i < n; i++) k[i] = bin_of(v[i0 + i], min_exp, bins_per_octave, top);
                            for (int64_t i = 0; i < n; i++) {
                                layer[k[i]]++;
                                if (channel) channel[k[i]]++;
                            }
                        }
                    }
            }
        }
    }
    for (int64_t t = 0; t < threads; t++)
        for (int64_t k = 0; k < bins; k++) hist_layer[k] += scratch[t * bins + k];
}
