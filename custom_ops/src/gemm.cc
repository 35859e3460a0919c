// Cache-blocked SGEMM and small vector helpers (see gemm.h).
//
// Compiled with -ffp-contract=fast (CMakeLists.txt): multiply-adds may fuse. The baseline
// code targets the portable -march of the build; on x86-64 with GCC/Clang a second copy is
// compiled for AVX2+FMA and picked at run time when the CPU has both (checked once, by CPU
// features: target_clones("arch=...") would test the CPU model instead).
#include "gemm.h"

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(LREXPORT_NO_DISPATCH)
#define LRX_DISPATCH 1
#define LRX_AVX2 __attribute__((target("avx2,fma")))
#else
#define LRX_DISPATCH 0
#endif

#define LRX_INLINE inline __attribute__((always_inline))

namespace lrexport {
namespace {

constexpr int64_t MR = 4;     // rows of the register tile
constexpr int64_t NR = 16;    // columns of the register tile
constexpr int64_t KC = 256;   // K block
constexpr int64_t NC = 512;   // N block

// 8 floats, unaligned (GCC/Clang vector extension: one AVX register, or two SSE ones).
typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

// C[MR, NR] (+)= A[MR, k] @ B[k, NR]: 8 vector accumulators stay in registers.
LRX_INLINE void micro_full(int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                           int64_t ldc, bool accumulate) {
  static_assert(MR == 4 && NR == 16, "the micro-kernel is written for 4 x 16 tiles");
  v8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
  const float* a0 = A;
  const float* a1 = A + lda;
  const float* a2 = A + 2 * lda;
  const float* a3 = A + 3 * lda;
  for (int64_t p = 0; p < k; ++p) {
    const v8 b0 = *reinterpret_cast<const v8*>(B + p * ldb);
    const v8 b1 = *reinterpret_cast<const v8*>(B + p * ldb + 8);
    float x = a0[p];
    c00 += x * b0;
    c01 += x * b1;
    x = a1[p];
    c10 += x * b0;
    c11 += x * b1;
    x = a2[p];
    c20 += x * b0;
    c21 += x * b1;
    x = a3[p];
    c30 += x * b0;
    c31 += x * b1;
  }
  v8* r0 = reinterpret_cast<v8*>(C);
  v8* r1 = reinterpret_cast<v8*>(C + ldc);
  v8* r2 = reinterpret_cast<v8*>(C + 2 * ldc);
  v8* r3 = reinterpret_cast<v8*>(C + 3 * ldc);
  if (accumulate) {
    r0[0] += c00; r0[1] += c01;
    r1[0] += c10; r1[1] += c11;
    r2[0] += c20; r2[1] += c21;
    r3[0] += c30; r3[1] += c31;
  } else {
    r0[0] = c00; r0[1] = c01;
    r1[0] = c10; r1[1] = c11;
    r2[0] = c20; r2[1] = c21;
    r3[0] = c30; r3[1] = c31;
  }
}

// Any tile up to MR x NR (edges).
LRX_INLINE void micro_edge(int64_t mr, int64_t nr, int64_t k, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  float acc[MR][NR];
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t c = 0; c < NR; ++c) acc[r][c] = 0.0f;
  for (int64_t p = 0; p < k; ++p) {
    const float* b = B + p * ldb;
    for (int64_t r = 0; r < mr; ++r) {
      const float x = A[r * lda + p];
      for (int64_t c = 0; c < nr; ++c) acc[r][c] += x * b[c];
    }
  }
  for (int64_t r = 0; r < mr; ++r) {
    float* c = C + r * ldc;
    for (int64_t j = 0; j < nr; ++j) c[j] = accumulate ? c[j] + acc[r][j] : acc[r][j];
  }
}

LRX_INLINE void sgemm_impl(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = std::min(NC, N - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      const bool acc = pc > 0;
      for (int64_t ic = 0; ic < M; ic += MR) {
        const int64_t mr = std::min(MR, M - ic);
        const float* a = A + ic * lda + pc;
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int64_t nr = std::min(NR, nc - jr);
          const float* b = B + pc * ldb + jc + jr;
          float* c = C + ic * ldc + jc + jr;
          if (mr == MR && nr == NR) {
            micro_full(kc, a, lda, b, ldb, c, ldc, acc);
          } else {
            micro_edge(mr, nr, kc, a, lda, b, ldb, c, ldc, acc);
          }
        }
      }
    }
  }
}

