// CUDA kernels of LowRankKVAttention. Semantics: lrexport.trace.latent_attention_op.
// latent_attention_reference; layouts: docs/custom_op.md and ../quant.h (shared with the CPU kernel,
// so codes and params are bit-exact with it).
//
// One call, all on the stream ONNX Runtime gives:
//   0. present <- past (cudaMemcpyAsync) where they are different buffers; past_len in the kernel
//      parameters (up to 16 rows) or copied to the device (LowRankKVAttentionDeviceLen: already
//      there, never read on the host, so that a CUDA graph of the call replays with new lengths);
//   A. write_tokens: the new tokens' latents into the present caches at past_len[b] + t, quantized
//      per token and group when bits > 0 (one thread per quantization group);
//   B. attend_partial, flash-decoding style: one block per (batch row, tile of up to `qtile` new
//      tokens, KV head, split of the key positions). The block rebuilds the keys of its positions
//      tile by tile (32 positions) in shared memory: latent rows (dequantized) @ the k_up slice of
//      its KV head slot, in chunks of 32 latent channels (k_up chunk in shared memory), + k_bias,
//      RoPE at the key's position. The queries of the tile and of every query head sharing the KV
//      head (GQA) are scored against them, with an online softmax, and accumulate P . value latent
//      (rv channels). Each block writes (max, sum, acc) per query row and split.
//   C. combine: one block per (row, token, query head) merges the splits, normalises and applies
//      the head's v_up slice when v_up is given.
// Float32 accumulation everywhere; float16 activations are converted on load. Scratch memory:
// B int64 + B*S*Hq*nsplit*(rv + 2) floats, where nsplit > 1 only when there are too few blocks
// to fill the GPU (decode), so it stays linear in the number of new tokens.
//
// Tensor cores (float16 models): a float16 model whose head dim is a multiple of 16, on compute
// capability 7.0 or newer, runs attend_partial<__half, true> unless LREXPORT_CUDA_MMA=0 is in the
// environment (read by plan() at every call): the three products of B on tensor
// cores with WMMA (m16n16k16, float16 operands in shared memory, float accumulators), each warp
// taking 16x16 output tiles round robin:
//   keys   [32 positions, D] (float, rows of D + 4) += latent chunk [32, 32] (float16; dequantized
//          codes rounded to float16) @ k_up chunk [32, D] (float16), per 32-channel chunk; bias
//          before and RoPE after in float as in the scalar path;
//   scores [nq rounded up to 16, 32] = queries [.., D] (RoPE'd and scaled, rounded to float16;
//          padding rows zero) @ keys^T (after RoPE, rounded to float16; read as a column-major B);
//          then the same masking and online softmax in float (padding rows unused);
//   acc    [.., rv rounded up to 16] += probabilities (rounded to float16) @ value chunk [32, 32]
//          (float16).
// Rounding keys, queries and probabilities to float16 adds errors of float16's unit roundoff
// (2^-11) relative to the scores and the output, within the float16 tolerance of
// bench/gpu_check_ort.py; the caches are written by the same write_tokens (bit-exact). Checked on
// an H200 (bench/results/gpu_check_ort_mma.json) and in the CPU emulation (emulate.h's wmma
// stand-in). Otherwise, and always for float32, the scalar float32 path runs.
#if defined(LREXPORT_CUDA_EMULATE)
#include "emulate.h"  // test builds: the kernels run on the CPU (see emulate.h)
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
// 32-byte alignment at least: WMMA fragment pointers into shared memory need it
#define LRX_SHARED_FLOATS(name) extern __shared__ __align__(128) float name[]
#define LRX_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "../quant.h"
#include "launch.h"

