/* Causal self-attention for training on CPU, forward and backward, one (batch, head) pair per
   work item (rar/model/causal_attention.py). At the tiny preset's shapes (65 positions, heads of
   32) torch's fused CPU kernel runs at a fraction of the machine's arithmetic; here each pair's
   keys and values are transposed once into the thread's scratch so that every inner loop runs
   along contiguous memory and vectorizes, and ROWS query rows are processed together so that the
   inner loops keep ROWS independent accumulators in flight (one would wait on each FMA's latency).
   Like flash attention, the forward keeps only each row's log-sum-exp and the backward recomputes
   the probabilities from it.

   Layouts: q, k, v, o and dout are (B, H, N, D) with any (b, h, n) strides (in floats) and a
   contiguous last dimension; lse (B, H, N), dq, dk, dv (B, H, N, D) are contiguous. `scratch` holds
   (2 D + 2 MAX_ROWS) P floats per thread, P = N rounded up to a multiple of 16 (the forward uses
   less). D is the compile-time HEAD_DIM. Built by rar.core.toolchain; no torch headers. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<head size>"
#endif
#define D HEAD_DIM

#define PAD 16      /* rows of K^T are padded to a multiple of this many floats (a vector or two) */
#define MAX_ROWS 8  /* the scratch the Python side allocates allows this many rows per block */
#ifdef __AVX512F__
#define ROWS 4      /* 4 x (2 x 16 floats) output accumulators: 8 of the 32 vector registers */
#else
#define ROWS 2      /* AVX2 has 16 registers: 2 x (4 x 8 floats) accumulators, plus the operands */
#endif

static int64_t padded(int64_t n) { return (n + PAD - 1) / PAD * PAD; }

/* s[r P + j] = x_r . k_j for the ROWS rows x (ROWS, D) and j < padded(len), from kt = K^T (D, P)
   with zero-filled columns past N. Entries past a row's causal length are scores of future keys
   or of padding, which the caller ignores. */
static void block_scores(float x[ROWS][D], const float *restrict kt, int64_t P, int64_t len,
                         float *restrict s) {
    for (int64_t jb = 0; jb < len; jb += PAD) {  /* PAD scores of every row at a time, in registers */
        float acc[ROWS][PAD] = {{0}};
        for (int d = 0; d < D; d++) {
            const float *restrict row = kt + d * P + jb;
            #pragma GCC unroll 8
            for (int r = 0; r < ROWS; r++) {
                #pragma omp simd
                for (int t = 0; t < PAD; t++) acc[r][t] += x[r][d] * row[t];
            }
        }
        for (int r = 0; r < ROWS; r++)
            for (int t = 0; t < PAD; t++) s[r * P + jb + t] = acc[r][t];
    }
}

/* dst (D, P) = src (N, D) (rows `stride` apart) transposed, columns N..P-1 zero. */
static void transpose(const float *restrict src, int64_t stride, int64_t N, int64_t P, float *restrict dst) {
    for (int d = 0; d < D; d++) {  /* contiguous writes; the strided reads stay in L1 */
        #pragma omp simd
        for (int64_t j = 0; j < N; j++) dst[d * P + j] = src[j * stride + d];
        for (int64_t j = N; j < P; j++) dst[d * P + j] = 0.0f;
    }
}

/* x (ROWS, D) = `rows` rows of src (`stride` apart) times `scale`; the rows past `rows` are zero. */
static void load_rows(const float *src, int64_t stride, int64_t rows, float scale, float x[ROWS][D]) {
    memset(x, 0, sizeof(float) * ROWS * D);
    for (int64_t r = 0; r < rows; r++) {
        #pragma omp simd
        for (int d = 0; d < D; d++) x[r][d] = src[r * stride + d] * scale;
    }
}

/* out (ROWS, D) = sum over j < len of w[r P + j] * src_j (rows of src `stride` apart). */
static void block_weighted_sum(const float *restrict w, int64_t P, const float *src, int64_t stride, int64_t len,
                               float out[ROWS][D]) {
    float acc[ROWS][D] = {{0}};  /* local, so that it stays in registers (`out` might alias src) */
    for (int64_t j = 0; j < len; j++) {
        const float *restrict sj = src + j * stride;
        #pragma GCC unroll 8
        for (int r = 0; r < ROWS; r++) {
            float wj = w[r * P + j];
            #pragma omp simd
            for (int d = 0; d < D; d++) acc[r][d] += wj * sj[d];
        }
    }
    memcpy(out, acc, sizeof acc);
}

/* Row r of the block (query i0 + r) sees keys 0..i0 + r: s[r] becomes exp(s - m_r) there and 0 on
   the later keys up to len, with m_r = sub[r] (the backward pass: the row's log-sum-exp) or, where
   sub is NULL, the row's maximum (the forward pass). The forward pass also gets m_r and the row's
   sum (`m`, `sum`). */
