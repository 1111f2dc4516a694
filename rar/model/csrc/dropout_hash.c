/* Dropout masks from a counter-based hash (rar/model/dropout.py has the same function in torch).

   Element i of a mask with key (k0, k1) draws the 16-bit value
       mix(mix(lo(i) ^ k0) ^ (hi(i) + k1)) >> 16        (lo, hi: the low and high 32 bits of i)
   where mix is a 32-bit integer finalizer (two multiply-xorshift rounds), and is kept when that
   value is >= level (P(drop) = level / 65536). A mask is a pure function of its key and shape: the
   same on any number of threads, on any device, and each element costs a few integer operations
   instead of a serial generator's step. Built by rar.core.toolchain; no torch headers.

   gelu_dropout_forward/backward fuse the MLP's exact GELU with its dropout and fc1's bias: one
   pass each way over the hidden layer, no mask in memory (the backward pass draws it again from
   the key), and no pass that adds the bias. Their
   erf is the Abramowitz-Stegun 7.1.26 form torch's vectorized CPU GELU uses (|error| < 1.5e-7). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

#define CHUNK 4096    /* elements per OpenMP work item */
#define BIAS_ROWS 64  /* rows per partial sum of a bias's gradient (gelu_dropout_backward) */

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* The 16-bit draw of the element whose index has low word lo and high word h, with hi = h + k1. */
static inline uint32_t draw16(uint32_t lo, uint32_t hi, uint32_t k0) {
    return mix32(mix32(lo ^ k0) ^ hi) >> 16;
}

/* out[i] = scale where element i is kept, else 0 (inverted-dropout multipliers), i in [0, n). */
void dropout_scales(float *out, int64_t n, uint32_t k0, uint32_t k1, uint32_t level, float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t len = n - c < CHUNK ? n - c : CHUNK;
        uint32_t lo = (uint32_t)c, hi = (uint32_t)((uint64_t)c >> 32) + k1;  /* a chunk never crosses 2^32 */
        float *o = out + c;
        #pragma omp simd
        for (int64_t j = 0; j < len; j++)
            o[j] = draw16(lo + (uint32_t)j, hi, k0) >= level ? scale : 0.0f;
    }
}

/* out[i] = 1 where element i is kept, else 0 (a torch.bool keep-mask), i in [0, n). */
void dropout_keep(uint8_t *out, int64_t n, uint32_t k0, uint32_t k1, uint32_t level, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t len = n - c < CHUNK ? n - c : CHUNK;
        uint32_t lo = (uint32_t)c, hi = (uint32_t)((uint64_t)c >> 32) + k1;
        uint8_t *o = out + c;
        #pragma omp simd
        for (int64_t j = 0; j < len; j++)
            o[j] = draw16(lo + (uint32_t)j, hi, k0) >= level;
    }
}

/* scale where the draw is kept, else 0, selected on the bits: a floating-point select would let
   GCC branch on it, and the loop would not vectorize. */
static inline float kept_scale(uint32_t draw, uint32_t level, float scale) {
    uint32_t bits;
    memcpy(&bits, &scale, sizeof bits);
    bits &= -(uint32_t)(draw >= level);
    memcpy(&scale, &bits, sizeof bits);
    return scale;
}

/* The dropout multiplier of that element (`draw16`): scale where kept, else 0. */
static inline float multiplier(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t level, float scale) {
    return kept_scale(draw16(lo, hi, k0), level, scale);
}

/* Phi(a) = (1 + erf(a / sqrt 2)) / 2, given e = exp(-a^2 / 2) (which the derivative reuses). */
static inline float normal_cdf(float a, float e) {
    float z = fabsf(a) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.3275911f * z);
    float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
    float erf_abs = 1.0f - poly * e;
    return 0.5f + 0.5f * copysignf(erf_abs, a);
}

/* The GELU kernels run over (rows, cols) with the layer's bias added per column. A work item is a
   row, in pieces that do not cross a multiple of 2^32 (the hash's high word changes there): the
   piece [seg, next) with next = piece_end(seg, end of the row). */
static inline int64_t piece_end(int64_t seg, int64_t end) {
    int64_t boundary = (seg | 0xFFFFFFFFLL) + 1;
    return boundary < end ? boundary : end;
}

/* out = gelu(a + bias) * scale where the element is kept, else 0; a (rows, cols), bias (cols). */
void gelu_dropout_forward(const float *a, const float *bias, float *out, int64_t rows, int64_t cols, uint32_t k0,
                          uint32_t k1, uint32_t level, float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++)
        for (int64_t seg = row * cols, next; seg < (row + 1) * cols; seg = next) {
            next = piece_end(seg, (row + 1) * cols);
            uint32_t lo = (uint32_t)seg, hi = (uint32_t)((uint64_t)seg >> 32) + k1;
            const float *x = a + seg, *b = bias + (seg - row * cols);
            float *o = out + seg;
            #pragma omp simd
            for (int64_t j = 0; j < next - seg; j++) {
                float m = multiplier(lo + (uint32_t)j, hi, k0, level, scale);
                float h = x[j] + b[j];
                o[j] = h * normal_cdf(h, exp_nonpositive(-0.5f * h * h)) * m;
            }
        }
}

