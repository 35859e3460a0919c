// LowRankKVAttention (domain "lrexport", since version 1): attention over a cache of low-rank
// K/V latents (Palu), float or packed integer codes. See docs/custom_op.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ort_api.h"

namespace lrexport {

constexpr const char* kDomain = "lrexport";
constexpr const char* kOpName = "LowRankKVAttention";
// The same op with past_len read in device memory by the CUDA kernel (no host reads, no host
// checks of its values, splits planned from the cache capacity), so that ONNX Runtime can capture
// a decode step as a CUDA graph. On the CPU both names run the same kernel. See docs/custom_op.md.
constexpr const char* kOpNameDeviceLen = "LowRankKVAttentionDeviceLen";

// Input and output slots.
enum Input : size_t {
  kQuery = 0,
  kLatentK = 1,
  kLatentV = 2,
  kPastK = 3,
  kPastKParams = 4,
  kPastV = 5,
  kPastVParams = 6,
  kPastLen = 7,
  kKUp = 8,
  kKBias = 9,
  kVUp = 10,
  kCos = 11,
  kSin = 12,
  kNumInputs = 13,
};
enum Output : size_t {
  kOut = 0,
  kPresentK = 1,
  kPresentKParams = 2,
  kPresentV = 3,
  kPresentVParams = 4,
  kNumOutputs = 5,
};

struct Attributes {
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t group_size = 1;
  int64_t window = 0;
  float scale = 0.0f;
  bool has_scale = false;  // else 1/sqrt(head_dim)
  int64_t bits = 0;
  int64_t quant_group = 0;
};

// The kernel state ORT keeps per node (immutable after creation, so Compute is reentrant). One
// subclass per execution provider: the CPU kernel (lowrank_kv_attention.cc) and the CUDA kernel
// (cuda/lowrank_kv_attention_cuda.cc).
struct KernelBase {
  Attributes attrs;
  bool device_lengths = false;  // the op is LowRankKVAttentionDeviceLen and past_len is in device memory
  bool debug = false;  // LREXPORT_OPS_DEBUG=1: one stderr line per call (aliasing, sizes)
  virtual ~KernelBase() = default;
  // May throw: the one caller (op_common.cc) turns exceptions into error statuses.
  virtual OrtStatus* Compute(OrtKernelContext* ctx) const = 0;
  // After the common attributes are read (session creation): a kernel's own attributes.
  virtual OrtStatus* Init(const OrtKernelInfo*) { return nullptr; }
};

struct LowRankKVAttentionKernel : KernelBase {
  OrtStatus* Compute(OrtKernelContext* ctx) const override;
};

// One OrtCustomOp per (execution provider, activation dtype, K cache dtype, V cache dtype). The
// activation dtype is that of query, latent_k/v, k_up, k_bias, v_up, cos, sin and the output:
// float on the CPU, float or float16 on CUDA. A cache is of the activation dtype (bits = 0) or
// uint8 (packed codes); the mixed pairs exist so that a cache dtype that disagrees with `bits`
// reaches the kernel and is reported by name.
struct LowRankKVAttentionOp : OrtCustomOp {
  ONNXTensorElementDataType act_type;
  ONNXTensorElementDataType k_cache_type;
  ONNXTensorElementDataType v_cache_type;
  const char* provider;                   // "CPUExecutionProvider" or "CUDAExecutionProvider"
  const char* name;                       // kOpName or kOpNameDeviceLen
  KernelBase* (*make_kernel)() noexcept;  // a new kernel of this provider (nullptr: out of memory)
  LowRankKVAttentionOp(const char* provider, KernelBase* (*make_kernel)() noexcept, ONNXTensorElementDataType act,
                       ONNXTensorElementDataType k, ONNXTensorElementDataType v,
                       const char* op_name = kOpName) noexcept;
};

// The CPU ops to add to the domain, under both names (static storage, valid for the life of the
// process).
LowRankKVAttentionOp* cpu_ops(size_t* count) noexcept;

#if defined(LREXPORT_WITH_CUDA)
// The CUDA ops (cuda/lowrank_kv_attention_cuda.cc) under both names, added beside the CPU ones.
LowRankKVAttentionOp* cuda_ops(size_t* count) noexcept;
#endif

}  // namespace lrexport
