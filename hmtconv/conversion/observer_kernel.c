/* One calibration batch into ActivationObserver's statistics (float32 in, CPU), in one pass over x.
 *
 * x is [outer, C, inner] (channel dim 1 of conv activations, the last dim of tokens): runs of inner
 * values, channels inner apart, rows stride apart (more than C * inner for the heads of attention:
 * views of a projection that holds several, read in place). Channels are shared out in blocks of
 * about 16 floats of one row (a cache line) by OpenMP (torch's own pool, see cpu_kernel.c); a block
 * gathers a chunk of up to 1,024 values (64 rows of 16 token channels, or runs of one channel)
 * and runs three tight loops over the chunk while it sits in L1:
 *
 * - moments: per channel, the sums of (x - shift) and (x - shift)^2 in double, shift being one of
 *   the channel's own values (so M2 = s2 - s1^2 / n cancels little), and the largest output (|x|
 *   or relu(x)); after the pass, Chan's merge into the observer's float64 buffers, per channel and
 *   for the layer. Equal to the tensor path's float64 var_mean to rounding, not bit for bit.
 * - bins of the output: the number of bin edges 2**(min_exp + k / bpo) at or below it, read from
 *   its bits (no log2 library call): its octave from the exponent field, then its place among the
 *   octave's edges from the mantissa (see bins_of; exact: edge[j], the mantissa of the smallest
 *   float32 at or above 2**(j / bpo), the same in every octave, and lut[m >> 11], how many of them
 *   lie at or below the start of m's 1/4096 of the octave, which holds at most one more). Exactly
 *   the tensor path's bucketize against the float32 edges (histograms.py), on every CPU.
 * - counts: into hist_channel[c], or, without per-channel histograms (NULL), into this thread's
 *   share of the layer's histogram (with them, the layer's counts are their sum: each value is
 *   counted once). An observer without histograms (both NULL) skips bins and counts.
 *
 * A batch holding NaN or inf is counted out again and merges nothing.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define WIDTH 16  /* channels of a block when rows are short: 16 floats, a cache line */
#define CHUNK (WIDTH * 64)  /* values binned before they are counted */

typedef struct {
    int64_t outer, C, inner, stride;  /* x[o * stride + c * inner + i] */
    int is_signed;
    int32_t octave0, bpo, last;  /* 127 + min_exp: the exponent field of bin 1; bins per octave; bins - 1 */
    const int32_t *edge, *lut;  /* [bpo + 1], edge[bpo] = 2**23; [4096] */
} Layout;

static inline float output_of(float x, int is_signed) { return is_signed ? fabsf(x) : (x > 0.0f ? x : 0.0f); }

/* The bin's place in its octave from the mantissa m, exactly: how many of the octave's edges lie
 * at or below it (edge[j] and lut as in the header). */
static inline int32_t place_in_octave(int32_t m, const int32_t *restrict edge, const int32_t *restrict lut) {
    const int32_t j = lut[m >> 11];
    return j + (m >= edge[j + 1]);
}

/* log2 of a mantissa value m = 1 + f in [1, 2), a degree-6 polynomial of f fitted for the smallest
 * largest error: within 2.2e-6 of log2 in float32 (the test runs every mantissa through the kernel). */
static inline float log2_mantissa(float f) {
    return f * (1.4425531626f + f * (-0.7182822824f + f * (0.4582728744f + f * (-0.2795429528f + f * (
        0.1234564409f + f * -0.0264593214f)))));
}

/* A bin from its octave and place: <= 0 below 2**min_exp (zeros and subnormals too), the last
 * bin from its edge up. */
static inline int32_t clamp_bin(int32_t b, int32_t last) {
    b = b < 0 ? 0 : b;
    return b > last ? last : b;
}

/* Bins of n outputs of v into k. The place in the octave comes from log2_mantissa (a loop that
 * vectorizes) wherever that is more than eps = bpo * 2^-18 of a bin from an edge (1/256 at the
 * finest 1,024 bins an octave), which its error cannot cross (at most 2.2e-6 * bpo bins, and the
 * float32 rounding of the place, 2^-24 * bpo), and from the exact lookup (edge, lut) for the few
 * values nearer than that (2 * eps of a bin's values: 1 in 4,096 at 32 bins an octave) and exact
 * powers of 2. */
