// lrexport_generate: greedy generation from an exported lrexport folder, in C++.
//
//   lrexport_generate <export_folder> --prompt-ids 1,2,3 [--max-new-tokens N] [--no-library]
//                     [--lib PATH] [--threads N] [--cuda[=DEVICE]] [--verbose]
//   lrexport_generate <export_folder> --print-ranks N
//
// The folder is what `lrexport export` writes: model.onnx (+ model.onnx.data) and lrexport.json,
// whose "onnx" section gives the graph's inputs, the cache tensors, the stored ranks of the
// low-rank projections, the maximum length and the stop tokens, and whose "schedule" is the
// progressive-rank schedule (or null). This program does what lrexport/runtime/loop.py does for
// one prompt with greedy sampling:
//
//   1. prefill: input_ids [1, L], past_len [0], the caches [1, P, width] (P = L + max_new_tokens),
//      ranks = schedule.ranks(0); the logits of the last prompt token choose the first token;
//   2. decode step t = 1, 2, ...: the token of step t goes in at position past_len = L + t - 1 with
//      ranks = schedule.ranks(t), until a stop token (eos_token_ids) or max_new_tokens tokens.
//
// With lrexport's custom-op library (liblrexport_ops.so, LowRankKVAttention) registered, each
// present_* output is IO-bound to the buffer of its past_* input, so the kernel writes the new
// tokens into the cache in place. With --no-library the model's fallback bodies (standard ONNX
// ops) run, and the present_* outputs are copied back into the caches after each step.
//
// With --cuda, ONNX Runtime's CUDA execution provider runs the model (an onnxruntime-gpu library,
// a float16 export: `lrexport export --dtype float16`) and the caches live in GPU memory: device
// tensors from ONNX Runtime's CUDA allocator, bound in place as above, so they never cross to the
// host. The token ids, lengths and ranks go up from host tensors (ONNX Runtime copies them), and
// the logits come back to host memory.
//
// The generated token ids are printed on one line of stdout, separated by spaces. Errors print
// "lrexport_generate: error: ..." on stderr and exit with status 1 (2 for a bad command line).

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;

#ifndef LREXPORT_OPS_LIB_DEFAULT
#define LREXPORT_OPS_LIB_DEFAULT "build/custom_ops/liblrexport_ops.so"
#endif

namespace {

constexpr const char* kProg = "lrexport_generate";

// Every error the program reports; main() prints its message.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct UsageError : Error {
  using Error::Error;
};

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

// ---- command line -----------------------------------------------------------------------------

struct Options {
  fs::path folder;
  std::vector<int64_t> prompt;
  int64_t max_new_tokens = 32;
  bool use_library = true;
  std::string lib;  // empty: $LREXPORT_OPS_LIB, else LREXPORT_OPS_LIB_DEFAULT
  int threads = 0;  // 0: ONNX Runtime's default
  bool verbose = false;
  int64_t print_ranks = -1;  // >= 0: print the schedule's ranks of steps 0..N and exit
  int cuda_device = -1;      // >= 0: ONNX Runtime's CUDA execution provider on this device
};

const char* kUsage =
    "usage: lrexport_generate <export_folder> --prompt-ids 1,2,3 [--max-new-tokens N] [--no-library]\n"
    "                         [--lib PATH] [--threads N] [--cuda[=DEVICE]] [--verbose]\n"
    "       lrexport_generate <export_folder> --print-ranks N\n"
    "\n"
    "Greedy generation from a folder written by `lrexport export`; prints the generated token ids.\n"
    "  --prompt-ids IDS      comma-separated prompt token ids (required)\n"
    "  --max-new-tokens N    at most N new tokens (default 32); stops earlier at an eos token\n"
    "  --no-library          do not register liblrexport_ops.so (the model's fallback bodies run)\n"
    "  --lib PATH            the custom-op library (default: $LREXPORT_OPS_LIB, else\n"
    "                        " LREXPORT_OPS_LIB_DEFAULT ")\n"
    "  --threads N           ONNX Runtime intra-op threads (default: its own choice)\n"
    "  --cuda[=DEVICE]       run on ONNX Runtime's CUDA execution provider (GPU DEVICE, default 0), the caches\n"
    "                        in GPU memory (needs onnxruntime-gpu and the custom-op library)\n"
    "  --verbose             per-step ranks and timings on stderr\n"
    "  --print-ranks N       print the ranks of the schedule at steps 0 (prefill) to N, one line\n"
    "                        per step, and exit (reads lrexport.json only)\n";

