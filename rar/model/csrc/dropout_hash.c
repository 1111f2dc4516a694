/* Dropout masks from a counter-based hash (rar/model/dropout.py has the same function in torch).

   Element i of a mask with key (k0, k1) draws the 16-bit value
       mix(mix(lo(i) ^ k0) ^ (hi(i) + k1)) >> 16        (lo, hi: the low and high 32 bits of i)
   where mix is a 32-bit integer finalizer (two multiply-xorshift rounds), and is kept when that
   value is >= level (P(drop) = level / 65536). A mask is a pure function of its key and shape: the
   same on any number of threads, on any device, and each element costs a few integer operations
   instead of a serial generator's step. Built by rar.core.toolchain; no torch headers.

   gelu_dropout_forward/backward fuse the MLP's exact GELU with its dropout: one pass each way over
   the hidden layer, and no mask in memory (the backward pass draws it again from the key). Their
   erf is the Abramowitz-Stegun 7.1.26 form torch's vectorized CPU GELU uses (|error| < 1.5e-7). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

#define CHUNK 4096  /* elements per OpenMP work item */

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
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
            o[j] = (mix32(mix32((lo + (uint32_t)j) ^ k0) ^ hi) >> 16) >= level ? scale : 0.0f;
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
            o[j] = (mix32(mix32((lo + (uint32_t)j) ^ k0) ^ hi) >> 16) >= level;
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

/* Phi(a) = (1 + erf(a / sqrt 2)) / 2, given e = exp(-a^2 / 2) (which the derivative reuses). */
static inline float normal_cdf(float a, float e) {
    float z = fabsf(a) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.3275911f * z);
    float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
    float erf_abs = 1.0f - poly * e;
    return 0.5f + 0.5f * copysignf(erf_abs, a);
}

/* out[i] = gelu(a[i]) * scale where element i is kept, else 0. */
void gelu_dropout_forward(const float *a, float *out, int64_t n, uint32_t k0, uint32_t k1, uint32_t level,
                          float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t len = n - c < CHUNK ? n - c : CHUNK;
        uint32_t lo = (uint32_t)c, hi = (uint32_t)((uint64_t)c >> 32) + k1;
        const float *x = a + c;
        float *o = out + c;
        #pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            float m = kept_scale(mix32(mix32((lo + (uint32_t)j) ^ k0) ^ hi) >> 16, level, scale);
            o[j] = x[j] * normal_cdf(x[j], exp_nonpositive(-0.5f * x[j] * x[j])) * m;
        }
    }
}

/* out[i] = grad[i] * gelu'(a[i]) * scale where element i is kept, else 0;
   gelu'(a) = Phi(a) + a exp(-a^2 / 2) / sqrt(2 pi). */
void gelu_dropout_backward(const float *a, const float *grad, float *out, int64_t n, uint32_t k0, uint32_t k1,
                           uint32_t level, float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t len = n - c < CHUNK ? n - c : CHUNK;
        uint32_t lo = (uint32_t)c, hi = (uint32_t)((uint64_t)c >> 32) + k1;
        const float *x = a + c, *g = grad + c;
        float *o = out + c;
        #pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            float m = kept_scale(mix32(mix32((lo + (uint32_t)j) ^ k0) ^ hi) >> 16, level, scale);
            float e = exp_nonpositive(-0.5f * x[j] * x[j]), cdf = normal_cdf(x[j], e);
            o[j] = g[j] * (cdf + x[j] * e * 0.39894228040143268f) * m;
        }
    }
}

/* The residual update of a block branch with its dropout: out[i] = x[i] + gate[i] * y[i] * m[i],
   m[i] = scale where element i is kept, else 0. */
void gated_residual_forward(const float *x, const float *gate, const float *y, float *out, int64_t n, uint32_t k0,
                            uint32_t k1, uint32_t level, float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t len = n - c < CHUNK ? n - c : CHUNK;
        uint32_t lo = (uint32_t)c, hi = (uint32_t)((uint64_t)c >> 32) + k1;
        const float *xc = x + c, *gc = gate + c, *yc = y + c;
        float *o = out + c;
        #pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            float m = kept_scale(mix32(mix32((lo + (uint32_t)j) ^ k0) ^ hi) >> 16, level, scale);
            o[j] = xc[j] + gc[j] * (yc[j] * m);
        }
    }
}

/* grad_gate = grad * y * m and grad_y = grad * gate * m (the gradient of x is grad itself). */
void gated_residual_backward(const float *gate, const float *y, const float *grad, float *grad_gate, float *grad_y,
                             int64_t n, uint32_t k0, uint32_t k1, uint32_t level, float scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t len = n - c < CHUNK ? n - c : CHUNK;
        uint32_t lo = (uint32_t)c, hi = (uint32_t)((uint64_t)c >> 32) + k1;
        const float *gc = gate + c, *yc = y + c, *g = grad + c;
        float *gg = grad_gate + c, *gy = grad_y + c;
        #pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            float gm = g[j] * kept_scale(mix32(mix32((lo + (uint32_t)j) ^ k0) ^ hi) >> 16, level, scale);
            gg[j] = gm * yc[j];
            gy[j] = gm * gc[j];
        }
    }
}
