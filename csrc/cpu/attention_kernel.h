// The per-task code of the CPU attention (see attention.cpp), written once over a vector type `Vec` and included
// by attention.cpp once per instruction set, inside a namespace and a `#pragma GCC target` of its own, so that
// each copy is compiled for its target only. No include guard, on purpose. Before including, the includer
// defines `Vec` (kLanes floats in a register type R, with load / store / set1 / zero / fmadd / add / sub / mul /
// max, horizontal reduce_add / reduce_max, exp2, and mask_after(value, j, i): -inf in the lanes of keys
// j + lane > i) and kRows, the query rows of a register tile, sized so that a tile of kRows x 3 vectors of
// accumulators, 3 loaded vectors and a broadcast fit the target's vector registers.

constexpr int64_t kLanes = Vec::kLanes;

// S[kRows][kBlock] = X[kRows][D] (row stride ldx) times PANELS panels of packed keys ([D][kLanes] each), in tiles
// of kRows x (PANELS x kLanes).
template <int PANELS>
FASTENC_INLINE void scores_tile(const float* x, int64_t ldx, const float* panel, int64_t d_size, float* s) {
  typename Vec::R acc[kRows][PANELS];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int c = 0; c < PANELS; ++c) acc[r][c] = Vec::zero();
  }
  for (int64_t d = 0; d < d_size; ++d) {
    typename Vec::R keys[PANELS];
#pragma GCC unroll 3
    for (int c = 0; c < PANELS; ++c) keys[c] = Vec::load(panel + (c * d_size + d) * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const auto xr = Vec::set1(x[r * ldx + d]);
#pragma GCC unroll 3
      for (int c = 0; c < PANELS; ++c) acc[r][c] = Vec::fmadd(xr, keys[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int c = 0; c < PANELS; ++c) Vec::store(s + r * kBlock + c * kLanes, acc[r][c]);
  }
}

void scores(const float* x, int64_t ldx, const float* panels, int64_t count, int64_t d_size, float* s) {
  int64_t c = 0;
  for (; c + 3 <= count; c += 3) scores_tile<3>(x, ldx, panels + c * d_size * kLanes, d_size, s + c * kLanes);
  if (c + 2 <= count) scores_tile<2>(x, ldx, panels + c * d_size * kLanes, d_size, s + c * kLanes), c += 2;
  if (c < count) scores_tile<1>(x, ldx, panels + c * d_size * kLanes, d_size, s + c * kLanes);
}

// Z[kRows][dp] += A (kRows x steps, element (i, t) at a[i * A_ROW + t * A_STEP]) times B[steps][dp] (row stride
// ldb), in kRows x (VECS x kLanes) register tiles. O += P V and dQ += dS K take A = P or dS (rows: queries,
// steps: keys); dV += P^T dO and dK += dS^T Q take their transposes (rows: kRows keys, steps: the tile's
// queries). A's strides are constants, so its addresses are as cheap as in a kernel written for one layout.
template <int VECS, int64_t A_ROW, int64_t A_STEP>
FASTENC_INLINE void accumulate_tile(const float* a, int64_t steps, const float* b, int64_t ldb, float* z,
                                    int64_t ldz) {
  typename Vec::R acc[kRows][VECS];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int c = 0; c < VECS; ++c) acc[r][c] = Vec::load(z + r * ldz + c * kLanes);
  }
  for (int64_t t = 0; t < steps; ++t) {
    typename Vec::R row[VECS];
#pragma GCC unroll 3
    for (int c = 0; c < VECS; ++c) row[c] = Vec::load(b + t * ldb + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const auto ar = Vec::set1(a[r * A_ROW + t * A_STEP]);
#pragma GCC unroll 3
      for (int c = 0; c < VECS; ++c) acc[r][c] = Vec::fmadd(ar, row[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 3
    for (int c = 0; c < VECS; ++c) Vec::store(z + r * ldz + c * kLanes, acc[r][c]);
  }
}

// accumulate_tile over the dp columns, 3 vectors at a time.
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
// n is a multiple of kLanes, hence of kRows (P is zero past the block's keys).
void transposed_products(const float* p, int64_t n, const float* x, int64_t ldx, float* z, int64_t ldz,
                         int64_t dp) {
  for (int64_t j = 0; j < n; j += kRows) accumulate<1, kBlock>(p + j, kRows, x, ldx, z + j * ldz, ldz, dp);
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

// Rows (a multiple of kLanes of them, dp floats each) as panels of kLanes rows, [d][kLanes] for d < d_size.
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
    auto largest = Vec::set1(-kInf);
    const int64_t i = std::min(i0 + r, h.len_q - 1);  // rows past the head repeat its last row's masks
    const auto* bias_row = p.bias ? p.bias + h.batch * p.bias_stride[0] + h.head * p.bias_stride[1] +
                                        i * p.bias_stride[2]
                                  : nullptr;
    for (int64_t c = 0; c < n; c += kLanes) {
      const int64_t j = j0 + c;
      auto value = Vec::load(s + r * kBlock + c);
      if (key_mask) value = Vec::add(value, Vec::load(w.key_add.data() + j));
      if (bias_row) {
        typename Vec::R b;
        if (p.bias_stride[3] == 1 && j + kLanes <= h.len_k) {
          b = Vec::load(bias_row + j);
        } else {
          float lanes[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) {
            lanes[l] = j + l < h.len_k ? bias_row[(j + l) * p.bias_stride[3]] : 0.0f;
          }
          b = Vec::load(lanes);
        }
        value = Vec::fmadd(b, Vec::set1(kLog2e), value);
      }
      if (causal) value = Vec::mask_after(value, j, i);
      if (changes) Vec::store(s + r * kBlock + c, value);
      largest = Vec::max(largest, value);
    }
    if (row_max) row_max[r] = Vec::reduce_max(largest);
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
        const auto shift_all = Vec::set1(shift);
        auto total = Vec::zero();
        for (int64_t c = 0; c < n; c += kLanes) {
          const auto e = Vec::exp2(Vec::sub(Vec::load(sr + c), shift_all));
          Vec::store(sr + c, e);
          total = Vec::add(total, e);
        }
        const float alpha = row_max[r] == -kInf ? 0.0f : std::exp2(row_max[r] - shift);
        row_sum[r] = row_sum[r] * alpha + Vec::reduce_add(total);
        row_max[r] = new_max;
        if (alpha != 1.0f) {
          float* o = w.o_tile.data() + r * dp;
          for (int64_t d = 0; d < dp; d += kLanes) Vec::store(o + d, Vec::mul(Vec::load(o + d), Vec::set1(alpha)));
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
        const auto shift = Vec::set1(lse2[r]);
        for (int64_t c = 0; c < n; c += kLanes) Vec::store(sr + c, Vec::exp2(Vec::sub(Vec::load(sr + c), shift)));
      }
      transposed_products(s, n, w.do_tile.data(), dp, w.dv.data() + j0 * dp, dp, dp);
      scores(w.do_tile.data(), dp, w.v_panels.data() + j0 * d_size, n / kLanes, d_size, dps);
      for (int64_t r = 0; r < kRows; ++r) {
        const auto dr = Vec::set1(delta[r]);
        for (int64_t c = 0; c < n; c += kLanes) {
          float* ds = dps + r * kBlock + c;  // dS = P (dP - delta), in place of dP
          Vec::store(ds, Vec::mul(Vec::load(s + r * kBlock + c), Vec::sub(Vec::load(ds), dr)));
        }
        if (p.bias_grad != nullptr && i0 + r < h.len_q) {  // the bias adds to the scores: its gradient is dS
          const int64_t* g = p.bias_grad_stride;
          float* row = p.bias_grad + h.batch * g[0] + h.head * g[1] + (i0 + r) * g[2] + j0;
          std::copy(dps + r * kBlock, dps + r * kBlock + std::min(n, h.len_k - j0), row);
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
