// The interface between the ONNX Runtime side of the CUDA kernel (lowrank_kv_attention_cuda.cc,
// compiled by the C++ compiler) and the CUDA code (lowrank_kv_attention.cu, compiled by nvcc).
// Plain data only: neither ONNX Runtime nor CUDA headers are needed to include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lrexport {
namespace cuda {

// One checked call (see op_common.h): shapes, attributes and the tensors' addresses. Every
// pointer is device memory except past_len: host memory (B values, checked), or device memory when
// device_lengths (LowRankKVAttentionDeviceLen: never read on the host; the kernels clamp each value
// to [0, min(P, Prope) - S], skip the cache write of a row outside it and write NaN as its output).
struct Params {
  int64_t B, S, Hq, Hkv, s, G, D, rk, rv, P, Prope, rep;
  int64_t Wk, Wv;    // latent widths G*rk, G*rv
  int64_t Ck, Cv;    // cache row widths (elements for bits = 0, code bytes otherwise)
  int64_t NPk, NPv;  // float16 params per row (bits > 0)
  int64_t out_w;     // output width: Hq*D with v_up, else Hq*rv
  int bits;
  int64_t quant_group;
  int64_t window;
  float scale;
  bool f16;  // activations (and float caches) are float16, else float
  const int64_t* past_len;
  bool device_lengths;
  const void *query, *latent_k, *latent_v, *k_up, *k_bias, *v_up, *cos, *sin;  // k_bias, v_up may be null
  const void *past_k, *past_k_params, *past_v, *past_v_params;
  void *out, *present_k, *present_k_params, *present_v, *present_v_params;
  size_t k_bytes, v_bytes, kp_bytes, vp_bytes;  // cache sizes (0 when empty)
  int device;                                   // the device that holds the tensors
};

// An ahead-of-time Triton decode kernel (lrexport/kernels/aot.py, loaded by triton_aot.cc) for the
// call's device. Its arguments: triton_aot.h's kArgNames, then two null scratch pointers.
struct TritonDecode {
  void* function = nullptr;  // CUfunction
  void* launch = nullptr;    // the driver's cuLaunchKernel
  int warps = 4, shared = 0, waves = 4;
  int64_t block_n = 64, rv_p = 16;
  int64_t min_split = 256;  // fewest cached positions per split
  bool row_splits = false;  // compiled with ROW_SPLITS: its past_len argument is (past_len, split_len) per row
  uint64_t d16 = 0;  // bit i: integer argument i (kArgNames order) was compiled as a multiple of 16
};

// How a call is split into blocks, and the device scratch memory it needs.
struct Plan {
  int64_t qtile = 1;   // new tokens per attention block
  int64_t nqt = 0;     // query tiles per batch row: ceil(S / qtile)
  int64_t nsplit = 1;  // blocks along the key positions (flash decoding)
  bool mma = false;    // the tensor-core (WMMA) attention: float16 unless LREXPORT_CUDA_MMA=0 (see the .cu)
  size_t smem_attn = 0, smem_combine = 0;
  size_t scratch_bytes = 0;  // past_len copy + partial results
  size_t off_ml = 0, off_acc = 0;
  // the Triton decode kernel (S = 1, plan() given one whose checks pass): its splits of split_len
  // positions; scratch: past_len as int32, then max / sum [B*Hq*nsplit] and acc [.., rv_p] floats
  bool triton = false;
  std::string triton_skip;  // why a given Triton kernel is not used for this call ("" when it is)
  // the warp decode kernel (decode_warp.cuh: S = 1, float16, its shape rules; only with
  // LREXPORT_CUDA_DECODE=warp, then before the Triton one): nsplit blocks per (row, KV head), a partial
  // row per warp in the off_ml / off_acc scratch
  bool warp = false;
  std::string warp_skip;  // why it is not used for this call although asked for ("" otherwise)
  int64_t split_len = 0;
  size_t off_past32 = 0, off_max = 0, off_sum = 0;
};

// Fills *plan for p (queries the device's properties). Returns "" or an error message. The splits
// along the key positions are planned from the longest row (host past_len) or, with device_lengths,
// from the cache's capacity: every row then divides its own length among them. `triton`: a
// decode kernel loaded for p.device (or null), used when the call is one token per row and its
// arguments meet the compiled assumptions (plan->triton; else plan->triton_skip says why).
std::string plan(const Params& p, Plan* plan, const TritonDecode* triton = nullptr);

// Enqueues the call on `stream` (a cudaStream_t; nullptr = the legacy default stream): copies
// past -> present where they are different buffers, writes (quantizes) the new tokens, attends.
// `scratch` is device memory of plan.scratch_bytes (null when 0). Returns "" or an error message
// (a CUDA error of a launch or a copy); nothing is synchronized.
std::string run(const Params& p, const Plan& plan, void* scratch, void* stream, const TritonDecode* triton = nullptr);

}  // namespace cuda
}  // namespace lrexport
