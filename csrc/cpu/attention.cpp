// Attention on CPU, flash style (contract: fastenc/ops/attention.py; summary: ../attention.h).
//
// Work is split into tasks of (sequence, head, query rows), balanced over threads by their cost (rows x keys
// seen), so packed sequences of unequal lengths load the threads evenly. A task brings its head's keys and
// values into float32 scratch once: K packed as panels of 16 keys ([d][16], so that a query row's product with 16
// keys is one FMA per d), V as rows. Then, per tile of kRows queries (pre-scaled by scale * log2(e), so that the
// softmax runs on exp2), it walks the keys in blocks of kBlock: S = Q K^T in 8 x 48 register tiles, the masks,
// the online softmax (running max and sum per row, in float32), and O += P V. Blocks that hold only padded keys,
// and blocks after the diagonal of a causal tile, are skipped. The backward is the same walk per head, over all
// its query tiles, recomputing P from the saved log-sum-exp: dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
// dQ += dS K, dK += dS^T Q. Each head's dK and dV belong to one task, so no atomics are needed.
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

// kRows query rows per tile: an 8 x 48 tile of S or of O is 24 accumulators (of 32 registers), loaded by 3 + 8
// loads per 24 FMAs.
// kBlock keys per softmax block: the rescale of O after each block costs 1 / kBlock of its product, and encoder
// sequences up to 256 tokens take one block (no rescale at all); a tile's block of S is 8 KiB, in L1.
constexpr int64_t kRows = 8, kLanes = 16, kBlock = 256;
constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
constexpr float kInf = std::numeric_limits<float>::infinity();

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

#pragma GCC push_options
#pragma GCC target("avx512f")

// 2^x on 16 lanes: round to the nearest integer n, 2^(x - n) by a degree-7 Taylor polynomial of e^(f ln 2) on
// |f| <= 1/2 (truncation error ~5e-9), times 2^n by scalef. x is clamped to [-200, 127]: 2^-200 rounds to 0, so
// masked scores (-inf) give exactly 0; max(lo, x) returns x where it is NaN, so NaN passes through.
FASTENC_INLINE __m512 exp2_16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-200.0f), x));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(kLn2));
  __m512 poly = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(poly, n);
}

// S[kRows][kBlock] = X[kRows][D] (row stride ldx) times `panels` panels of packed keys ([D][16] each), in tiles of
// kRows x (PANELS x 16).
template <int PANELS>
FASTENC_INLINE void scores_tile(const float* x, int64_t ldx, const float* panel, int64_t d_size, float* s) {
  __m512 acc[kRows][PANELS];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int c = 0; c < PANELS; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < d_size; ++d) {
    __m512 keys[PANELS];
#pragma GCC unroll 3
    for (int c = 0; c < PANELS; ++c) keys[c] = _mm512_loadu_ps(panel + (c * d_size + d) * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * ldx + d]);
#pragma GCC unroll 3
      for (int c = 0; c < PANELS; ++c) acc[r][c] = _mm512_fmadd_ps(xr, keys[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int c = 0; c < PANELS; ++c) _mm512_storeu_ps(s + r * kBlock + c * kLanes, acc[r][c]);
  }
}

void scores(const float* x, int64_t ldx, const float* panels, int64_t count, int64_t d_size, float* s) {
  int64_t c = 0;
  for (; c + 3 <= count; c += 3) scores_tile<3>(x, ldx, panels + c * d_size * kLanes, d_size, s + c * kLanes);
  if (c + 2 <= count) scores_tile<2>(x, ldx, panels + c * d_size * kLanes, d_size, s + c * kLanes), c += 2;
  if (c < count) scores_tile<1>(x, ldx, panels + c * d_size * kLanes, d_size, s + c * kLanes);
}

// Z[kRows][dp] += A (kRows x steps, element (i, t) at a[i * A_ROW + t * A_STEP]) times B[steps][dp] (row stride
// ldb), in kRows x (VECS x 16) register tiles. O += P V and dQ += dS K take A = P or dS (rows: queries, steps:
// keys); dV += P^T dO and dK += dS^T Q take their transposes (rows: 8 keys, steps: the tile's queries). A's
// strides are constants, so its addresses are as cheap as in a kernel written for one layout.
template <int VECS, int64_t A_ROW, int64_t A_STEP>
FASTENC_INLINE void accumulate_tile(const float* a, int64_t steps, const float* b, int64_t ldb, float* z,
                                    int64_t ldz) {
  __m512 acc[kRows][VECS];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_loadu_ps(z + r * ldz + c * kLanes);
  }
  for (int64_t t = 0; t < steps; ++t) {
    __m512 row[VECS];
#pragma GCC unroll 3
    for (int c = 0; c < VECS; ++c) row[c] = _mm512_loadu_ps(b + t * ldb + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * A_ROW + t * A_STEP]);