int64_t parse_int(const std::string& s, const std::string& what) {
  if (s.empty()) throw UsageError(cat(what, ": expected an integer, got an empty string"));
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &used, 10);
  } catch (const std::exception&) {
    throw UsageError(cat(what, ": expected an integer, got '", s, "'"));
  }
  if (used != s.size()) throw UsageError(cat(what, ": expected an integer, got '", s, "'"));
  return v;
}

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    int64_t v = parse_int(item, "--prompt-ids");
    if (v < 0) throw UsageError(cat("--prompt-ids: token ids must be >= 0, got ", v));
    ids.push_back(v);
  }
  if (ids.empty()) throw UsageError("--prompt-ids: give at least one token id, e.g. --prompt-ids 1,2,3");
  return ids;
}

Options parse_args(int argc, char** argv) {
  Options o;
  bool have_prompt = false;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], value;
    bool inline_value = false;
    if (a.rfind("--", 0) == 0 && a.find('=') != std::string::npos) {
      value = a.substr(a.find('=') + 1);
      a = a.substr(0, a.find('='));
      inline_value = true;
    }
    auto next = [&]() -> std::string {
      if (inline_value) return value;
      if (i + 1 >= argc) throw UsageError(cat(a, " needs a value"));
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (a == "--prompt-ids") {
      o.prompt = parse_ids(next());
      have_prompt = true;
    } else if (a == "--max-new-tokens") {
      o.max_new_tokens = parse_int(next(), a);
      if (o.max_new_tokens < 1) throw UsageError(cat("--max-new-tokens must be >= 1, got ", o.max_new_tokens));
    } else if (a == "--no-library") {
      o.use_library = false;
    } else if (a == "--lib") {
      o.lib = next();
    } else if (a == "--threads") {
      int64_t t = parse_int(next(), a);
      if (t < 0 || t > 1024) throw UsageError(cat("--threads must be in [0, 1024], got ", t));
      o.threads = static_cast<int>(t);
    } else if (a == "--print-ranks") {
      o.print_ranks = parse_int(next(), a);
      if (o.print_ranks < 0) throw UsageError(cat("--print-ranks must be >= 0, got ", o.print_ranks));
    } else if (a == "--cuda") {
      int64_t d = inline_value ? parse_int(value, a) : 0;
      if (d < 0 || d > 1024) throw UsageError(cat("--cuda: the device must be in [0, 1024], got ", d));
      o.cuda_device = static_cast<int>(d);
    } else if (a == "--verbose" || a == "-v") {
      o.verbose = true;
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError(cat("unknown option ", a));
    } else {
      positional.push_back(a);
    }
  }
  if (positional.size() != 1) throw UsageError("give exactly one export folder");
  if (!have_prompt && o.print_ranks < 0) throw UsageError("--prompt-ids is required");
  if (!o.use_library && !o.lib.empty()) throw UsageError("--lib and --no-library exclude each other");
  if (!o.use_library && o.cuda_device >= 0)
    throw UsageError("--cuda keeps the caches in GPU memory, in place: it needs the custom-op library (drop --no-library)");
  o.folder = positional[0];
  return o;
}

// ---- lrexport.json ----------------------------------------------------------------------------

// Typed access to lrexport.json with messages that say where the problem is.
const json& field(const json& obj, const char* key, const std::string& where) {
  if (!obj.is_object()) throw Error(cat("lrexport.json: ", where, " must be an object"));
  auto it = obj.find(key);
  if (it == obj.end()) throw Error(cat("lrexport.json: ", where, " has no '", key, "'"));
  return *it;
}

int64_t as_int(const json& v, const std::string& where) {
  if (!v.is_number_integer()) throw Error(cat("lrexport.json: ", where, " must be an integer, got ", v.dump()));
  return v.get<int64_t>();
}

double as_number(const json& v, const std::string& where) {
  if (!v.is_number()) throw Error(cat("lrexport.json: ", where, " must be a number, got ", v.dump()));
  return v.get<double>();
}

std::string as_string(const json& v, const std::string& where) {
  if (!v.is_string()) throw Error(cat("lrexport.json: ", where, " must be a string, got ", v.dump()));
  return v.get<std::string>();
}

const json& as_array(const json& v, const std::string& where) {
  if (!v.is_array()) throw Error(cat("lrexport.json: ", where, " must be a list, got ", v.dump()));
  return v;
}

