// CPU kernel of LowRankKVAttention. Semantics: lrexport.trace.latent_attention_op.
// latent_attention_reference; layouts: docs/custom_op.md and quant.h.
//
// Steps of one call:
//   1. check every input against the attributes and each other (an error status names the input
//      and the expected shape; nothing is written before all checks pass);
//   2. present = past (a copy only when ORT gave present and past different buffers), then the
//      new tokens' latents are written (quantized per token and group when bits > 0);
//   3. phase A, parallel over (batch row, head group, block of 64 positions): the keys of every
//      position a query of this call may see are rebuilt from the stored latents with a blocked
//      GEMM (latent block [64, rk] @ k_up[g] [rk, s*D]), biased and RoPE'd; quantized V latents
//      of the same positions are dequantized;
//   4. phase B, parallel over (batch row, query head, block of 16 queries): scores, softmax and
//      the value-latent sum, then the head's v_up slice when v_up is given; blocks of 8 or more
//      queries (prefill) do this with GEMMs (K @ Q^T, P @ V, O @ v_up), smaller ones (decode)
//      with vector loops.
// Threads: ORT's intra-op thread pool (KernelContext_ParallelFor).
#include "lowrank_kv_attention.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "gemm.h"
#include "quant.h"

namespace lrexport {

const OrtApi* g_ort = nullptr;

const char* dtype_name(ONNXTensorElementDataType t) noexcept {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "other";
  }
}

namespace {

constexpr int64_t kPosBlock = 64;    // positions per key-rebuild task
constexpr int64_t kQueryBlock = 16;  // queries per attention task

const char* const kInputNames[kNumInputs] = {"query",  "latent_k", "latent_v",    "past_k", "past_k_params",
                                             "past_v", "past_v_params", "past_len", "k_up", "k_bias",
                                             "v_up",   "cos",      "sin"};
const char* const kOutputNames[kNumOutputs] = {"output", "present_k", "present_k_params", "present_v",
                                               "present_v_params"};

std::string err_prefix() { return std::string(kOpName) + ": "; }

OrtStatus* fail(const std::string& msg) { return make_error(ORT_INVALID_ARGUMENT, err_prefix() + msg); }

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

OrtStatus* value_info(const OrtValue* v, ONNXTensorElementDataType* type, std::vector<int64_t>* shape,
                      int64_t* numel) {
  int is_tensor = 0;
  LRX_RETURN_IF_ERROR(g_ort->IsTensor(v, &is_tensor));
  if (!is_tensor) return fail("a tensor was expected");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  LRX_RETURN_IF_ERROR(g_ort->GetTensorTypeAndShape(v, &info));
  size_t rank = 0;
  OrtStatus* st = g_ort->GetTensorElementType(info, type);
  if (!st) st = g_ort->GetDimensionsCount(info, &rank);
  if (!st) {
    shape->assign(rank, 0);
    if (rank) st = g_ort->GetDimensions(info, shape->data(), rank);
  }
  g_ort->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  int64_t n = 1;
  for (int64_t d : *shape) {
    if (d < 0) return fail("tensor with a negative dimension");
    n *= d;
  }
  *numel = n;
  return nullptr;
}

OrtStatus* get_input(OrtKernelContext* ctx, size_t count, size_t idx, In* out) {
  *out = In{};
  if (idx >= count) return nullptr;
  const OrtValue* v = nullptr;
  LRX_RETURN_IF_ERROR(g_ort->KernelContext_GetInput(ctx, idx, &v));
  if (v == nullptr) return nullptr;
  out->present = true;
  LRX_RETURN_IF_ERROR(value_info(v, &out->type, &out->shape, &out->numel));
  void* p = nullptr;
  if (out->numel > 0) LRX_RETURN_IF_ERROR(g_ort->GetTensorMutableData(const_cast<OrtValue*>(v), &p));
  out->data = p;
  return nullptr;
}

// Output `idx` with `shape`; *data = nullptr when the node does not produce it.
OrtStatus* get_output(OrtKernelContext* ctx, size_t count, size_t idx, const std::vector<int64_t>& shape,
                      ONNXTensorElementDataType want, void** data) {
  *data = nullptr;
  if (idx >= count) return nullptr;
  OrtValue* v = nullptr;
  OrtStatus* st = g_ort->KernelContext_GetOutput(ctx, idx, shape.data(), shape.size(), &v);
  if (st) {
    std::string msg = g_ort->GetErrorMessage(st);
    g_ort->ReleaseStatus(st);
    return fail(cat("cannot allocate output '", kOutputNames[idx], "' (", idx, ") of shape ", dims_str(shape),
                    " (a buffer bound by the caller must have exactly this shape): ", msg));
  }
  if (v == nullptr) return nullptr;
  ONNXTensorElementDataType type;
  std::vector<int64_t> got;
  int64_t numel = 0;
  LRX_RETURN_IF_ERROR(value_info(v, &type, &got, &numel));
  if (type != want || got != shape)
    return fail(cat("output '", kOutputNames[idx], "' must be ", dtype_name(want), " ", dims_str(shape), ", got ",
                    dtype_name(type), " ", dims_str(got)));
  void* p = nullptr;
  if (numel > 0) LRX_RETURN_IF_ERROR(g_ort->GetTensorMutableData(v, &p));
  *data = p;
  // a non-null marker for empty outputs so that callers can tell "absent" from "empty"
  if (numel == 0) *data = reinterpret_cast<void*>(static_cast<uintptr_t>(alignof(std::max_align_t)));
  return nullptr;
}

// `t` must be `type` with exactly `want` dims; -1 in `want` matches any size. `desc` spells the
// expected shape with its symbols, e.g. "[B=2, P, G*rk=32]".
OrtStatus* expect(const In& t, size_t idx, ONNXTensorElementDataType type, const std::vector<int64_t>& want,
                  const std::string& desc) {
  const char* name = kInputNames[idx];
  if (!t.present) return fail(cat("input '", name, "' (", idx, ") is required: ", dtype_name(type), " ", desc));
  bool ok = t.type == type && t.shape.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || want[i] == t.shape[i];
  if (!ok)
    return fail(cat("input '", name, "' (", idx, ") must be ", dtype_name(type), " ", desc, ", got ",
                    dtype_name(t.type), " ", dims_str(t.shape)));
  return nullptr;
}

// Run f(i) for i in [0, n) on ORT's intra-op thread pool. f must not throw.
template <class F>
void parallel_for(OrtKernelContext* ctx, size_t n, const F& f) {
  if (n == 0) return;
  if (n == 1) {
    f(0);
    return;
  }
  struct Closure {
    const F* f;
  } closure{&f};
  OrtStatus* st = g_ort->KernelContext_ParallelFor(
      ctx, [](void* p, size_t i) { (*static_cast<Closure*>(p)->f)(i); }, n, 0, &closure);
  if (st) {  // no thread pool: run here (tasks are idempotent)
    g_ort->ReleaseStatus(st);
    for (size_t i = 0; i < n; ++i) f(i);
  }
}

size_t elem_size(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return 1;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return 8;
    default: return 4;
  }
}