/* out = grad * gelu'(a + bias) * scale where the element is kept, else 0: the gradient of a. The
   bias's gradient, out summed over rows, is summed per block of BIAS_ROWS rows into
   partial (ceil(rows / BIAS_ROWS), cols), whose total (the caller's) does not depend on the number
   of threads. gelu'(h) = Phi(h) + h exp(-h^2 / 2) / sqrt(2 pi). */
void gelu_dropout_backward(const float *a, const float *bias, const float *grad, float *out, float *partial,
                           int64_t rows, int64_t cols, uint32_t k0, uint32_t k1, uint32_t level, float scale,
                           int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += BIAS_ROWS) {
        float *acc = partial + (r0 / BIAS_ROWS) * cols;
        memset(acc, 0, sizeof(float) * cols);
        for (int64_t row = r0; row < rows && row < r0 + BIAS_ROWS; row++)
            for (int64_t seg = row * cols, next; seg < (row + 1) * cols; seg = next) {
                next = piece_end(seg, (row + 1) * cols);
                uint32_t lo = (uint32_t)seg, hi = (uint32_t)((uint64_t)seg >> 32) + k1;
                int64_t col = seg - row * cols;
                const float *x = a + seg, *b = bias + col, *g = grad + seg;
                float *o = out + seg, *ac = acc + col;
                #pragma omp simd
                for (int64_t j = 0; j < next - seg; j++) {
                    float m = multiplier(lo + (uint32_t)j, hi, k0, level, scale);
                    float h = x[j] + b[j], e = exp_nonpositive(-0.5f * h * h), cdf = normal_cdf(h, e);
                    o[j] = g[j] * (cdf + h * e * 0.39894228040143268f) * m;
                    ac[j] += o[j];
                }
            }
    }
}

/* The residual update of a block branch with its dropout, over rows = B N rows of D (B sequences
   of N positions): out = x + gate * y * m, m = scale where the element is kept, else 0. gate is
   (rows, D) like x (index NULL) or a (U, N, D) table whose row (index[b], n) row (b, n) reads (the
   adaLN gate, computed once per class in the batch). */
static inline const float *gate_row(const float *gate, const int64_t *index, int64_t row, int64_t N, int64_t D) {
    return gate + (index ? index[row / N] * N + row % N : row) * D;
}

void gated_residual_forward(const float *x, const float *gate, const int64_t *index, const float *y, float *out,
                            int64_t rows, int64_t N, int64_t D, uint32_t k0, uint32_t k1, uint32_t level,
                            float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        const float *gr = gate_row(gate, index, row, N, D);
        for (int64_t seg = row * D, next; seg < (row + 1) * D; seg = next) {
            next = piece_end(seg, (row + 1) * D);
            uint32_t lo = (uint32_t)seg, hi = (uint32_t)((uint64_t)seg >> 32) + k1;
            const float *xc = x + seg, *gc = gr + (seg - row * D), *yc = y + seg;
            float *o = out + seg;
            #pragma omp simd
            for (int64_t j = 0; j < next - seg; j++) {
                float m = multiplier(lo + (uint32_t)j, hi, k0, level, scale);
                o[j] = xc[j] + gc[j] * (yc[j] * m);
            }
        }
    }
}

/* One row's grad_y = grad * gate * m, and grad * y * m written to gg (add: added to it). */
static inline void residual_row_backward(const float *gr, const float *y, const float *grad, float *gg,
                                         float *grad_y, int64_t row, int64_t D, int add, uint32_t k0, uint32_t k1,
                                         uint32_t level, float scale) {
    for (int64_t seg = row * D, next; seg < (row + 1) * D; seg = next) {
        next = piece_end(seg, (row + 1) * D);
        uint32_t lo = (uint32_t)seg, hi = (uint32_t)((uint64_t)seg >> 32) + k1;
        int64_t col = seg - row * D;
        const float *gc = gr + col, *yc = y + seg, *g = grad + seg;
        float *ggc = gg + col, *gy = grad_y + seg;
        #pragma omp simd
        for (int64_t j = 0; j < next - seg; j++) {
            float gm = g[j] * multiplier(lo + (uint32_t)j, hi, k0, level, scale);
            ggc[j] = (add ? ggc[j] : 0.0f) + gm * yc[j];
            gy[j] = gm * gc[j];
        }
    }
}

/* grad_y = grad * gate * m and grad_gate = grad * y * m: (rows, D) where index is NULL, else
   summed into the zeroed (U, N, D) table per position, sequences in order (a thread owns whole
   positions: the same result on any number of threads). The gradient of x is grad itself. */
void gated_residual_backward(const float *gate, const int64_t *index, const float *y, const float *grad,
                             float *grad_gate, float *grad_y, int64_t rows, int64_t N, int64_t D, uint32_t k0,
                             uint32_t k1, uint32_t level, float scale, int threads) {
    if (index) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t row = n; row < rows; row += N)
                residual_row_backward(gate_row(gate, index, row, N, D), y, grad,
                                      (float *)gate_row(grad_gate, index, row, N, D), grad_y, row, D, 1, k0, k1,
                                      level, scale);
        return;
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; row++)
        residual_row_backward(gate + row * D, y, grad, grad_gate + row * D, grad_y, row, D, 0, k0, k1, level, scale);
}
