// The ONNX Runtime API as this library uses it.
//
// The library is built against one set of headers (Debian's ORT 1.21, API version 21, by
// default) and must load in any newer runtime. So:
//   * ORT_API_MANUAL_INIT: the C++ wrapper does not initialise itself from OrtGetApiBase()
//     (a libonnxruntime symbol: the library never links libonnxruntime);
//   * RegisterCustomOps asks the OrtApiBase it is given for the headers' ORT_API_VERSION and
//     stores the table here (and in the C++ wrapper, Ort::InitApi).
// Nothing here throws: every ORT call's status is checked and turned into an OrtStatus*.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace lrexport {

// The API table of the runtime that loaded us (set once by RegisterCustomOps).
extern const OrtApi* g_ort;

inline OrtStatus* make_error(OrtErrorCode code, const std::string& msg) noexcept {
  try {
    return g_ort->CreateStatus(code, msg.c_str());
  } catch (...) {
    return g_ort->CreateStatus(code, "lrexport: error (message lost)");
  }
}

// Concatenate anything streamable into a message.
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

inline std::string dims_str(const std::vector<int64_t>& d) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < d.size(); ++i) os << (i ? ", " : "") << d[i];
  os << "]";
  return os.str();
}

// Return a non-null OrtStatus* (an ORT call's or ours) from the enclosing function.
#define LRX_RETURN_IF_ERROR(expr)           \
  do {                                      \
    OrtStatus* lrx_st_ = (expr);            \
    if (lrx_st_ != nullptr) return lrx_st_; \
  } while (0)

const char* dtype_name(ONNXTensorElementDataType t) noexcept;

}  // namespace lrexport