#pragma GCC unroll 3
      for (int c = 0; c < VECS; ++c) acc[r][c] = _mm512_fmadd_ps(ar, row[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int c = 0; c < VECS; ++c) _mm512_storeu_ps(z + r * ldz + c * kLanes, acc[r][c]);
  }
}

// accumulate_tile over the dp columns, 48 at a time.
template <int64_t A_ROW, int64_t A_STEP>
void accumulate(const float* a, int64_t steps, const float* b, int64_t ldb, float* z, int64_t ldz, int64_t dp) {
  int64_t c = 0;
  for (; c + 3 * kLanes <= dp; c += 3 * kLanes) accumulate_tile<3, A_ROW, A_STEP>(a, steps, b + c, ldb, z + c, ldz);
  if (c + 2 * kLanes <= dp) accumulate_tile<2, A_ROW, A_STEP>(a, steps, b + c, ldb, z + c, ldz), c += 2 * kLanes;
  if (c < dp) accumulate_tile<1, A_ROW, A_STEP>(a, steps, b + c, ldb, z + c, ldz);
}

// O[kRows][dp] += P[kRows][n] (row stride kBlock) times Y[n][dp] (row stride ldy).
void products(const float* p, int64_t n, const float* y, int64_t ldy, float* o, int64_t ldo, int64_t dp) {
  accumulate<kBlock, 1>(p, n, y, ldy, o, ldo, dp);
}

// Z[n][dp] += P[kRows][n]^T (P's row stride kBlock) times X[kRows][dp] (row stride ldx), kRows keys at a time;
// n is a multiple of 16 (P is zero past the block's keys).
void transposed_products(const float* p, int64_t n, const float* x, int64_t ldx, float* z, int64_t ldz,
                         int64_t dp) {
  for (int64_t j = 0; j < n; j += kRows) accumulate<1, kBlock>(p + j, kRows, x, ldx, z + j * ldz, ldz, dp);
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
  w.key_add.assign(round_up(end, kLanes), -kInf);
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

// `count` rows from row `first` of a head's operand (row stride `stride`) into float32 rows of dp floats, times
// mul; zero past the head's n rows and past d_size.
void load_rows(const float* src, int64_t stride, int64_t first, int64_t count, int64_t n, int64_t d_size,
               int64_t dp, float mul, float* dst) {
  for (int64_t r = 0; r < count; ++r) {
    float* row = dst + r * dp;
    const int64_t i = first + r;
    if (i >= n) {
      std::fill(row, row + dp, 0.0f);
      continue;
    }
    const float* from = src + i * stride;
    for (int64_t d = 0; d < d_size; ++d) row[d] = from[d] * mul;
    std::fill(row + d_size, row + dp, 0.0f);
  }
}

// Rows (a multiple of 16 of them, dp floats each) as panels of 16 rows, [d][16] for d < d_size.
void pack_panels(const float* rows, int64_t count, int64_t dp, int64_t d_size, float* panels) {
  for (int64_t c = 0; c < count / kLanes; ++c) {
    float* panel = panels + c * d_size * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      const float* row = rows + (c * kLanes + l) * dp;
      for (int64_t d = 0; d < d_size; ++d) panel[d * kLanes + l] = row[d];
    }
  }
}