namespace lrexport {
namespace cuda {
namespace {

constexpr int kThreads = 256;   // threads of the attention and write blocks
constexpr int kTile = 32;       // key positions per tile (= warp size: one lane per position)
constexpr int kChunk = 32;      // latent channels per k_up / value chunk
constexpr size_t kSmemTarget = 96 * 1024;  // shrink the query tile below this much shared memory
constexpr int kInlineRows = 16;            // past_len of up to this many rows: in the kernel parameters
constexpr int kMmaTile = 16;               // WMMA m16n16k16
constexpr int kHalfPad = 8;                // float16 rows padded by 8 (16 bytes: WMMA's ldm rule, fewer bank conflicts)
static_assert(kTile % kMmaTile == 0 && kChunk % kMmaTile == 0, "WMMA tiles of 16");

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- element access -----------------------------------------------------------------------

template <class T>
__device__ __forceinline__ float ld(const T* p, int64_t i);
template <>
__device__ __forceinline__ float ld<float>(const float* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}

template <class T>
__device__ __forceinline__ void st(T* p, int64_t i, float v);
template <>
__device__ __forceinline__ void st<float>(float* p, int64_t i, float v) {
  p[i] = v;
}
template <>
__device__ __forceinline__ void st<__half>(__half* p, int64_t i, float v) {
  p[i] = __float2half_rn(v);
}

template <class T>
struct Load {
  const T* p;
  __device__ float operator()(int64_t i) const { return ld(p, i); }
};

// The kernels' view of a call (by value: kernel parameters).
struct Args {
  int64_t B, S, Hq, Hkv, s, G, D, rk, rv, P, Prope, rep;
  int64_t Wk, Wv, Ck, Cv, NPk, NPv, out_w;
  int bits;
  int64_t qg;
  int64_t window;
  float scale;
  const int64_t* past_len;  // device memory (more than kInlineRows rows, or device lengths), else null
  int64_t past_len_inline[kInlineRows];  // B <= kInlineRows: the values, no copy (no stream sync)
  int64_t len_max;  // min(P, Prope) - S: the largest valid past_len
  const void *query, *latent_k, *latent_v, *k_up, *k_bias, *v_up, *cos, *sin;
  void *out, *cache_k, *params_k, *cache_v, *params_v;  // the present caches
  int64_t qtile, nqt, nsplit;
  float *part_ml, *part_acc;  // [B*S*Hq*nsplit, 2] (max, sum), [B*S*Hq*nsplit, rv]
  // what combine reads: max and sum of partial row p at part_m[p * ml_step], part_l[p * ml_step],
  // its accumulators at part_acc + p * acc_ld; max in units of exp2 (the Triton kernel) or exp
  const float *part_m, *part_l;
  int64_t ml_step, acc_ld;
  bool max_log2;
  int32_t* past32;  // the Triton decode kernel's past_len (int32)
  int64_t row_block_n;  // > 0: past32 holds (past_len, split_len) per row, split_len a multiple of this
};

__device__ __forceinline__ int64_t raw_past_len(const Args& a, int64_t b) {
  return a.past_len ? a.past_len[b] : a.past_len_inline[b];
}
// Whether row b's past_len fits the cache and the RoPE table (always, when checked on the host).
__device__ __forceinline__ bool len_ok(const Args& a, int64_t b) {
  const int64_t v = raw_past_len(a, b);
  return v >= 0 && v <= a.len_max;
}
// Row b's past_len, clamped into range: a device length that is not (LowRankKVAttentionDeviceLen)
// reads no memory outside the tensors; its row's cache is left alone and its output is NaN.
__device__ __forceinline__ int64_t past_len_of(const Args& a, int64_t b) {
  return imax(0, imin(raw_past_len(a, b), a.len_max));
}

// Latent channel `ch` of cache row `row` (a position of a batch row) as a float.
template <class T>
__device__ __forceinline__ float cache_value(const void* cache, const void* params, int64_t row, int64_t ch,
                                             int64_t W, int64_t C, int64_t NP, int bits, int64_t qg) {
  if (bits == 0) return ld(static_cast<const T*>(cache), row * C + ch);
  const uint8_t* codes = static_cast<const uint8_t*>(cache) + row * C;
  const uint16_t* prm = static_cast<const uint16_t*>(params) + row * NP;
  const int64_t gi = ch / qg;
  const float sf = f16_to_f32(prm[gi]), zf = f16_to_f32(prm[W / qg + gi]);
  return mul_add_unfused(static_cast<float>(get_code(codes, ch, bits)), sf, zf);
}

// Row b's past_len as int32 for the Triton kernel; for a kernel compiled with ROW_SPLITS,
// (past_len, split_len), split_len the host's split rule (plan_triton) applied to the row's own
// length over the planned number of splits.
__device__ __forceinline__ void past32_row(const Args& a, int64_t b) {
  const int64_t past = past_len_of(a, b);
  if (a.row_block_n <= 0) {
    a.past32[b] = static_cast<int32_t>(past);
    return;
  }
  const int64_t kv = past + a.S, bn = a.row_block_n;
  const int64_t split = ((kv + a.nsplit - 1) / a.nsplit + bn - 1) / bn * bn;
  a.past32[2 * b] = static_cast<int32_t>(past);
  a.past32[2 * b + 1] = static_cast<int32_t>(split);
}

// ---- A: write the new tokens ----------------------------------------------------------------

// grid (B*S, 2): blockIdx.y 0 = keys, 1 = values. With a.past32 set (the Triton decode kernel
// follows), the block of each row's first token also writes its past_len as int32 (past32_row).
template <class T>
__global__ void __launch_bounds__(kThreads) write_tokens(Args a) {
  const int64_t row = blockIdx.x;  // b * S + t
  const int64_t b = row / a.S, t = row % a.S;
  if (a.past32 && t == 0 && blockIdx.y == 0 && threadIdx.x == 0) past32_row(a, b);
  if (!len_ok(a, b)) return;  // a device length out of range: nothing written
  const int64_t pos = past_len_of(a, b) + t;
  const bool is_v = blockIdx.y == 1;
  const T* src = static_cast<const T*>(is_v ? a.latent_v : a.latent_k) + row * (is_v ? a.Wv : a.Wk);
  const int64_t W = is_v ? a.Wv : a.Wk;
  const int64_t C = is_v ? a.Cv : a.Ck;
  const int64_t crow = b * a.P + pos;
  if (a.bits == 0) {
    T* dst = static_cast<T*>(is_v ? a.cache_v : a.cache_k) + crow * C;
    for (int64_t c = threadIdx.x; c < W; c += blockDim.x) dst[c] = src[c];
    return;
  }
  uint8_t* codes = static_cast<uint8_t*>(is_v ? a.cache_v : a.cache_k) + crow * C;
  const int64_t NP = is_v ? a.NPv : a.NPk;
  uint16_t* prm = static_cast<uint16_t*>(is_v ? a.params_v : a.params_k) + crow * NP;
  const int64_t ngroups = W / a.qg;
  for (int64_t gi = threadIdx.x; gi < ngroups; gi += blockDim.x)
    quantize_group_with(Load<T>{src + gi * a.qg}, a.qg, a.bits, codes + gi * a.qg * a.bits / 8, prm + gi,
                        prm + ngroups + gi);
}

// ---- B: attention over a split of the key positions ---------------------------------------

struct Smem {  // offsets (floats) into the dynamic shared memory of attend_partial
  int64_t q, k, buf, up, p, acc, m, l, corr, total;
  int64_t qh, kh, bufh, uph, ph;  // float16 buffers of the tensor-core path (offsets in floats)
  int64_t ldk;   // floats per key row: D + 1 (scalar), D + 4 (tensor cores: WMMA's float ldm rule)
  int64_t nqp;   // query rows: nq (scalar), nq rounded up to 16 (tensor cores)
  int64_t lda;   // floats per accumulator row: rv (scalar), rv rounded up to 16 (tensor cores)
};

__host__ __device__ inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

__host__ __device__ inline Smem smem_layout(int64_t nq, int64_t D, int64_t rv, bool mma) {
  Smem s{};
  if (!mma) {
    s.ldk = D + 1;
    s.nqp = nq;
    s.lda = rv;
    s.q = 0;                                  // [nq, D] RoPE'd, scaled queries
    s.k = s.q + nq * D;                       // [kTile, D + 1] keys (padded rows: no bank conflicts)
    s.buf = s.k + kTile * s.ldk;              // [kTile, kChunk] latent or value chunk
    s.up = s.buf + kTile * kChunk;            // [kChunk, D] k_up chunk
    s.p = s.up + kChunk * D;                  // [nq, kTile] scores, then probabilities
    s.acc = s.p + nq * kTile;                 // [nq, rv] value-latent accumulators
    s.m = s.acc + nq * rv;                    // [nq] running max
  } else {  // every buffer 32-byte aligned (8 floats); float16 buffers of n values take n / 2 floats
    const int64_t nqp = round_up(nq, kMmaTile), ldh = D + kHalfPad;
    s.ldk = D + 4;
    s.nqp = nqp;
    s.lda = round_up(rv, kMmaTile);
    s.qh = 0;                                                     // half [nqp, D + 8] queries
    s.k = s.qh + round_up(nqp * ldh / 2, 8);                      // float [kTile, D + 4] keys
    s.kh = s.k + round_up(kTile * s.ldk, 8);                      // half [kTile, D + 8] keys after RoPE
    s.bufh = s.kh + round_up(kTile * ldh / 2, 8);                 // half [kTile, kChunk + 8] latent / value chunk
    s.uph = s.bufh + round_up(kTile * (kChunk + kHalfPad) / 2, 8);  // half [kChunk, D + 8] k_up chunk
    s.p = s.uph + round_up(kChunk * ldh / 2, 8);                  // float [nqp, kTile] scores, probabilities
    s.ph = s.p + nqp * kTile;                                     // half [nqp, kTile + 8] probabilities
    s.acc = s.ph + round_up(nqp * (kTile + kHalfPad) / 2, 8);     // float [nqp, lda] accumulators
    s.m = s.acc + nqp * s.lda;
  }
  s.l = s.m + nq;                           // [nq] running sum
  s.corr = s.l + nq;                        // [nq] rescale factor of this tile
  s.total = s.corr + nq;
  return s;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The split combination's block: its threads, warps, groups of rv threads that sum the
// accumulators of every ng-th split, and its shared memory (bytes).
constexpr int kCombineThreads = 128;
constexpr int kCombineWarps = kCombineThreads / 32;
__host__ __device__ inline int64_t combine_groups(int64_t rv) { return rv < kCombineThreads ? kCombineThreads / rv : 1; }
inline size_t combine_smem(int64_t rv, int64_t nsplit) {
  return static_cast<size_t>(combine_groups(rv) * rv + rv + nsplit + 2 * kCombineWarps) * 4;
}

// ---- tensor cores (float16 only, opt-in: see the top of the file) ----------------------------

#if defined(LREXPORT_CUDA_EMULATE) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
#define LRX_WMMA 1  // nvcuda::wmma exists (sm_70 and newer; emulate.h's stand-in)
#else
#define LRX_WMMA 0
#endif

// One warp's share of C [M, N] (float, row-major, ldc) = or += A [M, K] @ B [K, N] on tensor
// cores (WMMA m16n16k16, float16 inputs, float accumulators); M, N, K multiples of 16. A is
// row-major (lda); B is row-major [K, N] (ldb), or with kBt given as its transpose, row-major
// [N, K] (ldb: read as a column-major B). The 16x16 tiles of C go to the warps round robin (a
// warp-uniform loop: every lane of a warp makes the same WMMA calls). Leading dimensions: multiples
// of 8 halves / 4 floats; every tile pointer 32-byte aligned (the buffers are, see smem_layout).
template <bool kBt>
__device__ __forceinline__ void mma_tiles(float* C, int64_t ldc, const __half* A, int64_t lda, const __half* B,
                                          int64_t ldb, int64_t M, int64_t N, int64_t K, bool accumulate, int warp,
                                          int nwarps) {
#if LRX_WMMA
  namespace wmma = nvcuda::wmma;
  using BLayout = typename std::conditional<kBt, wmma::col_major, wmma::row_major>::type;
  const int64_t tiles_n = N / kMmaTile, tiles = M / kMmaTile * tiles_n;
  for (int64_t t = warp; t < tiles; t += nwarps) {
    const int64_t tm = t / tiles_n, tn = t % tiles_n;
    float* c_ptr = C + tm * kMmaTile * ldc + tn * kMmaTile;
    wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, kMmaTile, float> c;
    if (accumulate)
      wmma::load_matrix_sync(c, c_ptr, static_cast<unsigned>(ldc), wmma::mem_row_major);
    else
      wmma::fill_fragment(c, 0.0f);
    for (int64_t k0 = 0; k0 < K; k0 += kMmaTile) {
      wmma::fragment<wmma::matrix_a, kMmaTile, kMmaTile, kMmaTile, __half, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, kMmaTile, __half, BLayout> fb;
      wmma::load_matrix_sync(fa, A + tm * kMmaTile * lda + k0, static_cast<unsigned>(lda));
      wmma::load_matrix_sync(fb, kBt ? B + tn * kMmaTile * ldb + k0 : B + k0 * ldb + tn * kMmaTile,
                             static_cast<unsigned>(ldb));
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(c_ptr, c, static_cast<unsigned>(ldc), wmma::mem_row_major);
  }
#else
  __trap();  // not reached: plan() picks this path on compute capability 7.0 or newer only
#endif
}

// grid: B * nqt * Hkv * nsplit blocks (split fastest), kThreads threads. kMma (T = __half only):
// the key rebuild, the scores and P @ value latents on tensor cores (see the top of the file).
template <class T, bool kMma>
__global__ void __launch_bounds__(kThreads) attend_partial(Args a) {
  static_assert(!kMma || std::is_same<T, __half>::value, "the tensor-core path is for float16 models");
  LRX_SHARED_FLOATS(sm);
  int64_t bid = blockIdx.x;
  const int64_t split = bid % a.nsplit;
  bid /= a.nsplit;
  const int64_t kv = bid % a.Hkv;
  bid /= a.Hkv;
  const int64_t qt = bid % a.nqt;
  const int64_t b = bid / a.nqt;
  const int64_t g = kv / a.s, slot = kv % a.s;
  const int64_t D = a.D, half = D / 2, rv = a.rv, rk = a.rk, rep = a.rep;
  const int64_t t0 = qt * a.qtile;
  const int64_t ntok = imin(a.qtile, a.S - t0);
  const int64_t nq = ntok * rep;  // query rows n = i * rep + r: token t0 + i, query head kv * rep + r
  const Smem L = smem_layout(nq, D, rv, kMma);
  float* q_s = sm + L.q;
  float* k_s = sm + L.k;
  float* buf = sm + L.buf;
  float* up_s = sm + L.up;
  float* p_s = sm + L.p;
  float* acc = sm + L.acc;
  float* m_s = sm + L.m;
  float* l_s = sm + L.l;
  float* corr_s = sm + L.corr;
  // tensor-core path: float16 copies of the operands (row strides: D + 8, kChunk + 8, kTile + 8)
  __half* qh = reinterpret_cast<__half*>(sm + L.qh);
  __half* kh = reinterpret_cast<__half*>(sm + L.kh);
  __half* bufh = reinterpret_cast<__half*>(sm + L.bufh);
  __half* uph = reinterpret_cast<__half*>(sm + L.uph);
  __half* ph = reinterpret_cast<__half*>(sm + L.ph);
  const int64_t ldh = D + kHalfPad, ldc = kChunk + kHalfPad, ldp = kTile + kHalfPad;
  const int64_t nqp = L.nqp, lda = L.lda;

  const T* query = static_cast<const T*>(a.query);
  const T* kup = static_cast<const T*>(a.k_up);
  const T* kbias = static_cast<const T*>(a.k_bias);
  const T* cosp = static_cast<const T*>(a.cos);
  const T* sinp = static_cast<const T*>(a.sin);
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;

  // positions: queries p0 .. p0 + ntok - 1; keys some query may see: [lo, p1]
  const int64_t p0 = past_len_of(a, b) + t0, p1 = p0 + ntok - 1;
  const int64_t lo = a.window > 0 ? imax(0, p0 - a.window + 1) : 0;
  const int64_t span = p1 - lo + 1;
  int64_t chunk = (span + a.nsplit - 1) / a.nsplit;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  const int64_t j_begin = lo + split * chunk;
  const int64_t j_end = imin(p1 + 1, j_begin + chunk);

  // queries, RoPE'd at their positions and scaled
  if constexpr (kMma) {  // as float16, rows nq .. nqp - 1 zero
    for (int64_t o = tid; o < nqp * half; o += nthreads) {
      const int64_t n = o / half, d = o % half;
      float y1 = 0.0f, y2 = 0.0f;
      if (n < nq) {
        const int64_t i = n / rep, h = kv * rep + n % rep;
        const int64_t pos = p0 + i;
        const int64_t qrow = ((b * a.S + t0 + i) * a.Hq + h) * D;
        const float x1 = ld(query, qrow + d), x2 = ld(query, qrow + d + half);
        const float c = ld(cosp, pos * half + d), sn = ld(sinp, pos * half + d);
        y1 = a.scale * (x1 * c - x2 * sn);
        y2 = a.scale * (x2 * c + x1 * sn);
      }
      qh[n * ldh + d] = __float2half_rn(y1);
      qh[n * ldh + d + half] = __float2half_rn(y2);
    }
    for (int64_t o = tid; o < nqp * lda; o += nthreads) acc[o] = 0.0f;
  } else {
    for (int64_t o = tid; o < nq * half; o += nthreads) {
      const int64_t n = o / half, d = o % half;
      const int64_t i = n / rep, h = kv * rep + n % rep;
      const int64_t pos = p0 + i;
      const int64_t qrow = ((b * a.S + t0 + i) * a.Hq + h) * D;
      const float x1 = ld(query, qrow + d), x2 = ld(query, qrow + d + half);
      const float c = ld(cosp, pos * half + d), sn = ld(sinp, pos * half + d);
      q_s[n * D + d] = a.scale * (x1 * c - x2 * sn);
      q_s[n * D + d + half] = a.scale * (x2 * c + x1 * sn);
    }
    for (int64_t o = tid; o < nq * rv; o += nthreads) acc[o] = 0.0f;
  }
  for (int64_t n = tid; n < nq; n += nthreads) {
    m_s[n] = -INFINITY;
    l_s[n] = 0.0f;
  }
  __syncthreads();

  const int64_t Dp = L.ldk;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTile) {
    const int64_t nk = imin(kTile, j_end - j0);
    // -- keys of positions j0 .. j0 + nk - 1: bias, then + latent @ k_up slice, chunk by chunk
    for (int64_t o = tid; o < kTile * D; o += nthreads) {
      const int64_t j = o / D, d = o % D;
      k_s[j * Dp + d] = kbias ? ld(kbias, kv * D + d) : 0.0f;
    }
    for (int64_t r0 = 0; r0 < rk; r0 += kChunk) {
      const int64_t rc = imin(kChunk, rk - r0);
      __syncthreads();  // the previous chunk has been used
      if constexpr (kMma) {
        // float16 operands: latent chunk [kTile, kChunk] (dequantized codes rounded to float16),
        // k_up chunk [kChunk, D]; zero outside the tile's positions and the chunk's channels
        for (int64_t o = tid; o < kTile * kChunk; o += nthreads) {
          const int64_t j = o / kChunk, r = o % kChunk;
          const float x = (j < nk && r < rc) ? cache_value<T>(a.cache_k, a.params_k, b * a.P + j0 + j, g * rk + r0 + r,
                                                              a.Wk, a.Ck, a.NPk, a.bits, a.qg)
                                             : 0.0f;
          bufh[j * ldc + r] = __float2half_rn(x);
        }
        for (int64_t o = tid; o < kChunk * D; o += nthreads) {
          const int64_t r = o / D, d = o % D;
          uph[r * ldh + d] = r < rc ? kup[(g * rk + r0 + r) * (a.s * D) + slot * D + d] : __float2half_rn(0.0f);
        }
        __syncthreads();
        mma_tiles<false>(k_s, Dp, bufh, ldc, uph, ldh, kTile, D, kChunk, true, warp, nwarps);
      } else {
        for (int64_t o = tid; o < kTile * kChunk; o += nthreads) {
          const int64_t j = o / kChunk, r = o % kChunk;
          buf[o] = (j < nk && r < rc) ? cache_value<T>(a.cache_k, a.params_k, b * a.P + j0 + j, g * rk + r0 + r,
                                                       a.Wk, a.Ck, a.NPk, a.bits, a.qg)
                                      : 0.0f;
        }
        for (int64_t o = tid; o < kChunk * D; o += nthreads) {
          const int64_t r = o / D, d = o % D;
          up_s[o] = r < rc ? ld(kup, (g * rk + r0 + r) * (a.s * D) + slot * D + d) : 0.0f;
        }
        __syncthreads();
        for (int64_t o = tid; o < nk * D; o += nthreads) {
          const int64_t j = o / D, d = o % D;
          const float* lrow = buf + j * kChunk;
          float sum = 0.0f;
#pragma unroll 8
          for (int r = 0; r < kChunk; ++r) sum += lrow[r] * up_s[r * D + d];
          k_s[j * Dp + d] += sum;
        }
      }
    }
    __syncthreads();
    // -- RoPE of the keys at their positions
    if constexpr (kMma) {  // into the float16 key tile, whose rows nk .. kTile - 1 are zero (masked below)
      for (int64_t o = tid; o < kTile * half; o += nthreads) {
        const int64_t j = o / half, d = o % half;
        float y1 = 0.0f, y2 = 0.0f;
        if (j < nk) {
          const int64_t pos = j0 + j;
          const float x1 = k_s[j * Dp + d], x2 = k_s[j * Dp + d + half];
          const float c = ld(cosp, pos * half + d), sn = ld(sinp, pos * half + d);
          y1 = x1 * c - x2 * sn;
          y2 = x2 * c + x1 * sn;
        }
        kh[j * ldh + d] = __float2half_rn(y1);
        kh[j * ldh + d + half] = __float2half_rn(y2);
      }
    } else {
      for (int64_t o = tid; o < nk * half; o += nthreads) {
        const int64_t j = o / half, d = o % half;
        const int64_t pos = j0 + j;
        const float x1 = k_s[j * Dp + d], x2 = k_s[j * Dp + d + half];
        const float c = ld(cosp, pos * half + d), sn = ld(sinp, pos * half + d);
        k_s[j * Dp + d] = x1 * c - x2 * sn;
        k_s[j * Dp + d + half] = x2 * c + x1 * sn;
      }
    }
    __syncthreads();
    // -- scores (masked: causal, window)
    if constexpr (kMma) {
      // [nqp, kTile] = queries [nqp, D] @ keys^T; rows nq .. nqp - 1 are not used
      mma_tiles<true>(p_s, kTile, qh, ldh, kh, ldh, nqp, kTile, D, false, warp, nwarps);
      __syncthreads();
      for (int64_t o = tid; o < nq * kTile; o += nthreads) {
        const int64_t n = o / kTile, j = o % kTile;
        const int64_t pq = p0 + n / rep, pk = j0 + j;
        const bool valid = j < nk && pk <= pq && (a.window <= 0 || pk > pq - a.window);
        if (!valid) p_s[o] = -INFINITY;
      }
    } else {
      for (int64_t o = tid; o < nq * kTile; o += nthreads) {
        const int64_t n = o / kTile, j = o % kTile;
        const int64_t pq = p0 + n / rep, pk = j0 + j;
        const bool valid = j < nk && pk <= pq && (a.window <= 0 || pk > pq - a.window);
        float s = -INFINITY;
        if (valid) {
          const float* qr = q_s + n * D;
          const float* kr = k_s + j * Dp;
          s = 0.0f;
          for (int64_t d = 0; d < D; ++d) s += qr[d] * kr[d];
        }
        p_s[o] = s;
      }
    }
    __syncthreads();
    // -- online softmax, one warp per query row, one lane per position
    for (int64_t n = warp; n < nq; n += nwarps) {
      const float v = p_s[n * kTile + lane];
      const float m_old = m_s[n];
      const float m_new = fmaxf(m_old, warp_max(v));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float e = v == -INFINITY ? 0.0f : expf(v - m_use);
      p_s[n * kTile + lane] = e;
      if constexpr (kMma) ph[n * ldp + lane] = __float2half_rn(e);
      const float sum = warp_sum(e);
      if (lane == 0) {
        const float corr = m_old == -INFINITY ? 0.0f : expf(m_old - m_use);
        corr_s[n] = corr;
        l_s[n] = l_s[n] * corr + sum;
        m_s[n] = m_new;
      }
    }
    if constexpr (kMma)
      for (int64_t o = nq * kTile + tid; o < nqp * kTile; o += nthreads)
        ph[o / kTile * ldp + o % kTile] = __float2half_rn(0.0f);  // padding rows
    __syncthreads();
    if constexpr (kMma) {
      for (int64_t o = tid; o < nq * rv; o += nthreads) acc[o / rv * lda + o % rv] *= corr_s[o / rv];
    } else {
      for (int64_t o = tid; o < nq * rv; o += nthreads) acc[o] *= corr_s[o / rv];
    }
    // -- acc += P @ value latents, chunk by chunk
    for (int64_t c0 = 0; c0 < rv; c0 += kChunk) {
      const int64_t cc = imin(kChunk, rv - c0);
      if constexpr (kMma) {
        for (int64_t o = tid; o < kTile * kChunk; o += nthreads) {
          const int64_t j = o / kChunk, c = o % kChunk;
          const float x = (j < nk && c < cc) ? cache_value<T>(a.cache_v, a.params_v, b * a.P + j0 + j, g * rv + c0 + c,
                                                              a.Wv, a.Cv, a.NPv, a.bits, a.qg)
                                             : 0.0f;
          bufh[j * ldc + c] = __float2half_rn(x);
        }
        __syncthreads();  // (also: the accumulators' rescaling above is done)
        // acc[:, c0 .. c0 + cc rounded up to 16] += P [nqp, kTile] @ values [kTile, ...]; columns
        // from rv on (up to lda) get zeros
        mma_tiles<false>(acc + c0, lda, ph, ldp, bufh, ldc, nqp, round_up(cc, kMmaTile), kTile, true, warp, nwarps);
      } else {
        for (int64_t o = tid; o < kTile * kChunk; o += nthreads) {
          const int64_t j = o / kChunk, c = o % kChunk;
          buf[o] = (j < nk && c < cc) ? cache_value<T>(a.cache_v, a.params_v, b * a.P + j0 + j, g * rv + c0 + c,
                                                       a.Wv, a.Cv, a.NPv, a.bits, a.qg)
                                      : 0.0f;
        }
        __syncthreads();
        for (int64_t o = tid; o < nq * cc; o += nthreads) {
          const int64_t n = o / cc, c = o % cc;
          const float* pr = p_s + n * kTile;
          float sum = 0.0f;
          for (int64_t j = 0; j < nk; ++j) sum += pr[j] * buf[j * kChunk + c];
          acc[n * rv + c0 + c] += sum;
        }
      }
      __syncthreads();
    }
  }

  // partial results of this split
  for (int64_t o = tid; o < nq * rv; o += nthreads) {
    const int64_t n = o / rv, c = o % rv;
    const int64_t h = kv * rep + n % rep, t = t0 + n / rep;
    const int64_t prow = ((b * a.S + t) * a.Hq + h) * a.nsplit + split;
    a.part_acc[prow * rv + c] = acc[kMma ? n * lda + c : o];
  }
  for (int64_t n = tid; n < nq; n += nthreads) {
    const int64_t h = kv * rep + n % rep, t = t0 + n / rep;
    const int64_t prow = ((b * a.S + t) * a.Hq + h) * a.nsplit + split;
    a.part_ml[prow * 2] = m_s[n];
    a.part_ml[prow * 2 + 1] = l_s[n];
  }
}

// ---- C: merge the splits, normalise, v_up ---------------------------------------------------

// grid: B * S * Hq blocks of kCombineThreads threads; shared memory: combine_smem(rv, nsplit).
// The splits' maxima, weights and sums are reduced across the block (a thread per split), and
// the accumulators by groups of threads that take every ng-th split (ng = combine_groups(rv)), so
// that no thread walks the splits alone: at batch 1 a row has tens of splits.
template <class T>
__global__ void __launch_bounds__(kCombineThreads) combine(Args a) {
  LRX_SHARED_FLOATS(sm);
  const int64_t ng = combine_groups(a.rv);
  float* part = sm;                 // [ng, rv]: each group's weighted sum
  float* o_s = part + ng * a.rv;    // [rv]: the merged, normalised row
  float* w_s = o_s + a.rv;          // [nsplit]: the splits' weights
  float* red = w_s + a.nsplit;      // [2, kCombineWarps]: the warps' maxima, then their sums
  const int64_t row = blockIdx.x;  // (b * S + t) * Hq + h
  const int64_t h = row % a.Hq, bt = row / a.Hq;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (!len_ok(a, bt / a.S)) {  // a device length out of range: NaN, as the caller's signal
    T* out = static_cast<T*>(a.out) + bt * a.out_w;
    const int64_t w = a.v_up ? a.D : a.rv;
    for (int64_t c = tid; c < w; c += blockDim.x) st(out, h * w + c, NAN);
    return;
  }
  const int64_t p0 = row * a.nsplit;  // the row's first partial row
  float M = -INFINITY;
  for (int64_t sp = tid; sp < a.nsplit; sp += kCombineThreads) M = fmaxf(M, a.part_m[(p0 + sp) * a.ml_step]);
  M = warp_max(M);
  if (lane == 0) red[warp] = M;
  __syncthreads();
  M = red[0];
  for (int i = 1; i < kCombineWarps; ++i) M = fmaxf(M, red[i]);
  float total = 0.0f;
  for (int64_t sp = tid; sp < a.nsplit; sp += kCombineThreads) {
    const float m = a.part_m[(p0 + sp) * a.ml_step];
    const float w = m == -INFINITY ? 0.0f : (a.max_log2 ? exp2f(m - M) : expf(m - M));
    w_s[sp] = w;
    total += w * a.part_l[(p0 + sp) * a.ml_step];
  }
  total = warp_sum(total);
  if (lane == 0) red[kCombineWarps + warp] = total;
  __syncthreads();  // also: w_s complete
  total = 0.0f;
  for (int i = 0; i < kCombineWarps; ++i) total += red[kCombineWarps + i];
  const float inv = 1.0f / total;  // > 0: every query sees at least its own position
  for (int64_t i = tid; i < ng * a.rv; i += kCombineThreads) {
    const int64_t g = i / a.rv, c = i % a.rv;
    const float* acc = a.part_acc + p0 * a.acc_ld + c;
    float o0 = 0.0f, o1 = 0.0f;  // two chains, so that loads of two splits are in flight at once
    int64_t sp = g;
    for (; sp + ng < a.nsplit; sp += 2 * ng) {
      o0 += w_s[sp] * acc[sp * a.acc_ld];
      o1 += w_s[sp + ng] * acc[(sp + ng) * a.acc_ld];
    }
    if (sp < a.nsplit) o0 += w_s[sp] * acc[sp * a.acc_ld];
    part[i] = o0 + o1;
  }
  __syncthreads();
  for (int64_t c = tid; c < a.rv; c += kCombineThreads) {
    float o = 0.0f;
    for (int64_t g = 0; g < ng; ++g) o += part[g * a.rv + c];
    o_s[c] = o * inv;
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + bt * a.out_w;
  if (!a.v_up) {
    for (int64_t c = tid; c < a.rv; c += kCombineThreads) st(out, h * a.rv + c, o_s[c]);
    return;
  }
  const T* vup = static_cast<const T*>(a.v_up);
  const int64_t kv = h / a.rep, g = kv / a.s, slot = kv % a.s, sD = a.s * a.D;
  for (int64_t d = tid; d < a.D; d += kCombineThreads) {
    const T* col = vup + g * a.rv * sD + slot * a.D + d;
    float y0 = 0.0f, y1 = 0.0f, y2 = 0.0f, y3 = 0.0f;  // four chains of loads in flight
    int64_t c = 0;
    for (; c + 4 <= a.rv; c += 4) {
      y0 += o_s[c] * ld(col, c * sD);
      y1 += o_s[c + 1] * ld(col, (c + 1) * sD);
      y2 += o_s[c + 2] * ld(col, (c + 2) * sD);
      y3 += o_s[c + 3] * ld(col, (c + 3) * sD);
    }
    for (; c < a.rv; ++c) y0 += o_s[c] * ld(col, c * sD);
    st(out, h * a.D + d, (y0 + y1) + (y2 + y3));
  }
}

// ---- the Triton decode kernel's inputs ------------------------------------------------------

// ---- C': the decode kernel on tensor cores, one warp per stream of positions -------------------

#include "decode_warp.cuh"

// ---- host side ------------------------------------------------------------------------------

std::string cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// The Triton decode kernel's integer arguments, in the order of triton_aot.h's kIntArgs.
constexpr int kTritonInts = 16;
void triton_ints(const Params& p, int64_t split_len, int64_t nsplit, int64_t out[kTritonInts]) {
  const int64_t kp = p.bits ? p.NPk : p.Ck, vp = p.bits ? p.NPv : p.Cv;
  const int64_t v[kTritonInts] = {p.Hq * p.D, p.Hq * p.D, p.P * p.Ck, p.Ck, p.P * kp, kp, p.P * p.Cv, p.Cv,
                                  p.P * vp,   vp,         0,          0,    split_len, nsplit, p.rk, p.rv};
  for (int i = 0; i < kTritonInts; ++i) out[i] = v[i];
}

// The Triton decode kernel (S = 1), after the cache write: past_len as int32, the kernel (one
// program per row, KV head and split), then combine (splits in exp2 units, rows of rv_p floats).
std::string launch_triton(const Params& p, const Plan& pl, Args a, const TritonDecode& t, char* base,
                          cudaStream_t stream) {
  cudaError_t e;
  int32_t* past32 = a.past32;  // written by write_tokens (launch)
  float* mx = reinterpret_cast<float*>(base + pl.off_max);
  float* sm = reinterpret_cast<float*>(base + pl.off_sum);
  // the argument values (plan() checked that they fit int32 and meet the d16 assumptions)
  int64_t wide[kTritonInts];
  triton_ints(p, pl.split_len, pl.nsplit, wide);
  int32_t ints[kTritonInts];
  for (int i = 0; i < kTritonInts; ++i) ints[i] = static_cast<int32_t>(wide[i]);
  float qk_scale = p.scale * 1.4426950408889634f;
  const void* ptrs[] = {p.query, a.cache_k, p.bits ? a.params_k : a.cache_k, a.cache_v,
                        p.bits ? a.params_v : a.cache_v, p.k_up, p.k_bias ? p.k_bias : p.k_up, p.cos, p.sin,
                        past32, a.out, a.part_acc, mx, sm, nullptr, nullptr};
  // kArgNames order (triton_aot.h), then Triton's global and profile scratch pointers (none)
  void* args[] = {&ptrs[0],  &ints[0],  &ints[1],  &ptrs[1],  &ints[2],  &ints[3],  &ptrs[2],  &ints[4],  &ints[5],
                  &ptrs[3],  &ints[6],  &ints[7],  &ptrs[4],  &ints[8],  &ints[9],  &ptrs[5],  &ptrs[6],  &ptrs[7],
                  &ptrs[8],  &ptrs[9],  &ptrs[10], &ints[10], &ints[11], &ptrs[11], &ptrs[12], &ptrs[13], &ints[12],
                  &ints[13], &qk_scale, &ints[14], &ints[15], &ptrs[14], &ptrs[15]};
  using LaunchFn = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*,
                           void**, void**);
  const int r = reinterpret_cast<LaunchFn>(t.launch)(
      t.function, static_cast<unsigned>(p.B * p.Hkv), 1, static_cast<unsigned>(pl.nsplit),
      static_cast<unsigned>(32 * t.warps), 1, 1, static_cast<unsigned>(t.shared), stream, args, nullptr);
  if (r != 0) return "cuLaunchKernel of the Triton decode kernel failed (CUresult " + std::to_string(r) + ")";
  a.part_m = mx, a.part_l = sm, a.ml_step = 1, a.acc_ld = t.rv_p, a.max_log2 = true;
  LRX_LAUNCH(combine<__half>, static_cast<unsigned>(p.B * p.Hq), kCombineThreads, pl.smem_combine, stream, a);
  if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error("launch of the split combination", e);
  return "";
}

// The warp decode kernel's instance for a call (plan_warp checked the shape rules).
template <int D, int BITS, int MT>
void (*warp_kernel_for(int64_t rk, int64_t rv))(Args) {
  if (rk <= 64) return rv <= 64 ? attend_decode_warp<D, BITS, 4, 4, MT> : attend_decode_warp<D, BITS, 4, 8, MT>;
  return rv <= 64 ? attend_decode_warp<D, BITS, 8, 4, MT> : attend_decode_warp<D, BITS, 8, 8, MT>;
}
template <int MT>
void (*warp_kernel_for(const Params& p))(Args) {
  return p.D == 64 ? (p.bits ? warp_kernel_for<64, 4, MT>(p.rk, p.rv) : warp_kernel_for<64, 0, MT>(p.rk, p.rv))
                   : (p.bits ? warp_kernel_for<128, 4, MT>(p.rk, p.rv) : warp_kernel_for<128, 0, MT>(p.rk, p.rv));
}

// The warp decode kernel (S = 1) after the cache write, then combine (one partial row per warp).
std::string launch_warp(const Params& p, const Plan& pl, Args a, cudaStream_t stream) {
  // m16 tiles per warp step: 1 (fewer registers; default) or 2 (LREXPORT_CUDA_WARP_MT=2)
  const char* mt = std::getenv("LREXPORT_CUDA_WARP_MT");
  void (*kernel)(Args) = mt && std::strcmp(mt, "2") == 0 ? warp_kernel_for<2>(p) : warp_kernel_for<1>(p);
  cudaError_t e;
  const int64_t blocks = p.B * p.Hkv * pl.nsplit;
  LRX_LAUNCH(kernel, static_cast<unsigned>(blocks), kWarpBlock, pl.smem_attn, stream, a);
  if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error("launch of the warp decode kernel", e);
  a.nsplit = pl.nsplit * (kWarpBlock / 32);  // combine merges every warp's partial row
  a.max_log2 = true;
  LRX_LAUNCH(combine<__half>, static_cast<unsigned>(p.B * p.Hq), kCombineThreads, pl.smem_combine, stream, a);
  if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error("launch of the split combination", e);
  return "";
}

template <class T>
std::string launch(const Params& p, const Plan& pl, Args a, cudaStream_t stream, const TritonDecode* triton,
                   char* base) {
  cudaError_t e;
  const int64_t rows = p.B * p.S;
  if (rows > 0) {
    if (pl.triton) {  // the Triton decode kernel's past_len (int32), written by write_tokens
      a.past32 = reinterpret_cast<int32_t*>(base + pl.off_past32);
      a.row_block_n = triton->row_splits ? triton->block_n : 0;
    }
    LRX_LAUNCH(write_tokens<T>, dim3(static_cast<unsigned>(rows), 2), 128, 0, stream, a);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error("launch of the cache write", e);
    if (pl.triton) return launch_triton(p, pl, a, *triton, base, stream);
    if constexpr (std::is_same<T, __half>::value) {
      if (pl.warp) return launch_warp(p, pl, a, stream);
    }
    void (*attend)(Args) = attend_partial<T, false>;
    if constexpr (std::is_same<T, __half>::value) {
      if (pl.mma) attend = attend_partial<T, true>;
    }
    if (pl.smem_attn > 48 * 1024) {
      e = cudaFuncSetAttribute(attend, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(pl.smem_attn));
      if (e != cudaSuccess) return cuda_error("cudaFuncSetAttribute (shared memory of the attention)", e);
    }
    const int64_t blocks = p.B * pl.nqt * p.Hkv * pl.nsplit;
    LRX_LAUNCH(attend, static_cast<unsigned>(blocks), kThreads, pl.smem_attn, stream, a);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error("launch of the attention", e);
    LRX_LAUNCH(combine<T>, static_cast<unsigned>(rows * p.Hq), kCombineThreads, pl.smem_combine, stream, a);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error("launch of the split combination", e);
  }
  return "";
}

// Splits per row for `rows` rows and `slots` resident programs (waves x multiprocessors): `ns`, or where
// rows * ns programs leave their waves less than 3/4 full, the splits up to `cap` and four waves' worth that
// fill them best (the fewest of equals). As lrexport.kernels.triton_latent.fill_waves.
int64_t fill_waves(int64_t rows, int64_t slots, int64_t cap, int64_t ns) {
  auto waves = [&](int64_t n) { return (rows * n + slots - 1) / slots; };
  if (4 * rows * ns >= 3 * waves(ns) * slots) return ns;
  int64_t best = ns;
  for (int64_t n = ns + 1; n <= std::min(cap, 4 * slots / rows); ++n)
    if (n * waves(best) > best * waves(n)) best = n;
  return best;
}

// The Triton decode kernel for this call, when its compiled assumptions hold: one new token per
// row, float16, int32 arguments, 16-byte aligned tensors and the integer arguments it was compiled
// as multiples of 16 for (TritonDecode::d16). Splits as lrexport.kernels.triton_latent.split_plan.
// Returns "" (pl->triton set, scratch re-planned) or why not.
std::string plan_triton(const Params& p, const TritonDecode& t, int sms, int64_t kv_max, Plan* pl) {
  if (p.S != 1) return "more than one new token per row (prefill)";
  if (!p.f16) return "float32 activations";
  const int64_t programs = p.B * p.Hkv;
  const int64_t slots = t.waves * static_cast<int64_t>(sms), cap = (kv_max + t.min_split - 1) / t.min_split;
  int64_t ns = fill_waves(programs, slots, cap, std::max<int64_t>(1, std::min(slots / programs, cap)));
  const int64_t split_len = ((kv_max + ns - 1) / ns + t.block_n - 1) / t.block_n * t.block_n;
  ns = (kv_max + split_len - 1) / split_len;
  int64_t ints[kTritonInts];
  triton_ints(p, split_len, ns, ints);
  for (int i = 0; i < kTritonInts; ++i) {
    if (ints[i] > 0x7fffffff) return "a cache of more than 2^31 elements per row";
    if (((t.d16 >> i) & 1) && ints[i] % 16) return "an argument is not a multiple of 16 as compiled";
  }
  const void* ptrs[] = {p.query, p.present_k, p.present_v, p.k_up, p.k_bias, p.cos, p.sin,
                        p.bits ? p.present_k_params : nullptr, p.bits ? p.present_v_params : nullptr};
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % 16) return "a tensor that is not 16-byte aligned";
  if (programs > 0x7fffffff || ns > 65535) return "too many programs for one launch";
  pl->triton = true;
  pl->split_len = split_len;
  pl->nsplit = ns;
  pl->smem_combine = combine_smem(p.rv, ns);
  const size_t prows = static_cast<size_t>(p.B * p.Hq * ns);
  pl->off_past32 = align_up(static_cast<size_t>(p.B) * 8, 256);  // after the int64 past_len copy
  pl->off_max = pl->off_past32 + align_up(static_cast<size_t>(p.B) * (t.row_splits ? 8 : 4), 256);
  pl->off_sum = pl->off_max + align_up(prows * 4, 256);
  pl->off_acc = pl->off_sum + align_up(prows * 4, 256);
  pl->scratch_bytes = pl->off_acc + prows * static_cast<size_t>(t.rv_p) * 4;
  return "";
}

// The warp decode kernel for this call (asked for: LREXPORT_CUDA_DECODE=warp), when its shape rules hold
// (see decode_warp.cuh). Returns ""
// (pl->warp set, splits and scratch re-planned) or why not. Splits: about kWarpWaves blocks per
// multiprocessor in all, but no split shorter than kWarpMinSplit positions (8 steps of each warp).
constexpr int64_t kWarpWaves = 6, kWarpMinSplit = 1024;
std::string plan_warp(const Params& p, int sms, int cc_major, int64_t kv_max, Plan* pl) {
  if (p.S != 1) return "more than one new token per row (prefill)";
  if (!p.f16) return "float32 activations";
  if (cc_major < 8) return "compute capability below 8.0";
  if (p.D != 64 && p.D != 128) return "head dim " + std::to_string(p.D) + " (64 or 128)";
  if (p.rep > 8) return "more than 8 query heads per KV head";
  const int64_t mult = p.bits ? 32 : 16;
  if (p.rk % mult || p.rv % mult || p.rk > 128 || p.rv > 128)
    return "ranks rk=" + std::to_string(p.rk) + ", rv=" + std::to_string(p.rv) + " (multiples of " +
           std::to_string(mult) + " up to 128)";
  if (p.bits != 0 && p.bits != 4) return std::to_string(p.bits) + "-bit latents (float16 or 4-bit)";
  if (p.bits && (p.quant_group < 8 || (p.quant_group & (p.quant_group - 1)))) return "quantization groups below 8";
  if (p.Ck % 4 || p.Cv % 4) return "cache rows not a multiple of 4 elements";
  const void* ptrs[] = {p.present_k, p.present_v, p.cos, p.sin, p.bits ? p.present_k_params : nullptr,
                        p.bits ? p.present_v_params : nullptr};
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % 8) return "a tensor that is not 8-byte aligned";
  const int64_t programs = p.B * p.Hkv;
  int64_t ns = std::max<int64_t>(1, std::min((kWarpWaves * sms + programs - 1) / programs,
                                             (kv_max + kWarpMinSplit - 1) / kWarpMinSplit));
  if (programs * ns > 0x7fffffff) return "too many blocks for one launch";
  pl->warp = true;
  pl->triton = false;
  pl->nsplit = ns;
  const int64_t nsp = ns * (kWarpBlock / 32);
  pl->smem_attn = static_cast<size_t>(p.D * (p.rk + 8)) * 2;
  pl->smem_combine = combine_smem(p.rv, nsp);
  const size_t prows = static_cast<size_t>(p.B * p.Hq * nsp);
  pl->off_ml = align_up(static_cast<size_t>(p.B) * 8, 256);
  pl->off_acc = pl->off_ml + align_up(prows * 2 * 4, 256);
  pl->scratch_bytes = pl->off_acc + prows * static_cast<size_t>(p.rv) * 4;
  return "";
}

}  // namespace

std::string plan(const Params& p, Plan* pl, const TritonDecode* triton) {
  *pl = Plan{};
  if (p.B == 0 || p.S == 0) return "";
  int dev = 0, sms = 0, smem_optin = 0, cc_major = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess && dev != p.device) e = cudaSetDevice(p.device);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice / cudaSetDevice", e);
  if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.device)) != cudaSuccess)
    return cuda_error("cudaDeviceGetAttribute (multiprocessors)", e);
  if ((e = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.device)) != cudaSuccess)
    return cuda_error("cudaDeviceGetAttribute (shared memory per block)", e);
  if ((e = cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, p.device)) != cudaSuccess)
    return cuda_error("cudaDeviceGetAttribute (compute capability)", e);
  // tensor cores: float16 models, head dim a multiple of 16 (WMMA tiles), compute capability 7.0 or
  // newer, unless LREXPORT_CUDA_MMA=0 (read per call); else the float32 path
  const char* mma_env = std::getenv("LREXPORT_CUDA_MMA");
  const bool mma_off = mma_env && std::strcmp(mma_env, "0") == 0;
  pl->mma = !mma_off && p.f16 && p.D % kMmaTile == 0 && cc_major >= 7;
  // query tile: as many new tokens as fit the shared-memory target (decode: 1)
  int64_t qtile = std::min<int64_t>(16, p.S);
  auto smem = [&](int64_t qt) { return static_cast<size_t>(smem_layout(qt * p.rep, p.D, p.rv, pl->mma).total) * 4; };
  while (qtile > 1 && smem(qtile) > kSmemTarget) qtile = (qtile + 1) / 2;
  pl->qtile = qtile;
  pl->smem_attn = smem(qtile);
  if (pl->smem_attn > static_cast<size_t>(smem_optin))
    return "the CUDA kernel needs " + std::to_string(pl->smem_attn) + " bytes of shared memory per block (head dim " +
           std::to_string(p.D) + ", rv=" + std::to_string(p.rv) + ", " + std::to_string(p.rep) +
           " query heads per KV head); the device allows " + std::to_string(smem_optin);
  pl->nqt = (p.S + qtile - 1) / qtile;
  // splits along the keys only when the blocks would not fill the GPU (decode)
  // the longest row, or with device lengths the capacity (each row splits its own length)
  int64_t max_len = p.device_lengths ? std::min(p.P, p.Prope) : 0;
  for (int64_t b = 0; !p.device_lengths && b < p.B; ++b) max_len = std::max(max_len, p.past_len[b] + p.S);
  int64_t span = p.window > 0 ? std::min(max_len, p.window + qtile - 1) : max_len;
  const int64_t blocks = p.B * pl->nqt * p.Hkv;
  const int64_t target = 2 * static_cast<int64_t>(sms);
  int64_t nsplit = 1;
  if (blocks < target) nsplit = std::min((target + blocks - 1) / blocks, std::max<int64_t>(1, span / (2 * kTile)));
  pl->nsplit = std::max<int64_t>(1, nsplit);
  pl->smem_combine = combine_smem(p.rv, pl->nsplit);
  const int64_t kMaxGrid = 0x7fffffff;  // gridDim.x
  if (p.B * p.S * p.Hq > kMaxGrid || p.B * pl->nqt * p.Hkv * pl->nsplit > kMaxGrid)
    return "too many blocks for one launch (B*S*num_heads = " + std::to_string(p.B * p.S * p.Hq) + ")";
  const size_t prows = static_cast<size_t>(p.B * p.S * p.Hq * pl->nsplit);
  pl->off_ml = align_up(static_cast<size_t>(p.B) * 8, 256);
  pl->off_acc = pl->off_ml + align_up(prows * 2 * 4, 256);
  pl->scratch_bytes = pl->off_acc + prows * static_cast<size_t>(p.rv) * 4;
  // the warp decode kernel only when asked for (slower than the Triton kernel on an H200, docs/gpu.md)
  const char* decode_env = std::getenv("LREXPORT_CUDA_DECODE");
  if (decode_env && std::strcmp(decode_env, "warp") == 0)
    pl->warp_skip = mma_off ? "LREXPORT_CUDA_MMA=0" : plan_warp(p, sms, cc_major, max_len, pl);
  if (triton && !pl->warp) pl->triton_skip = plan_triton(p, *triton, sms, max_len, pl);
  if (triton && pl->warp) pl->triton_skip = "the warp decode kernel runs (LREXPORT_CUDA_DECODE=warp)";
  return "";
}

