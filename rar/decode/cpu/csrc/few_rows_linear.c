/* y = x W^T + b for the few rows of a decode step (fp32, AVX2 + FMA):
 *     x (rows, K) contiguous, W (N, K) packed as below, b (N,) or NULL, y (rows, N) contiguous.
 *
 * Why it exists: at RAR-B batch 8 with guidance a step multiplies 16 rows by every weight matrix,
 * ~5.4 GFLOP against ~680 MB of weights. oneDNN's AVX2 kernel runs that at ~75-85 GFLOP/s on the
 * project's 2-core machine, about half its fp32 peak (BENCHMARKS.md). Here W streams from memory
 * exactly once and every weight is broadcast against all rows held in registers:
 *   - the rows are transposed into groups of 16 (two 8-float registers; a last group of 8 when
 *     the rows leave 8 or fewer), zero-padded: xt[k][16];
 *   - W is cut into panels of 6 output columns; for each k a tile multiplies 6 broadcast weights
 *     by the group's 2 registers of rows: 12 FMAs into 12 accumulators per 8 loads;
 *   - K is walked in chunks of KC = 128 so that a group's chunk of xt (8 KiB) stays in L1 while
 *     the thread's panels stream past it; the accumulators go to a per-call buffer between chunks.
 *
 * Packed layout (rar/decode/cpu/linear_kernel.py `pack`): for each chunk k0 = 0, KC, 2 KC, ... of
 * width kn = min(KC, K - k0), for each panel p = 0 .. ceil(N / 6) - 1, for each k in the chunk,
 * the 6 weights W[6p + j][k0 + k], j = 0..5 (rows past N are zero). So the whole matrix is one
 * front-to-back stream per thread.
 *
 * Threads: torch's OpenMP runtime (the loader checks it) splits the panels evenly; every output is
 * summed in the same order whatever the thread count. Built by rar/decode/cpu/linear_kernel.py. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "compile with -mavx2 -mfma"
#endif

#define NR 6   /* output columns per panel */
#define KC 128 /* k per chunk */

/* acc (6 x 16 floats, [j][row]) += xt (kn x 16) . w (kn x 6) for 16 rows; `first` starts from 0. */
static void tile16(const float *xt, const float *w, int64_t kn, float *acc, int first) {
  __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
  if (first) {
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = _mm256_setzero_ps();
  } else {
    a00 = _mm256_load_ps(acc), a01 = _mm256_load_ps(acc + 8), a10 = _mm256_load_ps(acc + 16);
    a11 = _mm256_load_ps(acc + 24), a20 = _mm256_load_ps(acc + 32), a21 = _mm256_load_ps(acc + 40);
    a30 = _mm256_load_ps(acc + 48), a31 = _mm256_load_ps(acc + 56), a40 = _mm256_load_ps(acc + 64);
    a41 = _mm256_load_ps(acc + 72), a50 = _mm256_load_ps(acc + 80), a51 = _mm256_load_ps(acc + 88);
  }
  for (int64_t k = 0; k < kn; k++) { /* written out: an array of accumulators would live on the stack */
    const float *xk = xt + k * 16, *wk = w + k * NR;
    __m256 x0 = _mm256_load_ps(xk), x1 = _mm256_load_ps(xk + 8), b;
    b = _mm256_broadcast_ss(wk + 0), a00 = _mm256_fmadd_ps(x0, b, a00), a01 = _mm256_fmadd_ps(x1, b, a01);
    b = _mm256_broadcast_ss(wk + 1), a10 = _mm256_fmadd_ps(x0, b, a10), a11 = _mm256_fmadd_ps(x1, b, a11);
    b = _mm256_broadcast_ss(wk + 2), a20 = _mm256_fmadd_ps(x0, b, a20), a21 = _mm256_fmadd_ps(x1, b, a21);
    b = _mm256_broadcast_ss(wk + 3), a30 = _mm256_fmadd_ps(x0, b, a30), a31 = _mm256_fmadd_ps(x1, b, a31);
    b = _mm256_broadcast_ss(wk + 4), a40 = _mm256_fmadd_ps(x0, b, a40), a41 = _mm256_fmadd_ps(x1, b, a41);
    b = _mm256_broadcast_ss(wk + 5), a50 = _mm256_fmadd_ps(x0, b, a50), a51 = _mm256_fmadd_ps(x1, b, a51);
  }
  _mm256_store_ps(acc, a00), _mm256_store_ps(acc + 8, a01), _mm256_store_ps(acc + 16, a10);
  _mm256_store_ps(acc + 24, a11), _mm256_store_ps(acc + 32, a20), _mm256_store_ps(acc + 40, a21);
  _mm256_store_ps(acc + 48, a30), _mm256_store_ps(acc + 56, a31), _mm256_store_ps(acc + 64, a40);
  _mm256_store_ps(acc + 72, a41), _mm256_store_ps(acc + 80, a50), _mm256_store_ps(acc + 88, a51);
}