std::vector<int64_t> int_list(const json& v, const std::string& where) {
  std::vector<int64_t> out;
  for (size_t i = 0; i < as_array(v, where).size(); ++i) out.push_back(as_int(v[i], cat(where, "[", i, "]")));
  return out;
}

// The progressive schedule of lrexport/schedule.py: fraction(step) and ranks(step, max_ranks).
class Schedule {
 public:
  enum class Form { Constant, Steps, Linear, Cosine };

  static Schedule from_json(const json& j) {
    const std::string w = "schedule";
    if (!j.is_object()) throw Error("lrexport.json: 'schedule' must be null or an object");
    std::string type = as_string(field(j, "type", w), w + ".type");
    if (type != "Schedule") throw Error(cat("lrexport.json: schedule.type must be 'Schedule', got '", type, "'"));
    Schedule s;
    if (j.contains("min_rank")) s.min_rank_ = as_int(j["min_rank"], "schedule.min_rank");
    if (j.contains("align")) s.align_ = as_int(j["align"], "schedule.align");
    if (j.contains("prefill")) s.prefill_ = as_number(j["prefill"], "schedule.prefill");
    check_frac(s.prefill_, "schedule.prefill");
    if (s.min_rank_ < 1) throw Error(cat("lrexport.json: schedule.min_rank must be >= 1, got ", s.min_rank_));
    if (s.align_ < 1) throw Error(cat("lrexport.json: schedule.align must be >= 1, got ", s.align_));
    if (!j.contains("form")) {  // Schedule's default form: Constant(1.0)
      s.form_ = Form::Constant;
      return s;
    }
    const json& f = j["form"];
    const std::string fw = "schedule.form";
    std::string ft = as_string(field(f, "type", fw), fw + ".type");
    if (ft == "Constant") {
      s.form_ = Form::Constant;
      if (f.contains("frac")) s.frac_ = as_number(f["frac"], fw + ".frac");
      check_frac(s.frac_, fw + ".frac");
    } else if (ft == "Steps") {
      s.form_ = Form::Steps;
      s.points_ = {{1.0, 1.0}};
      if (f.contains("points")) {
        s.points_.clear();
        const json& pts = as_array(f["points"], fw + ".points");
        for (size_t i = 0; i < pts.size(); ++i) {
          std::string pw = cat(fw, ".points[", i, "]");
          if (!pts[i].is_array() || pts[i].size() != 2) throw Error(cat("lrexport.json: ", pw, " must be [step, frac]"));
          double step = as_number(pts[i][0], pw + "[0]"), frac = as_number(pts[i][1], pw + "[1]");
          check_frac(frac, pw + "[1]");
          if (!s.points_.empty() && std::trunc(step) < std::trunc(s.points_.back().first))
            throw Error(cat("lrexport.json: ", fw, ".points must be sorted by step"));
          s.points_.emplace_back(step, frac);
        }
        if (s.points_.empty()) throw Error(cat("lrexport.json: ", fw, ".points needs at least one [step, frac]"));
        if (std::trunc(s.points_.front().first) > 1)
          throw Error(cat("lrexport.json: ", fw, ".points must start at a step <= 1"));
      }
    } else if (ft == "Linear" || ft == "Cosine") {
      s.form_ = ft == "Linear" ? Form::Linear : Form::Cosine;
      if (f.contains("start")) s.start_ = as_number(f["start"], fw + ".start");
      if (f.contains("end")) s.end_ = as_number(f["end"], fw + ".end");
      if (f.contains("steps")) s.steps_ = as_int(f["steps"], fw + ".steps");
      check_frac(s.start_, fw + ".start");
      check_frac(s.end_, fw + ".end");
      if (s.steps_ < 1) throw Error(cat("lrexport.json: ", fw, ".steps must be >= 1, got ", s.steps_));
    } else {
      throw Error(cat("lrexport.json: unknown schedule form '", ft, "' (known: Constant, Steps, Linear, Cosine)"));
    }
    return s;
  }

  // Rank fraction at decode step `step` (>= 1); step 0 is the prefill.
  double fraction(int64_t step) const {
    if (step <= 0) return prefill_;
    switch (form_) {
      case Form::Constant:
        return frac_;
      case Form::Steps: {
        double frac = points_.front().second;
        for (const auto& [s, f] : points_)
          if (static_cast<double>(step) >= s) frac = f;
        return frac;
      }
      case Form::Linear: {
        double x = progress(step);
        return start_ + (end_ - start_) * x;
      }
      case Form::Cosine: {
        double x = progress(step);
        return end_ + (start_ - end_) * 0.5 * (1 + std::cos(kPi * x));
      }
    }
    return 1.0;
  }

