/* The adaLN-modulated LayerNorm of the training forward, out = c + a * (x - mean) / sqrt(var + eps)
   per row of D, forward and backward in one pass each (rar/model/modulated_norm.py): torch runs it
   as a LayerNorm and an addcmul, five passes and six autograd nodes' worth of small tensors.

   x, out, grad and grad_x are contiguous (rows, D), rows = B N (B sequences of N positions); mean
   and rstd are (rows,). a and c are either (rows, D) too (index NULL) or tables (U, N, D) of
   per-(class, position) rows, row (b, n) reading table row (index[b], n): the model's modulation,
   computed once per class in the batch, is then never gathered to every sequence. Built by
   rar.core.toolchain; no torch headers. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define ROWS_PER_ITEM 64  /* rows per OpenMP work item */

/* The row of a or c (a table when index is not NULL) that row r = (b, n) of x reads. */
static inline int64_t table_row(const int64_t *index, int64_t r, int64_t N) {
    return index ? index[r / N] * N + r % N : r;
}

void modulated_norm_forward(const float *x, const float *a, const float *c, const int64_t *index, float *out,
                            float *mean, float *rstd, int64_t rows, int64_t N, int64_t D, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS_PER_ITEM) {
        int64_t r1 = r0 + ROWS_PER_ITEM < rows ? r0 + ROWS_PER_ITEM : rows;
        for (int64_t r = r0; r < r1; r++) {
            int64_t t = table_row(index, r, N);
            const float *xr = x + r * D, *ar = a + t * D, *cr = c + t * D;
            float *o = out + r * D, sum = 0.0f, sq = 0.0f;
            #pragma omp simd reduction(+ : sum)
            for (int64_t d = 0; d < D; d++) sum += xr[d];
            float mu = sum / (float)D;
            #pragma omp simd reduction(+ : sq)
            for (int64_t d = 0; d < D; d++) sq += (xr[d] - mu) * (xr[d] - mu);
            float rs = 1.0f / sqrtf(sq / (float)D + eps);
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) o[d] = cr[d] + ar[d] * ((xr[d] - mu) * rs);
            mean[r] = mu;
            rstd[r] = rs;
        }
    }
}

/* One row: with xhat = (x - mean) rstd and gh = grad * a, grad_x = rstd (gh - mean(gh) - xhat
   mean(gh * xhat)); grad * xhat is written to ga, or added to it (and grad to gc) where gc is not
   NULL. */
static inline void row_backward(const float *xr, const float *ar, float mu, float rs, const float *g, float *gx,
                                float *ga, float *gc, int64_t D) {
    float s1 = 0.0f, s2 = 0.0f;
    #pragma omp simd reduction(+ : s1, s2)
    for (int64_t d = 0; d < D; d++) {
        float xhat = (xr[d] - mu) * rs, gh = g[d] * ar[d];
        s1 += gh;
        s2 += gh * xhat;
    }
    s1 /= (float)D;
    s2 /= (float)D;
    if (gc) {
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            float xhat = (xr[d] - mu) * rs;
            gx[d] = rs * (g[d] * ar[d] - s1 - xhat * s2);
            ga[d] += g[d] * xhat;
            gc[d] += g[d];
        }
    } else {
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            float xhat = (xr[d] - mu) * rs;
            gx[d] = rs * (g[d] * ar[d] - s1 - xhat * s2);
            ga[d] = g[d] * xhat;
        }
    }
}

/* grad_a (rows, D) = grad * xhat where index is NULL (grad_c is then grad itself, and not
   written); else grad_a and grad_c are zeroed (U, N, D) tables that each row adds to. Tables are
   summed per position, sequences in order (a thread owns whole positions): the same result on any
   number of threads. */
void modulated_norm_backward(const float *x, const float *a, const int64_t *index, const float *mean,
                             const float *rstd, const float *grad, float *grad_x, float *grad_a, float *grad_c,
                             int64_t rows, int64_t N, int64_t D, int threads) {
    if (index) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t r = n; r < rows; r += N) {
                int64_t t = table_row(index, r, N);
                row_backward(x + r * D, a + t * D, mean[r], rstd[r], grad + r * D, grad_x + r * D, grad_a + t * D,
                             grad_c + t * D, D);
            }
        return;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS_PER_ITEM) {
        int64_t r1 = r0 + ROWS_PER_ITEM < rows ? r0 + ROWS_PER_ITEM : rows;
        for (int64_t r = r0; r < r1; r++)
            row_backward(x + r * D, a + r * D, mean[r], rstd[r], grad + r * D, grad_x + r * D, grad_a + r * D, NULL, D);
    }
}