std::string run(const Params& p, const Plan& pl, void* scratch, void* stream_ptr, const TritonDecode* triton) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  cudaGetLastError();  // clear an earlier, unrelated error: what follows reports only ours
  cudaError_t e;
  // present <- past where they are different buffers (prepare_call checked any other overlap)
  struct Copy {
    const void* src;
    void* dst;
    size_t n;
  };
  const Copy copies[] = {{p.past_k, p.present_k, p.k_bytes},
                         {p.past_v, p.present_v, p.v_bytes},
                         {p.past_k_params, p.present_k_params, p.kp_bytes},
                         {p.past_v_params, p.present_v_params, p.vp_bytes}};
  for (const Copy& c : copies) {
    if (c.n == 0 || c.src == c.dst) continue;
    if ((e = cudaMemcpyAsync(c.dst, c.src, c.n, cudaMemcpyDeviceToDevice, stream)) != cudaSuccess)
      return cuda_error("cudaMemcpyAsync (past -> present cache)", e);
  }
  if (p.B == 0 || p.S == 0) return "";
  char* base = static_cast<char*>(scratch);
  Args a{};
  a.len_max = std::min(p.P, p.Prope) - p.S;
  if (p.device_lengths) {
    a.past_len = p.past_len;  // device memory, read by the kernels only
  } else if (p.B <= kInlineRows) {
    for (int64_t b = 0; b < p.B; ++b) a.past_len_inline[b] = p.past_len[b];
    a.past_len = nullptr;
  } else {
    // From pageable host memory: staged before the call returns (so the host array may go), but
    // the driver may synchronize the stream first; small batches avoid it (kernel parameters).
    int64_t* past_len_dev = reinterpret_cast<int64_t*>(base);
    if ((e = cudaMemcpyAsync(past_len_dev, p.past_len, static_cast<size_t>(p.B) * 8, cudaMemcpyHostToDevice,
                             stream)) != cudaSuccess)
      return cuda_error("cudaMemcpyAsync (past_len)", e);
    a.past_len = past_len_dev;
  }
  a.B = p.B, a.S = p.S, a.Hq = p.Hq, a.Hkv = p.Hkv, a.s = p.s, a.G = p.G, a.D = p.D, a.rk = p.rk, a.rv = p.rv;
  a.P = p.P, a.Prope = p.Prope, a.rep = p.rep, a.Wk = p.Wk, a.Wv = p.Wv, a.Ck = p.Ck, a.Cv = p.Cv;
  a.NPk = p.NPk, a.NPv = p.NPv, a.out_w = p.out_w, a.bits = p.bits, a.qg = p.quant_group, a.window = p.window;
  a.scale = p.scale;
  a.query = p.query, a.latent_k = p.latent_k, a.latent_v = p.latent_v, a.k_up = p.k_up, a.k_bias = p.k_bias;
  a.v_up = p.v_up, a.cos = p.cos, a.sin = p.sin;
  a.out = p.out, a.cache_k = p.present_k, a.params_k = p.present_k_params, a.cache_v = p.present_v;
  a.params_v = p.present_v_params;
  a.qtile = pl.qtile, a.nqt = pl.nqt, a.nsplit = pl.nsplit;
  a.part_ml = reinterpret_cast<float*>(base + pl.off_ml);
  a.part_acc = reinterpret_cast<float*>(base + pl.off_acc);
  a.part_m = a.part_ml, a.part_l = a.part_ml + 1, a.ml_step = 2, a.acc_ld = p.rv, a.max_log2 = false;
  return p.f16 ? launch<__half>(p, pl, a, stream, triton, base) : launch<float>(p, pl, a, stream, triton, base);
}

}  // namespace cuda
}  // namespace lrexport
