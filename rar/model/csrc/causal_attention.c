/* Causal self-attention for training on CPU, forward and backward, one (batch, head) pair per
   work item (rar/model/causal_attention.py). At the tiny preset's shapes (65 positions, heads of
   32) torch's fused CPU kernel runs at a fraction of the machine's arithmetic; here each pair's
   keys and values are transposed once into the thread's scratch so that every inner loop runs
   along contiguous memory and vectorizes. Like flash attention, the forward keeps only each row's
   log-sum-exp and the backward recomputes the probabilities from it.

   Layouts: q, k, v, o and dout are (B, H, N, D) with any (b, h, n) strides (in floats) and a
   contiguous last dimension; lse (B, H, N), dq, dk, dv (B, H, N, D) are contiguous. `scratch` holds
   (2 D + 2) P floats per thread, P = N rounded up to a multiple of 16 (the forward uses half). D is the compile-time HEAD_DIM. Built by rar.core.toolchain; no torch headers. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<head size>"
#endif
#define D HEAD_DIM

#define PAD 16  /* rows of K^T are padded to a multiple of this many floats (a vector or two) */

static int64_t padded(int64_t n) { return (n + PAD - 1) / PAD * PAD; }

/* s[j] = scale * q . k_j for j < len, from kt = K^T (D, P) with P = padded(N) zero-filled columns:
   the loops run to padded(len), a whole number of vectors with no scalar remainder per d (the
   entries past len are scores of padding or of future keys, which the caller ignores). */
static void scores(const float *restrict qi, const float *restrict kt, int64_t P, int64_t len, float scale,
                   float *restrict s) {
    float q[D];
    for (int d = 0; d < D; d++) q[d] = qi[d] * scale;
    for (int64_t jb = 0; jb < len; jb += PAD) {  /* PAD scores at a time, summed over d in registers */
        float acc[PAD] = {0};
        for (int d = 0; d < D; d++) {
            const float *restrict row = kt + d * P + jb;
            #pragma omp simd
            for (int t = 0; t < PAD; t++) acc[t] += q[d] * row[t];
        }
        for (int t = 0; t < PAD; t++) s[jb + t] = acc[t];
    }
}

/* dst (D, P) = src (N, D) (rows `stride` apart) transposed, columns N..P-1 zero. */
static void transpose(const float *restrict src, int64_t stride, int64_t N, int64_t P, float *restrict dst) {
    for (int d = 0; d < D; d++)
        for (int64_t j = N; j < P; j++) dst[d * P + j] = 0.0f;
    for (int64_t j = 0; j < N; j++)
        for (int d = 0; d < D; d++) dst[d * P + j] = src[j * stride + d];
}

void causal_attention_forward(const float *q, const int64_t *qs, const float *k, const int64_t *ks,
                              const float *v, const int64_t *vs, float *o, const int64_t *os, float *lse,
                              int64_t B, int64_t H, int64_t N, float scale, float *scratch, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int64_t P = padded(N);
        float *kt = scratch + (2 * D + 2) * P * omp_get_thread_num(), *s = kt + D * P;
        #pragma omp for schedule(static)
        for (int64_t pair = 0; pair < B * H; pair++) {
            int64_t b = pair / H, h = pair % H;
            const float *qp = q + b * qs[0] + h * qs[1], *vp = v + b * vs[0] + h * vs[1];
            float *op = o + b * os[0] + h * os[1];
            transpose(k + b * ks[0] + h * ks[1], ks[2], N, P, kt);
            for (int64_t i = 0; i < N; i++) {
                int64_t len = i + 1;  /* causal: keys 0..i */
                scores(qp + i * qs[2], kt, P, len, scale, s);
                float m = s[0], sum = 0.0f, acc[D];
                for (int64_t j = 1; j < len; j++) m = s[j] > m ? s[j] : m;
                #pragma omp simd reduction(+ : sum)
                for (int64_t j = 0; j < len; j++) {
                    s[j] = exp_nonpositive(s[j] - m);
                    sum += s[j];
                }
                for (int d = 0; d < D; d++) acc[d] = 0.0f;
                for (int64_t j = 0; j < len; j++) {
                    const float *restrict vj = vp + j * vs[2];
                    float pj = s[j];
                    #pragma omp simd
                    for (int d = 0; d < D; d++) acc[d] += pj * vj[d];
                }
                float inv = 1.0f / sum, *oi = op + i * os[2];
                for (int d = 0; d < D; d++) oi[d] = acc[d] * inv;
                lse[pair * N + i] = m + logf(sum);
            }
        }
    }
}

/* dS = P * (dP - rowsum(dout * o)) with P = exp(S - lse) and dP = dout V^T; dq = scale dS K,
   dk = scale dS^T Q, dv = P^T dout. */
void causal_attention_backward(const float *q, const int64_t *qs, const float *k, const int64_t *ks,
                               const float *v, const int64_t *vs, const float *o, const int64_t *os,
                               const float *dout, const int64_t *gs, const float *lse, float *dq, float *dk,
                               float *dv, int64_t B, int64_t H, int64_t N, float scale, float *scratch, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int64_t P = padded(N);
        float *kt = scratch + (2 * D + 2) * P * omp_get_thread_num(), *vt = kt + D * P, *p = vt + D * P, *ds = p + P;
        #pragma omp for schedule(static)
        for (int64_t pair = 0; pair < B * H; pair++) {
            int64_t b = pair / H, h = pair % H;
            const float *qp = q + b * qs[0] + h * qs[1], *kp = k + b * ks[0] + h * ks[1];
            const float *op = o + b * os[0] + h * os[1], *gp = dout + b * gs[0] + h * gs[1];
            float *dqp = dq + pair * N * D, *dkp = dk + pair * N * D, *dvp = dv + pair * N * D;
            transpose(kp, ks[2], N, P, kt);
            transpose(v + b * vs[0] + h * vs[1], vs[2], N, P, vt);
            memset(dkp, 0, sizeof(float) * N * D);
            memset(dvp, 0, sizeof(float) * N * D);
            for (int64_t i = 0; i < N; i++) {
                int64_t len = i + 1;
                const float *qi = qp + i * qs[2], *gi = gp + i * gs[2], *oi = op + i * os[2];
                float row = 0.0f, l = lse[pair * N + i], acc[D];
                for (int d = 0; d < D; d++) row += gi[d] * oi[d];
                scores(qi, kt, P, len, scale, p);
                #pragma omp simd
                for (int64_t j = 0; j < len; j++) p[j] = exp_nonpositive(p[j] - l);
                scores(gi, vt, P, len, 1.0f, ds);  /* dP[i, j] = dout_i . v_j */
                #pragma omp simd
                for (int64_t j = 0; j < len; j++) ds[j] = p[j] * (ds[j] - row) * scale;
                for (int d = 0; d < D; d++) acc[d] = 0.0f;
                for (int64_t j = 0; j < len; j++) {
                    const float *restrict kj = kp + j * ks[2];
                    float *restrict dkj = dkp + j * D, *restrict dvj = dvp + j * D;
                    float dsj = ds[j], pj = p[j];
                    #pragma omp simd
                    for (int d = 0; d < D; d++) {
                        acc[d] += dsj * kj[d];
                        dkj[d] += dsj * qi[d];
                        dvj[d] += pj * gi[d];
                    }
                }
                for (int d = 0; d < D; d++) dqp[i * D + d] = acc[d];
            }
        }
    }
}