// The block's scores S (kRows x n, scaled by log2(e) through Q) plus the bias (times log2(e)) and the keys'
// padding, with keys after a row's position removed when causal: -inf wherever a query may not see a key. With
// row_max, also each row's largest (in the same pass). keys: the head's keys worth reading (prepare_keys).
void mask_scores(const Problem& p, const Head& h, const Scratch& w, int64_t keys, int64_t i0, int64_t j0, int64_t n,
                 float* s, float* row_max) {
  const bool causal = p.causal && j0 + n - 1 > i0;
  const bool key_mask = w.padding_inside || j0 + n > keys;
  const bool changes = causal || key_mask || p.bias;
  if (!changes && !row_max) return;
  for (int64_t r = 0; r < kRows; ++r) {
    __m512 largest = _mm512_set1_ps(-kInf);
    const int64_t i = std::min(i0 + r, h.len_q - 1);  // rows past the head repeat its last row's masks
    const auto* bias_row = p.bias ? p.bias + h.batch * p.bias_stride[0] + h.head * p.bias_stride[1] +
                                        i * p.bias_stride[2]
                                  : nullptr;
    for (int64_t c = 0; c < n; c += kLanes) {
      const int64_t j = j0 + c;
      __m512 value = _mm512_loadu_ps(s + r * kBlock + c);
      if (key_mask) value = _mm512_add_ps(value, _mm512_loadu_ps(w.key_add.data() + j));
      if (bias_row) {
        __m512 b;
        if (p.bias_stride[3] == 1 && j + kLanes <= h.len_k) {
          b = _mm512_loadu_ps(bias_row + j);
        } else {
          alignas(64) float lanes[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) {
            lanes[l] = j + l < h.len_k ? bias_row[(j + l) * p.bias_stride[3]] : 0.0f;
          }
          b = _mm512_load_ps(lanes);
        }
        value = _mm512_fmadd_ps(b, _mm512_set1_ps(kLog2e), value);
      }
      if (causal) {
        const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)),
                                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        const __mmask16 after = _mm512_cmpgt_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(i)));
        value = _mm512_mask_blend_ps(after, value, _mm512_set1_ps(-kInf));
      }
      if (changes) _mm512_storeu_ps(s + r * kBlock + c, value);
      largest = _mm512_max_ps(largest, value);
    }
    if (row_max) row_max[r] = _mm512_reduce_max_ps(largest);
  }
}

// The keys rows [i0, i0 + kRows) may see: [0, end), fewer under a causal mask.
int64_t keys_seen(const Problem& p, int64_t keys, int64_t i0) {
  return p.causal ? std::min(keys, i0 + kRows) : keys;
}

void forward_task(const Problem& p, const Head& h, int64_t q0, int64_t q1, Scratch& w) {
  const int64_t d_size = p.head_dim, dp = round_up(d_size, kLanes);
  const int64_t keys = prepare_keys(p, h, w);
  const int64_t keys_needed = p.causal ? std::min(keys, q1) : keys;
  const int64_t padded = round_up(keys_needed, kLanes);
  w.k_rows.resize(padded * dp);
  w.k_panels.resize(padded * d_size);
  w.v_rows.resize(padded * dp);
  int64_t ks, vs, qs, os;
  const int64_t kb = head_base(p, kK, h, &ks), vb = head_base(p, kV, h, &vs);
  const int64_t qb = head_base(p, kQ, h, &qs), ob = head_base(p, kO, h, &os);
  load_rows(p.k + kb, ks, 0, padded, keys_needed, d_size, dp, 1.0f, w.k_rows.data());
  pack_panels(w.k_rows.data(), padded, dp, d_size, w.k_panels.data());
  load_rows(p.v + vb, vs, 0, padded, keys_needed, d_size, dp, 1.0f, w.v_rows.data());
  w.q_tile.resize(kRows * dp);
  w.o_tile.resize(kRows * dp);
  w.s.resize(kRows * kBlock);
  float* s = w.s.data();
  float* lse = p.lse_out + lse_base(p.lse_stride, p.packed, h);
  for (int64_t i0 = q0; i0 < q1; i0 += kRows) {
    load_rows(p.q + qb, qs, i0, kRows, h.len_q, d_size, dp, p.scale * kLog2e, w.q_tile.data());
    std::fill(w.o_tile.begin(), w.o_tile.end(), 0.0f);
    float row_max[kRows], row_sum[kRows];
    std::fill(row_max, row_max + kRows, -kInf);
    std::fill(row_sum, row_sum + kRows, 0.0f);
    const int64_t seen = keys_seen(p, keys_needed, i0);
    for (int64_t j0 = 0; j0 < seen; j0 += kBlock) {
      if (!w.block_live[j0 / kBlock]) continue;
      const int64_t n = round_up(std::min(kBlock, seen - j0), kLanes);
      scores(w.q_tile.data(), dp, w.k_panels.data() + j0 * d_size, n / kLanes, d_size, s);
      float block_max[kRows];
      mask_scores(p, h, w, keys_needed, i0, j0, n, s, block_max);
      for (int64_t r = 0; r < kRows; ++r) {
        float* sr = s + r * kBlock;
        const float new_max = std::max(row_max[r], block_max[r]);
        const float shift = new_max == -kInf ? 0.0f : new_max;  // a row that has seen no key yet stays at 0
        const __m512 shift16 = _mm512_set1_ps(shift);
        __m512 total = _mm512_setzero_ps();
        for (int64_t c = 0; c < n; c += kLanes) {
          const __m512 e = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(sr + c), shift16));
          _mm512_storeu_ps(sr + c, e);
          total = _mm512_add_ps(total, e);
        }
        const float alpha = row_max[r] == -kInf ? 0.0f : std::exp2(row_max[r] - shift);
        row_sum[r] = row_sum[r] * alpha + _mm512_reduce_add_ps(total);
        row_max[r] = new_max;
        if (alpha != 1.0f) {
          float* o = w.o_tile.data() + r * dp;
          for (int64_t d = 0; d < dp; d += kLanes) {
            _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(alpha)));
          }
        }
      }
      products(s, n, w.v_rows.data() + j0 * dp, dp, w.o_tile.data(), dp, dp);
    }
    for (int64_t r = 0; r < kRows && i0 + r < h.len_q; ++r) {
      const float inverse = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
      float* out = p.q_grad_or_out + ob + (i0 + r) * os;
      const float* o = w.o_tile.data() + r * dp;
      for (int64_t d = 0; d < d_size; ++d) out[d] = o[d] * inverse;
      lse[(i0 + r) * p.lse_stride[2]] = row_sum[r] > 0.0f ? (row_max[r] + std::log2(row_sum[r])) * kLn2 : kInf;
    }
  }
}

