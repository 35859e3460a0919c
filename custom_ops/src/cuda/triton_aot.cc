// Loading and resolving the ahead-of-time Triton decode kernels: see triton_aot.h. The CUDA driver
// (libcuda.so.1) is opened with dlopen on first use, so that the library needs no driver to load;
// the handful of driver types and entry points used here are declared below.
#include "triton_aot.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#if !defined(LREXPORT_CUDA_EMULATE)
#include <dlfcn.h>
#endif

namespace lrexport {
namespace cuda {

const char* const kIntArgs[kNumIntArgs] = {"sq_b",  "sq_s",  "sck_b", "sck_p", "spk_b",     "spk_p",
                                           "scv_b", "scv_p", "spv_b", "spv_p", "so_b",      "so_s",
                                           "split_len", "nsplit", "RK", "RV"};

std::string parse_triton_meta(const std::string& text, TritonMeta* m) {
  std::istringstream in(text);
  std::string kv;
  int abi = -1;
  bool have_name = false;
  while (in >> kv) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) return "'" + kv + "' is not key=value";
    const std::string k = kv.substr(0, eq), v = kv.substr(eq + 1);
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    const bool num = !v.empty() && end && *end == '\0';
    if (k == "name") {
      m->name = v;
      have_name = !v.empty();
    } else if (k == "d16") {
      m->d16 = 0;
      std::istringstream names(v);
      std::string a;
      while (std::getline(names, a, ',')) {
        if (a.empty()) continue;
        int i = 0;
        while (i < kNumIntArgs && a != kIntArgs[i]) ++i;
        if (i == kNumIntArgs) return "d16 names an unknown argument '" + a + "'";
        m->d16 |= uint64_t{1} << i;
      }
    } else if (!num) {
      if (k == "abi" || k == "arch" || k == "warps" || k == "shared" || k == "block_n" || k == "rv_p" || k == "waves" ||
          k == "min_split")
        return "'" + kv + "': not a number";
      // unknown keys are ignored: newer exporters may add some
    } else if (k == "abi") {
      abi = static_cast<int>(n);
    } else if (k == "arch") {
      m->arch = static_cast<int>(n);
    } else if (k == "warps") {
      m->warps = static_cast<int>(n);
    } else if (k == "shared") {
      m->shared = static_cast<int>(n);
    } else if (k == "block_n") {
      m->block_n = n;
    } else if (k == "rv_p") {
      m->rv_p = n;
    } else if (k == "waves") {
      m->waves = static_cast<int>(n);
    } else if (k == "min_split") {
      m->min_split = n;
    } else if (k == "row_splits") {
      m->row_splits = n != 0;
    }
  }
  if (abi != kAbi) return "abi=" + std::to_string(abi) + " (this library launches abi=" + std::to_string(kAbi) + ")";
  if (!have_name) return "no kernel name";
  if (m->arch < 30 || m->warps < 1 || m->warps > 32 || m->shared < 0 || m->block_n < 16 || m->rv_p < 16 ||
      m->waves < 1 || m->min_split < 1)
    return "a value out of range";
  return "";
}

#if defined(LREXPORT_CUDA_EMULATE)

TritonModule::~TritonModule() = default;

const TritonDecode* TritonModule::get(int, std::string* why) const {
  *why = "an emulated CUDA kernel (no GPU)";
  return nullptr;
}

#else

namespace {

// The CUDA driver API, as much as is used here (cuda.h's types and values).
using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
constexpr int kMaxDynamicShared = 8;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
constexpr int kCcMajor = 75, kCcMinor = 76;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR

struct Driver {
  CUresult (*init)(unsigned) = nullptr;
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*device_attribute)(int*, int, CUdevice) = nullptr;
  CUresult (*primary_retain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*primary_release)(CUdevice) = nullptr;
  CUresult (*push)(CUcontext) = nullptr;
  CUresult (*pop)(CUcontext*) = nullptr;
  CUresult (*load)(CUmodule*, const void*) = nullptr;
  CUresult (*unload)(CUmodule) = nullptr;
  CUresult (*get_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*set_attribute)(CUfunction, int, int) = nullptr;
  CUresult (*error_name)(CUresult, const char**) = nullptr;
  void* launch = nullptr;  // cuLaunchKernel
  std::string error;       // why the driver is unusable ("" when it is)
};

