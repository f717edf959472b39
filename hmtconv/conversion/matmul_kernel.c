/* Batched matrix products of attention (float32, CPU, AVX-512): C[i] = A[i] @ B[i] for items i of
 * one or two batch dims, A and B read through their strides (the heads of a projection, a
 * transposed operand: no copy first), C contiguous.
 *
 * Each output is its products summed in k order by fused multiply-adds from 0, as MKL's sgemm
 * sums them on attention's shapes here (equal to torch.matmul bit for bit on the ViT's operands
 * on the project's CPU; on others, such as odd sizes, MKL may order a sum otherwise: tested to
 * float32 rounding everywhere). A block of 4 rows by up to 64 columns keeps its 16 sums in registers;
 * an item's B is first copied into rows of 64 (a transposed operand read once). Items are shared
 * out by OpenMP (torch's own pool, see cpu_kernel.c). Without AVX-512 it declines (returns 0):
 * torch.matmul runs.
 */
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__) && defined(__FMA__)
#include <immintrin.h>
#define NB 64  /* columns of a block: 4 vectors of 16 */

/* R rows of C (R <= 4) by V vectors (the last one masked by last), from A's rows (ra, ca: row
 * and column strides) and the packed B (K rows of NB). */
static inline __attribute__((always_inline)) void block(const float *a, int64_t ra, int64_t ca, const float *bp,
                                                        int64_t K, float *c, int64_t N, int R, int V, __mmask16 last) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 b[4];
        for (int v = 0; v < V; v++) b[v] = _mm512_load_ps(bp + k * NB + 16 * v);
        for (int r = 0; r < R; r++) {
            const __m512 x = _mm512_set1_ps(a[r * ra + k * ca]);
            for (int v = 0; v < V; v++) acc[r][v] = _mm512_fmadd_ps(x, b[v], acc[r][v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++)
            _mm512_mask_storeu_ps(c + r * N + 16 * v, v + 1 < V ? (__mmask16)0xffff : last, acc[r][v]);
}

/* block with R and V constants, so that its sums stay in registers */
static void rows(const float *a, int64_t ra, int64_t ca, const float *bp, int64_t K, float *c, int64_t N, int R,
                 int V, __mmask16 last) {
    switch (R * 4 + V) {
#define CASE(r, v) case r * 4 + v: block(a, ra, ca, bp, K, c, N, r, v, last); break;
        CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
        CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
#undef CASE
    }
}
#endif

/* sa, sb: strides (elements) of the two batch dims, the rows and the columns of A [B0, B1, M, K]
 * and B [B0, B1, K, N]; C is [B0, B1, M, N] contiguous. Returns 1, or 0 where built without
 * AVX-512 (nothing written) or short of memory (C then partly written: to be discarded). */
int hmt_matmul(const float *A, const float *B, float *C, int64_t B0, int64_t B1, int64_t M, int64_t K, int64_t N,
               const int64_t *sa, const int64_t *sb, int threads) {
#if defined(__AVX512F__) && defined(__FMA__)
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *bp = aligned_alloc(64, sizeof(float) * (size_t)(K * NB + 16));
        failed = bp == NULL;
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < B0 * B1; item++) {
            if (failed) continue;
            const float *a = A + item / B1 * sa[0] + item % B1 * sa[1], *b = B + item / B1 * sb[0] + item % B1 * sb[1];
            float *c = C + item * M * N;
            for (int64_t n0 = 0; n0 < N; n0 += NB) {
                const int64_t w = N - n0 < NB ? N - n0 : NB;
                const __mmask16 last = (__mmask16)(w % 16 ? (1u << (w % 16)) - 1 : 0xffff);
                for (int64_t k = 0; k < K; k++)
                    for (int64_t n = 0; n < w; n++) bp[k * NB + n] = b[k * sb[2] + (n0 + n) * sb[3]];
                for (int64_t i = 0; i < M; i += 4)
                    rows(a + i * sa[2], sa[2], sa[3], bp, K, c + i * N + n0, N, M - i < 4 ? (int)(M - i) : 4,
                         (int)((w + 15) / 16), last);
            }
        }
        free(bp);
    }
    return !failed;
#else
    (void)A, (void)B, (void)C, (void)B0, (void)B1, (void)M, (void)K, (void)N, (void)sa, (void)sb, (void)threads;
    return 0;
#endif
}
