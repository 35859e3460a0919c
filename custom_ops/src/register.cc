// Entry point of liblrexport_ops.so: RegisterCustomOps, called by
// SessionOptions::RegisterCustomOpsLibrary (Python: SessionOptions.register_custom_ops_library).
//
// The library is built against headers of API version ORT_API_VERSION (21 with Debian's ORT 1.21
// headers) and asks the loading runtime for exactly that version, so it loads in every runtime
// from that version on. It never links libonnxruntime: the API table comes from the
// OrtApiBase* argument (ORT_API_MANUAL_INIT, see ort_api.h).
//
// Execution providers: the CPU kernels (cpu_ops()) are always registered. A library built with
// the CUDA kernel (LREXPORT_WITH_CUDA) adds the CUDA ops (cuda_ops(), OrtCustomOp objects of the
// same name and domain whose GetExecutionProviderType is "CUDAExecutionProvider") beside them,
// never instead: a kernel registered only for the CUDA provider would make a CPU-only session
// fail to find an implementation, whereas with both each session picks the kernel of the provider
// it assigns the node to. Registering the CUDA ops needs no GPU and no driver (the CUDA runtime is
// linked statically and first called when a CUDA kernel runs).
#include <mutex>
#include <string>
#include <vector>

#include "lowrank_kv_attention.h"
#include "ort_api.h"

#if defined(_WIN32)
#define LRX_EXPORT __declspec(dllexport)
#else
#define LRX_EXPORT __attribute__((visibility("default")))
#endif

namespace {

// Domains stay alive as long as the sessions that use them: released at process exit.
struct DomainList {
  std::mutex mu;
  std::vector<OrtCustomOpDomain*> domains;
  ~DomainList() {
    if (!lrexport::g_ort) return;
    for (OrtCustomOpDomain* d : domains) lrexport::g_ort->ReleaseCustomOpDomain(d);
  }
};

DomainList& domain_list() {
  static DomainList list;
  return list;
}

OrtStatus* register_ops(OrtSessionOptions* options) {
  const OrtApi* api = lrexport::g_ort;
  OrtCustomOpDomain* domain = nullptr;
  LRX_RETURN_IF_ERROR(api->CreateCustomOpDomain(lrexport::kDomain, &domain));
  size_t n = 0;
  lrexport::LowRankKVAttentionOp* ops = lrexport::cpu_ops(&n);
#if defined(LREXPORT_CUDA_EMULATE)
  n = 0;  // test builds: only the CUDA kernel (run on the CPU by emulate.h, registered for the CPU provider)
#endif
  for (size_t i = 0; i < n; ++i) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, &ops[i])) {
      api->ReleaseCustomOpDomain(domain);
      return st;
    }
  }
#if defined(LREXPORT_WITH_CUDA)
  // They run on the stream from KernelContext_GetGPUComputeStream (cuda/lowrank_kv_attention_cuda.cc).
  lrexport::LowRankKVAttentionOp* cuda = lrexport::cuda_ops(&n);
  for (size_t i = 0; i < n; ++i) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, &cuda[i])) {
      api->ReleaseCustomOpDomain(domain);
      return st;
    }
  }
#endif
  if (OrtStatus* st = api->AddCustomOpDomain(options, domain)) {
    api->ReleaseCustomOpDomain(domain);
    return st;
  }
  try {
    DomainList& list = domain_list();
    std::lock_guard<std::mutex> lock(list.mu);
    list.domains.push_back(domain);
  } catch (...) {
    // keep the domain alive (the session options hold it): leak it rather than free it
  }
  return nullptr;
}

}  // namespace

extern "C" LRX_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                const OrtApiBase* api_base) noexcept {
  if (api_base == nullptr || options == nullptr) return nullptr;  // nothing to report the error with
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Older runtime: report through the oldest API table, which every runtime has.
    const OrtApi* api1 = api_base->GetApi(1);
    if (api1 == nullptr) return nullptr;
    std::string msg = "lrexport_ops was built against ONNX Runtime API version " + std::to_string(ORT_API_VERSION) +
                      "; this runtime (" + api_base->GetVersionString() + ") does not provide it";
    return api1->CreateStatus(ORT_FAIL, msg.c_str());
  }
  lrexport::g_ort = api;
  Ort::InitApi(api);  // the C++ wrapper, for any code that uses it
  try {
    return register_ops(options);
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "lrexport_ops: RegisterCustomOps failed");
  }
}

// The ORT API version the library was built against (for diagnostics).
extern "C" LRX_EXPORT int lrexport_ops_api_version(void) noexcept { return ORT_API_VERSION; }

// 1 when the library has the CUDA kernel (built with LREXPORT_WITH_CUDA), else 0. Says nothing
// about the machine: the kernel runs only where ONNX Runtime's CUDA execution provider does.
extern "C" LRX_EXPORT int lrexport_ops_has_cuda(void) noexcept {
#if defined(LREXPORT_WITH_CUDA)
  return 1;
#else
  return 0;
#endif
}
