// A CPU stand-in for the few CUDA features lowrank_kv_attention.cu uses, so that its kernels can
// run, unchanged, on a machine without a GPU. Test builds only (CMake -DLREXPORT_CUDA_EMULATE=ON,
// tests/test_custom_op_cuda_emulated.py); a real build never includes this file.
//
// Blocks run one after the other. The threads of a block are ucontext fibers on the calling
// thread, switched only at __syncthreads() and warp shuffles (barriers), so every interleaving a
// barrier allows is a valid CUDA one. threadIdx / blockIdx are set by the scheduler before a fiber
// resumes. __half is float16 storage with round-to-nearest-even conversions (quant.h). A deadlock
// (threads waiting at different barriers) aborts with a message. Device memory is host memory;
// copies are memmove; the "device" has LREXPORT_EMU_SMS multiprocessors (default 16). Dynamic
// shared memory starts 128-byte aligned and is filled with garbage (0x7f bytes).
//
// nvcuda::wmma (m16n16k16, __half inputs, float accumulators): the element-to-lane mapping of a
// real fragment is opaque to the kernel, so here every lane holds the whole 16x16 tile. Loads and
// stores copy the whole tile (the same values from every lane, so idempotent) between warp
// barriers (all lanes arrive before any reads, and all have read or written before any goes on,
// as with the warp-wide real ones; a lane that skips one deadlocks); mma_sync computes the full
// product in float from the float16 inputs. They abort on a pointer that is not 32-byte aligned
// or a leading dimension that is not a multiple of 16 bytes (the real API's requirements).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../quant.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) { return lrexport::f16_to_f32(h.bits); }
inline __half __float2half_rn(float f) { return __half{lrexport::f32_to_f16(f)}; }

namespace lrx_emu {

struct Block {
  int n = 0;        // threads
  int current = 0;  // the running fiber
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
  ucontext_t main;
  long block_gen = 0;
  int block_arrived = 0;
  std::vector<long> warp_gen;
  std::vector<int> warp_arrived;
  std::vector<float> xchg;
  std::vector<uint32_t> xchg_u;  // warp_gather: up to kGatherMax words per thread
  std::vector<char> smem;
  float* smem_base = nullptr;  // smem.data() rounded up to 128 bytes
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  long progress = 0;  // bumped when a barrier opens or a fiber ends
};

inline Block* cur = nullptr;
inline dim3 thread_idx, block_idx, block_dim, grid_dim;

inline void yield() {
  Block& b = *cur;
  swapcontext(&b.ctx[b.current], &b.main);
}

inline void syncthreads() {
  Block& b = *cur;
  const long gen = b.block_gen;
  if (++b.block_arrived == b.n) {
    b.block_arrived = 0;
    ++b.block_gen;
    ++b.progress;
    return;
  }
  while (b.block_gen == gen) yield();
}

inline void warp_barrier() {
  Block& b = *cur;
  const int w = static_cast<int>(thread_idx.x) / 32;
  const int lanes = b.n - w * 32 < 32 ? b.n - w * 32 : 32;
  const long gen = b.warp_gen[w];
  if (++b.warp_arrived[w] == lanes) {
    b.warp_arrived[w] = 0;
    ++b.warp_gen[w];
    ++b.progress;
    return;
  }
  while (b.warp_gen[w] == gen) yield();
}

inline float shfl_xor(float v, int lane_mask) {
  Block& b = *cur;
  const int t = static_cast<int>(thread_idx.x);
  b.xchg[t] = v;
  warp_barrier();
  const int src = t ^ lane_mask;
  const float r = src < b.n ? b.xchg[src] : v;
  warp_barrier();
  return r;
}

// Every lane of the calling warp hands in n words (n <= kGatherMax) and gets all 32 lanes' words:
// all[lane * n + i]. A warp-wide barrier before and after, like the real warp-collective instructions
// (mma.sync, ldmatrix, movmatrix) that decode_warp.cuh's emulated forms build on.
constexpr int kGatherMax = 16;
inline void warp_gather(const uint32_t* mine, int n, uint32_t* all) {
  Block& b = *cur;
  const int t = static_cast<int>(thread_idx.x), w = t / 32;
  for (int i = 0; i < n; ++i) b.xchg_u[t * kGatherMax + i] = mine[i];
  warp_barrier();
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < n; ++i) all[l * n + i] = w * 32 + l < b.n ? b.xchg_u[(w * 32 + l) * kGatherMax + i] : 0u;
  warp_barrier();
}

inline void trampoline() {
  Block& b = *cur;
  b.body(b.body_arg);
  b.done[b.current] = 1;
  ++b.progress;
}  // returns to uc_link (the scheduler)

