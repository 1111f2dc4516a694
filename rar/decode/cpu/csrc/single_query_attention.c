/* Single-query attention for fp32 CPU decoding: for every (row, head) pair,
 *     out = softmax(q . k_l * scale over l < length) . v
 * with one query against `length` cached keys and values.
 *
 * Why it exists: a decode step at RAR-B batch 8 with guidance attends 16 rows x 16 heads over up
 * to 257 cached positions in each of 24 blocks. torch 2.13's fused CPU kernel reads that KV cache
 * at ~12-15 GB/s; these loops read each pair's keys, then its values, once, front to back, and
 * reach the ~20-27 GB/s this machine streams with that access pattern (BENCHMARKS.md).
 *
 * Built at run time by rar/sampling/attention_kernel.py with -DHEAD_DIM=<head size> (fixed trip counts
 * for the inner loops) and -fopenmp. torch has already loaded its libgomp.so.1, so the loader
 * resolves this library's OpenMP to the same runtime: the threads below are torch's own
 * intra-op threads and no second pool competes for the cores (the loader checks this).
 *
 * Layout: pair (r, h) of q at q + r * q_strides[0] + h * q_strides[1], HEAD_DIM contiguous
 * floats; of k (and v alike) at k + r * k_strides[0] + h * k_strides[1], its positions HEAD_DIM
 * floats apart (slices of the (rows, heads, slots, head_dim) cache of rar.decode.cache.KVCache); out
 * (rows, heads, HEAD_DIM) contiguous. `length` is at most rar.decode.cpu.attention_kernel.MAX_LENGTH (scores live on the
 * stack). `starts` (NULL: all zero) gives each row its first cached position: rows of an editing
 * batch with fewer known tokens than others have padding slots in front (rar.decode.cache). */
#include <stdint.h>
#include <string.h>

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head size>"
#endif

/* e^x for x <= 0 (a softmax argument after subtracting the max), vectorisable: x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by Cephes' expf polynomial, 2^n from the exponent bits. Relative error
 * ~1e-7 (tests/test_attention_kernel.py compares with torch's kernel). Below -87, e^x is taken
 * as e^-87 ~ 1.6e-38: a weight under 1e-37 of the largest changes no fp32 sum. */
static inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  float n = __builtin_rintf(x * 1.44269504088896341f); /* rint, not round: vectorises */
  float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f; /* ln2 in two parts */
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  union { float f; int32_t i; } two_n = {.i = ((int32_t)n + 127) << 23};
  return p * two_n.f;
}

void single_query_attention(const float *q, const int64_t *q_strides, const float *k,
                            const int64_t *k_strides, const float *v, const int64_t *v_strides,
                            const int64_t *starts, float *out, int64_t rows, int64_t heads,
                            int64_t length, float scale, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t pair = 0; pair < rows * heads; pair++) {
    int64_t r = pair / heads, h = pair % heads;
    const float *qp = q + r * q_strides[0] + h * q_strides[1];
    int64_t first = starts ? starts[r] : 0;
    const float *kp = k + r * k_strides[0] + h * k_strides[1] + first * HEAD_DIM;
    const float *vp = v + r * v_strides[0] + h * v_strides[1] + first * HEAD_DIM;
    int64_t n = length - first;
    float s[length], acc[HEAD_DIM];

    float max = -3.402823466e38f; /* -FLT_MAX */
    for (int64_t l = 0; l < n; l++) { /* scores: one pass over the keys */
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < HEAD_DIM; d++) dot += qp[d] * kp[l * HEAD_DIM + d];
      s[l] = dot * scale;
      max = s[l] > max ? s[l] : max;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t l = 0; l < n; l++) {
      s[l] = exp_nonpositive(s[l] - max);
      sum += s[l];
    }
    memset(acc, 0, sizeof acc);
    for (int64_t l = 0; l < n; l++) { /* weighted sum: one pass over the values */
      float w = s[l];
#pragma omp simd
      for (int64_t d = 0; d < HEAD_DIM; d++) acc[d] += w * vp[l * HEAD_DIM + d];
    }
    float inv = 1.f / sum;
    for (int64_t d = 0; d < HEAD_DIM; d++) out[pair * HEAD_DIM + d] = acc[d] * inv;
  }
}

