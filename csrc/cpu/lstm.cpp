// The LSTM's per-step CPU kernels: the fused cell (rows split over threads, each row's H columns in one vectorised
// loop) after a GEMM, and on x86 with AVX-512 the fused step (the recurrent product and the cell in one pass,
// forward and backward; below).
//
// float32 uses our own exp (below) so the loop vectorises: glibc's expf is a scalar call that gcc will not
// vectorise without -ffast-math, and a cell is ~5 transcendentals per element, which would cost more than the
// step's GEMM. The x86 row loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (target_clones). float64 (gradcheck, oracles) uses std::exp / std::tanh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTENC_FUSED_STEP 1
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <span>

#include "../lstm.h"
#include "simd.h"


namespace fastenc {
namespace {

// Rows handed to a thread at least: 64K gate elements, so a step of a small batch (32 x 4 x 256) stays on one
// thread: waking a second one costs more than its half of the step.
constexpr int64_t kGrainElements = 1 << 16;

// e^x = 2^k e^r with k = round(x log2 e) and r = x - k ln 2 (ln 2 in two parts, so r is exact), |r| <= ln2 / 2;
// e^r by its Taylor series to r^7 (truncation < 6e-9, under float32's rounding). The round uses the 1.5 * 2^23
// trick, whose bits also hold k. x is clamped so 2^k stays a normal float; NaN passes the clamp and the result.
FASTENC_INLINE float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float k = shifted - 12582912.0f;
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t k_int = std::bit_cast<int32_t>(shifted) - 0x4B400000;
  return p * std::bit_cast<float>((k_int + 127) << 23);
}

FASTENC_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// tanh: an odd polynomial near 0, where 1 - 2 / (e^{2|x|} + 1) would cancel; both sides are computed and one is
// selected, so the loop stays branch-free. The polynomial is the minimax fit used by Cephes' tanhf on |x| < 0.625.
FASTENC_INLINE float tanh_of(float x) {
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float near_zero = x + x * z * p;
  const float a = std::fabs(x);
  const float far = std::copysign(1.0f - 2.0f / (exp_f32(2.0f * a) + 1.0f), x);
  return a < 0.625f ? near_zero : far;
}

FASTENC_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
FASTENC_INLINE double tanh_of(double x) { return std::tanh(x); }

// Every loop below runs over distinct contiguous arrays, the shape gcc vectorises.
// y = sigmoid(a + b), y = tanh(a + b): the recurrent product plus the input projection, activated.
template <typename T>
FASTENC_INLINE void add_sigmoid(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = sigmoid(a[j] + b[j]);
}

template <typename T>
FASTENC_INLINE void add_tanh(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = tanh_of(a[j] + b[j]);
}

// Restrict-qualified parameters (not locals) are what tells gcc the gate slices do not overlap.
template <typename T>
FASTENC_INLINE void cell_state(const T* __restrict__ i, const T* __restrict__ f, const T* __restrict__ g,
                               const T* __restrict__ o, const T* __restrict__ c_prev, T* __restrict__ c,
                               T* __restrict__ r, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T c_t = f[j] * c_prev[j] + i[j] * g[j];
    c[j] = c_t;
    r[j] = o[j] * tanh_of(c_t);
  }
}

template <typename T>
FASTENC_INLINE void forward_row(const T* hw, const T* gx, const T* c_prev, T* gates, T* c, T* r, int64_t hidden) {
  add_sigmoid(hw, gx, gates, 2 * hidden);  // i, f
  add_tanh(hw + 2 * hidden, gx + 2 * hidden, gates + 2 * hidden, hidden);  // g
  add_sigmoid(hw + 3 * hidden, gx + 3 * hidden, gates + 3 * hidden, hidden);  // o
  cell_state(gates, gates + hidden, gates + 2 * hidden, gates + 3 * hidden, c_prev, c, r, hidden);
}

template <typename T>
FASTENC_INLINE void backward_gates(const T* __restrict__ i, const T* __restrict__ f, const T* __restrict__ g,
                                   const T* __restrict__ o, const T* __restrict__ c, const T* __restrict__ c_prev,
                                   const T* __restrict__ dr, T* __restrict__ dc, T* __restrict__ di,
                                   T* __restrict__ df, T* __restrict__ dg, T* __restrict__ d_o, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T tc = tanh_of(c[j]);
    const T dc_t = dc[j] + dr[j] * o[j] * (T(1) - tc * tc);
    di[j] = dc_t * g[j] * i[j] * (T(1) - i[j]);
    df[j] = dc_t * c_prev[j] * f[j] * (T(1) - f[j]);
    dg[j] = dc_t * i[j] * (T(1) - g[j] * g[j]);
    d_o[j] = dr[j] * tc * o[j] * (T(1) - o[j]);
    dc[j] = dc_t * f[j];
  }
}

