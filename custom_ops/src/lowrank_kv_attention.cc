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
#include "op_common.h"
#include "quant.h"

namespace lrexport {

namespace {

constexpr int64_t kPosBlock = 64;    // positions per key-rebuild task
constexpr int64_t kQueryBlock = 16;  // queries per attention task

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

// present <- past unless they are the same buffer (prepare_call has checked any other overlap).
void copy_past(const void* past, void* present, size_t bytes) {
  if (bytes != 0 && past != present) std::memcpy(present, past, bytes);
}

struct PosRange {
  int64_t lo, hi;   // positions [lo, hi) of row b that some query of this call may attend
  int64_t offset;   // first row of this batch row in the scratch buffers
};

}  // namespace

OrtStatus* LowRankKVAttentionKernel::Compute(OrtKernelContext* ctx) const {
  const Attributes& a = attrs;
  // ---- 1. checks, outputs ---------------------------------------------------------------
  Call call;
  LRX_RETURN_IF_ERROR(prepare_call(ctx, a, /*allow_f16=*/false, /*lengths_on_host=*/true, &call));
  const Shapes& z = call.z;
  const In* in = call.in;
  const In& q = in[kQuery];
  const In& kup = in[kKUp];
  const In& lv = in[kLatentV];
  const In& pk = in[kPastK];
  const In& pv = in[kPastV];
  const In& cs = in[kCos];
  const int bits = call.bits;
  const int64_t* pl = call.past_len;
  const int64_t sD = z.s * z.D;
  const int64_t out_w = call.out_w;
  void* out_p = call.out;
  void* prk = call.present_k;
  void* prv = call.present_v;
  void* prkp = call.present_k_params;
  void* prvp = call.present_v_params;

  // ---- 2. cache update ------------------------------------------------------------------
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto ms_since = [](clock::time_point t) {
    return std::chrono::duration<double, std::milli>(clock::now() - t).count();
  };
  double t_copy = 0, t_write = 0, t_keys = 0, t_attn = 0;
  auto report = [&] {
    if (!debug) return;
    std::fprintf(stderr, "[lrexport_ops] %s; ms: copy %.2f write %.2f keys %.2f attention %.2f\n",
                 describe_call(call).c_str(), t_copy, t_write, t_keys, t_attn);
  };
  if (pk.numel > 0) copy_past(pk.data, prk, call.k_bytes);
  if (pv.numel > 0) copy_past(pv.data, prv, call.v_bytes);
  if (bits) {
    copy_past(in[kPastKParams].data, prkp, call.kp_bytes);
    copy_past(in[kPastVParams].data, prvp, call.vp_bytes);
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
}

// ---- the CPU ops ---------------------------------------------------------------------------

namespace {
KernelBase* make_cpu_kernel() noexcept { return new (std::nothrow) LowRankKVAttentionKernel(); }
}  // namespace

LowRankKVAttentionOp* cpu_ops(size_t* count) noexcept {
  constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  constexpr auto U8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  constexpr const char* cpu = "CPUExecutionProvider";
  constexpr const char* dl = kOpNameDeviceLen;  // on the CPU, past_len is in host memory either way
  static LowRankKVAttentionOp ops[] = {
      {cpu, make_cpu_kernel, F32, F32, F32},     {cpu, make_cpu_kernel, F32, U8, U8},
      {cpu, make_cpu_kernel, F32, F32, U8},      {cpu, make_cpu_kernel, F32, U8, F32},
      {cpu, make_cpu_kernel, F32, F32, F32, dl}, {cpu, make_cpu_kernel, F32, U8, U8, dl},
      {cpu, make_cpu_kernel, F32, F32, U8, dl},  {cpu, make_cpu_kernel, F32, U8, F32, dl},
  };
  *count = sizeof(ops) / sizeof(ops[0]);
  return ops;
}

}  // namespace lrexport