  // r = max(min(min_rank, R), round_half_even(f * R / align) * align), at most R; R itself when f >= 1.
  std::vector<int64_t> ranks(int64_t step, const std::vector<int64_t>& max_ranks) const {
    double f = fraction(step);
    if (f >= 1.0) return max_ranks;
    std::vector<int64_t> out;
    out.reserve(max_ranks.size());
    for (int64_t R : max_ranks) {
      // std::nearbyint rounds half to even in the default rounding mode, as Python's round()
      int64_t r = static_cast<int64_t>(std::nearbyint(f * static_cast<double>(R) / static_cast<double>(align_))) * align_;
      out.push_back(std::min(R, std::max(std::min(min_rank_, R), r)));
    }
    return out;
  }

  std::string describe() const {
    std::ostringstream os;
    switch (form_) {
      case Form::Constant: os << "constant " << frac_; break;
      case Form::Steps:
        os << "steps";
        for (const auto& [s, f] : points_) os << " t>=" << s << ":" << f;
        break;
      case Form::Linear: os << "linear " << start_ << "->" << end_ << " over " << steps_ << " steps"; break;
      case Form::Cosine: os << "cosine " << start_ << "->" << end_ << " over " << steps_ << " steps"; break;
    }
    os << ", min_rank " << min_rank_ << ", align " << align_ << ", prefill " << prefill_;
    return os.str();
  }

 private:
  static constexpr double kPi = 3.141592653589793;  // math.pi

  static void check_frac(double v, const std::string& where) {
    if (!(v > 0 && v <= 1)) throw Error(cat("lrexport.json: ", where, " must be in (0, 1], got ", v));
  }

  // 0 at step 1, 1 at step `steps` and after (1 right away when steps == 1).
  double progress(int64_t t) const {
    if (steps_ <= 1) return 1.0;
    double x = static_cast<double>(std::max<int64_t>(t - 1, 0)) / static_cast<double>(steps_ - 1);
    return std::min(x, 1.0);
  }

  Form form_ = Form::Constant;
  double frac_ = 1.0;
  std::vector<std::pair<double, double>> points_;
  double start_ = 1.0, end_ = 0.5;
  int64_t steps_ = 64;
  int64_t min_rank_ = 8, align_ = 1;
  double prefill_ = 1.0;
};

struct CacheSpec {
  std::string name;     // past_*
  std::string present;  // present_*
  int64_t width = 0;
  std::string dtype;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t elem_size = 0;
};

struct ExportInfo {
  std::string model_file;
  std::vector<std::string> inputs, outputs;
  std::vector<CacheSpec> caches;
  std::vector<int64_t> rank_max;
  int64_t max_len = 0;
  std::vector<int64_t> eos;
  std::optional<Schedule> schedule;
};

