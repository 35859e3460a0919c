// The decode kernel of LowRankKVAttention on tensor cores, one warp per stream of key positions
// (included by lowrank_kv_attention.cu, inside its namespace; uses its Args and helpers).
//
// One new token per row (S = 1), float16, head dim 64 or 128, up to 8 query heads per KV head, key
// and value ranks multiples of 16 up to 128, float16 or 4-bit latents (quantization groups of 8
// channels or more), no v_up restriction (combine applies it). A block of 4 warps owns one batch row,
// one KV head and one split of the cached positions; each warp walks its own 32-position tiles of
// that split and keeps its own online softmax, so the warps never wait for each other after the
// k_up slice is staged. Each warp's result is one partial row of `combine`.
//
// Everything lives in registers as mma.sync m16n8k16 fragments, so no tile goes through shared
// memory between the three products:
//   keys   K [16 positions, D] = latent [16, rk] @ k_up slice [rk, D]: the latent rows are loaded
//          (4-bit codes unpacked and dequantized in float16) straight into A fragments; the k_up
//          slice, staged once per block in shared memory, comes in as B fragments by ldmatrix;
//   RoPE   the output columns are ordered so that d and d + D/2 (a rotation pair) land in the same
//          lane and register slot; the rotation runs on float16 pairs against the table rows;
//   scores S [16 positions, 8 query heads] = K @ Q^T: the rotated keys are already laid out as
//          the A fragment (the accumulator layout of two n-tiles is the A layout of one k-step);
//          the queries, RoPE'd and scaled once, stay in registers as B fragments;
//   values O^T [rv, 8 heads] += V^T [rv, 16 positions] @ P [16, 8]: P and the value latents are
//          moved into operand layout by movmatrix (an 8x8 transpose across the warp's lanes).
// The latent channels a lane loads are contiguous in memory (the k-index of the fragments is
// permuted to match; k_up's rows and the output channels follow the same permutation), so the
// loads are 8- or 16-byte vectors. Rounding: keys rounded to float16 after the rebuild (as a
// float16 model's k projection does), RoPE in float16, queries and probabilities rounded to
// float16 for the products; float32 accumulators. In the emulated build (emulate.h) the
// warp-collective instructions are computed from all lanes' registers (warp_gather).

#if defined(LREXPORT_CUDA_EMULATE) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define LRX_WARP_MMA 1  // mma.sync m16n8k16 with float16 inputs, ldmatrix, movmatrix
#else
#define LRX_WARP_MMA 0
#endif

constexpr int kWarpBlock = 128;  // threads: 4 warps
constexpr int kWarpTile = 32;    // splits are multiples of this many positions
constexpr uint32_t kH2OneK = 0x64006400u;  // float16 pair (1024, 1024)

// ---- float16 pairs and warp-collective tensor-core instructions ------------------------------