template <typename T>
FASTENC_INLINE void backward_row(const T* gates, const T* c, const T* c_prev, const T* dr, T* dc, T* d_gates,
                                 int64_t hidden) {
  backward_gates(gates, gates + hidden, gates + 2 * hidden, gates + 3 * hidden, c, c_prev, dr, dc, d_gates,
                 d_gates + hidden, d_gates + 2 * hidden, d_gates + 3 * hidden, hidden);
}

template <typename T>
FASTENC_INLINE void forward_rows_loop(const T* hw, const T* gx, const T* c_prev, T* gates, T* c, T* r,
                                      int64_t rows, int64_t hidden) {
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t h = b * hidden;
    forward_row(hw + 4 * h, gx + 4 * h, c_prev + h, gates + 4 * h, c + h, r + h, hidden);
  }
}

template <typename T>
FASTENC_INLINE void backward_rows_loop(const T* gates, const T* c, const T* c_prev, const T* dr, T* dc, T* d_gates,
                                  int64_t rows, int64_t hidden) {
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t h = b * hidden;
    backward_row(gates + 4 * h, c + h, c_prev + h, dr + h, dc + h, d_gates + 4 * h, hidden);
  }
}

// The float32 row loops, multi-versioned (target_clones does not apply to templates); float64 runs the loop as is.
FASTENC_CPU_CLONES void forward_rows_f32(const float* hw, const float* gx, const float* c_prev, float* gates,
                                         float* c, float* r, int64_t rows, int64_t hidden) {
  forward_rows_loop(hw, gx, c_prev, gates, c, r, rows, hidden);
}

FASTENC_CPU_CLONES void backward_rows_f32(const float* gates, const float* c, const float* c_prev, const float* dr,
                                          float* dc, float* d_gates, int64_t rows, int64_t hidden) {
  backward_rows_loop(gates, c, c_prev, dr, dc, d_gates, rows, hidden);
}

void forward_rows(const float* hw, const float* gx, const float* c_prev, float* gates, float* c, float* r,
                  int64_t rows, int64_t hidden) {
  forward_rows_f32(hw, gx, c_prev, gates, c, r, rows, hidden);
}
void forward_rows(const double* hw, const double* gx, const double* c_prev, double* gates, double* c, double* r,
                  int64_t rows, int64_t hidden) {
  forward_rows_loop(hw, gx, c_prev, gates, c, r, rows, hidden);
}
void backward_rows(const float* gates, const float* c, const float* c_prev, const float* dr, float* dc,
                   float* d_gates, int64_t rows, int64_t hidden) {
  backward_rows_f32(gates, c, c_prev, dr, dc, d_gates, rows, hidden);
}
void backward_rows(const double* gates, const double* c, const double* c_prev, const double* dr, double* dc,
                   double* d_gates, int64_t rows, int64_t hidden) {
  backward_rows_loop(gates, c, c_prev, dr, dc, d_gates, rows, hidden);
}

// ---- The fused steps (x86 with AVX-512, float32): the recurrent product and the cell in one pass ----------------
// Both directions multiply a step's rows (R of them at a time) by a panel of 64 columns of W_hh (the forward also
// x_t by W_ih's, into the same accumulators: the input projection costs no GEMM, no pass over memory and no
// oneDNN setup per call), packed once per sequence as [panel][k][64] so that a panel is one contiguous stream
// (per step a thread streams all panels of both, ~2 MB at hidden 256, from L2 / L3; the FMAs still bound the
// step): R x 64 outputs are 4R zmm accumulators
// (R = 6: 24 of the 32 registers, + 4 for the panel's k-th row and 1 broadcast). The cell of a panel's units runs
// right after their product. Where the driver gives each thread a share of the batch (csrc/lstm.cpp; batches of
// 12 rows and more on 2 threads), a step runs on its share's thread; otherwise the threads split a step's panels
// (at::parallel_for splits them the same way every step, so each keeps its part of W_hh in its own L2).
// forward: a panel is the 4 gates (i f g o) of 16 units, [k][gate][16]; the cell of those 16 units follows.
// backward (no projection): a panel is 64 units of dh = d_gates_{t+1} W_hh (k over the 4H gates), zero-padded to
//           whole panels; the cell's backward of those units follows (a unit's needs only its own dh).
constexpr int64_t kPanel = 64, kBlockUnits = kPanel / 4, kTileRows = 6;

