// What the CPU and the CUDA kernels of LowRankKVAttention share: the attributes, the checks of
// every input against them and each other (error statuses that name the input), the outputs'
// allocation and the checks of the buffers' sharing, and the OrtCustomOp registration.
//
// A kernel calls prepare_call(); when it returns nullptr every input has been checked, every output
// allocated, and nothing has been written yet. Pointers in Call are wherever ONNX Runtime put the
// tensors: host memory for the CPU kernel, device memory for the CUDA kernel (except past_len, which
// LowRankKVAttention's CUDA op takes as a CPU input so that the checks and the launch can read it on
// the host; LowRankKVAttentionDeviceLen's takes it in device memory).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lowrank_kv_attention.h"
#include "ort_api.h"

namespace lrexport {

extern const char* const kInputNames[kNumInputs];
extern const char* const kOutputNames[kNumOutputs];

// "LowRankKVAttention: " + msg, as an ORT_INVALID_ARGUMENT status.
OrtStatus* fail(const std::string& msg);
std::string err_prefix();

// A tensor input (or its absence).
struct In {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t numel = 0;
  template <class T>
  const T* as() const {
    return static_cast<const T*>(data);
  }
};

size_t elem_size(ONNXTensorElementDataType t);
bool overlaps(const void* a, size_t na, const void* b, size_t nb);

struct Shapes {
  int64_t B, S, Hq, Hkv, s, G, D, rk, rv, P, Prope, rep;
  int64_t Wk, Wv;    // latent widths G*rk, G*rv
  int64_t Ck, Cv;    // cache row widths (elements: floats / halves, or code bytes)
  int64_t NPk, NPv;  // params per row (bits > 0)
  bool has_vup, has_kbias;
  float scale;
  ONNXTensorElementDataType act;  // float (the CPU kernel) or float16 / float (the CUDA kernel)
};

// One call, checked: inputs, shapes, outputs.
struct Call {
  In in[kNumInputs];
  Shapes z{};
  int bits = 0;
  const int64_t* past_len = nullptr;  // B values: host memory, or device memory (lengths_on_host false)
  int64_t out_w = 0;                  // output width: Hq*D with v_up, else Hq*rv
  void* out = nullptr;
  void* present_k = nullptr;
  void* present_v = nullptr;
  void* present_k_params = nullptr;  // bits > 0
  void* present_v_params = nullptr;
  size_t k_bytes = 0, v_bytes = 0, kp_bytes = 0, vp_bytes = 0;  // cache (and params) sizes
  bool k_inplace = false, v_inplace = false;                    // present_* is past_*'s buffer
};

// Checks every input of the call against `a` and each other, allocates the outputs and checks that
// an output shares memory with no input but its own past (exactly). `allow_f16`: float16
// activations are accepted (query's element type decides; the float inputs and float caches must
// then all be float16); otherwise they must be float. `lengths_on_host`: past_len's values are
// checked against the cache and the RoPE table (false: past_len is in device memory and only its
// shape is checked; the kernels guard the values). Writes nothing but *c.
OrtStatus* prepare_call(OrtKernelContext* ctx, const Attributes& a, bool allow_f16, bool lengths_on_host, Call* c);

// The attributes of a node (errors when the session is created).
OrtStatus* read_attributes(const OrtKernelInfo* info, Attributes* a);

// "LowRankKVAttention: B=.. S=.. P=.. bits=..; present_k aliases past_k, present_v is a copy of past_v"
std::string describe_call(const Call& c);

}  // namespace lrexport
