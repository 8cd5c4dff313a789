// Attention on CPU, flash style (contract: fastenc/ops/attention.py; summary: ../attention.h).
//
// Work is split into tasks of (sequence, head, query rows), balanced over threads by their cost (rows x keys
// seen), so packed sequences of unequal lengths load the threads evenly. A task brings its head's keys and
// values into float32 scratch once: K packed as panels of one vector of keys ([d][lanes], so that a query row's
// product with a vector of keys is one FMA per d), V as rows. Then, per tile of kRows queries (pre-scaled by
// scale * log2(e), so that the softmax runs on exp2), it walks the keys in blocks of kBlock: S = Q K^T in
// kRows x 3-vector register tiles, the masks,
// the online softmax (running max and sum per row, in float32), and O += P V. Blocks that hold only padded keys,
// and blocks after the diagonal of a causal tile, are skipped. The backward is the same walk per head, over all
// its query tiles, recomputing P from the saved log-sum-exp: dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
// dQ += dS K, dK += dS^T Q. Each head's dK and dV belong to one task, so no atomics are needed.
// The per-task code (attention_kernel.h) is compiled twice: for AVX-512 (16 lanes, tiles of 8 rows) and for
// AVX2 + FMA (8 lanes, tiles of 4 rows, within 16 vector registers); the CPU picks at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTENC_CPU_ATTENTION 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../attention.h"
#include "simd.h"

namespace fastenc {

#ifdef FASTENC_CPU_ATTENTION
namespace {

// kBlock keys per softmax block: the rescale of O after each block costs 1 / kBlock of its product, and encoder
// sequences up to 256 tokens take one block (no rescale at all); a tile's block of S is 8 KiB or less, in L1.
// kMaxLanes and kMaxRows: the widest vector and the tallest tile of the instruction sets below, which the code
// shared by both rounds to.
constexpr int64_t kBlock = 256, kMaxLanes = 16, kMaxRows = 8;
constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
constexpr float kInf = std::numeric_limits<float>::infinity();
// e^f = sum f^t / t! for t = 7 .. 0, Horner's order: degree 7 on |f| <= ln(2) / 2 leaves an error of ~5e-9.
constexpr float kTaylor[8] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f,
                              1.0f};

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Where one (sequence, head) lives: from token token_q / token_k of a packed layout, or at batch row `batch` of a
// padded one.
struct Head {
  int64_t batch, head, token_q, token_k, len_q, len_k;
};

// The inputs' layout, shared by every task of a call.
struct Problem {
  const float *q, *k, *v, *dout, *out;
  const float* lse;
  float *q_grad_or_out, *k_grad, *v_grad;
  float* bias_grad;  // (B, H, S_q, S_k) with unit key stride, or null: the backward writes dS there
  int64_t bias_grad_stride[3];
  float* lse_out;
  const float* bias;
  const bool* key_padding;
  int64_t bias_stride[4], kpm_stride[2];
  int64_t row_stride[4][3];  // q, k, v, out (and their gradients): [batch or token][head][row]
  int64_t lse_stride[3];     // [batch][head][row] (padded) or [-][head][token] (packed)
  bool packed, causal;
  int64_t head_dim;
  float scale;
};

enum Operand { kQ = 0, kK = 1, kV = 2, kO = 3 };

// Element (row, d) of operand `which` of head `h` is at base + row * stride + d.
int64_t head_base(const Problem& p, Operand which, const Head& h, int64_t* stride) {
  const auto& s = p.row_stride[which];
  if (p.packed) {
    *stride = s[0];
    return (which == kK || which == kV ? h.token_k : h.token_q) * s[0] + h.head * s[1];
  }
  *stride = s[2];
  return h.batch * s[0] + h.head * s[1];
}

int64_t lse_base(const int64_t* s, bool packed, const Head& h) {
  return packed ? h.head * s[1] + h.token_q * s[2] : h.batch * s[0] + h.head * s[1];
}

// A task's float32 copies of its head's operands, reused from task to task of a thread.
struct Scratch {
  std::vector<float> k_panels, v_panels, k_rows, v_rows, key_add, q_tile, do_tile, o_tile, dq_tile, s, dp, dk, dv;
  std::vector<char> block_live;
  bool padding_inside = false;  // a padded key before the last unpadded one
};

// Key j of the head: 0 where it may be seen, -inf where it is padding or past the last key. Returns the number
// of keys worth bringing in (past the last unpadded key, all are -inf) and marks the blocks with a live key.
int64_t prepare_keys(const Problem& p, const Head& h, Scratch& w) {
  int64_t end = h.len_k;
  const bool* pad = p.key_padding ? p.key_padding + h.batch * p.kpm_stride[0] : nullptr;
  if (pad) {
    while (end > 0 && pad[(end - 1) * p.kpm_stride[1]]) --end;
  }
  w.key_add.assign(round_up(end, kMaxLanes), -kInf);
  w.block_live.assign((end + kBlock - 1) / kBlock, 0);
  w.padding_inside = false;
  for (int64_t j = 0; j < end; ++j) {
    if (pad && pad[j * p.kpm_stride[1]]) {
      w.padding_inside = true;
      continue;
    }
    w.key_add[j] = 0.0f;
    w.block_live[j / kBlock] = 1;
  }
  return end;
}

// The two instruction sets the kernels are compiled for, each in its own namespace (see attention_kernel.h).
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f")

// 8 x 3 vectors of accumulators + 3 + 1 of 32 registers.
constexpr int64_t kRows = 8;

struct Vec {
  using R = __m512;
  static constexpr int64_t kLanes = 16;
  static FASTENC_INLINE R load(const float* p) { return _mm512_loadu_ps(p); }
  static FASTENC_INLINE void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static FASTENC_INLINE R set1(float x) { return _mm512_set1_ps(x); }
  static FASTENC_INLINE R zero() { return _mm512_setzero_ps(); }
  static FASTENC_INLINE R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static FASTENC_INLINE R add(R a, R b) { return _mm512_add_ps(a, b); }
  static FASTENC_INLINE R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static FASTENC_INLINE R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static FASTENC_INLINE R max(R a, R b) { return _mm512_max_ps(a, b); }
  static FASTENC_INLINE float reduce_add(R v) { return _mm512_reduce_add_ps(v); }
  static FASTENC_INLINE float reduce_max(R v) { return _mm512_reduce_max_ps(v); }
  // 2^x: round to the nearest integer n, 2^(x - n) = e^(f), f = (x - n) ln 2, by kTaylor, times 2^n by scalef.
  // x is clamped to [-200, 127]: 2^-200 rounds to 0, so masked scores (-inf) give exactly 0; max(lo, x) returns x
  // where it is NaN, so NaN passes through.
  static FASTENC_INLINE R exp2(R x) {
    x = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-200.0f), x));
    const R n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(kLn2));
    R poly = _mm512_set1_ps(kTaylor[0]);
    for (int t = 1; t < 8; ++t) poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(kTaylor[t]));
    return _mm512_scalef_ps(poly, n);
  }
  static FASTENC_INLINE R mask_after(R value, int64_t j, int64_t i) {
    const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __mmask16 after = _mm512_cmpgt_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(i)));
    return _mm512_mask_blend_ps(after, value, _mm512_set1_ps(-kInf));
  }
};

