/* The two passes of expectation compensation (compensated.py) over [T, P] float32, one pass each.
 *
 * The tensor path's arithmetic operation for operation (float32; build with -ffp-contract=off),
 * so results are equal bit for bit:
 *   hmt_running_mean:    s[t] = s[t-1] + x[t] (s[0] = x[0]), u[t] = s[t] / (t + 1);
 *   hmt_step_difference: out[t] = (t + 1) * y[t] - t * y[t-1] (each product rounded), out[0] = y[0].
 * u may be x and out may be y: each step is read before it is written.  Positions are shared out
 * in blocks by OpenMP (torch's own pool, see cpu_kernel.c); a block's sums stay in L1.
 */
#include <stdint.h>

#define BLOCK 1024

void hmt_running_mean(const float *x, float *u, int64_t T, int64_t P, int threads) {
    const int64_t blocks = (P + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t p0 = b * BLOCK, n = P - p0 < BLOCK ? P - p0 : BLOCK;
        float s[BLOCK];
        for (int64_t i = 0; i < n; i++) s[i] = u[p0 + i] = x[p0 + i];
        for (int64_t t = 1; t < T; t++) {
            const float steps = (float)(t + 1);
            const float *xt = x + t * P + p0;
            float *ut = u + t * P + p0;
            for (int64_t i = 0; i < n; i++) {
                s[i] = s[i] + xt[i];
                ut[i] = s[i] / steps;
            }
        }
    }
}

void hmt_step_difference(const float *y, float *out, int64_t T, int64_t P, int threads) {
    const int64_t blocks = (P + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t p0 = b * BLOCK, n = P - p0 < BLOCK ? P - p0 : BLOCK;
        float prev[BLOCK];
        for (int64_t i = 0; i < n; i++) prev[i] = out[p0 + i] = y[p0 + i];
        for (int64_t t = 1; t < T; t++) {
            const float steps = (float)(t + 1);
            const float *yt = y + t * P + p0;
            float *ot = out + t * P + p0;
            for (int64_t i = 0; i < n; i++) {
                const float scaled = yt[i] * steps;
                ot[i] = scaled - prev[i];
                prev[i] = scaled;
            }
        }
    }
}