template <class F>
bool sym(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

const Driver& driver() {
  static const Driver d = [] {
    Driver r;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      r.error = "cannot open libcuda.so.1";
      return r;
    }
    bool ok = sym(lib, "cuInit", &r.init) && sym(lib, "cuDeviceGet", &r.device_get) &&
              sym(lib, "cuDeviceGetAttribute", &r.device_attribute) &&
              sym(lib, "cuDevicePrimaryCtxRetain", &r.primary_retain) &&
              sym(lib, "cuDevicePrimaryCtxRelease_v2", &r.primary_release) &&
              sym(lib, "cuCtxPushCurrent_v2", &r.push) && sym(lib, "cuCtxPopCurrent_v2", &r.pop) &&
              sym(lib, "cuModuleLoadData", &r.load) && sym(lib, "cuModuleUnload", &r.unload) &&
              sym(lib, "cuModuleGetFunction", &r.get_function) && sym(lib, "cuFuncSetAttribute", &r.set_attribute) &&
              sym(lib, "cuGetErrorName", &r.error_name) && sym(lib, "cuLaunchKernel", &r.launch);
    if (!ok) r.error = "libcuda.so.1 lacks a driver API entry point";
    else if (r.init(0) != 0) r.error = "cuInit failed";
    return r;
  }();
  return d;
}

std::string cu_error(const Driver& d, const char* what, CUresult r) {
  const char* name = nullptr;
  if (d.error_name) d.error_name(r, &name);
  return std::string(what) + " failed: " + (name ? name : "CUresult " + std::to_string(r));
}

}  // namespace

TritonModule::~TritonModule() {
  const Driver& d = driver();
  for (auto& kv : loaded_) {
    Loaded& l = *kv.second;
    if (!l.module) continue;
    // errors ignored: at process exit the context may already be gone
    if (d.push(l.context) == 0) {
      d.unload(l.module);
      CUcontext dummy = nullptr;
      d.pop(&dummy);
    }
    d.primary_release(l.device);
  }
}

const TritonDecode* TritonModule::get(int device, std::string* why) const {
  const char* env = std::getenv("LREXPORT_CUDA_TRITON");
  if (env && std::strcmp(env, "0") == 0) {
    *why = "LREXPORT_CUDA_TRITON=0";
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = loaded_.find(device);
  if (it == loaded_.end()) {
    auto l = std::make_unique<Loaded>();
    l->device = device;
    const Driver& d = driver();
    CUdevice dev = 0;
    CUcontext ctx = nullptr;
    CUresult r = 0;
    int major = 0, minor = 0;
    if (!d.error.empty()) {
      l->error = d.error;
    } else if ((r = d.device_get(&dev, device)) != 0) {
      l->error = cu_error(d, "cuDeviceGet", r);
    } else if (d.device_attribute(&major, kCcMajor, dev) != 0 || d.device_attribute(&minor, kCcMinor, dev) != 0) {
      l->error = "cannot read the device's compute capability";
    } else if (major * 10 + minor != meta_.arch) {
      l->error = "compiled for sm_" + std::to_string(meta_.arch) + ", the device is sm_" +
                 std::to_string(major * 10 + minor);
    } else if ((r = d.primary_retain(&ctx, dev)) != 0) {
      l->error = cu_error(d, "cuDevicePrimaryCtxRetain", r);
    } else {
      l->device = dev;
      d.push(ctx);
      CUmodule mod = nullptr;
      CUfunction fn = nullptr;
      if ((r = d.load(&mod, cubin_.data())) != 0) {
        l->error = cu_error(d, "cuModuleLoadData (the node's cuda_cubin)", r);
      } else if ((r = d.get_function(&fn, mod, meta_.name.c_str())) != 0) {
        l->error = cu_error(d, ("cuModuleGetFunction(" + meta_.name + ")").c_str(), r);
      } else if (meta_.shared > 48 * 1024 && (r = d.set_attribute(fn, kMaxDynamicShared, meta_.shared)) != 0) {
        l->error = cu_error(d, "cuFuncSetAttribute (dynamic shared memory)", r);
      }
      CUcontext dummy = nullptr;
      d.pop(&dummy);
      if (l->error.empty()) {
        l->module = mod;
        l->context = ctx;
        TritonDecode& k = l->kernel;
        k.function = fn;
        k.launch = d.launch;
        k.warps = meta_.warps, k.shared = meta_.shared, k.waves = meta_.waves;
        k.block_n = meta_.block_n, k.rv_p = meta_.rv_p, k.min_split = meta_.min_split, k.d16 = meta_.d16;
        k.row_splits = meta_.row_splits;
      } else {
        if (mod && d.push(ctx) == 0) {
          d.unload(mod);
          d.pop(&dummy);
        }
        d.primary_release(dev);
      }
    }
    it = loaded_.emplace(device, std::move(l)).first;
  }
  if (!it->second->error.empty()) {
    *why = it->second->error;
    return nullptr;
  }
  return &it->second->kernel;
}

#endif

}  // namespace cuda
}  // namespace lrexport
