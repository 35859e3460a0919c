// Packed integer codes of quantized KV latents, bit-exact with lrexport/kv/quant.py.
//
// One cache row (one token of one sequence) of R latent channels, bits in {2, 3, 4, 8} and
// quantization groups of `group` channels:
//   * codes: R*bits/8 bytes. Channel c has code q_c in [0, 2^bits). Little-endian packing:
//     for 2/4/8 bits, 8/bits codes per byte, the lowest channel in the lowest bits; for 3 bits
//     each run of 8 channels is one 24-bit little-endian word (3 bytes) holding channel 8k+i at
//     bits 3i.
//   * params: 2*R/group float16: the groups' scales, then their zero points.
// A value is q*scale + zero (float32 arithmetic, like the PyTorch reference).
//
// Quantization (per row and group), like lrexport.kv.quant.quantize:
//   lo, hi = min, max (float32); scale = fp16(max((hi - lo) / (2^bits - 1), 1e-8)); zero = fp16(lo);
//   q = clamp(round_half_even((x - zero) / scale), 0, 2^bits - 1)  (float32 arithmetic on the
//   float16-rounded scale and zero). A NaN quotient (0/0 when scale rounds to 0) gives code 0.
// 2-bit groups whose size is a power of two up to 256 search their range instead (like
// lrexport.kv.quant._searched): 256 candidates trim a/64 of the range from the bottom and b/64
// from the top (a, b < 16, a major; (0, 0) is min/max):
//   scale = fp16(max(((hi - lo) * (64 - a - b)) * 2^-6 / 3, 1e-8)); zero = a ? fp16(lo + ((hi - lo) * a) * 2^-6) : fp16(lo)
// and the codes of the one with the least error scale^2 * sum((q - t)^2) are stored, t being the
// unrounded level. The squares are exact in double and the sum adds halves (v[i] + v[i + n/2],
// repeated), so every implementation picks the same candidate; ties keep the first.
//
// The same functions serve the CPU kernel and the CUDA kernel (custom_ops/src/cuda/): under nvcc
// they are __host__ __device__, the bit casts use CUDA intrinsics on the device, and the
// dequantization's multiply and add are kept apart (__fmul_rn / __fadd_rn) so that nvcc cannot fuse
// them into one FMA (the host side is compiled with -ffp-contract=off for the same reason).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LRX_HD __host__ __device__ __forceinline__
#else
#define LRX_HD inline
#endif

