// A small cache-blocked single-precision GEMM (no BLAS dependency).
#pragma once

#include <cstdint>

namespace lrexport {

// C[M, N] = A[M, K] @ B[K, N] (row-major, leading dimensions lda, ldb, ldc; C is overwritten).
// Register-blocked 4 x 16 micro-kernel, K and N blocked for the caches. On x86-64 an AVX2+FMA
// copy of each function here is used when the CPU has both (checked once at run time).
void sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
           int64_t ldc) noexcept;

// y[j] = dot(A[j, 0..k), x) for j in [0, n)  (rows of A at stride lda)
void sgemv_rows(int64_t n, int64_t k, const float* A, int64_t lda, const float* x, float* y) noexcept;

// y[0..k) = sum_j w[j] * A[j, 0..k) for j in [0, n)  (y is overwritten)
void sgemv_cols(int64_t n, int64_t k, const float* A, int64_t lda, const float* w, float* y) noexcept;

// x[i] = exp(x[i] - shift) for i in [0, n); returns the sum. A polynomial exp (relative error
// ~2e-7) that vectorizes; arguments below -87.3 give 0.
float exp_shifted_sum(float* x, int64_t n, float shift) noexcept;

}  // namespace lrexport