#if defined(LREXPORT_CUDA_EMULATE)
inline float h_lo(uint32_t x) { return f16_to_f32(static_cast<uint16_t>(x & 0xffffu)); }
inline float h_hi(uint32_t x) { return f16_to_f32(static_cast<uint16_t>(x >> 16)); }
inline uint32_t h2_bits(float lo, float hi) {
  return static_cast<uint32_t>(f32_to_f16(lo)) | (static_cast<uint32_t>(f32_to_f16(hi)) << 16);
}
inline uint32_t h2_mul(uint32_t a, uint32_t b) { return h2_bits(h_lo(a) * h_lo(b), h_hi(a) * h_hi(b)); }
inline uint32_t h2_sub(uint32_t a, uint32_t b) { return h2_bits(h_lo(a) - h_lo(b), h_hi(a) - h_hi(b)); }
inline uint32_t h2_fma(uint32_t a, uint32_t b, uint32_t c) {  // rounded once (to float16)
  const double lo = static_cast<double>(h_lo(a)) * h_lo(b) + h_lo(c);
  const double hi = static_cast<double>(h_hi(a)) * h_hi(b) + h_hi(c);
  return h2_bits(static_cast<float>(lo), static_cast<float>(hi));
}
// D [16, 8] += A [16, 16] @ B [16, 8] in the m16n8k16 fragment layouts (g = lane / 4, t = lane % 4):
// A regs {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]}, B regs {B[2t..][g], B[2t+8..][g]},
// D {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}.
inline void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  uint32_t mine[10] = {a0, a1, a2, a3, b0, b1, f32_bits(d[0]), f32_bits(d[1]), f32_bits(d[2]), f32_bits(d[3])};
  uint32_t all[32 * 10];
  lrx_emu::warp_gather(mine, 10, all);
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* v = all + l * 10;
    const int g = l >> 2, t = l & 3;
    for (int e = 0; e < 2; ++e) {
      auto h = [&](uint32_t x) { return e ? h_hi(x) : h_lo(x); };
      A[g][2 * t + e] = h(v[0]), A[g + 8][2 * t + e] = h(v[1]);
      A[g][2 * t + 8 + e] = h(v[2]), A[g + 8][2 * t + 8 + e] = h(v[3]);
      B[2 * t + e][g] = h(v[4]), B[2 * t + 8 + e][g] = h(v[5]);
      C[g][2 * t + e] = bits_f32(v[6 + e]), C[g + 8][2 * t + e] = bits_f32(v[8 + e]);
    }
  }
  const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[i] = acc;
  }
}
// ldmatrix .x4 (not transposed): lane l gives the address of row l % 8 of matrix l / 8 (8 float16
// each); each lane gets {M_i[g][2t], M_i[g][2t+1]} of the four matrices.
inline void ldsm_x4(uint32_t (&r)[4], const __half* row) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(row);
  uint32_t mine[2] = {static_cast<uint32_t>(p), static_cast<uint32_t>(static_cast<uint64_t>(p) >> 32)};
  uint32_t all[64];
  lrx_emu::warp_gather(mine, 2, all);
  const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int src = 8 * i + g;
    const __half* rp = reinterpret_cast<const __half*>(static_cast<uintptr_t>(all[2 * src]) |
                                                       (static_cast<uintptr_t>(all[2 * src + 1]) << 32));
    r[i] = static_cast<uint32_t>(rp[2 * t].bits) | (static_cast<uint32_t>(rp[2 * t + 1].bits) << 16);
  }
}
// movmatrix .trans: the 8x8 matrix whose row g, columns 2t and 2t + 1 lane 4g + t holds, transposed.
inline uint32_t movm_t(uint32_t x) {
  uint32_t all[32];
  lrx_emu::warp_gather(&x, 1, all);
  const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
  auto at = [&](int row, int col) { return (all[row * 4 + col / 2] >> (16 * (col & 1))) & 0xffffu; };
  return at(2 * t, g) | (at(2 * t + 1, g) << 16);
}
template <class V>
inline V ld_vec(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
struct LrxU2 {
  uint32_t x, y;
};
struct LrxU4 {
  uint32_t x, y, z, w;
};
inline float lrx_exp2(float x) { return std::exp2(x); }
inline __half half_from_bits(uint16_t b) { return __half{b}; }
#else
__device__ __forceinline__ uint32_t h2_bits(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ uint32_t h2_mul(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ uint32_t h2_sub(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ uint32_t h2_fma(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if LRX_WARP_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const __half* row) {
#if LRX_WARP_MMA
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}
__device__ __forceinline__ uint32_t movm_t(uint32_t x) {
  uint32_t r = x;
#if LRX_WARP_MMA
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
#endif
  return r;
}
template <class V>
__device__ __forceinline__ V ld_vec(const void* p) {
  return __ldg(static_cast<const V*>(p));
}
using LrxU2 = uint2;
using LrxU4 = uint4;
__device__ __forceinline__ float lrx_exp2(float x) { return exp2f(x); }
__device__ __forceinline__ __half half_from_bits(uint16_t b) { return __ushort_as_half(b); }
#endif

__device__ __forceinline__ uint32_t h2_neg(uint32_t x) { return x ^ 0x80008000u; }

// Latent channel (within the KV head's rank) of half e of the i-th float16 pair a lane of column
// q (lane % 4) holds, `per` channels per lane: float16 latents are read as pairs of neighbours;
// 4-bit ones as 32-bit words of 8 codes, a word's pairs being channels (s, s + 4), s < 4.
__host__ __device__ __forceinline__ int pair_channel(int q, int i, int e, int per, int bits) {
  return bits == 0 ? per * q + 2 * i + e : per * q + 8 * (i >> 2) + (i & 3) + 4 * e;
}
// The latent channel behind k-index kk of the fragments (16 per k-step: pairs 2q and 2q + 8 of
// lane column q), or behind output channel kk of the value product.
__host__ __device__ __forceinline__ int virt_channel(int kk, int per, int bits) {
  return pair_channel((kk >> 1) & 3, 2 * (kk >> 4) + ((kk >> 3) & 1), kk & 1, per, bits);
}
// A lane's share of one cache row, as loaded: float16 latents: its `pairs` float16 pairs from channel
// c0 on (8-byte vectors); 4-bit: its 32-bit words of 8 codes (pairs / 4 of them) and, per word, the
// group's scale and zero point packed as a float16 pair (scale low).
template <int BITS, int MAXP>
struct RawRow {
  uint32_t w[BITS == 0 ? MAXP : MAXP / 4];
  uint32_t sz[BITS == 0 ? 1 : MAXP / 4];
};

template <int BITS, int MAXP>
__device__ __forceinline__ void fetch_row(const void* cache, const void* params, int64_t crow, int64_t C, int64_t NP,
                                          int64_t W, int64_t qg, int64_t c0, int pairs, RawRow<BITS, MAXP>& raw) {
  if constexpr (BITS == 0) {
    const __half* p = static_cast<const __half*>(cache) + crow * C + c0;
#pragma unroll
    for (int u = 0; u < MAXP / 2; ++u) {
      if (2 * u >= pairs) break;
      const LrxU2 v = ld_vec<LrxU2>(p + 4 * u);
      raw.w[2 * u] = v.x, raw.w[2 * u + 1] = v.y;
    }
  } else {
    const uint8_t* codes = static_cast<const uint8_t*>(cache) + crow * C + c0 / 2;
    const uint16_t* prm = static_cast<const uint16_t*>(params) + crow * NP;
#pragma unroll
    for (int u = 0; u < MAXP / 4; ++u) {
      if (4 * u >= pairs) break;
      raw.w[u] = ld_vec<uint32_t>(codes + 4 * u);
      const int64_t gi = (c0 + 8 * u) / qg;
      raw.sz[u] = static_cast<uint32_t>(prm[gi]) | (static_cast<uint32_t>(prm[W / qg + gi]) << 16);
    }
  }
}

// The float16 pairs of a fetched row (4-bit: codes s and s + 4 of a word into the mantissas of 1024.0,
// which is 1024 + code exactly, minus 1024, times the scale plus the zero point, rounded once).
template <int BITS, int MAXP>
__device__ __forceinline__ void unpack_row(const RawRow<BITS, MAXP>& raw, int pairs, uint32_t (&out)[MAXP]) {
  if constexpr (BITS == 0) {
#pragma unroll
    for (int i = 0; i < MAXP; ++i) out[i] = raw.w[i];
  } else {
#pragma unroll
    for (int u = 0; u < MAXP / 4; ++u) {
      if (4 * u >= pairs) break;
      const uint32_t s2 = (raw.sz[u] & 0xffffu) * 0x10001u, z2 = (raw.sz[u] >> 16) * 0x10001u;
#pragma unroll
      for (int sh = 0; sh < 4; ++sh) {
        const uint32_t x = ((raw.w[u] >> (4 * sh)) & 0x000f000fu) | kH2OneK;
        out[4 * u + sh] = h2_fma(h2_sub(x, kH2OneK), s2, z2);
      }
    }
  }
}

// Inverse of virt_channel: the k-index (or value-product output channel) of latent channel c.
__host__ __device__ __forceinline__ int channel_virt(int c, int per, int bits) {
  const int q = c / per, w = c % per;
  int i, e;
  if (bits == 0) {
    i = w >> 1, e = w & 1;
  } else {
    i = 4 * (w >> 3) + (w & 3), e = (w >> 2) & 1;
  }
  return 16 * (i >> 1) + 8 * (i & 1) + 2 * q + e;
}
// The column of the rebuilt keys (k_up's columns in n-tile order) behind head-dim column p: n-tile
// t < D/16 holds frequencies (D/8) q + 2t + e of the first half (lane column q, pair half e), n-tile
// t + D/16 the same ones of the second half, so that both halves of a RoPE pair sit in one lane.
template <int D>
__host__ __device__ __forceinline__ int dim_virt(int p) {
  constexpr int T = D / 16, FQ = D / 8;
  const int second = p >= D / 2, f = p % (D / 2), q = f / FQ, w = f % FQ;
  return 8 * ((w >> 1) + T * second) + 2 * q + (w & 1);
}

// grid: B * Hkv * nsplit blocks (split fastest), kWarpBlock threads; dynamic shared memory
// D * (rk + 8) float16 (the k_up slice, transposed, rows padded by 8 against bank conflicts).
// Partial rows: ((b * Hq + h) * nsplit * 4 + split * 4 + warp), max in exp2 units.
template <int D, int BITS, int NKP, int NVP, int MT>
__global__ void __launch_bounds__(kWarpBlock, MT == 1 ? 4 : (NKP <= 4 ? 3 : 2)) attend_decode_warp(Args a) {
#if LRX_WARP_MMA
  constexpr int T = D / 16, HALF = D / 2, FQ = D / 8;
  LRX_SHARED_FLOATS(sm);
  __half* ut = reinterpret_cast<__half*>(sm);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int r = lane >> 2, q = lane & 3;
  int64_t bid = blockIdx.x;
  const int64_t split = bid % a.nsplit;
  bid /= a.nsplit;
  const int64_t kv = bid % a.Hkv, b = bid / a.Hkv;
  const int64_t g = kv / a.s, slot = kv % a.s;
  const int rk = static_cast<int>(a.rk), rv = static_cast<int>(a.rv);
  const int nk = rk / 16, nv = rv / 16, kq = rk / 4, vq = rv / 4, ldu = rk + 8;

  // the k_up slice of this KV head, transposed: ut[dim_virt(d)][channel_virt(c)] = k_up[g][c][slot][d]
  const __half* kup = static_cast<const __half*>(a.k_up);
  const int64_t sD = a.s * D;
#pragma unroll 4
  for (int o = tid; o < rk * D / 8; o += kWarpBlock) {  // 8 columns of one row of k_up per load
    const int c = o / (D / 8), d0 = 8 * (o % (D / 8));
    const LrxU4 v = ld_vec<LrxU4>(kup + (g * rk + c) * sD + slot * D + d0);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    const int kk = channel_virt(c, kq, BITS);
#pragma unroll
    for (int i = 0; i < 8; ++i)
      ut[dim_virt<D>(d0 + i) * ldu + kk] = half_from_bits(static_cast<uint16_t>(w[i >> 1] >> (16 * (i & 1))));
  }
  __syncthreads();

  const int64_t past = past_len_of(a, b), kvlen = past + 1;
  const int64_t lo = a.window > 0 ? imax(0, past - a.window + 1) : 0;
  int64_t chunk = (kvlen - lo + a.nsplit - 1) / a.nsplit;
  chunk = (chunk + kWarpTile - 1) / kWarpTile * kWarpTile;
  const int64_t j0 = lo + split * chunk, j1 = imin(kvlen, j0 + chunk);

  const __half* cosp = static_cast<const __half*>(a.cos);
  const __half* sinp = static_cast<const __half*>(a.sin);
  const __half* kbias = static_cast<const __half*>(a.k_bias);
  // the queries as B fragments (k: head dim in n-tile order, n: query head r of this KV head), RoPE'd
  // at their position and scaled by scale * log2(e) (scores in exp2 units)
  uint32_t bq[T][2];
  {
    const bool on = r < a.rep;
    const __half* qp = static_cast<const __half*>(a.query) + (b * a.Hq + kv * a.rep + (on ? r : 0)) * D;
    const float qs = a.scale * 1.4426950408889634f;
#pragma unroll
    for (int t = 0; t < T; ++t) {
      float y1[2], y2[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int f = FQ * q + 2 * t + e;
        const float x1 = __half2float(qp[f]), x2 = __half2float(qp[HALF + f]);
        const float c = __half2float(cosp[past * HALF + f]), s = __half2float(sinp[past * HALF + f]);
        y1[e] = qs * (x1 * c - x2 * s);
        y2[e] = qs * (x2 * c + x1 * s);
      }
      bq[t][0] = on ? h2_bits(y1[0], y1[1]) : 0u;
      bq[t][1] = on ? h2_bits(y2[0], y2[1]) : 0u;
    }
  }

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  float o_acc[NVP][4];
#pragma unroll
  for (int mc = 0; mc < NVP; ++mc) o_acc[mc][0] = o_acc[mc][1] = o_acc[mc][2] = o_acc[mc][3] = 0.0f;
  const int64_t ck0 = g * rk + kq * q, cv0 = g * rv + vq * q;

  // this lane's rows of a step at n0: m-tile mi, half hr -> position n0 + 16 mi + 8 hr + r (loads clamped
  // to the split's last position)
  auto pos = [&](int64_t n0, int mi, int hr) { return imin(n0 + 16 * mi + 8 * hr + r, j1 - 1); };
  auto crow = [&](int64_t n0, int mi, int hr) { return b * a.P + pos(n0, mi, hr); };
  RawRow<BITS, 2 * NKP> rk_raw[MT][2];
  RawRow<BITS, 2 * NVP> rv_raw[MT][2];
  auto fetch = [&](int64_t n0) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        fetch_row(a.cache_k, a.params_k, crow(n0, mi, hr), a.Ck, a.NPk, a.Wk, a.qg, ck0, 2 * nk, rk_raw[mi][hr]);
        fetch_row(a.cache_v, a.params_v, crow(n0, mi, hr), a.Cv, a.NPv, a.Wv, a.qg, cv0, 2 * nv, rv_raw[mi][hr]);
      }
  };
  constexpr int64_t kStride = 16 * MT * (kWarpBlock / 32);
  const int64_t first = j0 + 16 * MT * warp;
  constexpr bool kPrefetch = BITS != 0 && MT == 1;
  if (kPrefetch && first < j1) fetch(first);
#pragma unroll 1
  for (int64_t n0 = first; n0 < j1; n0 += kStride) {
    if constexpr (!kPrefetch) fetch(n0);
    uint32_t ak[MT][2][2 * NKP], av[MT][2][2 * NVP];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        unpack_row(rk_raw[mi][hr], 2 * nk, ak[mi][hr]);
        unpack_row(rv_raw[mi][hr], 2 * nv, av[mi][hr]);
      }
    // packed latents, one m-tile per step: the next step's codes load while this one computes (float16
    // ones are already the operands; their next rows would need as many registers again)
    if constexpr (kPrefetch) {
      if (n0 + kStride < j1) fetch(n0 + kStride);
    }

    // keys, RoPE and scores, one rotation pair of n-tiles (t, t + T) at a time
    float sc[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) sc[mi][0] = sc[mi][1] = sc[mi][2] = sc[mi][3] = 0.0f;
#pragma unroll
    for (int t = 0; t < T; ++t) {
      float k1[MT][4], k2[MT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int c = 0; c < 4; ++c) k1[mi][c] = k2[mi][c] = 0.0f;
#pragma unroll
      for (int j = 0; j < NKP; ++j) {
        if (j >= nk) break;
        uint32_t bb[4];
        const int mat = lane >> 3;
        ldsm_x4(bb, ut + (8 * (t + T * (mat >> 1)) + (lane & 7)) * ldu + 16 * j + 8 * (mat & 1));
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          mma16816(k1[mi], ak[mi][0][2 * j], ak[mi][1][2 * j], ak[mi][0][2 * j + 1], ak[mi][1][2 * j + 1], bb[0], bb[1]);
          mma16816(k2[mi], ak[mi][0][2 * j], ak[mi][1][2 * j], ak[mi][0][2 * j + 1], ak[mi][1][2 * j + 1], bb[2], bb[3]);
        }
      }
      const int f = FQ * q + 2 * t;  // this lane's frequencies f, f + 1 of the pair
      if (kbias) {
        const float b1a = __half2float(kbias[kv * D + f]), b1b = __half2float(kbias[kv * D + f + 1]);
        const float b2a = __half2float(kbias[kv * D + HALF + f]), b2b = __half2float(kbias[kv * D + HALF + f + 1]);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            k1[mi][2 * hr] += b1a, k1[mi][2 * hr + 1] += b1b;
            k2[mi][2 * hr] += b2a, k2[mi][2 * hr + 1] += b2b;
          }
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        uint32_t o1[2], o2[2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int64_t rp = pos(n0, mi, hr) * HALF + f;
          const uint32_t c = ld_vec<uint32_t>(cosp + rp), s = ld_vec<uint32_t>(sinp + rp);
          const uint32_t x1 = h2_bits(k1[mi][2 * hr], k1[mi][2 * hr + 1]);
          const uint32_t x2 = h2_bits(k2[mi][2 * hr], k2[mi][2 * hr + 1]);
          o1[hr] = h2_fma(x1, c, h2_neg(h2_mul(x2, s)));
          o2[hr] = h2_fma(x2, c, h2_mul(x1, s));
        }
        mma16816(sc[mi], o1[0], o1[1], o2[0], o2[1], bq[t][0], bq[t][1]);
      }
    }

    // online softmax per query head (column 2q + e), over the warp's rows
    float mloc[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (n0 + 16 * mi + 8 * (c >> 1) + r >= j1) sc[mi][c] = -INFINITY;
        mloc[c & 1] = fmaxf(mloc[c & 1], sc[mi][c]);
      }
    float corr[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      for (int o = 4; o < 32; o <<= 1) mloc[e] = fmaxf(mloc[e], __shfl_xor_sync(0xffffffffu, mloc[e], o));
      const float mn = fmaxf(m_run[e], mloc[e]);
      corr[e] = mn == -INFINITY ? 1.0f : lrx_exp2(m_run[e] - mn);
      m_run[e] = mn;
      l_run[e] *= corr[e];
    }
    float p[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float mn = m_run[c & 1];
        p[mi][c] = mn == -INFINITY ? 0.0f : lrx_exp2(sc[mi][c] - mn);
        l_run[c & 1] += p[mi][c];
      }
#pragma unroll
    for (int mc = 0; mc < NVP; ++mc)
#pragma unroll
      for (int c = 0; c < 4; ++c) o_acc[mc][c] *= corr[c & 1];

    // O^T [rv, heads] += V^T [rv, positions] @ P [positions, heads]
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      const uint32_t pb0 = movm_t(h2_bits(p[mi][0], p[mi][1])), pb1 = movm_t(h2_bits(p[mi][2], p[mi][3]));
#pragma unroll
      for (int mc = 0; mc < NVP; ++mc) {
        if (mc >= nv) break;
        mma16816(o_acc[mc], movm_t(av[mi][0][2 * mc]), movm_t(av[mi][0][2 * mc + 1]), movm_t(av[mi][1][2 * mc]),
                 movm_t(av[mi][1][2 * mc + 1]), pb0, pb1);
      }
    }
  }

  // this warp's partial row per query head: max (exp2 units), sum, unnormalised value latents
#pragma unroll
  for (int e = 0; e < 2; ++e)
    for (int o = 4; o < 32; o <<= 1) l_run[e] += __shfl_xor_sync(0xffffffffu, l_run[e], o);
  const int64_t nsp = a.nsplit * (kWarpBlock / 32), sp = split * (kWarpBlock / 32) + warp;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int h = 2 * q + e;
    if (h >= a.rep) continue;
    const int64_t prow = (b * a.Hq + kv * a.rep + h) * nsp + sp;
    if (r == 0) a.part_ml[2 * prow] = m_run[e], a.part_ml[2 * prow + 1] = l_run[e];
    float* acc = a.part_acc + prow * rv;
#pragma unroll
    for (int mc = 0; mc < NVP; ++mc) {
      if (mc >= nv) break;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) acc[virt_channel(16 * mc + 8 * hh + r, vq, BITS)] = o_acc[mc][2 * hh + e];
    }
  }
#else
  __trap();  // not reached: plan() picks this kernel on compute capability 8.0 or newer only
#endif
}