static void block_softmax(float *s, int64_t P, int64_t i0, int64_t rows, int64_t len, const float *sub, float *m,
                          float *sum) {
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * P, top = sr[0], total = 0.0f;
        int64_t n = i0 + r + 1, whole = padded(n);  /* whole vectors: no scalar remainder of exp */
        if (sub) {
            top = sub[r];
        } else {
            #pragma omp simd reduction(max : top)
            for (int64_t j = 0; j < n; j++) top = sr[j] > top ? sr[j] : top;
        }
        /* Later keys' scores become e^-87 (exp_nonpositive's floor), nothing next to a sum >= 1, and
           are zeroed after. */
        for (int64_t j = n; j < whole; j++) sr[j] = -1e30f;  /* finite: exp_nonpositive computes 0 * x */
        #pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < whole; j++) {
            sr[j] = exp_nonpositive(sr[j] - top);
            total += sr[j];
        }
        for (int64_t j = n; j < (whole > len ? whole : len); j++) sr[j] = 0.0f;
        if (m) m[r] = top, sum[r] = total;
    }
}

void causal_attention_forward(const float *q, const int64_t *qs, const float *k, const int64_t *ks,
                              const float *v, const int64_t *vs, float *o, const int64_t *os, float *lse,
                              int64_t B, int64_t H, int64_t N, float scale, float *scratch, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int64_t P = padded(N);
        float *kt = scratch + (2 * D + 2 * MAX_ROWS) * P * omp_get_thread_num(), *s = kt + D * P;
        #pragma omp for schedule(static)
        for (int64_t pair = 0; pair < B * H; pair++) {
            int64_t b = pair / H, h = pair % H;
            const float *qp = q + b * qs[0] + h * qs[1], *vp = v + b * vs[0] + h * vs[1];
            float *op = o + b * os[0] + h * os[1], *lp = lse + pair * N;
            transpose(k + b * ks[0] + h * ks[1], ks[2], N, P, kt);
            for (int64_t i0 = 0; i0 < N; i0 += ROWS) {
                int64_t rows = N - i0 < ROWS ? N - i0 : ROWS, len = i0 + rows;  /* causal: keys < len */
                float x[ROWS][D], acc[ROWS][D], m[ROWS], sum[ROWS];
                load_rows(qp + i0 * qs[2], qs[2], rows, scale, x);
                block_scores(x, kt, P, len, s);
                block_softmax(s, P, i0, rows, len, NULL, m, sum);
                block_weighted_sum(s, P, vp, vs[2], len, acc);  /* unnormalized P V */
                for (int64_t r = 0; r < rows; r++) {
                    float inv = 1.0f / sum[r], *oi = op + (i0 + r) * os[2];
                    for (int d = 0; d < D; d++) oi[d] = acc[r][d] * inv;
                    lp[i0 + r] = m[r] + logf(sum[r]);
                }
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
        float *kt = scratch + (2 * D + 2 * MAX_ROWS) * P * omp_get_thread_num(), *vt = kt + D * P;
        float *p = vt + D * P, *ds = p + ROWS * P;
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
            for (int64_t i0 = 0; i0 < N; i0 += ROWS) {
                int64_t rows = N - i0 < ROWS ? N - i0 : ROWS, len = i0 + rows;
                float x[ROWS][D], xs[ROWS][D], g[ROWS][D], acc[ROWS][D], row[ROWS] = {0};
                load_rows(qp + i0 * qs[2], qs[2], rows, 1.0f, x);
                load_rows(qp + i0 * qs[2], qs[2], rows, scale, xs);
                load_rows(gp + i0 * gs[2], gs[2], rows, 1.0f, g);
                for (int64_t r = 0; r < rows; r++) {
                    const float *oi = op + (i0 + r) * os[2];
                    float dot = 0.0f;
                    #pragma omp simd reduction(+ : dot)
                    for (int d = 0; d < D; d++) dot += g[r][d] * oi[d];
                    row[r] = dot;
                }
                block_scores(xs, kt, P, len, p);
                block_softmax(p, P, i0, rows, len, lse + pair * N + i0, NULL, NULL);
                block_scores(g, vt, P, len, ds);  /* dP[i, j] = dout_i . v_j */
                for (int64_t r = 0; r < ROWS; r++) {
                    float *pr = p + r * P, *dr = ds + r * P, rr = row[r];
                    if (r >= rows) {  /* a row past N: no gradient */
                        memset(pr, 0, sizeof(float) * len);
                        memset(dr, 0, sizeof(float) * len);
                        continue;
                    }
                    #pragma omp simd
                    for (int64_t j = 0; j < len; j++) dr[j] = pr[j] * (dr[j] - rr) * scale;
                }
                block_weighted_sum(ds, P, kp, ks[2], len, acc);
                for (int64_t r = 0; r < rows; r++)
                    memcpy(dqp + (i0 + r) * D, acc[r], sizeof(float) * D);
                for (int64_t j = 0; j < len; j++) {  /* the block's rows added to dk_j, dv_j in registers */
                    float dkj[D], dvj[D];
                    memcpy(dkj, dkp + j * D, sizeof dkj);
                    memcpy(dvj, dvp + j * D, sizeof dvj);
                    #pragma GCC unroll 8
                    for (int r = 0; r < ROWS; r++) {
                        float dsj = ds[r * P + j], pj = p[r * P + j];
                        #pragma omp simd
                        for (int d = 0; d < D; d++) {
                            dkj[d] += dsj * x[r][d];
                            dvj[d] += pj * g[r][d];
                        }
                    }
                    memcpy(dkp + j * D, dkj, sizeof dkj);
                    memcpy(dvp + j * D, dvj, sizeof dvj);
                }
            }
        }
    }
}
