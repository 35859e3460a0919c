// The CUDA execution provider's LowRankKVAttention: the ONNX Runtime side (checks, outputs,
// scratch memory, stream). The kernels are in lowrank_kv_attention.cu (see launch.h).
//
// Types: the activation dtype is query's, float or float16; latent_k/v, k_up, k_bias, v_up, cos,
// sin, the output and float caches (bits = 0) have that same dtype; packed caches are uint8 with
// float16 params, as on the CPU. LowRankKVAttention's past_len is a CPU input (OrtMemTypeCPUInput):
// the checks and the launch read it on the host without synchronizing the stream; everything else is
// device memory. LowRankKVAttentionDeviceLen's past_len is device memory too, read by the kernels
// only (a call is then the same launches whatever the lengths: ONNX Runtime can capture it in a CUDA
// graph and replay it with new lengths).
// Every bad input gives the CPU kernel's error status (prepare_call, op_common.cc); CUDA errors of
// a launch or a copy give an ORT_FAIL status. Nothing waits for the GPU.
//
// LREXPORT_CUDA_EMULATE (test builds only): the same code with the kernels run on the CPU by
// emulate.h, registered for the CPU execution provider, scratch memory from malloc.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <new>
#include <string>

#include "../lowrank_kv_attention.h"
#include "../op_common.h"
#include "launch.h"
#include "triton_aot.h"