ExportInfo read_export(const fs::path& folder) {
  std::error_code ec;
  if (!fs::exists(folder, ec)) throw Error(cat("export folder ", folder, " does not exist"));
  if (!fs::is_directory(folder, ec)) throw Error(cat(folder, " is not a folder (give the folder `lrexport export` wrote)"));
  fs::path meta_path = folder / "lrexport.json";
  if (!fs::is_regular_file(meta_path, ec))
    throw Error(cat(folder, ": no lrexport.json (not an exported lrexport folder, or an incomplete one)"));
  std::ifstream in(meta_path, std::ios::binary);
  if (!in) throw Error(cat("cannot read ", meta_path, ": ", std::strerror(errno)));
  json meta;
  try {
    meta = json::parse(in);
  } catch (const json::parse_error& e) {
    throw Error(cat(meta_path, " is not valid JSON: ", e.what()));
  }
  if (!meta.is_object()) throw Error(cat(meta_path, ": expected a JSON object"));
  auto onnx_it = meta.find("onnx");
  if (onnx_it == meta.end() || onnx_it->is_null())
    throw Error(cat(meta_path, " has no 'onnx' section; export the model with `lrexport export`"));
  const json& o = *onnx_it;
  ExportInfo info;
  info.model_file = o.contains("file") ? as_string(o["file"], "onnx.file") : "model.onnx";
  for (const auto& [key, dst] : {std::pair<const char*, std::vector<std::string>*>{"inputs", &info.inputs},
                                 {"outputs", &info.outputs}}) {
    const json& a = as_array(field(o, key, "onnx"), cat("onnx.", key));
    for (size_t i = 0; i < a.size(); ++i) dst->push_back(as_string(a[i], cat("onnx.", key, "[", i, "]")));
  }
  const json& cache = as_array(field(o, "cache", "onnx"), "onnx.cache");
  for (size_t i = 0; i < cache.size(); ++i) {
    std::string w = cat("onnx.cache[", i, "]");
    CacheSpec c;
    c.name = as_string(field(cache[i], "name", w), w + ".name");
    c.width = as_int(field(cache[i], "width", w), w + ".width");
    c.dtype = as_string(field(cache[i], "dtype", w), w + ".dtype");
    if (c.width < 1) throw Error(cat("lrexport.json: ", w, ".width must be >= 1, got ", c.width));
    c.present = "present_" + (c.name.rfind("past_", 0) == 0 ? c.name.substr(5) : c.name);
    if (c.dtype == "float32") {
      c.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, c.elem_size = 4;
    } else if (c.dtype == "float16") {
      c.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, c.elem_size = 2;
    } else if (c.dtype == "bfloat16") {
      c.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, c.elem_size = 2;
    } else if (c.dtype == "uint8") {
      c.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, c.elem_size = 1;
    } else {
      throw Error(cat("lrexport.json: ", w, ".dtype '", c.dtype, "' is not supported (float32, float16, bfloat16, uint8)"));
    }
    info.caches.push_back(std::move(c));
  }
  info.rank_max = o.contains("rank_max") ? int_list(o["rank_max"], "onnx.rank_max") : std::vector<int64_t>{};
  for (int64_t r : info.rank_max)
    if (r < 1) throw Error(cat("lrexport.json: onnx.rank_max holds ", r, "; stored ranks are >= 1"));
  info.max_len = as_int(field(o, "max_len", "onnx"), "onnx.max_len");
  info.eos = o.contains("eos_token_ids") ? int_list(o["eos_token_ids"], "onnx.eos_token_ids") : std::vector<int64_t>{};
  auto sched = meta.find("schedule");
  if (sched != meta.end() && !sched->is_null()) info.schedule = Schedule::from_json(*sched);
  return info;
}

// ---- ONNX Runtime -----------------------------------------------------------------------------

std::string join(const std::vector<int64_t>& v, const char* sep) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? sep : "") << v[i];
  return os.str();
}

std::vector<std::string> session_names(Ort::Session& s, bool inputs) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> names;
  size_t n = inputs ? s.GetInputCount() : s.GetOutputCount();
  for (size_t i = 0; i < n; ++i)
    names.emplace_back((inputs ? s.GetInputNameAllocated(i, alloc) : s.GetOutputNameAllocated(i, alloc)).get());
  return names;
}

// The index of the largest value; the first one on ties (and the first NaN), as torch.argmax.
int64_t argmax(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(v[i])) return i;
    if (v[i] > v[best]) best = i;
  }
  return best;
}

class Generator {
 public:
  Generator(const Options& opt, ExportInfo info) : opt_(opt), info_(std::move(info)), env_(ORT_LOGGING_LEVEL_WARNING, kProg) {
    Ort::SessionOptions so;
    if (opt_.threads > 0) so.SetIntraOpNumThreads(opt_.threads);
    if (opt_.use_library) {
      std::string lib = opt_.lib;
      if (lib.empty()) {
        const char* env = std::getenv("LREXPORT_OPS_LIB");
        lib = env && *env ? env : LREXPORT_OPS_LIB_DEFAULT;
      }
      std::error_code ec;
      if (!fs::is_regular_file(lib, ec))
        throw Error(cat("the custom-op library ", lib, " does not exist: build it with `python -m lrexport.ortops` "
                        "(or `make custom-ops`), pass --lib PATH, or run with --no-library"));
      lib = fs::absolute(lib, ec).string();  // dlopen searches the library path for a bare file name
      try {
        so.RegisterCustomOpsLibrary(fs::path(lib).c_str());
      } catch (const Ort::Exception& e) {
        throw Error(cat("ONNX Runtime could not load the custom-op library ", lib, ": ", e.what()));
      }
      if (opt_.verbose) std::cerr << kProg << ": custom-op library " << lib << "\n";
    }
    if (opt_.cuda_device >= 0) add_cuda(so);
    fs::path model = opt_.folder / info_.model_file;
    std::error_code ec;
    if (!fs::is_regular_file(model, ec)) throw Error(cat(opt_.folder, ": no ", info_.model_file));
    try {
      session_ = std::make_unique<Ort::Session>(env_, model.c_str(), so);
    } catch (const Ort::Exception& e) {
      throw Error(cat("ONNX Runtime could not load ", model, ": ", e.what()));
    }
    check_io();
  }