void backward_task(const Problem& p, const Head& h, Scratch& w) {
  const int64_t d_size = p.head_dim, dp = round_up(d_size, kLanes);
  const int64_t keys = prepare_keys(p, h, w);
  const int64_t padded = round_up(keys, kLanes);
  w.k_rows.resize(padded * dp);
  w.k_panels.resize(padded * d_size);
  w.v_rows.resize(padded * dp);
  w.v_panels.resize(padded * d_size);
  w.dk.assign(padded * dp, 0.0f);
  w.dv.assign(padded * dp, 0.0f);
  int64_t ks, vs, qs, os;
  const int64_t kb = head_base(p, kK, h, &ks), vb = head_base(p, kV, h, &vs);
  const int64_t qb = head_base(p, kQ, h, &qs), ob = head_base(p, kO, h, &os);
  load_rows(p.k + kb, ks, 0, padded, keys, d_size, dp, 1.0f, w.k_rows.data());
  pack_panels(w.k_rows.data(), padded, dp, d_size, w.k_panels.data());
  load_rows(p.v + vb, vs, 0, padded, keys, d_size, dp, 1.0f, w.v_rows.data());
  pack_panels(w.v_rows.data(), padded, dp, d_size, w.v_panels.data());
  w.q_tile.resize(kRows * dp);
  w.do_tile.resize(kRows * dp);
  w.o_tile.resize(kRows * dp);
  w.dq_tile.resize(kRows * dp);
  w.s.resize(kRows * kBlock);
  w.dp.resize(kRows * kBlock);
  float *s = w.s.data(), *dps = w.dp.data();
  const float* lse = p.lse + lse_base(p.lse_stride, p.packed, h);
  for (int64_t i0 = 0; i0 < h.len_q; i0 += kRows) {
    load_rows(p.q + qb, qs, i0, kRows, h.len_q, d_size, dp, p.scale * kLog2e, w.q_tile.data());
    load_rows(p.dout + ob, os, i0, kRows, h.len_q, d_size, dp, 1.0f, w.do_tile.data());
    load_rows(p.out + ob, os, i0, kRows, h.len_q, d_size, dp, 1.0f, w.o_tile.data());
    std::fill(w.dq_tile.begin(), w.dq_tile.end(), 0.0f);
    float lse2[kRows], delta[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      lse2[r] = i0 + r < h.len_q ? lse[(i0 + r) * p.lse_stride[2]] * kLog2e : kInf;
      float dot = 0.0f;
      for (int64_t d = 0; d < dp; ++d) dot += w.do_tile[r * dp + d] * w.o_tile[r * dp + d];
      delta[r] = dot;
    }
    const int64_t seen = keys_seen(p, keys, i0);
    for (int64_t j0 = 0; j0 < seen; j0 += kBlock) {
      if (!w.block_live[j0 / kBlock]) continue;
      const int64_t n = round_up(std::min(kBlock, seen - j0), kLanes);
      scores(w.q_tile.data(), dp, w.k_panels.data() + j0 * d_size, n / kLanes, d_size, s);
      mask_scores(p, h, w, keys, i0, j0, n, s, nullptr);
      for (int64_t r = 0; r < kRows; ++r) {
        float* sr = s + r * kBlock;
        const __m512 shift = _mm512_set1_ps(lse2[r]);
        for (int64_t c = 0; c < n; c += kLanes) {
          _mm512_storeu_ps(sr + c, exp2_16(_mm512_sub_ps(_mm512_loadu_ps(sr + c), shift)));
        }
      }
      transposed_products(s, n, w.do_tile.data(), dp, w.dv.data() + j0 * dp, dp, dp);
      scores(w.do_tile.data(), dp, w.v_panels.data() + j0 * d_size, n / kLanes, d_size, dps);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512 dr = _mm512_set1_ps(delta[r]);
        for (int64_t c = 0; c < n; c += kLanes) {
          float* ds = dps + r * kBlock + c;  // dS = P (dP - delta), in place of dP
          const __m512 pr = _mm512_loadu_ps(s + r * kBlock + c);
          _mm512_storeu_ps(ds, _mm512_mul_ps(pr, _mm512_sub_ps(_mm512_loadu_ps(ds), dr)));
        }
      }
      products(dps, n, w.k_rows.data() + j0 * dp, dp, w.dq_tile.data(), dp, dp);
      transposed_products(dps, n, w.q_tile.data(), dp, w.dk.data() + j0 * dp, dp, dp);
    }
    for (int64_t r = 0; r < kRows && i0 + r < h.len_q; ++r) {
      float* dq = p.q_grad_or_out + qb + (i0 + r) * qs;
      for (int64_t d = 0; d < d_size; ++d) dq[d] = w.dq_tile[r * dp + d] * p.scale;
    }
  }
  for (int64_t j = 0; j < h.len_k; ++j) {
    float* dk = p.k_grad + kb + j * ks;
    float* dv = p.v_grad + vb + j * vs;
    for (int64_t d = 0; d < d_size; ++d) {
      dk[d] = j < keys ? w.dk[j * dp + d] * kLn2 : 0.0f;
      dv[d] = j < keys ? w.dv[j * dp + d] : 0.0f;
    }
  }
}

