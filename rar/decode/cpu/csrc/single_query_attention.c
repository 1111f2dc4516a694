/* Single-query attention for fp32 CPU decoding: for every (row, head) pair,
 *     out = softmax(q . k_l * scale over l < length) . v
 * with one query against `length` cached keys and values.
 *
 * Why it exists: a decode step at RAR-B batch 8 with guidance attends 16 rows x 16 heads over up
 * to 257 cached positions in each of 24 blocks. torch 2.13's fused CPU kernel reads that KV cache
 * at ~12-15 GB/s; these loops read each pair's keys, then its values, once, front to back. Each
 * pair's keys and values are short runs (12-48 KiB) far apart, too short for the hardware
 * prefetcher to reach full speed, so the loops prefetch by hand: the keys PF_AHEAD positions
 * ahead and the values one pass ahead (they are read next, from L2), and while summing the values,
 * the first keys of the next pair. That took a pair's stream from ~21 to ~27-30 GB/s at 16 rows
 * (BENCHMARKS.md). The caller may also hand over the query's own key and value (k_new, v_new):
 * they are written to the last slot here, by the thread that reads them next, instead of by a
 * strided copy of its own (~2-5 ms per step of RAR-B at 16 rows).
 *
 * Built at run time by rar/decode/cpu/attention_kernel.py with -DHEAD_DIM=<head size> (fixed trip counts
 * for the inner loops) and -fopenmp. torch has already loaded its libgomp.so.1, so the loader
 * resolves this library's OpenMP to the same runtime: the threads below are torch's own
 * intra-op threads and no second pool competes for the cores (the loader checks this).
 *
 * Layout: pair (r, h) of q at q + r * q_strides[0] + h * q_strides[1], HEAD_DIM contiguous
 * floats; of k (and v alike) at k + r * k_strides[0] + h * k_strides[1], its positions HEAD_DIM
 * floats apart (slices of the (rows, heads, slots, head_dim) cache of rar.decode.cache.KVCache); out
 * (rows, heads, HEAD_DIM) contiguous. `length` is at most rar.decode.cpu.attention_kernel.MAX_LENGTH (scores live on the
 * stack). `starts` (NULL: all zero) gives each row its first cached position: rows of an editing
 * batch with fewer known tokens than others have padding slots in front (rar.decode.cache).
 * k_new (NULL: none) and v_new, (rows, heads, HEAD_DIM) with strides new_strides[0..1] and
 * [2..3], are copied to position length - 1 of k and v before the pair attends. */
#include <stdint.h>
#include <string.h>

#ifndef PF_AHEAD
#define PF_AHEAD 8 /* keys prefetched this many positions ahead (8-16 measured alike) */
#endif

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

void single_query_attention(const float *q, const int64_t *q_strides, float *k,
                            const int64_t *k_strides, float *v, const int64_t *v_strides,
                            const int64_t *starts, const float *k_new, const float *v_new,
                            const int64_t *new_strides, float *out, int64_t rows, int64_t heads,
                            int64_t length, float scale, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t pair = 0; pair < rows * heads; pair++) {
    int64_t r = pair / heads, h = pair % heads;
    const float *qp = q + r * q_strides[0] + h * q_strides[1];
    int64_t first = starts ? starts[r] : 0;
    float *kp = k + r * k_strides[0] + h * k_strides[1] + first * HEAD_DIM;
    float *vp = v + r * v_strides[0] + h * v_strides[1] + first * HEAD_DIM;
    int64_t n = length - first;
    float s[length], acc[HEAD_DIM];
    if (k_new) { /* the query's own key and value go to the last slot first (the cache write, fused) */
      memcpy(kp + (n - 1) * HEAD_DIM, k_new + r * new_strides[0] + h * new_strides[1], sizeof acc);
      memcpy(vp + (n - 1) * HEAD_DIM, v_new + r * new_strides[2] + h * new_strides[3], sizeof acc);
    }

    float max = -3.402823466e38f; /* -FLT_MAX */
    for (int64_t l = 0; l < n; l++) { /* scores: one pass over the keys; prefetch keys and values */
      for (int64_t c = 0; c < HEAD_DIM; c += 16) { /* one cache line each (a prefetch never faults) */
        __builtin_prefetch(kp + (l + PF_AHEAD) * HEAD_DIM + c, 0, 0);
        __builtin_prefetch(vp + l * HEAD_DIM + c, 0, 1);
      }
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
    int64_t next = pair + 1 < rows * heads ? pair + 1 : pair; /* most likely this thread's next pair */
    int64_t nr = next / heads, nh = next % heads, nfirst = starts ? starts[nr] : 0;
    const float *nkp = k + nr * k_strides[0] + nh * k_strides[1] + nfirst * HEAD_DIM;
    for (int64_t l = 0; l < n; l++) { /* weighted sum: one pass over the values */
      if (l < PF_AHEAD)
        for (int64_t c = 0; c < HEAD_DIM; c += 16) __builtin_prefetch(nkp + l * HEAD_DIM + c, 0, 0);
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