#ifdef FASTENC_FUSED_STEP
// Everything up to the matching pop is compiled for AVX-512 (lambdas included); only called where the CPU has it.
#pragma GCC push_options
#pragma GCC target("avx512f")

// exp_f32, sigmoid and tanh_of above on 16 lanes, the same algorithm and constants: rounding by roundscale and
// 2^k by scalef (exact for the clamped k). max(lo, x) / min(hi, x) return x where it is NaN, so NaN passes.
FASTENC_INLINE __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860682030941723e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float coefficient : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(coefficient));
  }
  return _mm512_scalef_ps(p, k);
}

FASTENC_INLINE __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

FASTENC_INLINE __m512 tanh16(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  for (const float coefficient : {2.06390887954e-2f, -5.37397155531e-2f, 1.33314422036e-1f, -3.33332819422e-1f}) {
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(coefficient));
  }
  const __m512 near_zero = _mm512_fmadd_ps(_mm512_mul_ps(x, z), p, x);
  const __m512 a = _mm512_abs_ps(x);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp16(_mm512_add_ps(a, a));
  const __m512 far = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
  const __m512 signed_far = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(far), sign));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ), signed_far, near_zero);
}

// The cell of a tile's rows (`tile` of them, from row 0 of each pointer) for one block of `units` (<= 16) units:
// pre (per row 4 gates x 16, the products) + the bias, at column gate * H + unit. gates is null where
// nothing keeps them (inference). Two passes: the rows' h = o tanh(c_t), each a latency-bound chain, come one
// after another, so the core overlaps them (after its row's gates, one would stall the next row's start).
FASTENC_INLINE void cell_tile(const float (*pre)[kPanel], int64_t tile, const float* bias, const float* c_prev,
                              float* gates, float* c, float* r, int64_t hidden, int64_t units) {
  const __mmask16 lanes = static_cast<__mmask16>((1u << units) - 1);
  __m512 c_t[kTileRows], o[kTileRows];
  for (int64_t row = 0; row < tile; ++row) {
    const auto pre_activation = [&](int64_t gate) {
      return _mm512_add_ps(_mm512_load_ps(pre[row] + gate * kBlockUnits),
                           _mm512_maskz_loadu_ps(lanes, bias + gate * hidden));
    };
    const __m512 i = sigmoid16(pre_activation(0)), f = sigmoid16(pre_activation(1)), g = tanh16(pre_activation(2));
    o[row] = sigmoid16(pre_activation(3));
    c_t[row] = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(lanes, c_prev + row * hidden), _mm512_mul_ps(i, g));
    if (gates != nullptr) {
      float* gates_row = gates + row * 4 * hidden;
      _mm512_mask_storeu_ps(gates_row, lanes, i);
      _mm512_mask_storeu_ps(gates_row + hidden, lanes, f);
      _mm512_mask_storeu_ps(gates_row + 2 * hidden, lanes, g);
      _mm512_mask_storeu_ps(gates_row + 3 * hidden, lanes, o[row]);
    }
    _mm512_mask_storeu_ps(c + row * hidden, lanes, c_t[row]);
  }
  for (int64_t row = 0; row < tile; ++row) {
    _mm512_mask_storeu_ps(r + row * hidden, lanes, _mm512_mul_ps(o[row], tanh16(c_t[row])));
  }
}

// A product's operand: rows (one pointer per row of a tile) of `depth` values, times a packed panel (depth x 64).
struct Operand {
  const float* rows[kTileRows];
  int64_t depth;
  const float* panel;
};