static void bins_of(const float *restrict v, int64_t n, const Layout *L, int32_t *restrict k) {
    const int32_t *restrict edge = L->edge, *restrict lut = L->lut;
    const int32_t octave0 = L->octave0, bpo = L->bpo, last = L->last;
    const int is_signed = L->is_signed;
    const float per_octave = (float)bpo, eps = per_octave * 0x1p-18f;
    uint8_t near[CHUNK + 8];
    int32_t nears = 0;
    for (int64_t i = 0; i < n; i++) {
        const float o = output_of(v[i], is_signed);
        uint32_t bits, mb;
        float m;
        memcpy(&bits, &o, sizeof bits);
        mb = (bits & 0x7fffff) | 0x3f800000;  /* the mantissa as a float in [1, 2) */
        memcpy(&m, &mb, sizeof m);
        const float s = log2_mantissa(m - 1.0f) * per_octave;
        const int32_t j = (int32_t)s, octave = (int32_t)(bits >> 23) - octave0;
        const float frac = s - (float)j;
        near[i] = ((frac < eps) | (frac > 1.0f - eps)) & (octave >= -1);  /* below 2**(min_exp - 1): bin 0 anyway */
        nears += near[i];
        k[i] = clamp_bin(octave * bpo + j + 1, last);
    }
    memset(near + n, 0, 8);
    for (int64_t i0 = 0; i0 < n && nears; i0 += 8) {  /* (until the last near value) */
        uint64_t any;
        memcpy(&any, near + i0, sizeof any);
        if (!any) continue;
        for (int64_t i = i0; i < i0 + 8 && i < n; i++)
            if (near[i]) {
                nears--;
                const float o = output_of(v[i], is_signed);
                uint32_t bits;
                memcpy(&bits, &o, sizeof bits);
                const int32_t octave = (int32_t)(bits >> 23) - octave0;
                k[i] = clamp_bin(octave * bpo + place_in_octave(bits & 0x7fffff, edge, lut) + 1, last);
            }
    }
}

/* Per lane c < w, over rows r: the sums of (x - sh[c]) and (x - sh[c])^2 and the largest output
 * of the values x[r * stride + c], each copied to copy[r * w + c] unless copy is NULL. Lanes are a
 * block's channels (tokens), or a stretch of one channel read as rows of WIDTH (the loop over
 * lanes vectorizes, with no reassociation). */
static inline __attribute__((always_inline)) void lane_moments(const float *restrict x, int64_t rows, int64_t stride,
                                                               int64_t w, const float *restrict sh, int is_signed,
                                                               double *restrict s1, double *restrict s2,
                                                               float *restrict mx, float *restrict copy) {
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict row = x + r * stride;
        for (int64_t c = 0; c < w; c++) {
            const float o = output_of(row[c], is_signed);
            const double d = (double)row[c] - (double)sh[c];
            s1[c] += d;
            s2[c] += d * d;
            mx[c] = o > mx[c] ? o : mx[c];
            if (copy) copy[r * w + c] = row[c];
        }
    }
}

/* The same sums over n values v of one channel (shift sh), added into s1, s2, mx. */
static void channel_moments(const float *v, int64_t n, float sh, int is_signed, double *s1, double *s2, float *mx) {
    double a[WIDTH] = {0}, b[WIDTH] = {0};
    float m[WIDTH], shift[WIDTH];
    for (int l = 0; l < WIDTH; l++) {
        m[l] = -INFINITY;
        shift[l] = sh;
    }
    lane_moments(v, n / WIDTH, WIDTH, WIDTH, shift, is_signed, a, b, m, NULL);
    lane_moments(v + n / WIDTH * WIDTH, 1, 0, n % WIDTH, shift, is_signed, a, b, m, NULL);
    for (int l = 0; l < WIDTH; l++) {
        *s1 += a[l];
        *s2 += b[l];
        *mx = m[l] > *mx ? m[l] : *mx;
    }
}

/* Adds step to h[k[j]] for j < n; where parts ([3][bins]) is given, values go round-robin to h
 * and the three parts (fold_parts adds them into h later): a run of one bin (a ReLU's zeros,
 * near-equal probabilities) then makes four chains of increments, not one waiting on each of
 * its own stores. */