namespace lrexport {
namespace {

struct CudaKernel : KernelBase {
  OrtStatus* Init(const OrtKernelInfo* info) override;
  OrtStatus* Compute(OrtKernelContext* ctx) const override;
  std::unique_ptr<cuda::TritonModule> triton;  // the node's ahead-of-time decode kernel, if any
  std::string triton_note;                      // what the node carries (for LREXPORT_OPS_DEBUG)
};

OrtStatus* cuda_fail(const std::string& msg) { return make_error(ORT_FAIL, err_prefix() + "CUDA kernel: " + msg); }

// A string attribute (binary-safe); *found = false when the node does not set it.
OrtStatus* attr_string(const OrtKernelInfo* info, const char* name, std::string* out, bool* found) {
  size_t size = 0;
  *found = false;
  if (OrtStatus* st = g_ort->KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    g_ort->ReleaseStatus(st);
    return nullptr;
  }
  std::string buf(size, '\0');
  LRX_RETURN_IF_ERROR(g_ort->KernelInfoGetAttribute_string(info, name, &buf[0], &size));
  buf.resize(size > 0 ? size - 1 : 0);  // the API counts a terminating NUL
  *out = std::move(buf);
  *found = true;
  return nullptr;
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

OrtStatus* CudaKernel::Init(const OrtKernelInfo* info) {
  std::string meta_text, cubin;
  bool has_meta = false, has_cubin = false;
  LRX_RETURN_IF_ERROR(attr_string(info, "cuda_kernel", &meta_text, &has_meta));
  LRX_RETURN_IF_ERROR(attr_string(info, "cuda_cubin", &cubin, &has_cubin));
  if (!has_meta && !has_cubin) return nullptr;
  if (has_meta != has_cubin || cubin.empty())
    return fail("attributes cuda_kernel and cuda_cubin come together (re-export the model)");
  cuda::TritonMeta meta;
  const std::string err = cuda::parse_triton_meta(meta_text, &meta);
  char note[160];
  if (!err.empty()) {
    if (err.rfind("abi=", 0) != 0) return fail("attribute cuda_kernel: " + err + " (re-export the model)");
    triton_note = "Triton decode kernel not used: " + err;  // another exporter version: the C++ kernels run
    return nullptr;
  }
  std::snprintf(note, sizeof(note), "Triton decode kernel %s for sm_%d, %zu cubin bytes (fnv1a %016llx)",
                meta.name.c_str(), meta.arch, cubin.size(), static_cast<unsigned long long>(fnv1a(cubin)));
  triton_note = note;
  triton.reset(new cuda::TritonModule(std::move(cubin), std::move(meta)));
  return nullptr;
}

OrtStatus* CudaKernel::Compute(OrtKernelContext* ctx) const {
  Call call;
  LRX_RETURN_IF_ERROR(prepare_call(ctx, attrs, /*allow_f16=*/true, /*lengths_on_host=*/!device_lengths, &call));
  const Shapes& z = call.z;
  const In* in = call.in;

  // the device holding the tensors (query's), and its allocator for the scratch memory
  const OrtValue* qv = nullptr;
  LRX_RETURN_IF_ERROR(g_ort->KernelContext_GetInput(ctx, kQuery, &qv));
  const OrtMemoryInfo* mem = nullptr;
  LRX_RETURN_IF_ERROR(g_ort->GetTensorMemoryInfo(qv, &mem));
  int device = 0;
  LRX_RETURN_IF_ERROR(g_ort->MemoryInfoGetId(mem, &device));
  void* stream = nullptr;
  LRX_RETURN_IF_ERROR(g_ort->KernelContext_GetGPUComputeStream(ctx, &stream));

  cuda::Params p{};
  p.B = z.B, p.S = z.S, p.Hq = z.Hq, p.Hkv = z.Hkv, p.s = z.s, p.G = z.G, p.D = z.D, p.rk = z.rk, p.rv = z.rv;
  p.P = z.P, p.Prope = z.Prope, p.rep = z.rep, p.Wk = z.Wk, p.Wv = z.Wv, p.Ck = z.Ck, p.Cv = z.Cv;
  p.NPk = z.NPk, p.NPv = z.NPv, p.out_w = call.out_w;
  p.bits = call.bits;
  p.quant_group = attrs.quant_group;
  p.window = attrs.window;
  p.scale = z.scale;
  p.f16 = z.act == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  p.past_len = call.past_len;
  p.device_lengths = device_lengths;
  p.query = in[kQuery].data, p.latent_k = in[kLatentK].data, p.latent_v = in[kLatentV].data;
  p.k_up = in[kKUp].data, p.k_bias = z.has_kbias ? in[kKBias].data : nullptr;
  p.v_up = z.has_vup ? in[kVUp].data : nullptr, p.cos = in[kCos].data, p.sin = in[kSin].data;
  p.past_k = in[kPastK].data, p.past_v = in[kPastV].data;
  p.past_k_params = in[kPastKParams].data, p.past_v_params = in[kPastVParams].data;
  p.out = call.out, p.present_k = call.present_k, p.present_v = call.present_v;
  p.present_k_params = call.present_k_params, p.present_v_params = call.present_v_params;
  p.k_bytes = call.k_bytes, p.v_bytes = call.v_bytes, p.kp_bytes = call.kp_bytes, p.vp_bytes = call.vp_bytes;
  p.device = device;

  std::string triton_why;
  const cuda::TritonDecode* tk = triton ? triton->get(device, &triton_why) : nullptr;
  cuda::Plan plan;
  std::string err = cuda::plan(p, &plan, tk);
  if (!err.empty()) return cuda_fail(err);
  if (tk && !plan.triton) triton_why = plan.triton_skip;
  if (debug) {
    std::string path = plan.triton ? ", Triton decode kernel"
                       : plan.warp ? ", tensor cores (warp decode kernel)"
                       : (plan.mma ? ", tensor cores (WMMA)" : "");
    if (!plan.warp_skip.empty()) path += "; warp decode kernel not used: " + plan.warp_skip;
    if (!triton_note.empty())
      path += "; " + triton_note + (triton_why.empty() ? "" : "; not used for this call: " + triton_why);
    std::fprintf(stderr, "[lrexport_ops] %s; CUDA device %d, query tile %lld, %lld splits%s\n",
                 describe_call(call).c_str(), device, static_cast<long long>(plan.qtile),
                 static_cast<long long>(plan.nsplit), path.c_str());
  }
  const cuda::TritonDecode* run_tk = plan.triton ? tk : nullptr;

  // Scratch memory from ONNX Runtime's allocator for this device, on this stream: handed back
  // right after the launches, which is safe in stream order (ORT's own CUDA kernels do the same).
  void* scratch = nullptr;
  OrtAllocator* alloc = nullptr;
#if defined(LREXPORT_CUDA_EMULATE)
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> host_scratch(plan.scratch_bytes ? std::malloc(plan.scratch_bytes) : nullptr);
  if (plan.scratch_bytes && !host_scratch) return cuda_fail("out of memory (emulated scratch)");
  err = cuda::run(p, plan, host_scratch.get(), stream, run_tk);
  if (!err.empty()) return cuda_fail(err);
  return nullptr;
#endif
  if (plan.scratch_bytes > 0) {
    LRX_RETURN_IF_ERROR(g_ort->KernelContext_GetAllocator(ctx, mem, &alloc));
    if (OrtStatus* st = g_ort->KernelContext_GetScratchBuffer(ctx, mem, plan.scratch_bytes, &scratch)) {
      g_ort->ReleaseAllocator(alloc);
      return st;
    }
    if (scratch == nullptr) {
      g_ort->ReleaseAllocator(alloc);
      return cuda_fail("could not allocate " + std::to_string(plan.scratch_bytes) + " bytes of scratch memory");
    }
  }
  err = cuda::run(p, plan, scratch, stream, run_tk);
  if (scratch) alloc->Free(alloc, scratch);
  if (alloc) g_ort->ReleaseAllocator(alloc);
  if (!err.empty()) return cuda_fail(err);
  return nullptr;
}

KernelBase* make_cuda_kernel() noexcept { return new (std::nothrow) CudaKernel(); }

}  // namespace

LowRankKVAttentionOp* cuda_ops(size_t* count) noexcept {
  constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  constexpr auto F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  constexpr auto U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
#if defined(LREXPORT_CUDA_EMULATE)
  constexpr const char* ep = "CPUExecutionProvider";  // test builds: the kernels run on the CPU
#else
  constexpr const char* ep = "CUDAExecutionProvider";
#endif
  constexpr const char* dl = kOpNameDeviceLen;
  static LowRankKVAttentionOp ops[] = {
      {ep, make_cuda_kernel, F32, F32, F32},     {ep, make_cuda_kernel, F32, U8, U8},
      {ep, make_cuda_kernel, F32, F32, U8},      {ep, make_cuda_kernel, F32, U8, F32},
      {ep, make_cuda_kernel, F16, F16, F16},     {ep, make_cuda_kernel, F16, U8, U8},
      {ep, make_cuda_kernel, F16, F16, U8},      {ep, make_cuda_kernel, F16, U8, F16},
      {ep, make_cuda_kernel, F32, F32, F32, dl}, {ep, make_cuda_kernel, F32, U8, U8, dl},
      {ep, make_cuda_kernel, F32, F32, U8, dl},  {ep, make_cuda_kernel, F32, U8, F32, dl},
      {ep, make_cuda_kernel, F16, F16, F16, dl}, {ep, make_cuda_kernel, F16, U8, U8, dl},
      {ep, make_cuda_kernel, F16, F16, U8, dl},  {ep, make_cuda_kernel, F16, U8, F16, dl},
  };
  *count = sizeof(ops) / sizeof(ops[0]);
  return ops;
}

}  // namespace lrexport