  // Greedy generation of at most max_new_tokens after `prompt`.
  std::vector<int64_t> run(const std::vector<int64_t>& prompt) {
    const int64_t L = static_cast<int64_t>(prompt.size()), N = opt_.max_new_tokens;
    const int64_t capacity = L + N;
    if (capacity > info_.max_len)
      throw Error(cat("a prompt of ", L, " tokens plus --max-new-tokens ", N, " needs ", capacity,
                      " positions, more than the model's maximum length max_len=", info_.max_len));
    if (vocab_ > 0)
      for (int64_t t : prompt)
        if (t >= vocab_) throw Error(cat("prompt token id ", t, " is out of the vocabulary (", vocab_, " tokens)"));
    caches_.clear();
    device_caches_.clear();
    if (opt_.cuda_device >= 0) {
      // GPU memory from ONNX Runtime's CUDA allocator; positions at and after past_len are never read, so
      // the caches need no clearing
      if (!cuda_alloc_) {
        Ort::MemoryInfo cuda("Cuda", OrtDeviceAllocator, opt_.cuda_device, OrtMemTypeDefault);
        cuda_alloc_ = std::make_unique<Ort::Allocator>(*session_, cuda);
      }
      for (const auto& c : info_.caches) {
        std::vector<int64_t> shape = {1, capacity, c.width};
        device_caches_.push_back(Ort::Value::CreateTensor(*cuda_alloc_, shape.data(), shape.size(), c.type));
      }
    } else {
      for (const auto& c : info_.caches) caches_.emplace_back(static_cast<size_t>(capacity * c.width) * c.elem_size, 0);
    }
    capacity_ = capacity;
    const std::set<int64_t> stops(info_.eos.begin(), info_.eos.end());
    const bool use_ranks = has_ranks_ && info_.schedule.has_value();

    std::vector<int64_t> out;
    auto ranks_at = [&](int64_t step) { return use_ranks ? info_.schedule->ranks(step, info_.rank_max) : info_.rank_max; };
    auto t0 = std::chrono::steady_clock::now();
    std::vector<float> last = step(prompt, 0, ranks_at(0));
    log_step(0, ranks_at(0), t0);
    int64_t pos = L;
    for (int64_t s = 1; s <= N; ++s) {
      int64_t tok = argmax(last.data(), static_cast<int64_t>(last.size()));
      out.push_back(tok);
      if (stops.count(tok) || s == N) break;
      std::vector<int64_t> ranks = ranks_at(s);
      t0 = std::chrono::steady_clock::now();
      last = step({tok}, pos, ranks);
      log_step(s, ranks, t0);
      ++pos;
    }
    return out;
  }

 private:
  void log_step(int64_t s, const std::vector<int64_t>& ranks, std::chrono::steady_clock::time_point t0) const {
    if (!opt_.verbose) return;
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::cerr << kProg << ": " << (s == 0 ? "prefill" : cat("step ", s)) << " " << ms << " ms";
    if (has_ranks_) std::cerr << ", ranks " << join(ranks, ",");
    std::cerr << "\n";
  }

  // ONNX Runtime's CUDA execution provider first (the CPU provider stays for what CUDA does not run).
  void add_cuda(Ort::SessionOptions& so) {
    const OrtApi& api = Ort::GetApi();
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    std::string device = std::to_string(opt_.cuda_device);
    const char* keys[] = {"device_id"};
    const char* values[] = {device.c_str()};
    OrtStatus* st = api.CreateCUDAProviderOptions(&cuda);
    if (!st) st = api.UpdateCUDAProviderOptions(cuda, keys, values, 1);
    if (!st) st = api.SessionOptionsAppendExecutionProvider_CUDA_V2(so, cuda);
    if (cuda) api.ReleaseCUDAProviderOptions(cuda);
    if (st) {
      std::string msg = api.GetErrorMessage(st);
      api.ReleaseStatus(st);
      throw Error(cat("--cuda: ONNX Runtime's CUDA execution provider is not available (", msg,
                      "); link the library of onnxruntime-gpu and run on a machine with an NVIDIA GPU"));
    }
    if (opt_.verbose) std::cerr << kProg << ": CUDA execution provider, device " << opt_.cuda_device << "\n";
  }