static void add_counts(int64_t *restrict h, const int32_t *restrict k, int64_t n, int64_t step, int64_t bins,
                       int64_t *restrict parts) {
    int64_t j = 0;
    if (parts)
        for (; j + 4 <= n; j += 4) {
            h[k[j]] += step;
            parts[k[j + 1]] += step;
            parts[bins + k[j + 2]] += step;
            parts[2 * bins + k[j + 3]] += step;
        }
    for (; j < n; j++) h[k[j]] += step;
}

/* h += the three parts of add_counts, which are left zero. */
static void fold_parts(int64_t *restrict h, int64_t *restrict parts, int64_t bins) {
    for (int64_t b = 0; b < bins; b++) {
        h[b] += parts[b] + parts[bins + b] + parts[2 * bins + b];
        parts[b] = parts[bins + b] = parts[2 * bins + b] = 0;
    }
}

static inline int64_t block_width(int64_t inner) { return inner >= WIDTH ? 1 : (WIDTH + inner - 1) / inner; }

/* Channels c0..c1 of x: moments into s1, s2, mx (indexed from c0) and counts times step (+1, or -1
 * to take a batch back out) into hist_channel, or layer where that is NULL (both NULL: no counts). */
static void block_pass(const float *restrict x, const Layout *L, int64_t c0, int64_t c1, int64_t step, double *s1,
                       double *s2, float *sh, float *mx, int64_t *hist_channel, int64_t *restrict layer,
                       int64_t *parts) {
    const int64_t inner = L->inner, stride = L->stride, bins = L->last + 1;
    const int counting = hist_channel || layer;
    int32_t k[CHUNK];
    float tile[CHUNK];  /* the values binned next, side by side */
    if (inner == 1) {  /* tokens and [B, C]: the channels are the lanes of a row */
        const int64_t w = c1 - c0;
        for (int64_t o0 = 0; o0 < L->outer; o0 += 64) {
            const int64_t rows = L->outer - o0 < 64 ? L->outer - o0 : 64;
            for (int64_t r = o0 + 64; r < o0 + 128 && r < L->outer; r++)  /* the next rows: a line each */
                __builtin_prefetch(x + r * stride + c0);
            float *copy = counting ? tile : NULL;
            if (w == WIDTH)  /* a constant width: the sums stay in registers */
                lane_moments(x + o0 * stride + c0, rows, stride, WIDTH, sh, L->is_signed, s1, s2, mx, copy);
            else
                lane_moments(x + o0 * stride + c0, rows, stride, w, sh, L->is_signed, s1, s2, mx, copy);
            if (!counting) continue;
            bins_of(tile, rows * w, L, k);
            if (hist_channel) {
                int64_t *h[WIDTH];
                for (int64_t c = 0; c < w; c++) h[c] = hist_channel + (c0 + c) * bins;
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t c = 0; c < w; c++) h[c][k[r * w + c]] += step;
            } else
                add_counts(layer, k, rows * w, step, bins, parts);
        }
        if (layer && parts) fold_parts(layer, parts, bins);
        return;
    }
    for (int64_t c = c0; c < c1; c++) {  /* a channel's runs of inner values, gathered CHUNK at a time */
        int64_t *channel = hist_channel ? hist_channel + c * bins : NULL;
        int64_t n = 0;
        for (int64_t o = 0; o < L->outer; o++)
            for (int64_t i = 0; i < inner;) {
                const int64_t take = inner - i < CHUNK - n ? inner - i : CHUNK - n;
                memcpy(tile + n, x + o * stride + c * inner + i, (size_t)take * sizeof *tile);
                n += take;
                i += take;
                if (n < CHUNK && (i < inner || o + 1 < L->outer)) continue;
                channel_moments(tile, n, sh[c - c0], L->is_signed, s1 + (c - c0), s2 + (c - c0), mx + (c - c0));
                if (counting) {
                    bins_of(tile, n, L, k);
                    add_counts(channel ? channel : layer, k, n, step, bins, parts);
                }
                n = 0;
            }
        if (counting && parts) fold_parts(channel ? channel : layer, parts, bins);
    }
}