#include "attention_kernel.h"

#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// 16 vector registers: 4 x 3 vectors of accumulators + 3 + 1.
constexpr int64_t kRows = 4;

struct Vec {
  using R = __m256;
  static constexpr int64_t kLanes = 8;
  static FASTENC_INLINE R load(const float* p) { return _mm256_loadu_ps(p); }
  static FASTENC_INLINE void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static FASTENC_INLINE R set1(float x) { return _mm256_set1_ps(x); }
  static FASTENC_INLINE R zero() { return _mm256_setzero_ps(); }
  static FASTENC_INLINE R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static FASTENC_INLINE R add(R a, R b) { return _mm256_add_ps(a, b); }
  static FASTENC_INLINE R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static FASTENC_INLINE R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static FASTENC_INLINE R max(R a, R b) { return _mm256_max_ps(a, b); }
  static FASTENC_INLINE float reduce_add(R v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  static FASTENC_INLINE float reduce_max(R v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  // 2^x as avx512::Vec::exp2, with 2^n built in the exponent field (no scalef): x is clamped to [-127, 127], and
  // n = -127 makes the field 0, so masked scores (-inf) give exactly 0 (as does anything below 2^-126.5, far
  // under a softmax row's largest term, 1). max(lo, x) returns x where it is NaN, so NaN passes through.
  static FASTENC_INLINE R exp2(R x) {
    x = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), x));
    const R n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i field = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const R f = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(kLn2));
    R poly = _mm256_set1_ps(kTaylor[0]);
    for (int t = 1; t < 8; ++t) poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(kTaylor[t]));
    return _mm256_mul_ps(poly, _mm256_castsi256_ps(field));
  }
  static FASTENC_INLINE R mask_after(R value, int64_t j, int64_t i) {
    const __m256i key = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(j)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i after = _mm256_cmpgt_epi32(key, _mm256_set1_epi32(static_cast<int32_t>(i)));
    return _mm256_blendv_ps(value, _mm256_set1_ps(-kInf), _mm256_castsi256_ps(after));
  }
};