  // The session must take exactly what lrexport.json says: input_ids, past_len, the caches and
  // (with stored ranks) ranks; and give logits and a present_* for each cache.
  void check_io() {
    std::vector<std::string> ins = session_names(*session_, true), outs = session_names(*session_, false);
    std::set<std::string> want_in = {"input_ids", "past_len"}, want_out = {"logits"};
    for (const auto& c : info_.caches) want_in.insert(c.name), want_out.insert(c.present);
    has_ranks_ = std::find(ins.begin(), ins.end(), "ranks") != ins.end();
    if (has_ranks_ != !info_.rank_max.empty())
      throw Error(cat("model.onnx ", has_ranks_ ? "takes" : "does not take", " a 'ranks' input but lrexport.json lists ",
                      info_.rank_max.size(), " stored ranks"));
    if (has_ranks_) want_in.insert("ranks");
    for (const auto& n : ins)
      if (!want_in.count(n)) throw Error(cat("model.onnx has an input '", n, "' that lrexport.json does not describe"));
    for (const auto& n : want_in)
      if (std::find(ins.begin(), ins.end(), n) == ins.end()) throw Error(cat("model.onnx has no input '", n, "'"));
    for (const auto& n : want_out)
      if (std::find(outs.begin(), outs.end(), n) == outs.end()) throw Error(cat("model.onnx has no output '", n, "'"));
    size_t logits_index = std::find(outs.begin(), outs.end(), "logits") - outs.begin();
    Ort::TypeInfo type_info = session_->GetOutputTypeInfo(logits_index);  // owns what `info` views
    auto info = type_info.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw Error("model.onnx: 'logits' must be float32 (this sample reads float32 logits only)");
    std::vector<int64_t> shape = info.GetShape();
    if (shape.size() != 3) throw Error(cat("model.onnx: 'logits' must be [B, S, vocab], has rank ", shape.size()));
    vocab_ = shape[2];  // <= 0 when symbolic
  }

  Ort::Value tensor(void* data, size_t bytes, const std::vector<int64_t>& shape, ONNXTensorElementDataType type) {
    return Ort::Value::CreateTensor(mem_, data, bytes, shape.data(), shape.size(), type);
  }