bool overlaps(const void* a, size_t na, const void* b, size_t nb) {
  const char* pa = static_cast<const char*>(a);
  const char* pb = static_cast<const char*>(b);
  return pa < pb + nb && pb < pa + na;
}

// present <- past unless they are the same buffer. Partial overlap is an error.
OrtStatus* copy_past(const void* past, void* present, size_t bytes, const char* what) {
  if (bytes == 0 || past == present) return nullptr;
  if (overlaps(past, bytes, present, bytes))
    return fail(cat("output '", what, "' partially overlaps its past input; bind the same buffer or disjoint ones"));
  std::memcpy(present, past, bytes);
  return nullptr;
}

struct Shapes {
  int64_t B, S, Hq, Hkv, s, G, D, rk, rv, P, Prope, rep;
  int64_t Wk, Wv;          // latent widths G*rk, G*rv
  int64_t Ck, Cv;          // cache row widths (floats or code bytes)
  int64_t NPk, NPv;        // params per row (bits > 0)
  bool has_vup, has_kbias;
  float scale;
};

struct PosRange {
  int64_t lo, hi;   // positions [lo, hi) of row b that some query of this call may attend
  int64_t offset;   // first row of this batch row in the scratch buffers
};

}  // namespace

OrtStatus* LowRankKVAttentionKernel::Compute(OrtKernelContext* ctx) const noexcept {
  try {
    const Attributes& a = attrs;
    size_t nin = 0, nout = 0;
    LRX_RETURN_IF_ERROR(g_ort->KernelContext_GetInputCount(ctx, &nin));
    LRX_RETURN_IF_ERROR(g_ort->KernelContext_GetOutputCount(ctx, &nout));
    In in[kNumInputs];
    for (size_t i = 0; i < kNumInputs; ++i) LRX_RETURN_IF_ERROR(get_input(ctx, nin, i, &in[i]));
    const auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const auto U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    const auto F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const auto I64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;

    // ---- 1. checks -------------------------------------------------------------------------
    Shapes z{};
    const In& q = in[kQuery];
    LRX_RETURN_IF_ERROR(expect(q, kQuery, F32, {-1, -1, -1}, "[B, S, num_heads*D]"));
    z.B = q.shape[0];
    z.S = q.shape[1];
    z.Hq = a.num_heads;
    z.Hkv = a.num_kv_heads;
    z.s = a.group_size;
    z.G = z.Hkv / z.s;
    z.rep = z.Hq / z.Hkv;
    if (q.shape[2] % z.Hq != 0 || q.shape[2] == 0)
      return fail(cat("input 'query' (0) width ", q.shape[2], " is not a positive multiple of num_heads=", z.Hq,
                      " (expected [B, S, num_heads*D])"));
    z.D = q.shape[2] / z.Hq;
    if (z.D % 2 != 0)
      return fail(cat("head dim D=", z.D, " (query width ", q.shape[2], " / num_heads=", z.Hq,
                      ") must be even for rotate-half RoPE"));
    const int64_t sD = z.s * z.D;

    const In& kup = in[kKUp];
    LRX_RETURN_IF_ERROR(expect(kup, kKUp, F32, {z.G, -1, sD},
                               cat("[G=", z.G, ", rk, group_size*D=", sD, "]")));
    z.rk = kup.shape[1];
    if (z.rk == 0) return fail("input 'k_up' (8) has rank rk=0");
    z.Wk = z.G * z.rk;
    LRX_RETURN_IF_ERROR(expect(in[kLatentK], kLatentK, F32, {z.B, z.S, z.Wk},
                               cat("[B=", z.B, ", S=", z.S, ", G*rk=", z.Wk, "]")));
    const In& lv = in[kLatentV];
    LRX_RETURN_IF_ERROR(expect(lv, kLatentV, F32, {z.B, z.S, -1}, cat("[B=", z.B, ", S=", z.S, ", G*rv]")));
    if (lv.shape[2] == 0 || lv.shape[2] % z.G != 0)
      return fail(cat("input 'latent_v' (2) width ", lv.shape[2], " is not a positive multiple of G=", z.G,
                      " head groups (expected [B, S, G*rv])"));
    z.rv = lv.shape[2] / z.G;
    z.Wv = z.G * z.rv;
    z.has_vup = in[kVUp].present;
    if (z.has_vup)
      LRX_RETURN_IF_ERROR(expect(in[kVUp], kVUp, F32, {z.G, z.rv, sD},
                                 cat("[G=", z.G, ", rv=", z.rv, ", group_size*D=", sD, "]")));
    z.has_kbias = in[kKBias].present;
    if (z.has_kbias)
      LRX_RETURN_IF_ERROR(expect(in[kKBias], kKBias, F32, {z.Hkv * z.D},
                                 cat("[num_kv_heads*D=", z.Hkv * z.D, "]")));

    // caches
    const int bits = static_cast<int>(a.bits);
    const In& pk = in[kPastK];
    const In& pv = in[kPastV];
    if (bits == 0) {
      LRX_RETURN_IF_ERROR(expect(pk, kPastK, F32, {z.B, -1, z.Wk}, cat("[B=", z.B, ", P, G*rk=", z.Wk, "] (bits=0)")));
      z.P = pk.shape[1];
      LRX_RETURN_IF_ERROR(expect(pv, kPastV, F32, {z.B, z.P, z.Wv},
                                 cat("[B=", z.B, ", P=", z.P, ", G*rv=", z.Wv, "] (bits=0)")));
      z.Ck = z.Wk;
      z.Cv = z.Wv;
      for (size_t i : {kPastKParams, kPastVParams})
        if (in[i].present)
          return fail(cat("input '", kInputNames[i], "' (", i, ") must be absent when bits=0 (float caches)"));
    } else {
      const int64_t g = a.quant_group;
      if (z.Wk % g != 0)
        return fail(cat("key latent width G*rk=", z.Wk, " (from k_up [", z.G, ", ", z.rk,
                        ", ...]) is not a multiple of quant_group=", g));
      if (z.Wv % g != 0)
        return fail(cat("value latent width G*rv=", z.Wv, " (from latent_v) is not a multiple of quant_group=", g));
      z.Ck = z.Wk * bits / 8;
      z.Cv = z.Wv * bits / 8;
      z.NPk = 2 * z.Wk / g;
      z.NPv = 2 * z.Wv / g;
      LRX_RETURN_IF_ERROR(expect(pk, kPastK, U8, {z.B, -1, z.Ck},
                                 cat("[B=", z.B, ", P, G*rk*bits/8=", z.Ck, "] (packed codes, bits=", bits, ")")));
      z.P = pk.shape[1];
      LRX_RETURN_IF_ERROR(expect(pv, kPastV, U8, {z.B, z.P, z.Cv},
                                 cat("[B=", z.B, ", P=", z.P, ", G*rv*bits/8=", z.Cv, "] (packed codes, bits=", bits,
                                     ")")));
      LRX_RETURN_IF_ERROR(expect(in[kPastKParams], kPastKParams, F16, {z.B, z.P, z.NPk},
                                 cat("[B=", z.B, ", P=", z.P, ", 2*G*rk/quant_group=", z.NPk, "] (bits=", bits, ")")));
      LRX_RETURN_IF_ERROR(expect(in[kPastVParams], kPastVParams, F16, {z.B, z.P, z.NPv},
                                 cat("[B=", z.B, ", P=", z.P, ", 2*G*rv/quant_group=", z.NPv, "] (bits=", bits, ")")));
    }
    const In& plen = in[kPastLen];
    LRX_RETURN_IF_ERROR(expect(plen, kPastLen, I64, {z.B}, cat("[B=", z.B, "]")));
    const In& cs = in[kCos];
    LRX_RETURN_IF_ERROR(expect(cs, kCos, F32, {-1, z.D / 2}, cat("[max_positions, D/2=", z.D / 2, "]")));
    z.Prope = cs.shape[0];
    LRX_RETURN_IF_ERROR(expect(in[kSin], kSin, F32, {z.Prope, z.D / 2}, cat("[", z.Prope, ", D/2=", z.D / 2, "] like cos")));

    const int64_t* pl = plen.as<int64_t>();
    for (int64_t b = 0; b < z.B; ++b) {
      if (pl[b] < 0) return fail(cat("input 'past_len' (7): past_len[", b, "]=", pl[b], " must be >= 0"));
      if (z.S == 0) continue;
      if (pl[b] > z.P - z.S)
        return fail(cat("input 'past_len' (7): past_len[", b, "]=", pl[b], " + S=", z.S,
                        " new tokens does not fit in the cache of P=", z.P,
                        " positions (past_k dim 1); past_len + S must be <= P"));
      if (pl[b] > z.Prope - z.S)
        return fail(cat("input 'past_len' (7): past_len[", b, "]=", pl[b], " + S=", z.S,
                        " new tokens exceeds the RoPE table of ", z.Prope, " positions (cos/sin dim 0)"));
    }
    z.scale = a.has_scale ? a.scale : 1.0f / std::sqrt(static_cast<float>(z.D));

    // ---- 2. outputs and cache update -----------------------------------------------------
    const int64_t out_w = z.has_vup ? z.Hq * z.D : z.Hq * z.rv;
    void* out_p = nullptr;
    LRX_RETURN_IF_ERROR(get_output(ctx, nout, kOut, {z.B, z.S, out_w}, F32, &out_p));
    if (!out_p) return fail("output 'output' (0) is required");
    const auto ktype = bits ? U8 : F32;
    void* prk = nullptr;
    void* prv = nullptr;
    void* prkp = nullptr;
    void* prvp = nullptr;
    LRX_RETURN_IF_ERROR(get_output(ctx, nout, kPresentK, pk.shape, ktype, &prk));
    LRX_RETURN_IF_ERROR(get_output(ctx, nout, kPresentV, pv.shape, ktype, &prv));
    if (!prk || !prv) return fail("outputs 'present_k' (1) and 'present_v' (3) are required");
    if (bits) {
      LRX_RETURN_IF_ERROR(get_output(ctx, nout, kPresentKParams, in[kPastKParams].shape, F16, &prkp));
      LRX_RETURN_IF_ERROR(get_output(ctx, nout, kPresentVParams, in[kPastVParams].shape, F16, &prvp));
      if (!prkp || !prvp)
        return fail(cat("outputs 'present_k_params' (2) and 'present_v_params' (4) are required when bits=", bits));
    }
    const size_t esz = bits ? 1 : 4;
    const size_t kbytes = static_cast<size_t>(pk.numel) * esz;
    const size_t vbytes = static_cast<size_t>(pv.numel) * esz;
    {
      // Buffers bound by the caller: an output may share memory only with its own past input
      // (same start, same size); anything else would be read after it is overwritten.
      struct Buf {
        const void* p;
        size_t n;
        size_t idx;
      };
      const size_t out_bytes = static_cast<size_t>(z.B * z.S * out_w) * sizeof(float);
      const Buf outs[] = {{out_p, out_bytes, kOut},
                          {prk, kbytes, kPresentK},
                          {prkp, bits ? static_cast<size_t>(in[kPastKParams].numel) * 2 : 0, kPresentKParams},
                          {prv, vbytes, kPresentV},
                          {prvp, bits ? static_cast<size_t>(in[kPastVParams].numel) * 2 : 0, kPresentVParams}};
      const size_t own_past[] = {kNumInputs, kPastK, kPastKParams, kPastV, kPastVParams};
      for (const Buf& o : outs) {
        if (!o.p || !o.n) continue;
        for (size_t i = 0; i < kNumInputs; ++i) {
          if (!in[i].present || in[i].numel == 0) continue;
          const size_t bytes = static_cast<size_t>(in[i].numel) * elem_size(in[i].type);
          if (!overlaps(o.p, o.n, in[i].data, bytes)) continue;
          if (i == own_past[o.idx] && o.p == in[i].data && o.n == bytes) continue;  // in place
          return fail(cat("output '", kOutputNames[o.idx], "' shares memory with input '", kInputNames[i],
                          "': only a present cache may be bound to the buffer of its own past input"));
        }
        for (const Buf& o2 : outs)
          if (&o2 != &o && o2.p && o2.n && overlaps(o.p, o.n, o2.p, o2.n))
            return fail(cat("outputs '", kOutputNames[o.idx], "' and '", kOutputNames[o2.idx], "' share memory"));
      }
    }
    const bool k_inplace = pk.numel > 0 && pk.data == prk;
    const bool v_inplace = pv.numel > 0 && pv.data == prv;
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    auto ms_since = [](clock::time_point t) {
      return std::chrono::duration<double, std::milli>(clock::now() - t).count();
    };
    double t_copy = 0, t_write = 0, t_keys = 0, t_attn = 0;
    auto report = [&] {
      if (!debug) return;
      std::fprintf(stderr,
                   "[lrexport_ops] %s: B=%lld S=%lld P=%lld bits=%d present_k %s past_k, present_v %s past_v; "
                   "ms: copy %.2f write %.2f keys %.2f attention %.2f\n",
                   kOpName, static_cast<long long>(z.B), static_cast<long long>(z.S), static_cast<long long>(z.P),
                   bits, k_inplace ? "aliases" : "is a copy of", v_inplace ? "aliases" : "is a copy of", t_copy,
                   t_write, t_keys, t_attn);
    };
    if (pk.numel > 0) LRX_RETURN_IF_ERROR(copy_past(pk.data, prk, kbytes, "present_k"));
    if (pv.numel > 0) LRX_RETURN_IF_ERROR(copy_past(pv.data, prv, vbytes, "present_v"));
    if (bits) {
      const In& pkp = in[kPastKParams];
      const In& pvp = in[kPastVParams];
      if (pkp.numel > 0) LRX_RETURN_IF_ERROR(copy_past(pkp.data, prkp, pkp.numel * 2, "present_k_params"));
      if (pvp.numel > 0) LRX_RETURN_IF_ERROR(copy_past(pvp.data, prvp, pvp.numel * 2, "present_v_params"));
    }

    t_copy = ms_since(t0);
    const auto t1 = clock::now();
    const float* lk = in[kLatentK].as<float>();
    const float* lvp = lv.as<float>();
    for (int64_t b = 0; b < z.B; ++b) {
      for (int64_t t = 0; t < z.S; ++t) {
        const int64_t row = b * z.P + pl[b] + t;  // cache row of this token
        const float* xk = lk + (b * z.S + t) * z.Wk;
        const float* xv = lvp + (b * z.S + t) * z.Wv;
        if (!bits) {
          std::memcpy(static_cast<float*>(prk) + row * z.Wk, xk, z.Wk * sizeof(float));
          std::memcpy(static_cast<float*>(prv) + row * z.Wv, xv, z.Wv * sizeof(float));
        } else {
          quantize_row(xk, z.Wk, bits, a.quant_group, static_cast<uint8_t*>(prk) + row * z.Ck,
                       static_cast<uint16_t*>(prkp) + row * z.NPk);
          quantize_row(xv, z.Wv, bits, a.quant_group, static_cast<uint8_t*>(prv) + row * z.Cv,
                       static_cast<uint16_t*>(prvp) + row * z.NPv);
        }
      }
    }
    t_write = ms_since(t1);
    if (z.B == 0 || z.S == 0) {
      report();
      return nullptr;
    }
    const auto t2 = clock::now();

    // ---- 3. phase A: keys (and dequantized values) of the positions in reach -------------
    std::vector<PosRange> rng(z.B);
    int64_t rows = 0;
    for (int64_t b = 0; b < z.B; ++b) {
      const int64_t hi = pl[b] + z.S;
      const int64_t lo = a.window > 0 ? std::max<int64_t>(0, pl[b] - a.window + 1) : 0;
      rng[b] = {lo, hi, rows};
      rows += hi - lo;
    }
    const int64_t HkvD = z.Hkv * z.D;
    std::unique_ptr<float[]> keys(new float[static_cast<size_t>(rows * HkvD)]);
    std::unique_ptr<float[]> vdeq;  // [rows, G*rv] when bits > 0
    if (bits) vdeq.reset(new float[static_cast<size_t>(rows * z.Wv)]);

    struct TaskA {
      int64_t b, g, j0, n;
    };
    std::vector<TaskA> tasks_a;
    for (int64_t b = 0; b < z.B; ++b)
      for (int64_t g = 0; g < z.G; ++g)
        for (int64_t j0 = rng[b].lo; j0 < rng[b].hi; j0 += kPosBlock)
          tasks_a.push_back({b, g, j0, std::min(kPosBlock, rng[b].hi - j0)});

    const float* kup_p = kup.as<float>();
    const float* kbias = z.has_kbias ? in[kKBias].as<float>() : nullptr;
    const float* cosp = cs.as<float>();
    const float* sinp = in[kSin].as<float>();
    const int64_t half = z.D / 2;
    std::atomic<bool> oom{false};

    parallel_for(ctx, tasks_a.size(), [&](size_t ti) {
      try {
        const TaskA& t = tasks_a[ti];
        const PosRange& r = rng[t.b];
        float* kout = keys.get() + (r.offset + (t.j0 - r.lo)) * HkvD + t.g * sD;
        const float* A;
        int64_t lda;
        std::vector<float> abuf;
        if (!bits) {
          A = static_cast<const float*>(prk) + (t.b * z.P + t.j0) * z.Wk + t.g * z.rk;
          lda = z.Wk;
        } else {
          abuf.resize(static_cast<size_t>(t.n * z.rk));
          for (int64_t i = 0; i < t.n; ++i) {
            const int64_t row = t.b * z.P + t.j0 + i;
            dequantize_range(static_cast<const uint8_t*>(prk) + row * z.Ck,
                             static_cast<const uint16_t*>(prkp) + row * z.NPk, z.Wk, bits, a.quant_group,
                             t.g * z.rk, (t.g + 1) * z.rk, abuf.data() + i * z.rk);
            dequantize_range(static_cast<const uint8_t*>(prv) + row * z.Cv,
                             static_cast<const uint16_t*>(prvp) + row * z.NPv, z.Wv, bits, a.quant_group,
                             t.g * z.rv, (t.g + 1) * z.rv,
                             vdeq.get() + (r.offset + (t.j0 - r.lo) + i) * z.Wv + t.g * z.rv);
          }
          A = abuf.data();
          lda = z.rk;
        }
        sgemm(t.n, sD, z.rk, A, lda, kup_p + t.g * z.rk * sD, sD, kout, HkvD);
        for (int64_t i = 0; i < t.n; ++i) {
          const int64_t j = t.j0 + i;
          const float* c = cosp + j * half;
          const float* sn = sinp + j * half;
          float* krow = kout + i * HkvD;
          for (int64_t h = 0; h < z.s; ++h) {
            float* x = krow + h * z.D;
            if (kbias) {
              const float* bias = kbias + (t.g * z.s + h) * z.D;
              for (int64_t d = 0; d < z.D; ++d) x[d] += bias[d];
            }
            for (int64_t d = 0; d < half; ++d) {
              const float x1 = x[d], x2 = x[d + half];
              x[d] = x1 * c[d] - x2 * sn[d];
              x[d + half] = x2 * c[d] + x1 * sn[d];
            }
          }
        }
      } catch (...) {
        oom.store(true);
      }
    });
    if (oom.load()) return make_error(ORT_FAIL, err_prefix() + "out of memory in the key rebuild");
    t_keys = ms_since(t2);
    const auto t3 = clock::now();

    // ---- 4. phase B: attention per (row, query head, query block) -------------------------
    struct TaskB {
      int64_t b, h, s0, n;
    };
    std::vector<TaskB> tasks_b;
    for (int64_t b = 0; b < z.B; ++b)
      for (int64_t h = 0; h < z.Hq; ++h)
        for (int64_t s0 = 0; s0 < z.S; s0 += kQueryBlock) tasks_b.push_back({b, h, s0, std::min(kQueryBlock, z.S - s0)});

    const float* qp = q.as<float>();
    const float* vup = z.has_vup ? in[kVUp].as<float>() : nullptr;
    float* outp = static_cast<float*>(out_p);
    const int64_t Q = z.Hq * z.D;

    parallel_for(ctx, tasks_b.size(), [&](size_t ti) {
      try {
        const TaskB& t = tasks_b[ti];
        const PosRange& r = rng[t.b];
        const int64_t kv = t.h / z.rep;
        const int64_t g = kv / z.s, slot = kv % z.s;
        const int64_t p0 = pl[t.b] + t.s0;            // position of the block's first query
        const int64_t p1 = p0 + t.n - 1;              // and of its last
        const int64_t jlo = a.window > 0 ? std::max<int64_t>(0, p0 - a.window + 1) : 0;
        const int64_t nk = p1 - jlo + 1;              // keys any query of the block may see
        const float* kb = keys.get() + (r.offset + (jlo - r.lo)) * HkvD + kv * z.D;
        const float* vb = (bits ? vdeq.get() + (r.offset + (jlo - r.lo)) * z.Wv
                                : static_cast<const float*>(prv) + (t.b * z.P + jlo) * z.Wv) +
                          g * z.rv;
        const float* up = vup ? vup + g * z.rv * sD + slot * z.D : nullptr;  // v_up[g, :, slot*D : +D]
        float* y0 = outp + (t.b * z.S + t.s0) * out_w + t.h * (vup ? z.D : z.rv);
        // RoPE'd, scaled query of block row i into dst[d * stride]
        auto rope_query = [&](int64_t i, float* dst, int64_t stride) {
          const int64_t p = p0 + i;
          const float* x = qp + (t.b * z.S + t.s0 + i) * Q + t.h * z.D;
          const float* c = cosp + p * half;
          const float* sn = sinp + p * half;
          for (int64_t d = 0; d < half; ++d) {
            dst[d * stride] = z.scale * (x[d] * c[d] - x[d + half] * sn[d]);
            dst[(d + half) * stride] = z.scale * (x[d + half] * c[d] + x[d] * sn[d]);
          }
        };
        // keys of query i: [lo_i, p_i] relative to jlo
        auto key_span = [&](int64_t i, int64_t* a0, int64_t* a1) {
          const int64_t p = p0 + i;
          *a0 = (a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : 0) - jlo;
          *a1 = p - jlo + 1;
        };

        if (t.n >= 8) {
          // scores^T [nk, 16] = K [nk, D] @ Q^T [D, 16]; probabilities [n, nk]; O = P @ V
          constexpr int64_t W = kQueryBlock;
          std::vector<float> qt(static_cast<size_t>(z.D * W), 0.0f), st(static_cast<size_t>(nk * W));
          std::vector<float> pm(static_cast<size_t>(t.n * nk)), o(static_cast<size_t>(t.n * z.rv));
          std::vector<float> inv(static_cast<size_t>(t.n));
          for (int64_t i = 0; i < t.n; ++i) rope_query(i, qt.data() + i, W);
          sgemm(nk, W, z.D, kb, HkvD, qt.data(), W, st.data(), W);
          for (int64_t i = 0; i < t.n; ++i) {
            int64_t a0, a1;
            key_span(i, &a0, &a1);
            float* row = pm.data() + i * nk;
            float m = -std::numeric_limits<float>::infinity();
            for (int64_t j = 0; j < nk; ++j) {
              const bool in = j >= a0 && j < a1;
              row[j] = in ? st[j * W + i] : 0.0f;
              if (in) m = std::max(m, row[j]);
            }
            inv[i] = 1.0f / exp_shifted_sum(row + a0, a1 - a0, m);
          }
          sgemm(t.n, z.rv, nk, pm.data(), nk, vb, z.Wv, o.data(), z.rv);
          for (int64_t i = 0; i < t.n; ++i)
            for (int64_t rr = 0; rr < z.rv; ++rr) o[i * z.rv + rr] *= inv[i];
          if (up) {
            sgemm(t.n, z.D, z.rv, o.data(), z.rv, up, sD, y0, out_w);
          } else {
            for (int64_t i = 0; i < t.n; ++i) std::copy(o.data() + i * z.rv, o.data() + (i + 1) * z.rv, y0 + i * out_w);
          }
        } else {
          // few queries (decode): one query at a time
          std::vector<float> qr(static_cast<size_t>(z.D)), o(static_cast<size_t>(z.rv));
          std::vector<float> sc(static_cast<size_t>(nk));
          for (int64_t i = 0; i < t.n; ++i) {
            rope_query(i, qr.data(), 1);
            int64_t a0, a1;
            key_span(i, &a0, &a1);
            const int64_t nj = a1 - a0;
            sgemv_rows(nj, z.D, kb + a0 * HkvD, HkvD, qr.data(), sc.data());
            const float m = *std::max_element(sc.begin(), sc.begin() + nj);
            const float inv = 1.0f / exp_shifted_sum(sc.data(), nj, m);
            for (int64_t j = 0; j < nj; ++j) sc[j] *= inv;
            float* y = y0 + i * out_w;
            if (up) {
              sgemv_cols(nj, z.rv, vb + a0 * z.Wv, z.Wv, sc.data(), o.data());
              sgemv_cols(z.rv, z.D, up, sD, o.data(), y);
            } else {
              sgemv_cols(nj, z.rv, vb + a0 * z.Wv, z.Wv, sc.data(), y);
            }
          }
        }
      } catch (...) {
        oom.store(true);
      }
    });
    if (oom.load()) return make_error(ORT_FAIL, err_prefix() + "out of memory in the attention");
    t_attn = ms_since(t3);
    report();
    return nullptr;
  } catch (const std::bad_alloc&) {
    return make_error(ORT_FAIL, err_prefix() + "out of memory");
  } catch (const std::exception& e) {
    return make_error(ORT_FAIL, err_prefix() + e.what());
  } catch (...) {
    return make_error(ORT_FAIL, err_prefix() + "unexpected error");
  }
}