/* Several queries per (row, head) against the same cache, each with its own keys: query n of row
 * r attends to the positions starts[r] <= l < ends[n], and to position own[n] as well when
 * own[n] >= 0 (a query row of parallel decoding sees the cache and the chain but the chain's last
 * row, whose place it takes, plus its own key, stored after the chain). Every key and value is read
 * once per (row, head) for all the queries (rar.decode.step). q of (r, n, h) at
 * q + r * q_strides[0] + n * q_strides[1] + h * q_strides[2]; out (rows, nq, heads, HEAD_DIM)
 * contiguous; nq * length is at most rar.decode.cpu.attention_kernel.MAX_SCORES (scores on the stack). */
void multi_query_attention(const float *q, const int64_t *q_strides, const float *k,
                           const int64_t *k_strides, const float *v, const int64_t *v_strides,
                           const int64_t *starts, const int64_t *ends, const int64_t *own, float *out,
                           int64_t rows, int64_t heads, int64_t nq, int64_t length, float scale,
                           int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t pair = 0; pair < rows * heads; pair++) {
    int64_t r = pair / heads, h = pair % heads;
    int64_t first = starts ? starts[r] : 0;
    const float *kp = k + r * k_strides[0] + h * k_strides[1];
    const float *vp = v + r * v_strides[0] + h * v_strides[1];
    float s[nq * length], acc[nq * HEAD_DIM], qs[nq * HEAD_DIM];
    for (int64_t n = 0; n < nq; n++) {
      const float *qp = q + r * q_strides[0] + n * q_strides[1] + h * q_strides[2];
      for (int64_t d = 0; d < HEAD_DIM; d++) qs[n * HEAD_DIM + d] = qp[d] * scale;
    }
    for (int64_t l = first; l < length; l++) { /* scores: one pass over the keys for every query */
      const float *kl = kp + l * HEAD_DIM;
      for (int64_t n = 0; n < nq; n++) {
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < HEAD_DIM; d++) dot += qs[n * HEAD_DIM + d] * kl[d];
        s[n * length + l] = (l < ends[n] || l == own[n]) ? dot : -3.402823466e38f;
      }
    }
    for (int64_t n = 0; n < nq; n++) { /* softmax per query; a masked score becomes exactly 0 */
      float *sn = s + n * length, max = -3.402823466e38f, sum = 0.f;
      for (int64_t l = first; l < length; l++) max = sn[l] > max ? sn[l] : max;
      for (int64_t l = first; l < length; l++) {
        float e = sn[l] <= -3.402823466e38f ? 0.f : exp_nonpositive(sn[l] - max);
        sn[l] = e;
        sum += e;
      }
      float inv = sum > 0.f ? 1.f / sum : 0.f; /* no visible key (never in rar's use): zeros, not NaN */
      for (int64_t l = first; l < length; l++) sn[l] *= inv;
    }
    memset(acc, 0, sizeof acc);
    for (int64_t l = first; l < length; l++) { /* weighted sums: one pass over the values */
      const float *vl = vp + l * HEAD_DIM;
      for (int64_t n = 0; n < nq; n++) {
        float w = s[n * length + l];
        if (w == 0.f) continue;
#pragma omp simd
        for (int64_t d = 0; d < HEAD_DIM; d++) acc[n * HEAD_DIM + d] += w * vl[d];
      }
    }
    for (int64_t n = 0; n < nq; n++)
      memcpy(out + ((r * nq + n) * heads + h) * HEAD_DIM, acc + n * HEAD_DIM, sizeof(float) * HEAD_DIM);
  }
}