namespace lrexport {

LRX_HD uint32_t f32_bits(float f) noexcept {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
LRX_HD float bits_f32(uint32_t u) noexcept {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// a * b + c with two roundings (never one fused multiply-add), like PyTorch's q * scale + zero
LRX_HD float mul_add_unfused(float a, float b, float c) noexcept {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  const float prod = a * b;  // the host build has -ffp-contract=off
  return prod + c;
#endif
}

// float32 -> float16, round to nearest even (overflow -> inf, NaN stays NaN).
LRX_HD uint16_t f32_to_f16(float f) noexcept {
  const uint32_t f32_infty = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;                    // 2^16: rounds to inf from here on
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t x = f32_bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint16_t o;
  if (x >= f16_max) {
    o = (x > f32_infty) ? 0x7e00 : 0x7c00;
  } else if (x < (113u << 23)) {                                   // below 2^-14: subnormal or zero
    // the FPU's round-to-nearest-even does the rounding of the shifted-out bits
    const float fx = bits_f32(x) + bits_f32(denorm_magic);
    o = static_cast<uint16_t>(f32_bits(fx) - denorm_magic);
  } else {
    const uint32_t mant_odd = (x >> 13) & 1u;
    x += ((15u - 127u) << 23) + 0xfffu;                            // rebias exponent, round
    x += mant_odd;                                                 // ties to even
    o = static_cast<uint16_t>(x >> 13);
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

LRX_HD float f16_to_f32(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;  // mant * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Code of channel c in a packed row.
LRX_HD uint32_t get_code(const uint8_t* row, int64_t c, int bits) noexcept {
  if (bits == 8) return row[c];
  if (bits == 3) {
    const uint8_t* w = row + 3 * (c >> 3);
    const uint32_t word = static_cast<uint32_t>(w[0]) | (static_cast<uint32_t>(w[1]) << 8) |
                          (static_cast<uint32_t>(w[2]) << 16);
    return (word >> (3 * (c & 7))) & 7u;
  }
  const int per = 8 / bits;  // 2 or 4 bits
  return (row[c / per] >> (bits * (c % per))) & ((1u << bits) - 1u);
}

constexpr int kSearchBits = 2;
constexpr int kSearchSteps = 16;
constexpr int kSearchDenom = 64;  // a power of two: the trims' scaling is exact
constexpr int64_t kSearchMaxGroup = 256;

LRX_HD bool searches(int bits, int64_t group) noexcept {
  return bits == kSearchBits && (group & (group - 1)) == 0 && group <= kSearchMaxGroup;
}

// round half to even, clamped to [0, levels]; NaN -> 0
LRX_HD float level_code(float t, uint32_t levels) noexcept {
  float q = nearbyintf(t);  // default rounding: half to even
  if (!(q > 0.0f)) q = 0.0f;  // also NaN -> 0
  if (q > static_cast<float>(levels)) q = static_cast<float>(levels);
  return q;
}

LRX_HD float clamp_scale(float scale) noexcept {
  if (!(scale >= 1e-8f)) scale = scale != scale ? scale : 1e-8f;  // clamp_min, NaN passes
  return scale;
}

// The searched (scale, zero) of a 2-bit group (see the header comment); sq: `group` doubles of
// scratch.
template <class Load>
LRX_HD void search_range(const Load& x, int64_t group, uint32_t levels, float lo, float hi, double* sq,
                         uint16_t* best_sh, uint16_t* best_zh) noexcept {
  const float span = hi - lo;
  double best = 0.0;
  for (int a = 0; a < kSearchSteps; ++a) {
    for (int b = 0; b < kSearchSteps; ++b) {
      const float num = (span * static_cast<float>(kSearchDenom - a - b)) * (1.0f / kSearchDenom);
      const uint16_t sh = f32_to_f16(clamp_scale(num / static_cast<float>(levels)));
      // (span * a) is rounded once; the power-of-two scaling is exact, so a fused multiply-add of it
      // with lo rounds like the separate operations
      const uint16_t zh =
          a == 0 ? f32_to_f16(lo) : f32_to_f16(lo + (span * static_cast<float>(a)) * (1.0f / kSearchDenom));
      const float sf = f16_to_f32(sh), zf = f16_to_f32(zh);
      for (int64_t c = 0; c < group; ++c) {
        const float t = (x(c) - zf) / sf;
        const double d = static_cast<double>(level_code(t, levels)) - static_cast<double>(t);
        sq[c] = d * d;  // exact
      }
      for (int64_t h = group / 2; h >= 1; h /= 2)
        for (int64_t i = 0; i < h; ++i) sq[i] = sq[i] + sq[i + h];
      const double s = static_cast<double>(sf);
      const double err = sq[0] * (s * s);
      if ((a == 0 && b == 0) || err < best) {
        best = err;
        *best_sh = sh;
        *best_zh = zh;
      }
    }
  }
}

// Quantize one group of `group` values (a multiple of 8) into packed codes (group*bits/8 bytes,
// all written) and its float16 scale and zero point. x(i) gives value i as a float (the CUDA
// kernel reads float16 latents through it; the float16 -> float conversion is exact).
template <class Load>
LRX_HD void quantize_group_with(const Load& x, int64_t group, int bits, uint8_t* codes, uint16_t* scale_h,
                                uint16_t* zero_h) noexcept {
  const uint32_t levels = (1u << bits) - 1u;
  float lo = x(0), hi = x(0);
  for (int64_t i = 1; i < group; ++i) {
    const float v = x(i);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  uint16_t sh, zh;
  if (searches(bits, group)) {
    double sq[kSearchMaxGroup];
    search_range(x, group, levels, lo, hi, sq, &sh, &zh);
  } else {
    sh = f32_to_f16(clamp_scale((hi - lo) / static_cast<float>(levels)));
    zh = f32_to_f16(lo);
  }
  *scale_h = sh;
  *zero_h = zh;
  const float sf = f16_to_f32(sh), zf = f16_to_f32(zh);
  for (int64_t i = 0; i < group * bits / 8; ++i) codes[i] = 0;
  for (int64_t c = 0; c < group; ++c) {
    const uint32_t code = static_cast<uint32_t>(level_code((x(c) - zf) / sf, levels));
    if (bits == 8) {
      codes[c] = static_cast<uint8_t>(code);
    } else if (bits == 3) {
      const int64_t bit = 3 * c;  // 8 channels = 24 bits = 3 bytes: bit offsets are contiguous
      const uint32_t v = code << (bit & 7);
      codes[bit >> 3] = static_cast<uint8_t>(codes[bit >> 3] | (v & 0xffu));
      if (v >> 8) codes[(bit >> 3) + 1] = static_cast<uint8_t>(codes[(bit >> 3) + 1] | (v >> 8));
    } else {
      const int per = 8 / bits;
      codes[c / per] = static_cast<uint8_t>(codes[c / per] | (code << (bits * (c % per))));
    }
  }
}

struct FloatLoad {
  const float* p;
  LRX_HD float operator()(int64_t i) const noexcept { return p[i]; }
};

LRX_HD void quantize_group(const float* xg, int64_t group, int bits, uint8_t* codes, uint16_t* scale_h,
                           uint16_t* zero_h) noexcept {
  quantize_group_with(FloatLoad{xg}, group, bits, codes, scale_h, zero_h);
}

// Quantize one row of `width` floats into packed codes (width*bits/8 bytes) and float16
// params (2*width/group). width is a multiple of group, group a multiple of 8, so every group
// starts on a byte (and, for 3 bits, on a 24-bit word).
LRX_HD void quantize_row(const float* x, int64_t width, int bits, int64_t group, uint8_t* codes,
                         uint16_t* params) noexcept {
  const int64_t ngroups = width / group;
  for (int64_t gi = 0; gi < ngroups; ++gi)
    quantize_group(x + gi * group, group, bits, codes + gi * group * bits / 8, params + gi, params + ngroups + gi);
}

// Dequantize channels [c0, c1) of a packed row into out[0 .. c1-c0).
LRX_HD void dequantize_range(const uint8_t* codes, const uint16_t* params, int64_t width, int bits,
                             int64_t group, int64_t c0, int64_t c1, float* out) noexcept {
  const int64_t ngroups = width / group;
  int64_t c = c0;
  while (c < c1) {
    const int64_t gi = c / group;
    const int64_t end = (gi + 1) * group < c1 ? (gi + 1) * group : c1;
    const float sf = f16_to_f32(params[gi]), zf = f16_to_f32(params[ngroups + gi]);
    for (; c < end; ++c) {
      const float q = static_cast<float>(get_code(codes, c, bits));
      out[c - c0] = mul_add_unfused(q, sf, zf);  // two roundings, like q * scale + zero in PyTorch
    }
  }
}

}  // namespace lrexport
