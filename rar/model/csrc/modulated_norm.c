/* The adaLN-modulated LayerNorm of the training forward, out = c + a * (x - mean) / sqrt(var + eps)
   per row of D, forward and backward in one pass each (rar/model/modulated_norm.py): torch runs it
   as a LayerNorm and an addcmul, five passes and six autograd nodes' worth of small tensors.

   x, a, c, out, grad and the gradients are contiguous (rows, D); mean and rstd are (rows,).
   Built by rar.core.toolchain; no torch headers. */
#include <math.h>
#include <stdint.h>

#define ROWS_PER_ITEM 64  /* rows per OpenMP work item */

void modulated_norm_forward(const float *x, const float *a, const float *c, float *out, float *mean,
                            float *rstd, int64_t rows, int64_t D, float eps, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS_PER_ITEM) {
        int64_t r1 = r0 + ROWS_PER_ITEM < rows ? r0 + ROWS_PER_ITEM : rows;
        for (int64_t r = r0; r < r1; r++) {
            const float *xr = x + r * D, *ar = a + r * D, *cr = c + r * D;
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

/* With xhat = (x - mean) rstd and gh = grad * a:
   grad_a = grad * xhat, grad_x = rstd (gh - mean(gh) - xhat mean(gh * xhat)); grad_c is grad. */
void modulated_norm_backward(const float *x, const float *a, const float *mean, const float *rstd,
                             const float *grad, float *grad_x, float *grad_a, int64_t rows, int64_t D,
                             int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS_PER_ITEM) {
        int64_t r1 = r0 + ROWS_PER_ITEM < rows ? r0 + ROWS_PER_ITEM : rows;
        for (int64_t r = r0; r < r1; r++) {
            const float *xr = x + r * D, *ar = a + r * D, *g = grad + r * D;
            float *gx = grad_x + r * D, *ga = grad_a + r * D;
            float mu = mean[r], rs = rstd[r], s1 = 0.0f, s2 = 0.0f;
            #pragma omp simd reduction(+ : s1, s2)
            for (int64_t d = 0; d < D; d++) {
                float xhat = (xr[d] - mu) * rs, gh = g[d] * ar[d];
                ga[d] = g[d] * xhat;
                s1 += gh;
                s2 += gh * xhat;
            }
            s1 /= (float)D;
            s2 /= (float)D;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) {
                float xhat = (xr[d] - mu) * rs;
                gx[d] = rs * (g[d] * ar[d] - s1 - xhat * s2);
            }
        }
    }
}