#include "attention_kernel.h"

#pragma GCC pop_options
}  // namespace avx2


// Runs fn(task) for every task, split over the threads by cost: thread t takes the tasks whose cost midpoint
// falls in its share t / threads of the total.
template <typename F>
void for_each_balanced(const std::vector<int64_t>& cost, const F& fn) {
  const int64_t tasks = static_cast<int64_t>(cost.size());
  std::vector<double> middle(tasks);
  double total = 0.0;
  for (int64_t t = 0; t < tasks; ++t) {
    middle[t] = total + 0.5 * static_cast<double>(cost[t]);
    total += static_cast<double>(cost[t]);
  }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t owner = total > 0 ? std::min<int64_t>(threads - 1, static_cast<int64_t>(
                                                                           middle[t] / total * threads))
                                      : t % threads;
      if (owner >= begin && owner < end) fn(t, scratch);
    }
  });
}

// The (sequence, head) pairs of a call, in the padded or the packed layout.
std::vector<Head> heads_of(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                           const std::optional<at::Tensor>& cu_k) {
  std::vector<Head> heads;
  if (cu_q.has_value()) {
    const auto bq = cu_q->to(at::kLong).contiguous(), bk = cu_k->to(at::kLong).contiguous();
    const int64_t *tq = bq.data_ptr<int64_t>(), *tk = bk.data_ptr<int64_t>();
    for (int64_t i = 0; i + 1 < bq.numel(); ++i) {
      for (int64_t h = 0; h < q.size(1); ++h) {
        heads.push_back({i, h, tq[i], tk[i], tq[i + 1] - tq[i], tk[i + 1] - tk[i]});
      }
    }
  } else {
    for (int64_t b = 0; b < q.size(0); ++b) {
      for (int64_t h = 0; h < q.size(1); ++h) heads.push_back({b, h, 0, 0, q.size(2), k.size(2)});
    }
  }
  return heads;
}

Problem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& o, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& key_padding_mask, bool packed, bool is_causal,
                                     double scale) {
  Problem p{};
  p.q = q.data_ptr<float>();
  p.k = k.data_ptr<float>();
  p.v = v.data_ptr<float>();
  const at::Tensor* operands[4] = {&q, &k, &v, &o};
  for (int which = 0; which < 4; ++which) {
    for (int d = 0; d < 3; ++d) p.row_stride[which][d] = operands[which]->stride(d);
  }
  if (bias.has_value()) {
    p.bias = bias->data_ptr<float>();
    for (int d = 0; d < 4; ++d) p.bias_stride[d] = bias->stride(d);
  }
  if (key_padding_mask.has_value()) {
    p.key_padding = key_padding_mask->data_ptr<bool>();
    for (int d = 0; d < 2; ++d) p.kpm_stride[d] = key_padding_mask->stride(d);
  }
  p.packed = packed;
  p.causal = is_causal;
  p.head_dim = q.size(-1);
  p.scale = static_cast<float>(scale);
  return p;
}

void set_lse_strides(const at::Tensor& lse, bool packed, int64_t* s) {
  if (packed) {
    s[0] = 0, s[1] = lse.stride(0), s[2] = lse.stride(1);
  } else {
    s[0] = lse.stride(0), s[1] = lse.stride(1), s[2] = lse.stride(2);
  }
}

at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// float32 only: on bfloat16 / float16 inputs torch's CPU flash kernel is the faster one (on AMX CPUs by far), and
// "auto" runs it (fastenc/ops/attention.py).
void check_dtypes(const at::Tensor& q, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.scalar_type() == at::kFloat, "the native attention takes float32, got ", q.scalar_type());
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == at::kFloat, "bias must be float32, got ",
              bias->scalar_type());
}

// Query rows per forward task: whole heads when there are enough of them to share out, else a head's rows in
// chunks (each chunk brings in the head's keys again, so chunks stay large).
int64_t rows_per_task(const std::vector<Head>& heads) {
  int64_t longest = 0;
  for (const auto& h : heads) longest = std::max(longest, h.len_q);
  const int64_t wanted_tasks = 4 * at::get_num_threads();
  if (static_cast<int64_t>(heads.size()) >= wanted_tasks || longest == 0) return std::max<int64_t>(longest, 1);
  const int64_t chunks = (wanted_tasks + static_cast<int64_t>(heads.size()) - 1) / static_cast<int64_t>(heads.size());
  return std::max<int64_t>(round_up((longest + chunks - 1) / chunks, kMaxRows), 8 * kMaxRows);
}

}  // namespace