  // One call of the model: `ids` at positions past_len, past_len + 1, ...; returns the logits of
  // the last of them and leaves the caches updated.
  std::vector<float> step(std::vector<int64_t> ids, int64_t past_len, std::vector<int64_t> ranks) {
    const int64_t S = static_cast<int64_t>(ids.size());
    std::vector<int64_t> pl = {past_len};
    std::vector<std::string> names = {"input_ids", "past_len"};
    std::vector<Ort::Value> values;
    values.push_back(tensor(ids.data(), ids.size() * sizeof(int64_t), {1, S}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    values.push_back(tensor(pl.data(), sizeof(int64_t), {1}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    if (has_ranks_) {
      names.push_back("ranks");
      values.push_back(tensor(ranks.data(), ranks.size() * sizeof(int64_t), {static_cast<int64_t>(ranks.size())},
                              ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    }
    std::vector<Ort::Value> cache_values;
    for (size_t i = 0; i < info_.caches.size() && device_caches_.empty(); ++i) {
      const CacheSpec& c = info_.caches[i];
      cache_values.push_back(tensor(caches_[i].data(), caches_[i].size(), {1, capacity_, c.width}, c.type));
    }
    Ort::Value logits{nullptr};
    try {
      if (opt_.use_library) {
        // In place: each present_* is bound to the OrtValue of its past_*.
        Ort::IoBinding binding(*session_);
        binding.BindOutput("logits", mem_);  // first: GetOutputValues() returns the bound order
        for (size_t i = 0; i < names.size(); ++i) binding.BindInput(names[i].c_str(), values[i]);
        for (size_t i = 0; i < info_.caches.size(); ++i) {
          Ort::Value& cache = device_caches_.empty() ? cache_values[i] : device_caches_[i];
          binding.BindInput(info_.caches[i].name.c_str(), cache);
          binding.BindOutput(info_.caches[i].present.c_str(), cache);
        }
        session_->Run(Ort::RunOptions{nullptr}, binding);
        std::vector<Ort::Value> outs = binding.GetOutputValues();
        logits = std::move(outs.at(0));
      } else {
        // Plain Run: ONNX Runtime allocates the present_* outputs; copy them into the caches.
        std::vector<const char*> in_names, out_names = {"logits"};
        for (const auto& n : names) in_names.push_back(n.c_str());
        for (size_t i = 0; i < info_.caches.size(); ++i) {
          in_names.push_back(info_.caches[i].name.c_str());
          values.push_back(std::move(cache_values[i]));
          out_names.push_back(info_.caches[i].present.c_str());
        }
        std::vector<Ort::Value> outs = session_->Run(Ort::RunOptions{nullptr}, in_names.data(), values.data(),
                                                     values.size(), out_names.data(), out_names.size());
        for (size_t i = 0; i < info_.caches.size(); ++i) {
          auto ti = outs[i + 1].GetTensorTypeAndShapeInfo();
          size_t bytes = ti.GetElementCount() * info_.caches[i].elem_size;
          if (ti.GetElementType() != info_.caches[i].type || bytes != caches_[i].size())
            throw Error(cat("model.onnx: output ", info_.caches[i].present, " has shape [", join(ti.GetShape(), ", "),
                            "]; expected [1, ", capacity_, ", ", info_.caches[i].width, "] of ", info_.caches[i].dtype));
          std::memcpy(caches_[i].data(), outs[i + 1].GetTensorRawData(), bytes);
        }
        logits = std::move(outs[0]);
      }
    } catch (const Ort::Exception& e) {
      throw Error(cat("ONNX Runtime failed at ", past_len == 0 ? std::string("the prefill") : cat("position ", past_len),
                      ": ", e.what()));
    }
    auto ti = logits.GetTensorTypeAndShapeInfo();
    std::vector<int64_t> shape = ti.GetShape();
    if (shape.size() != 3 || shape[0] != 1 || shape[1] != S || shape[2] < 1)
      throw Error(cat("model.onnx: logits of shape [", join(shape, ", "), "]; expected [1, ", S, ", vocab]"));
    const float* data = logits.GetTensorData<float>();
    return std::vector<float>(data + (S - 1) * shape[2], data + S * shape[2]);
  }

  const Options& opt_;
  ExportInfo info_;
  Ort::Env env_;
  Ort::MemoryInfo mem_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::unique_ptr<Ort::Session> session_;
  std::vector<std::vector<uint8_t>> caches_;  // host caches (the CPU provider)
  std::unique_ptr<Ort::Allocator> cuda_alloc_;  // --cuda: the session's CUDA allocator (outlives the caches)
  std::vector<Ort::Value> device_caches_;       // GPU caches (--cuda), from cuda_alloc_
  int64_t capacity_ = 0;
  bool has_ranks_ = false;
  int64_t vocab_ = 0;
};

void init_ort_api() {
  const OrtApiBase* base = OrtGetApiBase();
  const OrtApi* api = base ? base->GetApi(ORT_API_VERSION) : nullptr;
  if (!api)
    throw Error(cat("the ONNX Runtime library (version ", base ? base->GetVersionString() : "?",
                    ") does not provide API version ", ORT_API_VERSION,
                    " of the headers this program was built with; link a newer libonnxruntime"));
  Ort::InitApi(api);
}

int run_main(int argc, char** argv) {
  Options opt = parse_args(argc, argv);
  ExportInfo info = read_export(opt.folder);
  if (opt.print_ranks >= 0) {  // what the loop feeds as `ranks` at each step (the stored ranks without a schedule)
    for (int64_t step = 0; step <= opt.print_ranks; ++step)
      std::cout << join(info.schedule ? info.schedule->ranks(step, info.rank_max) : info.rank_max, " ") << "\n";
    std::cout.flush();
    return 0;
  }
  init_ort_api();
  if (opt.verbose && info.schedule) std::cerr << kProg << ": schedule " << info.schedule->describe() << "\n";
  Generator gen(opt, std::move(info));
  std::vector<int64_t> tokens = gen.run(opt.prompt);
  std::cout << join(tokens, " ") << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run_main(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << kProg << ": error: " << e.what() << "\n\n" << kUsage;
    return 2;
  } catch (const Error& e) {
    std::cerr << kProg << ": error: " << e.what() << "\n";
  } catch (const Ort::Exception& e) {
    std::cerr << kProg << ": error: ONNX Runtime: " << e.what() << "\n";
  } catch (const json::exception& e) {
    std::cerr << kProg << ": error: lrexport.json: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << kProg << ": error: " << e.what() << "\n";
  } catch (...) {
    std::cerr << kProg << ": error: unknown exception\n";
  }
  return 1;
}
