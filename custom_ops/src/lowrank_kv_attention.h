// LowRankKVAttention (domain "lrexport", since version 1): attention over a cache of low-rank
// K/V latents (Palu), float or packed integer codes. See docs/custom_op.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ort_api.h"

namespace lrexport {

constexpr const char* kDomain = "lrexport";
constexpr const char* kOpName = "LowRankKVAttention";

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

// The kernel state ORT keeps per node (immutable after creation, so Compute is reentrant).
struct LowRankKVAttentionKernel {
  Attributes attrs;
  bool debug = false;  // LREXPORT_OPS_DEBUG=1: one stderr line per call (aliasing, sizes)
  OrtStatus* Compute(OrtKernelContext* ctx) const noexcept;
};

// One OrtCustomOp per (K cache dtype, V cache dtype): float (bits = 0) or uint8 (packed codes).
// All CPU execution provider.
struct LowRankKVAttentionOp : OrtCustomOp {
  ONNXTensorElementDataType k_cache_type;
  ONNXTensorElementDataType v_cache_type;
  LowRankKVAttentionOp(ONNXTensorElementDataType k, ONNXTensorElementDataType v) noexcept;
};

// The CPU ops to add to the domain (static storage, valid for the life of the process).
LowRankKVAttentionOp* cpu_ops(size_t* count) noexcept;

}  // namespace lrexport