LRX_INLINE float sdot_impl(const float* a, const float* b, int64_t n) {
  // 8 partial sums: vectorizes without reassociation flags
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float t = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

LRX_INLINE void saxpy_impl(int64_t n, float alpha, const float* x, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

LRX_INLINE void sgemv_rows_impl(int64_t n, int64_t k, const float* A, int64_t lda, const float* x, float* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = sdot_impl(A + j * lda, x, k);
}

LRX_INLINE void sgemv_cols_impl(int64_t n, int64_t k, const float* A, int64_t lda, const float* w, float* y) {
  for (int64_t c = 0; c < k; ++c) y[c] = 0.0f;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four rows per pass over y
    const float w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
    const float* a0 = A + j * lda;
    const float* a1 = a0 + lda;
    const float* a2 = a1 + lda;
    const float* a3 = a2 + lda;
    for (int64_t c = 0; c < k; ++c) y[c] += (w0 * a0[c] + w1 * a1[c]) + (w2 * a2[c] + w3 * a3[c]);
  }
  for (; j < n; ++j) saxpy_impl(k, w[j], A + j * lda, y);
}

LRX_INLINE float exp_one(float x) {
  // Cephes-style expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, then 2^n.
  x = x < -87.3365f ? -87.3365f : (x > 88.3762f ? 88.3762f : x);
  float fx = x * 1.44269504088896341f;
  fx = __builtin_floorf(fx + 0.5f);
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t e = static_cast<int32_t>(fx) + 127;  // >= 1 after the clamp
  float two_n;
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  __builtin_memcpy(&two_n, &bits, 4);
  return y * two_n;
}

LRX_INLINE float exp_shifted_sum_impl(float* x, int64_t n, float shift) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = exp_one(x[i + j] - shift);
      x[i + j] = v;
      s[j] += v;
    }
  float t = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; i < n; ++i) {
    x[i] = exp_one(x[i] - shift);
    t += x[i];
  }
  return t;
}

#if LRX_DISPATCH
LRX_AVX2 void sgemv_rows_avx2(int64_t n, int64_t k, const float* A, int64_t lda, const float* x, float* y) {
  sgemv_rows_impl(n, k, A, lda, x, y);
}
LRX_AVX2 void sgemv_cols_avx2(int64_t n, int64_t k, const float* A, int64_t lda, const float* w, float* y) {
  sgemv_cols_impl(n, k, A, lda, w, y);
}
LRX_AVX2 float exp_shifted_sum_avx2(float* x, int64_t n, float shift) { return exp_shifted_sum_impl(x, n, shift); }
LRX_AVX2 void sgemm_avx2(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                         float* C, int64_t ldc) {
  sgemm_impl(M, N, K, A, lda, B, ldb, C, ldc);
}

bool use_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

}  // namespace

void sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
           int64_t ldc) noexcept {
#if LRX_DISPATCH
  if (use_avx2()) return sgemm_avx2(M, N, K, A, lda, B, ldb, C, ldc);
#endif
  sgemm_impl(M, N, K, A, lda, B, ldb, C, ldc);
}

void sgemv_rows(int64_t n, int64_t k, const float* A, int64_t lda, const float* x, float* y) noexcept {
#if LRX_DISPATCH
  if (use_avx2()) return sgemv_rows_avx2(n, k, A, lda, x, y);
#endif
  sgemv_rows_impl(n, k, A, lda, x, y);
}

void sgemv_cols(int64_t n, int64_t k, const float* A, int64_t lda, const float* w, float* y) noexcept {
#if LRX_DISPATCH
  if (use_avx2()) return sgemv_cols_avx2(n, k, A, lda, w, y);
#endif
  sgemv_cols_impl(n, k, A, lda, w, y);
}

float exp_shifted_sum(float* x, int64_t n, float shift) noexcept {
#if LRX_DISPATCH
  if (use_avx2()) return exp_shifted_sum_avx2(x, n, shift);
#endif
  return exp_shifted_sum_impl(x, n, shift);
}


}  // namespace lrexport