// out[i] = the sum over the operands of their row i times their panel, for the R rows of a tile.
template <int R>
void panel_tile(const Operand* operands, int count, float (*out)[kPanel]) {
  __m512 acc[R][4];
  for (auto& row : acc) {
    for (auto& v : row) v = _mm512_setzero_ps();
  }
  for (const Operand& op : std::span(operands, count)) {
    for (int64_t k = 0; k < op.depth; ++k) {
      const float* wk = op.panel + k * kPanel;
      const __m512 w[4] = {_mm512_load_ps(wk), _mm512_load_ps(wk + 16), _mm512_load_ps(wk + 32),
                           _mm512_load_ps(wk + 48)};
      for (int i = 0; i < R; ++i) {
        const __m512 x = _mm512_set1_ps(op.rows[i][k]);
        for (int v = 0; v < 4; ++v) acc[i][v] = _mm512_fmadd_ps(x, w[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < 4; ++v) _mm512_store_ps(out[i] + 16 * v, acc[i][v]);
  }
}

// panel_tile for n (1 .. kTileRows) rows.
void panel_rows(int64_t n, const Operand* operands, int count, float (*out)[kPanel]) {
  switch (n) {
    case 1: return panel_tile<1>(operands, count, out);
    case 2: return panel_tile<2>(operands, count, out);
    case 3: return panel_tile<3>(operands, count, out);
    case 4: return panel_tile<4>(operands, count, out);
    case 5: return panel_tile<5>(operands, count, out);
    default: return panel_tile<kTileRows>(operands, count, out);
  }
}

// Rows x (one panel: the 4 gates of 16 units, `units` of them real): h_prev (rows x depth) times the W_hh panel
// plus x (rows x input_size) times the W_ih panel, then the cell of those units. The unit offsets of bias, c_prev,
// gates, c and r are the caller's.
void step_panel(const float* h_prev, const float* x, int64_t rows, int64_t depth, int64_t input_size,
                const float* panel_hh, const float* panel_ih, const float* bias, const float* c_prev, float* gates,
                float* c, float* r, int64_t hidden, int64_t units) {
  alignas(64) float pre[kTileRows][kPanel];
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    const int64_t tile = std::min(kTileRows, rows - r0);
    Operand operands[2] = {{{}, depth, panel_hh}, {{}, input_size, panel_ih}};
    for (int64_t i = 0; i < tile; ++i) {
      operands[0].rows[i] = h_prev + (r0 + i) * depth;
      operands[1].rows[i] = x + (r0 + i) * input_size;
    }
    panel_rows(tile, operands, 2, pre);
    cell_tile(pre, tile, bias, c_prev + r0 * hidden, gates ? gates + r0 * 4 * hidden : nullptr, c + r0 * hidden,
              r + r0 * hidden, hidden, units);
  }
}

// One panel (units unit0 .. unit0 + units) of a backward step over `rows` rows, the first `continuing` of which
// feed d_gates_next (their rows of the next step) back. All pointers at row 0 / column 0.
void feedback_panel(const float* d_gates_next, int64_t continuing, const float* d_out, const float* d_hn,
                    const float* panel, const float* gates, const float* c, const float* c_prev, float* dc,
                    float* d_gates, int64_t rows, int64_t hidden, int64_t unit0, int64_t units) {
  alignas(64) float product[kTileRows][kPanel];
  float dr[kPanel];
  const int64_t depth = 4 * hidden;
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    const int64_t tile = std::min(kTileRows, rows - r0);
    const int64_t fed = std::clamp<int64_t>(continuing - r0, 0, tile);  // this tile's rows that feed back
    Operand next{{}, depth, panel};
    for (int64_t i = 0; i < fed; ++i) next.rows[i] = d_gates_next + (r0 + i) * depth;
    if (fed > 0) panel_rows(fed, &next, 1, product);
    for (int64_t i = 0; i < tile; ++i) {
      const int64_t row = r0 + i;
      const float* d_out_row = d_out + row * hidden + unit0;
      const float* tail = i < fed ? product[i] : d_hn + row * hidden + unit0;  // h_n's gradient where a row ends
      for (int64_t j = 0; j < units; ++j) dr[j] = d_out_row[j] + tail[j];
      const float* g = gates + row * 4 * hidden + unit0;
      float* dg = d_gates + row * 4 * hidden + unit0;
      backward_gates(g, g + hidden, g + 2 * hidden, g + 3 * hidden, c + row * hidden + unit0,
                     c_prev + row * hidden + unit0, dr, dc + row * hidden + unit0, dg, dg + hidden, dg + 2 * hidden,
                     dg + 3 * hidden, units);
    }
  }
}
// Transposes 16 rows of 16 floats in registers: rows[k] becomes column k. Within 128-bit lanes, unpack then
// shuffle_ps gather each lane's element m of 4 rows; shuffle_f32x4 twice then moves the 4 rows' lanes together.
FASTENC_INLINE void transpose16(__m512 (&rows)[16]) {
  __m512 pairs[16], quads[16];
  for (int i = 0; i < 16; i += 2) {
    pairs[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);      // per lane: r_i[0] r_i+1[0] r_i[1] r_i+1[1]
    pairs[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);  // per lane: r_i[2] r_i+1[2] r_i[3] r_i+1[3]
  }
  for (int j = 0; j < 16; j += 4) {  // quads[j + m], lane L: element 4L + m of rows j .. j + 3
    quads[j] = _mm512_shuffle_ps(pairs[j], pairs[j + 2], 0x44);
    quads[j + 1] = _mm512_shuffle_ps(pairs[j], pairs[j + 2], 0xEE);
    quads[j + 2] = _mm512_shuffle_ps(pairs[j + 1], pairs[j + 3], 0x44);
    quads[j + 3] = _mm512_shuffle_ps(pairs[j + 1], pairs[j + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 low_a = _mm512_shuffle_f32x4(quads[m], quads[4 + m], 0x44);    // lanes 0 1 of rows 0-7
    const __m512 high_a = _mm512_shuffle_f32x4(quads[m], quads[4 + m], 0xEE);   // lanes 2 3 of rows 0-7
    const __m512 low_b = _mm512_shuffle_f32x4(quads[8 + m], quads[12 + m], 0x44);
    const __m512 high_b = _mm512_shuffle_f32x4(quads[8 + m], quads[12 + m], 0xEE);
    rows[m] = _mm512_shuffle_f32x4(low_a, low_b, 0x88);
    rows[4 + m] = _mm512_shuffle_f32x4(low_a, low_b, 0xDD);
    rows[8 + m] = _mm512_shuffle_f32x4(high_a, high_b, 0x88);
    rows[12 + m] = _mm512_shuffle_f32x4(high_a, high_b, 0xDD);
  }
}

// W's rows [row0, row0 + units) (units <= 16; row stride `depth`) transposed into out[k * kPanel + u], k < depth,
// the missing units zero: one gate of one forward panel. 16 x 16 blocks through registers.
void pack_gate_block(const float* w, int64_t row0, int64_t units, int64_t depth, float* out) {
  for (int64_t k0 = 0; k0 < depth; k0 += 16) {
    const int64_t width = std::min<int64_t>(16, depth - k0);
    const __mmask16 columns = static_cast<__mmask16>((1u << width) - 1);
    __m512 block[16];
    for (int64_t u = 0; u < 16; ++u) {
      block[u] = u < units ? _mm512_maskz_loadu_ps(columns, w + (row0 + u) * depth + k0) : _mm512_setzero_ps();
    }
    transpose16(block);
    for (int64_t k = 0; k < width; ++k) _mm512_storeu_ps(out + (k0 + k) * kPanel, block[k]);
  }
}

#pragma GCC pop_options
#endif

int64_t row_grain(int64_t hidden) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(4 * hidden, 1)); }

}  // namespace

