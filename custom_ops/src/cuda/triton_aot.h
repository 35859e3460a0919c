// Ahead-of-time Triton decode kernels (lrexport/kernels/aot.py): a LowRankKVAttention node of a
// float16 model may carry the cubin of the Triton decode kernel compiled for its shapes and one GPU
// architecture, as two string attributes:
//   cuda_cubin   the cubin;
//   cuda_kernel  "abi=1 arch=90 name=_latent_attn_fwd warps=4 shared=N block_n=64 rv_p=64 waves=8
//                 min_split=1024 d16=sq_b,sq_s,..." (d16: the integer arguments compiled as multiples
//                 of 16; waves and min_split: how the cached positions are split, see plan_triton).
// The CUDA kernel loads it with the driver API (libcuda, opened at run time) on the first call on a
// device of that compute capability, and launches it for one-token steps (lowrank_kv_attention.cu,
// launch_triton); anything else runs the CUDA C++ kernels.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "launch.h"

namespace lrexport {
namespace cuda {

// The kernel's run-time integer arguments, in order (aot.py's ABI_ARGS without the pointers):
// bit i of TritonDecode::d16 is kIntArgs[i].
constexpr int kNumIntArgs = 16;
extern const char* const kIntArgs[kNumIntArgs];
constexpr int kAbi = 1;

struct TritonMeta {
  int arch = 0;  // compute capability * 10 + minor, e.g. 90
  std::string name;
  int warps = 4, shared = 0, waves = 4;
  int64_t block_n = 64, rv_p = 16;
  int64_t min_split = 256;  // absent in models exported before it was added: their rule
  bool row_splits = false;  // compiled with ROW_SPLITS: PAST holds (past_len, split_len) per row
  uint64_t d16 = 0;
};

// Parses cuda_kernel's value; returns "" or what is wrong with it.
std::string parse_triton_meta(const std::string& text, TritonMeta* m);

// A node's kernel: the cubin and its metadata, loaded per device on first use (thread-safe).
class TritonModule {
 public:
  TritonModule(std::string cubin, TritonMeta meta) : cubin_(std::move(cubin)), meta_(std::move(meta)) {}
  ~TritonModule();
  TritonModule(const TritonModule&) = delete;
  TritonModule& operator=(const TritonModule&) = delete;
  const TritonMeta& meta() const { return meta_; }
  size_t cubin_size() const { return cubin_.size(); }
  // The kernel for `device` (a CUDA runtime device ordinal); null with *why set when it cannot run
  // there (another compute capability, no driver, a load error; LREXPORT_CUDA_TRITON=0).
  const TritonDecode* get(int device, std::string* why) const;

 private:
  struct Loaded {
    TritonDecode kernel;
    void* module = nullptr;   // CUmodule
    void* context = nullptr;  // the device's primary context (retained)
    int device = 0;           // the driver's CUdevice (its primary context is retained)
    std::string error;        // why it cannot run on this device ("" when loaded)
  };
  std::string cubin_;
  TritonMeta meta_;
  mutable std::mutex mu_;
  mutable std::map<int, std::unique_ptr<Loaded>> loaded_;
};

}  // namespace cuda
}  // namespace lrexport
