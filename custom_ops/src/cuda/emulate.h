// A CPU stand-in for the few CUDA features lowrank_kv_attention.cu uses, so that its kernels can
// run, unchanged, on a machine without a GPU. Test builds only (CMake -DLREXPORT_CUDA_EMULATE=ON,
// tests/test_custom_op_cuda_emulated.py); a real build never includes this file.
//
// Blocks run one after the other. The threads of a block are ucontext fibers on the calling
// thread, switched only at __syncthreads() and warp shuffles (barriers), so every interleaving a
// barrier allows is a valid CUDA one. threadIdx / blockIdx are set by the scheduler before a fiber
// resumes. __half is float16 storage with round-to-nearest-even conversions (quant.h). A deadlock
// (threads waiting at different barriers) aborts with a message. Device memory is host memory;
// copies are memmove; the "device" has LREXPORT_EMU_SMS multiprocessors (default 16).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
  std::vector<char> smem;
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
      b.smem.assign(smem + 16, 0x7f);  // garbage, like uninitialised shared memory
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
#define LRX_SHARED_FLOATS(name) float* name = reinterpret_cast<float*>(lrx_emu::cur->smem.data())
#define LRX_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), lrx_emu::launch(kernel, dim3(grid), dim3(block), (smem), __VA_ARGS__))

// ---- the CUDA runtime calls the launcher makes --------------------------------------------------
enum cudaError_t { cudaSuccess = 0 };
typedef void* cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
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
  *v = a == cudaDevAttrMultiProcessorCount ? lrx_emu::multiprocessors() : 227 * 1024;  // H100's opt-in limit
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
