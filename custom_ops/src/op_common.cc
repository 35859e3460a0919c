// Shared by the CPU and CUDA kernels of LowRankKVAttention: input checks, output allocation and
// sharing checks, attributes, and the OrtCustomOp definition. See op_common.h.
#include "op_common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <sstream>

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

const char* const kInputNames[kNumInputs] = {"query",  "latent_k", "latent_v",    "past_k", "past_k_params",
                                             "past_v", "past_v_params", "past_len", "k_up", "k_bias",
                                             "v_up",   "cos",      "sin"};
const char* const kOutputNames[kNumOutputs] = {"output", "present_k", "present_k_params", "present_v",
                                               "present_v_params"};

std::string err_prefix() { return std::string(kOpName) + ": "; }

OrtStatus* fail(const std::string& msg) { return make_error(ORT_INVALID_ARGUMENT, err_prefix() + msg); }

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

namespace {

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

}  // namespace

OrtStatus* prepare_call(OrtKernelContext* ctx, const Attributes& a, bool allow_f16, bool lengths_on_host,
                        Call* c) {
  size_t nin = 0, nout = 0;
  LRX_RETURN_IF_ERROR(g_ort->KernelContext_GetInputCount(ctx, &nin));
  LRX_RETURN_IF_ERROR(g_ort->KernelContext_GetOutputCount(ctx, &nout));
  In* in = c->in;
  for (size_t i = 0; i < kNumInputs; ++i) LRX_RETURN_IF_ERROR(get_input(ctx, nin, i, &in[i]));
  const auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  const auto U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  const auto F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  const auto I64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;

  // ---- inputs --------------------------------------------------------------------------
  Shapes& z = c->z;
  const In& q = in[kQuery];
  // the activation dtype: query's (float16 only where the kernel takes it), else float
  const auto T = allow_f16 && q.present && q.type == F16 ? F16 : F32;
  z.act = T;
  LRX_RETURN_IF_ERROR(expect(q, kQuery, T, {-1, -1, -1}, "[B, S, num_heads*D]"));
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
  LRX_RETURN_IF_ERROR(expect(kup, kKUp, T, {z.G, -1, sD},
                             cat("[G=", z.G, ", rk, group_size*D=", sD, "]")));
  z.rk = kup.shape[1];
  if (z.rk == 0) return fail("input 'k_up' (8) has rank rk=0");
  z.Wk = z.G * z.rk;
  LRX_RETURN_IF_ERROR(expect(in[kLatentK], kLatentK, T, {z.B, z.S, z.Wk},
                             cat("[B=", z.B, ", S=", z.S, ", G*rk=", z.Wk, "]")));
  const In& lv = in[kLatentV];
  LRX_RETURN_IF_ERROR(expect(lv, kLatentV, T, {z.B, z.S, -1}, cat("[B=", z.B, ", S=", z.S, ", G*rv]")));
  if (lv.shape[2] == 0 || lv.shape[2] % z.G != 0)
    return fail(cat("input 'latent_v' (2) width ", lv.shape[2], " is not a positive multiple of G=", z.G,
                    " head groups (expected [B, S, G*rv])"));
  z.rv = lv.shape[2] / z.G;
  z.Wv = z.G * z.rv;
  z.has_vup = in[kVUp].present;
  if (z.has_vup)
    LRX_RETURN_IF_ERROR(expect(in[kVUp], kVUp, T, {z.G, z.rv, sD},
                               cat("[G=", z.G, ", rv=", z.rv, ", group_size*D=", sD, "]")));
  z.has_kbias = in[kKBias].present;
  if (z.has_kbias)
    LRX_RETURN_IF_ERROR(expect(in[kKBias], kKBias, T, {z.Hkv * z.D},
                               cat("[num_kv_heads*D=", z.Hkv * z.D, "]")));

  // caches
  const int bits = static_cast<int>(a.bits);
  c->bits = bits;
  const In& pk = in[kPastK];
  const In& pv = in[kPastV];
  if (bits == 0) {
    LRX_RETURN_IF_ERROR(expect(pk, kPastK, T, {z.B, -1, z.Wk}, cat("[B=", z.B, ", P, G*rk=", z.Wk, "] (bits=0)")));
    z.P = pk.shape[1];
    LRX_RETURN_IF_ERROR(expect(pv, kPastV, T, {z.B, z.P, z.Wv},
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
  LRX_RETURN_IF_ERROR(expect(cs, kCos, T, {-1, z.D / 2}, cat("[max_positions, D/2=", z.D / 2, "]")));
  z.Prope = cs.shape[0];
  LRX_RETURN_IF_ERROR(expect(in[kSin], kSin, T, {z.Prope, z.D / 2}, cat("[", z.Prope, ", D/2=", z.D / 2, "] like cos")));

  const int64_t* pl = plen.as<int64_t>();
  c->past_len = pl;
  if (!lengths_on_host && z.S > std::min(z.P, z.Prope))
    return fail(cat("S=", z.S, " new tokens do not fit in the cache of P=", z.P, " positions (past_k dim 1) and the ",
                    "RoPE table of ", z.Prope, " positions (cos/sin dim 0)"));
  for (int64_t b = 0; lengths_on_host && b < z.B; ++b) {
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

  // ---- outputs -------------------------------------------------------------------------
  const int64_t out_w = c->out_w = z.has_vup ? z.Hq * z.D : z.Hq * z.rv;
  void* out_p = nullptr;
  LRX_RETURN_IF_ERROR(get_output(ctx, nout, kOut, {z.B, z.S, out_w}, T, &out_p));
  if (!out_p) return fail("output 'output' (0) is required");
  const auto ktype = bits ? U8 : T;
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
  const size_t esz = bits ? 1 : elem_size(T);
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
    const size_t out_bytes = static_cast<size_t>(z.B * z.S * out_w) * elem_size(T);
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
  c->out = out_p;
  c->present_k = prk;
  c->present_v = prv;
  c->present_k_params = prkp;
  c->present_v_params = prvp;
  c->k_bytes = kbytes;
  c->v_bytes = vbytes;
  c->kp_bytes = bits ? static_cast<size_t>(in[kPastKParams].numel) * 2 : 0;
  c->vp_bytes = bits ? static_cast<size_t>(in[kPastVParams].numel) * 2 : 0;
  c->k_inplace = pk.numel > 0 && pk.data == prk;
  c->v_inplace = pv.numel > 0 && pv.data == prv;
  return nullptr;
}

std::string describe_call(const Call& c) {
  std::ostringstream os;
  os << kOpName << ": B=" << c.z.B << " S=" << c.z.S << " P=" << c.z.P << " bits=" << c.bits << " "
     << dtype_name(c.z.act) << "; present_k " << (c.k_inplace ? "aliases" : "is a copy of") << " past_k, present_v "
     << (c.v_inplace ? "aliases" : "is a copy of") << " past_v";
  return os.str();
}

namespace {

// Reads an int64 attribute; *found = false when the node does not set it.
OrtStatus* attr_i64(const OrtKernelInfo* info, const char* name, int64_t* out, bool* found) {
  OrtStatus* st = g_ort->KernelInfoGetAttribute_int64(info, name, out);
  *found = st == nullptr;
  if (st) g_ort->ReleaseStatus(st);
  return nullptr;
}

}  // namespace

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

namespace {

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
    default: return self(op)->act_type;
  }
}

ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp* op, size_t i) noexcept {
  switch (i) {
    case kPresentK: return self(op)->k_cache_type;
    case kPresentV: return self(op)->v_cache_type;
    case kPresentKParams:
    case kPresentVParams: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    default: return self(op)->act_type;
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

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                                      void** kernel) noexcept {
  *kernel = nullptr;
  try {
    std::unique_ptr<KernelBase> k(self(op)->make_kernel());
    if (!k) return make_error(ORT_FAIL, err_prefix() + "cannot create the kernel (out of memory)");
    LRX_RETURN_IF_ERROR(read_attributes(info, &k->attrs));
    k->device_lengths = std::strcmp(self(op)->name, kOpNameDeviceLen) == 0;
    LRX_RETURN_IF_ERROR(k->Init(info));
    const char* dbg = std::getenv("LREXPORT_OPS_DEBUG");
    k->debug = dbg && *dbg && std::strcmp(dbg, "0") != 0;
    *kernel = k.release();
    return nullptr;
  } catch (...) {
    return make_error(ORT_FAIL, err_prefix() + "cannot create the kernel (out of memory)");
  }
}

// Every kernel's exceptions end here, as error statuses: none reaches ONNX Runtime.
OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) noexcept {
  try {
    return static_cast<const KernelBase*>(kernel)->Compute(ctx);
  } catch (const std::bad_alloc&) {
    return make_error(ORT_FAIL, err_prefix() + "out of memory");
  } catch (const std::exception& e) {
    return make_error(ORT_FAIL, err_prefix() + e.what());
  } catch (...) {
    return make_error(ORT_FAIL, err_prefix() + "unexpected error");
  }
}

void ORT_API_CALL destroy(void* kernel) noexcept { delete static_cast<KernelBase*>(kernel); }

// LowRankKVAttention's past_len is read on the host (checks, launch sizes): a CPU input of the CUDA
// op, so ONNX Runtime hands it over in host memory (a graph input fed from the host needs no copy at
// all). LowRankKVAttentionDeviceLen takes it where the provider keeps its tensors.
OrtMemType ORT_API_CALL input_memory_type(const OrtCustomOp* op, size_t i) noexcept {
  if (i == kPastLen && std::strcmp(self(op)->provider, "CPUExecutionProvider") != 0 &&
      std::strcmp(self(op)->name, kOpNameDeviceLen) != 0)
    return OrtMemTypeCPUInput;
  return OrtMemTypeDefault;
}

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

LowRankKVAttentionOp::LowRankKVAttentionOp(const char* ep, KernelBase* (*make)() noexcept,
                                           ONNXTensorElementDataType act, ONNXTensorElementDataType k,
                                           ONNXTensorElementDataType v, const char* op_name) noexcept
    : OrtCustomOp{}, act_type(act), k_cache_type(k), v_cache_type(v), provider(ep), name(op_name), make_kernel(make) {
  version = ORT_API_VERSION;  // the headers' version: the fields below all exist in it
  CreateKernel = nullptr;
  KernelCompute = nullptr;
  CreateKernelV2 = create_kernel;
  KernelComputeV2 = compute;
  KernelDestroy = destroy;
  GetName = [](const OrtCustomOp* op) noexcept -> const char* { return self(op)->name; };
  // CPU and CUDA kernels are separate ops of the same name, added side by side: see register.cc.
  GetExecutionProviderType = [](const OrtCustomOp* op) noexcept -> const char* { return self(op)->provider; };
  GetInputType = input_type;
  GetInputTypeCount = [](const OrtCustomOp*) noexcept -> size_t { return kNumInputs; };
  GetOutputType = output_type;
  GetOutputTypeCount = [](const OrtCustomOp*) noexcept -> size_t { return kNumOutputs; };
  GetInputCharacteristic = input_characteristic;
  GetOutputCharacteristic = output_characteristic;
  GetInputMemoryType = input_memory_type;
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


}  // namespace lrexport