void lstm_cell_forward_cpu(const at::Tensor& hw, const at::Tensor& gates_x, const at::Tensor& c_prev,
                           at::Tensor& gates, at::Tensor& c, at::Tensor& r) {
  const int64_t rows = gates.size(0), hidden = c.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_cell_forward_cpu", [&] {
    const scalar_t* a = hw.data_ptr<scalar_t>();
    const scalar_t* gx = gates_x.data_ptr<scalar_t>();
    scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* cp = c_prev.data_ptr<scalar_t>();
    scalar_t* cc = c.data_ptr<scalar_t>();
    scalar_t* rr = r.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
      const int64_t h = begin * hidden;
      forward_rows(a + 4 * h, gx + 4 * h, cp + h, g + 4 * h, cc + h, rr + h, end - begin, hidden);
    });
  });
}

void lstm_cell_backward_cpu(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
                            const at::Tensor& dr, at::Tensor& dc, at::Tensor& d_gates) {
  const int64_t rows = gates.size(0), hidden = c.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_cell_backward_cpu", [&] {
    const scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* cc = c.data_ptr<scalar_t>();
    const scalar_t* cp = c_prev.data_ptr<scalar_t>();
    const scalar_t* d = dr.data_ptr<scalar_t>();
    scalar_t* dcc = dc.data_ptr<scalar_t>();
    scalar_t* dg = d_gates.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(hidden), [&](int64_t begin, int64_t end) {
      const int64_t h = begin * hidden;
      backward_rows(g + 4 * h, cc + h, cp + h, d + h, dcc + h, dg + 4 * h, end - begin, hidden);
    });
  });
}

