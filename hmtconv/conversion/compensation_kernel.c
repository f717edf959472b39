/* The two passes of expectation compensation (compensated.py) over [T, P] float32, one pass each.
 *
 * The tensor path's arithmetic operation for operation (float32; build with -ffp-contract=off),
 * so results are equal bit for bit:
 *   RUNNING_MEAN:    s[t] = s[t-1] + x[t] (s[0] = x[0]), u[t] = s[t] / (t + 1);
 *   STEP_DIFFERENCE: out[t] = (t + 1) * y[t] - t * y[t-1] (each product rounded), out[0] = y[0].
 * dst may be src: each step is read before it is written.  Positions are shared out
 * in blocks by OpenMP (torch's own pool, see cpu_kernel.c); a block's sums stay in L1.
 */
#include <stdint.h>

#define BLOCK 1024

enum { RUNNING_MEAN = 0, STEP_DIFFERENCE = 1 };

void hmt_compensate(const float *src, float *dst, int64_t T, int64_t P, int mode, int threads) {
    const int64_t blocks = (P + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t p0 = b * BLOCK, n = P - p0 < BLOCK ? P - p0 : BLOCK;
        float acc[BLOCK];  /* the running sum, or the last step's scaled value */
        for (int64_t i = 0; i < n; i++) acc[i] = dst[p0 + i] = src[p0 + i];
        for (int64_t t = 1; t < T; t++) {
            const float steps = (float)(t + 1);
            const float *in = src + t * P + p0;
            float *out = dst + t * P + p0;
            for (int64_t i = 0; i < n && t + 1 < T; i += 16) __builtin_prefetch(in + P + i);  /* far away */
            if (mode == RUNNING_MEAN) {
                for (int64_t i = 0; i < n; i++) {
                    acc[i] = acc[i] + in[i];
                    out[i] = acc[i] / steps;
                }
            } else {
                for (int64_t i = 0; i < n; i++) {
                    const float scaled = in[i] * steps;
                    out[i] = scaled - acc[i];
                    acc[i] = scaled;
                }
            }
        }
    }
}