inline void run_block(Block& b) {
  cur = &b;
  for (int i = 0; i < b.n; ++i) {
    b.done[i] = 0;
    getcontext(&b.ctx[i]);
    b.ctx[i].uc_stack.ss_sp = b.stacks[i].data();
    b.ctx[i].uc_stack.ss_size = b.stacks[i].size();
    b.ctx[i].uc_link = &b.main;
    makecontext(&b.ctx[i], trampoline, 0);
  }
  b.block_gen = 0;
  b.block_arrived = 0;
  std::fill(b.warp_gen.begin(), b.warp_gen.end(), 0);
  std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0);
  int alive = b.n;
  while (alive > 0) {
    const long before = b.progress;
    for (int i = 0; i < b.n; ++i) {
      if (b.done[i]) continue;
      b.current = i;
      thread_idx = dim3(static_cast<unsigned>(i));
      swapcontext(&b.main, &b.ctx[i]);
      if (b.done[i]) --alive;
    }
    if (alive > 0 && b.progress == before) {
      std::fprintf(stderr, "lrexport CUDA emulation: deadlock in block (%u, %u): threads wait at different barriers\n",
                   block_idx.x, block_idx.y);
      std::abort();
    }
  }
  cur = nullptr;
}

template <class Arg>
void launch(void (*kernel)(Arg), dim3 grid, dim3 block, size_t smem, Arg arg) {
  struct Call {
    void (*k)(Arg);
    Arg* a;
  } call{kernel, &arg};
  Block b;
  b.n = static_cast<int>(block.x);
  b.ctx.resize(b.n);
  b.stacks.assign(b.n, std::vector<char>(128 * 1024));
  b.done.assign(b.n, 0);
  b.warp_gen.assign((b.n + 31) / 32, 0);
  b.warp_arrived.assign((b.n + 31) / 32, 0);
  b.xchg.assign(b.n, 0.0f);
  b.xchg_u.assign(static_cast<size_t>(b.n) * kGatherMax, 0u);
  b.body = [](void* p) {
    Call* c = static_cast<Call*>(p);
    c->k(*c->a);
  };
  b.body_arg = &call;
  block_dim = block;
  grid_dim = grid;
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) {
      block_idx = dim3(x, y);
      b.smem.assign(smem + 16 + 128, 0x7f);  // garbage, like uninitialised shared memory
      const uintptr_t base = reinterpret_cast<uintptr_t>(b.smem.data());
      b.smem_base = reinterpret_cast<float*>(b.smem.data() + ((128 - base % 128) % 128));
      run_block(b);
    }
}

inline int multiprocessors() {
  const char* e = std::getenv("LREXPORT_EMU_SMS");
  const int n = e ? std::atoi(e) : 0;
  return n > 0 ? n : 16;
}

}  // namespace lrx_emu

#define threadIdx (lrx_emu::thread_idx)
#define blockIdx (lrx_emu::block_idx)
#define blockDim (lrx_emu::block_dim)
#define gridDim (lrx_emu::grid_dim)
#define __syncthreads() lrx_emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) lrx_emu::shfl_xor((v), (lane_mask))
#define LRX_SHARED_FLOATS(name) float* name = lrx_emu::cur->smem_base
#define LRX_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), lrx_emu::launch(kernel, dim3(grid), dim3(block), (smem), __VA_ARGS__))

// ---- nvcuda::wmma, m16n16k16 with __half inputs and float accumulators (see the top) -----------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated wmma: m16n16k16 only");
  static constexpr int num_elements = 256;
  float x[256];  // the whole tile, row-major (rows x columns of the operand), on every lane
};

}  // namespace wmma
}  // namespace nvcuda

namespace lrx_emu {

inline void wmma_check(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "lrexport CUDA emulation: wmma::%s at %p with ldm=%u: needs a 32-byte aligned pointer and "
                 "ldm a multiple of %zu elements\n", what, p, ldm, 16 / elem);
    std::abort();
  }
}

// element (r, c) of a 16x16 tile at p: row-major p[r * ldm + c], column-major p[c * ldm + r]
template <class E>
inline const E& tile_at(const E* p, unsigned ldm, bool col_major, int r, int c) {
  return col_major ? p[c * ldm + r] : p[r * ldm + c];
}

}  // namespace lrx_emu

namespace nvcuda {
namespace wmma {

template <class Use, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, __half, Layout>& f, const __half* p, unsigned ldm) {
  static_assert(std::is_same<Use, matrix_a>::value || std::is_same<Use, matrix_b>::value, "operand fragment");
  lrx_emu::wmma_check(p, ldm, sizeof(__half), "load_matrix_sync");
  lrx_emu::warp_barrier();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = __half2float(lrx_emu::tile_at(p, ldm, std::is_same<Layout, col_major>::value, r, c));
  lrx_emu::warp_barrier();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  lrx_emu::wmma_check(p, ldm, sizeof(float), "load_matrix_sync");
  lrx_emu::warp_barrier();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = lrx_emu::tile_at(p, ldm, layout == mem_col_major, r, c);
  lrx_emu::warp_barrier();
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  lrx_emu::wmma_check(p, ldm, sizeof(float), "store_matrix_sync");
  lrx_emu::warp_barrier();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * 16 + c];
  lrx_emu::warp_barrier();
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (float& e : f.x) e = v;
}

// d = a @ b + c (d may be c)
template <class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __half, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, __half, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda

// ---- the CUDA runtime calls the launcher makes --------------------------------------------------
enum cudaError_t { cudaSuccess = 0 };
typedef void* cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrComputeCapabilityMajor
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = lrx_emu::multiprocessors(); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 227 * 1024; break;  // H100's opt-in limit
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
  }
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}