bool lstm_fused_step_cpu_available() {
#ifdef FASTENC_FUSED_STEP
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
#else
  return false;
#endif
}

// The packs write a panel per task (a copy through zeros, a strided copy and a permute was three serial passes:
// ~0.25 ms of a forward at hidden 256, more than two steps; the forward's scalar transpose, ~0.13 ms).
at::Tensor lstm_pack_forward_cpu(const at::Tensor& weight) {
#ifdef FASTENC_FUSED_STEP
  const int64_t hidden = weight.size(0) / 4, depth = weight.size(1), panels = (hidden + kBlockUnits - 1) / kBlockUnits;
  const auto w = weight.contiguous();
  auto packed = at::empty({panels, depth, 4, kBlockUnits}, w.options());  // [panel][k][gate][unit]
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t unit0 = p * kBlockUnits, units = std::min(kBlockUnits, hidden - unit0);
      for (int64_t gate = 0; gate < 4; ++gate) {
        pack_gate_block(src, gate * hidden + unit0, units, depth, dst + p * depth * kPanel + gate * kBlockUnits);
      }
    }
  });
  return packed;
#else
  TORCH_CHECK(false, "the fused LSTM step needs an x86 build (lstm_fused_step_cpu_available says so)");
#endif
}

void lstm_step_forward_cpu(const float* h_prev, const float* x, int64_t rows, int64_t proj, int64_t input_size,
                           int64_t hidden, const at::Tensor& packed_hh, const at::Tensor& packed_ih, const float* bias,
                           const float* c_prev, float* gates, float* c, float* r) {
#ifdef FASTENC_FUSED_STEP
  const float* w_hh = packed_hh.data_ptr<float>();
  const float* w_ih = packed_ih.data_ptr<float>();
  at::parallel_for(0, packed_hh.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t unit = p * kBlockUnits;
      step_panel(h_prev, x, rows, proj, input_size, w_hh + p * proj * kPanel, w_ih + p * input_size * kPanel,
                 bias + unit, c_prev + unit, gates ? gates + unit : nullptr, c + unit, r + unit, hidden,
                 std::min(kBlockUnits, hidden - unit));
    }
  });
#else
  TORCH_CHECK(false, "the fused LSTM step needs an x86 build (lstm_fused_step_cpu_available says so)");
#endif
}

at::Tensor lstm_pack_feedback_cpu(const at::Tensor& w_hh) {
  const int64_t depth = w_hh.size(0), hidden = w_hh.size(1), panels = (hidden + kPanel - 1) / kPanel;
  const auto w = w_hh.contiguous();
  auto packed = at::empty({panels, depth, kPanel}, w.options());  // [panel][k][64 units]
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t unit0 = p * kPanel, units = std::min(kPanel, hidden - unit0);
      for (int64_t k = 0; k < depth; ++k) {
        float* row = dst + (p * depth + k) * kPanel;
        std::copy_n(src + k * hidden + unit0, units, row);
        std::fill(row + units, row + kPanel, 0.0f);  // zero padding
      }
    }
  });
  return packed;
}

void lstm_step_backward_cpu(const float* d_gates_next, int64_t continuing, const float* d_out, const float* d_hn,
                            const at::Tensor& packed, const float* gates, const float* c, const float* c_prev,
                            float* dc, float* d_gates, int64_t rows, int64_t hidden) {
#ifdef FASTENC_FUSED_STEP
  const float* w = packed.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t unit0 = p * kPanel;
      feedback_panel(d_gates_next, continuing, d_out, d_hn, w + p * 4 * hidden * kPanel, gates, c, c_prev, dc,
                     d_gates, rows, hidden, unit0, std::min(kPanel, hidden - unit0));
    }
  });
#else
  TORCH_CHECK(false, "the fused LSTM step needs an x86 build (lstm_fused_step_cpu_available says so)");
#endif
}

}  // namespace fastenc