/* The same for a group of 8 rows: acc (6 x 8 floats), xt (kn x 8). */
static void tile8(const float *xt, const float *w, int64_t kn, float *acc, int first) {
  __m256 a0, a1, a2, a3, a4, a5;
  if (first) {
    a0 = a1 = a2 = a3 = a4 = a5 = _mm256_setzero_ps();
  } else {
    a0 = _mm256_load_ps(acc), a1 = _mm256_load_ps(acc + 8), a2 = _mm256_load_ps(acc + 16);
    a3 = _mm256_load_ps(acc + 24), a4 = _mm256_load_ps(acc + 32), a5 = _mm256_load_ps(acc + 40);
  }
  for (int64_t k = 0; k < kn; k++) {
    const float *wk = w + k * NR;
    __m256 x0 = _mm256_load_ps(xt + k * 8);
    a0 = _mm256_fmadd_ps(x0, _mm256_broadcast_ss(wk + 0), a0);
    a1 = _mm256_fmadd_ps(x0, _mm256_broadcast_ss(wk + 1), a1);
    a2 = _mm256_fmadd_ps(x0, _mm256_broadcast_ss(wk + 2), a2);
    a3 = _mm256_fmadd_ps(x0, _mm256_broadcast_ss(wk + 3), a3);
    a4 = _mm256_fmadd_ps(x0, _mm256_broadcast_ss(wk + 4), a4);
    a5 = _mm256_fmadd_ps(x0, _mm256_broadcast_ss(wk + 5), a5);
  }
  _mm256_store_ps(acc, a0), _mm256_store_ps(acc + 8, a1), _mm256_store_ps(acc + 16, a2);
  _mm256_store_ps(acc + 24, a3), _mm256_store_ps(acc + 32, a4), _mm256_store_ps(acc + 40, a5);
}

/* Rows in group g: 16, or 8 for a last group padded to 8 (`padded` rows in all). */
static inline int64_t group_width(int64_t g, int64_t padded) { return g * 16 + 16 <= padded ? 16 : 8; }

/* Grown per calling thread and kept: a fresh buffer per call would fault in fresh pages each time. */
static __thread float *scratch;
static __thread size_t scratch_floats;

/* Returns 0, or -1 when the scratch buffer cannot be allocated (y is then untouched). */
int few_rows_linear(const float *x, const float *packed, const float *bias, float *y, int64_t rows,
                    int64_t N, int64_t K, int num_threads) {
  int64_t padded = (rows + 15) / 16 * 16, last = rows - (padded - 16); /* rows in the last group */
  if (last <= 8) padded -= 8;                                          /* ... which is then 8 wide */
  int64_t groups = (padded + 15) / 16, P = (N + NR - 1) / NR;
  size_t need = (size_t)(K * padded + P * NR * padded) + 16;
  if (need > scratch_floats) {
    free(scratch);
    scratch = aligned_alloc(32, (need * sizeof(float) + 31) / 32 * 32);
    scratch_floats = scratch ? need : 0;
    if (!scratch) return -1;
  }
  float *xt = scratch, *acc = scratch + K * padded; /* xt: group g at g * 16 K; acc: panel p at p * 6 padded */
  for (int64_t g = 0; g < groups; g++) {
    int64_t width = group_width(g, padded);
    float *dst = xt + g * 16 * K;
    for (int64_t k = 0; k < K; k++)
      for (int64_t r = 0; r < width; r++) dst[k * width + r] = g * 16 + r < rows ? x[(g * 16 + r) * K + k] : 0.f;
  }
#pragma omp parallel num_threads(num_threads)
  {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    int64_t p0 = P * t / T, p1 = P * (t + 1) / T;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      int64_t kn = K - k0 < KC ? K - k0 : KC;
      const float *chunk = packed + k0 * P * NR;
      for (int64_t p = p0; p < p1; p++)
        for (int64_t g = 0; g < groups; g++) {
          float *a = acc + p * NR * padded + g * 16 * NR;
          if (group_width(g, padded) == 16)
            tile16(xt + g * 16 * K + k0 * 16, chunk + p * kn * NR, kn, a, k0 == 0);
          else
            tile8(xt + g * 16 * K + k0 * 8, chunk + p * kn * NR, kn, a, k0 == 0);
        }
    }
    for (int64_t p = p0; p < p1; p++) /* acc [j][row] per group -> y[row][n], plus the bias */
      for (int64_t g = 0; g < groups; g++) {
        int64_t width = group_width(g, padded);
        const float *a = acc + p * NR * padded + g * 16 * NR;
        for (int j = 0; j < NR && p * NR + j < N; j++) {
          float b = bias ? bias[p * NR + j] : 0.f;
          for (int64_t r = 0; r < width && g * 16 + r < rows; r++) y[(g * 16 + r) * N + p * NR + j] = a[j * width + r] + b;
        }
      }
  }
  return 0;
}