#pragma GCC pop_options

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
  return std::max<int64_t>(round_up((longest + chunks - 1) / chunks, kRows), 8 * kRows);
}

}  // namespace

bool attention_cpu_available() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, bool is_causal, double scale) {
  TORCH_CHECK(attention_cpu_available(), "the native CPU attention needs a CPU with AVX-512");
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
  for_each_balanced(cost, [&](int64_t t, Scratch& scratch) {
    const auto& [head, first, end] = tasks[t];
    forward_task(p, heads[head], first, end, scratch);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, bool is_causal, double scale) {
  TORCH_CHECK(attention_cpu_available(), "the native CPU attention needs a CPU with AVX-512");
  const bool packed = cu_seqlens_q.has_value();
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
  for_each_balanced(cost, [&](int64_t t, Scratch& scratch) { backward_task(p, heads[t], scratch); });
  return {dq, dk, dv};
}

#else  // no x86 vector code: attention_cpu_available() is false and the Python side never selects these

bool attention_cpu_available() { return false; }

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const std::optional<at::Tensor>&,
                                                         const std::optional<at::Tensor>&,
                                                         const std::optional<at::Tensor>&,
                                                         const std::optional<at::Tensor>&, bool, double) {
  TORCH_CHECK(false, "the native CPU attention needs an x86 CPU with AVX-512");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, double) {
  TORCH_CHECK(false, "the native CPU attention needs an x86 CPU with AVX-512");
}

#endif

}  // namespace fastenc