/* The whole batch: this batch's count-free moments of each channel (mean, M2, and the largest
 * output, clamped at 0 for ReLU sites: the maximum of relu(x)) into mean, m2, top, and its counts
 * times step into the histograms (hist_layer: through scratch, [threads, bins] zeros, when
 * hist_channel is NULL; neither: no histogram, scratch NULL too). */
static void batch_pass(const float *restrict x, const Layout *L, int64_t step, int threads, double *restrict mean,
                       double *restrict m2, double *restrict top, int64_t *hist_channel, int64_t *restrict hist_layer,
                       int64_t *restrict scratch) {
    const int64_t bins = L->last + 1, width = block_width(L->inner), blocks = (L->C + width - 1) / width;
    const double rows = (double)(L->outer * L->inner);
    #pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int64_t *layer = hist_channel || !scratch ? NULL : scratch + omp_get_thread_num() * bins;  /* this thread's share */
#else
        int64_t *layer = hist_channel || !scratch ? NULL : scratch;
#endif
        /* parts for add_counts where one histogram takes values one after another (a channel's
         * runs, or a block's tokens into the layer's) and many against the bins (folding the
         * parts costs 3 * bins a channel or block) */
        const int split = (L->inner > 1 ? hist_channel || layer : layer != NULL) && L->outer * L->inner >= 16 * bins;
        int64_t *parts = split ? calloc((size_t)(3 * bins), sizeof *parts) : NULL;
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t c0 = blk * width, c1 = c0 + width < L->C ? c0 + width : L->C;
            double s1[WIDTH] = {0}, s2[WIDTH] = {0};
            float sh[WIDTH], mx[WIDTH];
            for (int64_t c = c0; c < c1; c++) {
                sh[c - c0] = x[c * L->inner];  /* one of the channel's own values */
                mx[c - c0] = -INFINITY;
            }
            block_pass(x, L, c0, c1, step, s1, s2, sh, mx, hist_channel, layer, parts);
            for (int64_t c = c0; c < c1; c++) {
                const int64_t i = c - c0;
                const double spread = s2[i] - s1[i] * s1[i] / rows;
                mean[c] = (double)sh[i] + s1[i] / rows;
                m2[c] = spread < 0.0 ? 0.0 : spread;  /* NaN stays NaN */
                top[c] = L->is_signed || mx[i] > 0.0f ? (double)mx[i] : 0.0;
            }
        }
        free(parts);
    }
    for (int64_t t = 0; t < threads && hist_layer; t++)
        for (int64_t b = 0; b < bins; b++) {
            hist_layer[b] += scratch[t * bins + b];
            scratch[t * bins + b] = 0;
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

/* One batch merged into the per-channel and per-layer (count, mean, M2, max) of an observer and
 * counted into its histogram: hist_channel [C, bins], or, where that is NULL, hist_layer [bins]
 * (both NULL: an observer without histograms, no binning at all); returns 1, with nothing merged
 * or counted, when x holds NaN or inf. scratch is [3 * C] doubles and (hist_layer only)
 * [threads, bins] int64 zeros (left zero). */
int hmt_observe_batch(const float *restrict x, int64_t outer, int64_t C, int64_t inner, int64_t stride, int is_signed,
                      int min_exp, int bpo, int64_t bins, const int32_t *edge, const int32_t *lut, int threads,
                      double *restrict scratch, int64_t *restrict counts_scratch, double *count, double *mean,
                      double *m2, double *max, double *ch_count, double *ch_mean, double *ch_m2, double *ch_max,
                      int64_t *hist_channel, int64_t *hist_layer) {
    const Layout L = {outer, C, inner, stride, is_signed, 127 + min_exp, bpo, (int32_t)(bins - 1), edge, lut};
    double *b_mean = scratch, *b_m2 = scratch + C, *b_max = scratch + 2 * C;
    batch_pass(x, &L, 1, threads, b_mean, b_m2, b_max, hist_channel, hist_layer, counts_scratch);
    for (int64_t c = 0; c < C; c++)
        if (!isfinite(b_m2[c]) || !isfinite(b_mean[c])) {
            batch_pass(x, &L, -1, threads, b_mean, b_m2, b_max, hist_channel, hist_layer, counts_scratch);
            return 1;
        }
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