namespace {

enum class Isa { kNone, kAvx2, kAvx512 };

Isa cpu_isa() {
  static const Isa isa = __builtin_cpu_supports("avx512f")                                     ? Isa::kAvx512
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                             : Isa::kNone;
  return isa;
}

}  // namespace

bool attention_cpu_available() { return cpu_isa() != Isa::kNone; }

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, bool is_causal, double scale) {
  TORCH_CHECK(attention_cpu_available(), "the native CPU attention needs a CPU with AVX2 and FMA");
  const bool packed = cu_seqlens_q.has_value();
  const auto q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty(packed ? at::IntArrayRef{q.size(1), q.size(0)} : q.sizes().slice(0, 3),
                       q.options().dtype(at::kFloat));
  const auto heads = heads_of(q, k, cu_seqlens_q, cu_seqlens_k);
  const int64_t chunk = rows_per_task(heads);
  std::vector<std::tuple<int64_t, int64_t, int64_t>> tasks;  // (head, first row, end row)
  std::vector<int64_t> cost;
  for (int64_t i = 0; i < static_cast<int64_t>(heads.size()); ++i) {
    for (int64_t r = 0; r < heads[i].len_q; r += chunk) {
      const int64_t end = std::min(heads[i].len_q, r + chunk);
      tasks.emplace_back(i, r, end);
      cost.push_back((end - r) * (is_causal ? std::min(heads[i].len_k, end) : heads[i].len_k) + heads[i].len_k);
    }
  }
  check_dtypes(q, bias);
  auto p = problem_of(q, k, v, out, bias, key_padding_mask, packed, is_causal, scale);
  p.q_grad_or_out = out.data_ptr<float>();
  p.lse_out = lse.data_ptr<float>();
  set_lse_strides(lse, packed, p.lse_stride);
  const auto task = cpu_isa() == Isa::kAvx512 ? avx512::forward_task : avx2::forward_task;
  for_each_balanced(cost, [&](int64_t t, Scratch& scratch) {
    const auto& [head, first, end] = tasks[t];
    task(p, heads[head], first, end, scratch);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& out_in, const at::Tensor& lse, bool bias_grad, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, bool is_causal, double scale) {
  TORCH_CHECK(attention_cpu_available(), "the native CPU attention needs a CPU with AVX2 and FMA");
  const bool packed = cu_seqlens_q.has_value();
  TORCH_CHECK(!(bias_grad && packed), "the packed layout takes no bias, so it has no bias gradient");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  // dout and out share one layout (the kernel reads both with out's strides).
  const auto out = out_in.contiguous(), dout = dout_in.contiguous();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const auto heads = heads_of(q, k, cu_seqlens_q, cu_seqlens_k);
  std::vector<int64_t> cost;
  for (const auto& h : heads) cost.push_back(h.len_q * h.len_k + h.len_k);
  check_dtypes(q, bias);
  auto p = problem_of(q, k, v, out, bias, key_padding_mask, packed, is_causal, scale);
  p.dout = dout.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  set_lse_strides(lse, packed, p.lse_stride);
  p.q_grad_or_out = dq.data_ptr<float>();
  p.k_grad = dk.data_ptr<float>();
  p.v_grad = dv.data_ptr<float>();
  // Zeros where the kernel writes nothing: keys a query cannot see (causal, padded tiles) have dS = 0.
  auto dbias = bias_grad ? at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options()) : q.new_empty({0});
  p.bias_grad = bias_grad ? dbias.data_ptr<float>() : nullptr;
  for (int d = 0; d < 3 && bias_grad; ++d) p.bias_grad_stride[d] = dbias.stride(d);
  const auto task = cpu_isa() == Isa::kAvx512 ? avx512::backward_task : avx2::backward_task;
  for_each_balanced(cost, [&](int64_t t, Scratch& scratch) { task(p, heads[t], scratch); });
  return {dq, dk, dv, dbias};
}

#else  // no x86 vector code: attention_cpu_available() is false and the Python side never selects these

bool attention_cpu_available() { return false; }

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const std::optional<at::Tensor>&,
                                                         const std::optional<at::Tensor>&,
                                                         const std::optional<at::Tensor>&,
                                                         const std::optional<at::Tensor>&, bool, double) {
  TORCH_CHECK(false, "the native CPU attention needs an x86 CPU with AVX2 and FMA");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double) {
  TORCH_CHECK(false, "the native CPU attention needs an x86 CPU with AVX2 and FMA");
}

#endif

}  // namespace fastenc
