/* The attention's heads from its qkv projection, forward and backward in one pass each
   (rar/model/qkv_heads.py): the projection's bias is added, q and k are qk-normed (a LayerNorm per
   head with its own affine), and q, k, v are written in the (B, H, N, D) layout the attention
   kernel reads. torch runs this as a bias pass, two LayerNorms on strided views (each copying its
   input), and a backward that stacks the three gradients back into the projection's layout.

   raw (B, N, 3, H, D) is the projection without its bias, bias (3, H, D); q, k, v, dq, dk, dv
   (B, H, N, D); stats (B, N, 2, H, 2) each normed head's mean and 1 / std; draw (B, N, 3, H, D).
   `partial` (items, 4 + 3 H, D): each work item's sums of the gradients of q_norm's weight and
   bias, k_norm's weight and bias and the projection's bias (3 H rows), over a fixed block of rows,
   so that their total (summed by the caller) does not depend on the number of threads. Built by rar.core.toolchain; no torch headers. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ROWS_PER_ITEM 64  /* (b, n) rows per OpenMP work item */
#define MAX_D 256         /* the Python side checks head_dim <= MAX_D */

void qkv_heads_forward(const float *raw, const float *bias, const float *qw, const float *qb, const float *kw,
                       const float *kb, float *q, float *k, float *v, float *stats, int64_t B, int64_t N,
                       int64_t H, int64_t D, float eps, int threads) {
    int64_t rows = B * N;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS_PER_ITEM) {
        for (int64_t row = r0; row < rows && row < r0 + ROWS_PER_ITEM; row++) {
            int64_t b = row / N, n = row % N;
            for (int64_t s = 0; s < 3; s++)
                for (int64_t h = 0; h < H; h++) {
                    const float *x = raw + ((row * 3 + s) * H + h) * D, *bb = bias + (s * H + h) * D;
                    float *dst = (s == 0 ? q : s == 1 ? k : v) + ((b * H + h) * N + n) * D;
                    if (s == 2) {
                        #pragma omp simd
                        for (int64_t d = 0; d < D; d++) dst[d] = x[d] + bb[d];
                        continue;
                    }
                    const float *w = s == 0 ? qw : kw, *nb = s == 0 ? qb : kb;
                    float t[MAX_D], sum = 0.0f, sq = 0.0f;
                    #pragma omp simd reduction(+ : sum)
                    for (int64_t d = 0; d < D; d++) {
                        t[d] = x[d] + bb[d];
                        sum += t[d];
                    }
                    float mu = sum / (float)D;
                    #pragma omp simd reduction(+ : sq)
                    for (int64_t d = 0; d < D; d++) sq += (t[d] - mu) * (t[d] - mu);
                    float rs = 1.0f / sqrtf(sq / (float)D + eps);
                    #pragma omp simd
                    for (int64_t d = 0; d < D; d++) dst[d] = (t[d] - mu) * rs * w[d] + nb[d];
                    float *st = stats + ((row * 2 + s) * H + h) * 2;
                    st[0] = mu;
                    st[1] = rs;
                }
        }
    }
}

/* Per normed head, with xhat = (t - mean) rstd, gy its output's gradient and gh = gy * w:
   grad_t = rstd (gh - mean(gh) - xhat mean(gh * xhat)), grad_w += gy * xhat, grad_b += gy;
   v's gradient is copied. grad_t is also the gradient of the projection's bias once summed. */
void qkv_heads_backward(const float *raw, const float *bias, const float *qw, const float *kw, const float *stats,
                        const float *dq, const float *dk, const float *dv, float *draw, float *partial,
                        int64_t B, int64_t N, int64_t H, int64_t D, int threads) {
    int64_t rows = B * N, width = (4 + 3 * H) * D;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS_PER_ITEM) {
        float *acc = partial + (r0 / ROWS_PER_ITEM) * width;  /* q_norm w, b; k_norm w, b; the qkv bias */
        memset(acc, 0, sizeof(float) * width);
        for (int64_t row = r0; row < rows && row < r0 + ROWS_PER_ITEM; row++) {
            int64_t b = row / N, n = row % N;
            for (int64_t s = 0; s < 3; s++)
                for (int64_t h = 0; h < H; h++) {
                    const float *g = (s == 0 ? dq : s == 1 ? dk : dv) + ((b * H + h) * N + n) * D;
                    float *out = draw + ((row * 3 + s) * H + h) * D, *ag = acc + (4 + s * H + h) * D;
                    if (s == 2) {
                        #pragma omp simd
                        for (int64_t d = 0; d < D; d++) {
                            out[d] = g[d];
                            ag[d] += g[d];
                        }
                        continue;
                    }
                    const float *x = raw + ((row * 3 + s) * H + h) * D, *bb = bias + (s * H + h) * D;
                    const float *w = s == 0 ? qw : kw, *st = stats + ((row * 2 + s) * H + h) * 2;
                    float *aw = acc + 2 * s * D, *ab = aw + D, mu = st[0], rs = st[1], s1 = 0.0f, s2 = 0.0f;
                    #pragma omp simd reduction(+ : s1, s2)
                    for (int64_t d = 0; d < D; d++) {
                        float xhat = (x[d] + bb[d] - mu) * rs, gh = g[d] * w[d];
                        aw[d] += g[d] * xhat;
                        ab[d] += g[d];
                        s1 += gh;
                        s2 += gh * xhat;
                    }
                    s1 /= (float)D;
                    s2 /= (float)D;
                    #pragma omp simd
                    for (int64_t d = 0; d < D; d++) {
                        float xhat = (x[d] + bb[d] - mu) * rs;
                        out[d] = rs * (g[d] * w[d] - s1 - xhat * s2);
                        ag[d] += out[d];
                    }
                }
        }
    }
}