// ---- the OrtCustomOp ---------------------------------------------------------------------

namespace {

// Reads an int64 attribute; *found = false when the node does not set it.
OrtStatus* attr_i64(const OrtKernelInfo* info, const char* name, int64_t* out, bool* found) {
  OrtStatus* st = g_ort->KernelInfoGetAttribute_int64(info, name, out);
  *found = st == nullptr;
  if (st) g_ort->ReleaseStatus(st);
  return nullptr;
}

OrtStatus* read_attributes(const OrtKernelInfo* info, Attributes* a) {
  bool found = false;
  attr_i64(info, "num_heads", &a->num_heads, &found);
  if (!found) return fail("attribute 'num_heads' (int) is required");
  attr_i64(info, "num_kv_heads", &a->num_kv_heads, &found);
  if (!found) a->num_kv_heads = a->num_heads;
  attr_i64(info, "group_size", &a->group_size, &found);
  if (!found) a->group_size = 1;
  attr_i64(info, "window", &a->window, &found);
  if (!found) a->window = 0;
  attr_i64(info, "bits", &a->bits, &found);
  if (!found) a->bits = 0;
  attr_i64(info, "quant_group", &a->quant_group, &found);
  if (!found) a->quant_group = 0;
  OrtStatus* st = g_ort->KernelInfoGetAttribute_float(info, "scale", &a->scale);
  a->has_scale = st == nullptr;
  if (st) g_ort->ReleaseStatus(st);

  if (a->num_heads < 1) return fail(cat("attribute num_heads=", a->num_heads, " must be >= 1"));
  if (a->num_kv_heads < 1) return fail(cat("attribute num_kv_heads=", a->num_kv_heads, " must be >= 1"));
  if (a->num_heads % a->num_kv_heads != 0)
    return fail(cat("attribute num_heads=", a->num_heads, " is not divisible by num_kv_heads=", a->num_kv_heads,
                    " (each KV head serves num_heads/num_kv_heads query heads)"));
  if (a->group_size < 1 || a->num_kv_heads % a->group_size != 0)
    return fail(cat("attribute group_size=", a->group_size, " does not divide num_kv_heads=", a->num_kv_heads,
                    " (KV heads come in num_kv_heads/group_size groups)"));
  if (a->window < 0) return fail(cat("attribute window=", a->window, " must be >= 0 (0 = no window)"));
  if (a->has_scale && !std::isfinite(a->scale)) return fail("attribute scale must be finite");
  if (a->bits != 0 && a->bits != 2 && a->bits != 3 && a->bits != 4 && a->bits != 8)
    return fail(cat("attribute bits=", a->bits, " is not one of 0 (float caches), 2, 3, 4, 8"));
  if (a->bits && (a->quant_group < 8 || a->quant_group % 8 != 0))
    return fail(cat("attribute quant_group=", a->quant_group, " must be a positive multiple of 8 when bits=", a->bits));
  return nullptr;
}

LowRankKVAttentionOp* self(const OrtCustomOp* op) {
  return static_cast<LowRankKVAttentionOp*>(const_cast<OrtCustomOp*>(op));
}

ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp* op, size_t i) noexcept {
  switch (i) {
    case kPastK: return self(op)->k_cache_type;
    case kPastV: return self(op)->v_cache_type;
    case kPastKParams:
    case kPastVParams: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case kPastLen: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp* op, size_t i) noexcept {
  switch (i) {
    case kPresentK: return self(op)->k_cache_type;
    case kPresentV: return self(op)->v_cache_type;
    case kPresentKParams:
    case kPresentVParams: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t i) noexcept {
  switch (i) {
    case kPastKParams:
    case kPastVParams:
    case kKBias:
    case kVUp: return INPUT_OUTPUT_OPTIONAL;
    default: return INPUT_OUTPUT_REQUIRED;
  }
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t i) noexcept {
  return (i == kPresentKParams || i == kPresentVParams) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info,
                                      void** kernel) noexcept {
  *kernel = nullptr;
  try {
    auto k = std::make_unique<LowRankKVAttentionKernel>();
    LRX_RETURN_IF_ERROR(read_attributes(info, &k->attrs));
    const char* dbg = std::getenv("LREXPORT_OPS_DEBUG");
    k->debug = dbg && *dbg && std::strcmp(dbg, "0") != 0;
    *kernel = k.release();
    return nullptr;
  } catch (...) {
    return make_error(ORT_FAIL, err_prefix() + "cannot create the kernel (out of memory)");
  }
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) noexcept {
  return static_cast<const LowRankKVAttentionKernel*>(kernel)->Compute(ctx);
}

void ORT_API_CALL destroy(void* kernel) noexcept { delete static_cast<LowRankKVAttentionKernel*>(kernel); }

// past_k -> present_k, past_k_params -> present_k_params, past_v -> present_v, ...: a hint
// that lets ORT's allocation planner hand the kernel the past buffer as the present output
// when the past is an intermediate value used nowhere else.
constexpr int kInplaceIn[] = {kPastK, kPastKParams, kPastV, kPastVParams};
constexpr int kInplaceOut[] = {kPresentK, kPresentKParams, kPresentV, kPresentVParams};

size_t ORT_API_CALL may_inplace(int** input_index, int** output_index) noexcept {
  *input_index = nullptr;
  *output_index = nullptr;
  int* in = new (std::nothrow) int[4];
  int* out = new (std::nothrow) int[4];
  if (!in || !out) {
    delete[] in;
    delete[] out;
    return 0;
  }
  std::copy(kInplaceIn, kInplaceIn + 4, in);
  std::copy(kInplaceOut, kInplaceOut + 4, out);
  *input_index = in;
  *output_index = out;
  return 4;
}

void ORT_API_CALL release_may_inplace(int* input_index, int* output_index) noexcept {
  delete[] input_index;
  delete[] output_index;
}

}  // namespace

LowRankKVAttentionOp::LowRankKVAttentionOp(ONNXTensorElementDataType k, ONNXTensorElementDataType v) noexcept
    : OrtCustomOp{}, k_cache_type(k), v_cache_type(v) {
  version = ORT_API_VERSION;  // the headers' version: the fields below all exist in it
  CreateKernel = nullptr;
  KernelCompute = nullptr;
  CreateKernelV2 = create_kernel;
  KernelComputeV2 = compute;
  KernelDestroy = destroy;
  GetName = [](const OrtCustomOp*) noexcept -> const char* { return kOpName; };
  // nullptr = the CPU execution provider. CUDA kernels will be separate ops of the same name
  // returning "CUDAExecutionProvider" here, added beside these (never instead): see register.cc.
  GetExecutionProviderType = [](const OrtCustomOp*) noexcept -> const char* { return "CPUExecutionProvider"; };
  GetInputType = input_type;
  GetInputTypeCount = [](const OrtCustomOp*) noexcept -> size_t { return kNumInputs; };
  GetOutputType = output_type;
  GetOutputTypeCount = [](const OrtCustomOp*) noexcept -> size_t { return kNumOutputs; };
  GetInputCharacteristic = input_characteristic;
  GetOutputCharacteristic = output_characteristic;
  GetInputMemoryType = [](const OrtCustomOp*, size_t) noexcept { return OrtMemTypeDefault; };
  GetVariadicInputMinArity = [](const OrtCustomOp*) noexcept { return 1; };
  GetVariadicInputHomogeneity = [](const OrtCustomOp*) noexcept { return 1; };
  GetVariadicOutputMinArity = [](const OrtCustomOp*) noexcept { return 1; };
  GetVariadicOutputHomogeneity = [](const OrtCustomOp*) noexcept { return 1; };
  InferOutputShapeFn = nullptr;  // see docs/custom_op.md ("Types and shapes")
  GetStartVersion = [](const OrtCustomOp*) noexcept { return 1; };
  GetEndVersion = [](const OrtCustomOp*) noexcept { return std::numeric_limits<int>::max(); };
  GetMayInplace = may_inplace;
  ReleaseMayInplace = release_may_inplace;
  GetAliasMap = nullptr;
  ReleaseAliasMap = nullptr;
}

LowRankKVAttentionOp* cpu_ops(size_t* count) noexcept {
  static LowRankKVAttentionOp ops[] = {
      {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
      {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
      {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8},
      {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT},
  };
  *count = sizeof(ops) / sizeof(ops[0]);
  return ops;
}

}  // namespace lrexport
