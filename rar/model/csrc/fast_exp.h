/* e^x for x <= 0, shared by rar's training kernels (dropout_hash.c, causal_attention.c). */
#ifndef RAR_FAST_EXP_H
#define RAR_FAST_EXP_H

#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (Cody-Waite reduction to [-ln2/2, ln2/2] and the Cephes expf polynomial), x
   clamped at -87 so that 2^n stays a normal float; written out so that the loops vectorize. */
static inline float exp_nonpositive(float x) {
    float floor_ = -87.0f + 0.0f * x;  /* not a constant: a constant lets GCC branch on the clamp */
    x = x > floor_ ? x : floor_;
    float n = -(float)(int32_t)(0.5f - x * 1.44269504088896341f);  /* round(x log2 e): truncation of a positive */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n as a float's bits */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return y * two_n;
}

#endif
