// Residual-add + LayerNorm on CPU: rows split over threads with at::parallel_for.
//
// Each row is brought once into a small op-math scratch row (it stays in L1/L2), then the passes over it (mean,
// centred variance, output) run from there. Row reductions use kLanes independent accumulators: without
// -ffast-math gcc may not reorder a single floating-point sum, but it does vectorise independent ones.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../layer_norm.h"
#include "partials.h"
#include "simd.h"

namespace fastenc {
namespace {

// Four AVX-512 registers of float32: an add's latency is hidden behind the three other chains.
constexpr int64_t kLanes = 64;
// Rows handed to a thread at least: ~32K elements, so small problems are not split into tiny chunks.
constexpr int64_t kGrainElements = 32768;

int64_t row_grain(int64_t n) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(n, 1)); }

// Rows are summed in blocks of kSumBlock elements, each in kLanes independent accumulators, and the block totals
// in double: a wide row (a normalized_shape of millions of elements) then keeps the accuracy of a short one
// instead of drifting with its length.
constexpr int64_t kSumBlock = 4096;

template <typename acc_t, typename Term>
FASTENC_INLINE acc_t blocked_row_sum(int64_t n, Term term) {
  double total = 0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = std::min(n, start + kSumBlock);
    acc_t lane[kLanes] = {};
    int64_t j = start;
    for (; j + kLanes <= end; j += kLanes) {
      for (int64_t k = 0; k < kLanes; ++k) lane[k] += term(j + k);
    }
    for (int64_t width = kLanes / 2; width > 0; width /= 2) {  // pairwise, so the wide halves stay vector adds
      for (int64_t k = 0; k < width; ++k) lane[k] += lane[k + width];
    }
    acc_t block = lane[0];
    for (; j < end; ++j) block += term(j);
    total += block;
  }
  return static_cast<acc_t>(total);
}

template <typename acc_t>
FASTENC_INLINE acc_t row_sum(const acc_t* v, int64_t n) {
  return blocked_row_sum<acc_t>(n, [v](int64_t j) __attribute__((always_inline)) { return v[j]; });
}

// Sum of squared deviations from `mean` (the second pass of a two-pass variance).
template <typename acc_t>
FASTENC_INLINE acc_t row_sum_sq_dev(const acc_t* v, acc_t mean, int64_t n) {
  return blocked_row_sum<acc_t>(n, [v, mean](int64_t j) __attribute__((always_inline)) {
    const acc_t d = v[j] - mean;
    return d * d;
  });
}

// y = (v - mean) * rstd [* w] [+ b], written in scalar_t; the four cases are separate loops so each vectorises.
template <bool kWeight, bool kBias, typename scalar_t, typename acc_t>
FASTENC_INLINE void normalize_row(const acc_t* v, const acc_t* w, const acc_t* b, acc_t mean, acc_t rstd,
                                  scalar_t* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t out = (v[j] - mean) * rstd;
    if constexpr (kWeight) out *= w[j];
    if constexpr (kBias) out += b[j];
    y[j] = static_cast<scalar_t>(out);
  }
}

template <typename scalar_t, typename acc_t>
FASTENC_INLINE void normalize_row(const acc_t* v, const acc_t* w, const acc_t* b, acc_t mean, acc_t rstd,
                                  scalar_t* y, int64_t n) {
  if (w && b) {
    normalize_row<true, true>(v, w, b, mean, rstd, y, n);
  } else if (w) {
    normalize_row<true, false>(v, w, b, mean, rstd, y, n);
  } else if (b) {
    normalize_row<false, true>(v, w, b, mean, rstd, y, n);
  } else {
    normalize_row<false, false>(v, w, b, mean, rstd, y, n);
  }
}

// Rows [begin, end); `scratch` holds n op-math values.
template <typename scalar_t, typename acc_t>
FASTENC_INLINE void forward_rows(const scalar_t* x, const scalar_t* residual, const acc_t* w, const acc_t* b,
                                 scalar_t* y, scalar_t* sum, acc_t* mean_out, acc_t* rstd_out, int64_t n, acc_t eps,
                                 int64_t begin, int64_t end, acc_t* scratch) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * n;
    const scalar_t* xr = x + off;
    const acc_t* v = scratch;
    if (residual) {
      // Round the sum to scalar_t as torch's `x + residual` would, then normalise the rounded value.
      const scalar_t* rr = residual + off;
      acc_t* dst = scratch;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (sum) dst = sum + off;  // float / double: the stored sum row doubles as the scratch row
        for (int64_t j = 0; j < n; ++j) dst[j] = xr[j] + rr[j];
      } else {
        scalar_t* sr = sum ? sum + off : nullptr;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t s = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) + static_cast<acc_t>(rr[j]));
          dst[j] = static_cast<acc_t>(s);
          if (sr) sr[j] = s;
        }
      }
      v = dst;
    } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v = xr;
    } else {
      for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<acc_t>(xr[j]);
    }
    const acc_t mean = row_sum(v, n) / static_cast<acc_t>(n);
    const acc_t var = row_sum_sq_dev(v, mean, n) / static_cast<acc_t>(n);
    const acc_t rstd = acc_t(1) / std::sqrt(var + eps);
    mean_out[row] = mean;
    rstd_out[row] = rstd;
    normalize_row(v, w, b, mean, rstd, y + off, n);
  }
}

// The float32 rows, multi-versioned (target_clones does not apply to templates); other dtypes run the template.
FASTENC_CPU_CLONES void forward_rows_f32(const float* x, const float* residual, const float* w, const float* b,
                                         float* y, float* sum, float* mean_out, float* rstd_out, int64_t n, float eps,
                                         int64_t begin, int64_t end, float* scratch) {
  forward_rows(x, residual, w, b, y, sum, mean_out, rstd_out, n, eps, begin, end, scratch);
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* x, const scalar_t* residual, const acc_t* w, const acc_t* b, scalar_t* y,
                    scalar_t* sum, acc_t* mean_out, acc_t* rstd_out, int64_t m, int64_t n, acc_t eps) {
  at::parallel_for(0, m, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(n);
    if constexpr (std::is_same_v<scalar_t, float>) {
      forward_rows_f32(x, residual, w, b, y, sum, mean_out, rstd_out, n, eps, begin, end, scratch.data());
    } else {
      forward_rows(x, residual, w, b, y, sum, mean_out, rstd_out, n, eps, begin, end, scratch.data());
    }
  });
}

// Accumulators of the backward's row sums: one vector register of float32 lanes under AVX-512.
constexpr int64_t kBackwardLanes = 16;

// The backward's first pass over one row: sum(g) and sum(g * xhat), g = dy [* w], xhat = (xs - mean) * rstd, in
// independent lanes (see row_sum), and the row's dweight / dbias terms added into dw / db.
template <bool kWeight, bool kBias, typename scalar_t, typename acc_t>
FASTENC_INLINE void backward_row_sums(const scalar_t* __restrict dy, const scalar_t* __restrict xs,
                                      const acc_t* __restrict w, acc_t mu, acc_t rs, acc_t* __restrict dw,
                                      acc_t* __restrict db, int64_t n, acc_t& sum_g, acc_t& sum_gx) {
  acc_t lane_g[kBackwardLanes];
  acc_t lane_gx[kBackwardLanes];
  const auto accumulate = [&](int64_t j, int64_t k) __attribute__((always_inline)) {
    const acc_t d = static_cast<acc_t>(dy[j + k]);
    const acc_t xhat = (static_cast<acc_t>(xs[j + k]) - mu) * rs;
    const acc_t g = kWeight ? d * w[j + k] : d;
    lane_g[k] += g;
    lane_gx[k] += g * xhat;
    if constexpr (kWeight) dw[j + k] += d * xhat;
    if constexpr (kBias) db[j + k] += d;
  };
  double total_g = 0, total_gx = 0;  // block totals in double, as in blocked_row_sum
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = std::min(n, start + kSumBlock);
    std::fill_n(lane_g, kBackwardLanes, acc_t(0));
    std::fill_n(lane_gx, kBackwardLanes, acc_t(0));
    for (int64_t j = start; j < end; j += kBackwardLanes) {
      const int64_t width = std::min(kBackwardLanes, end - j);
      if (width == kBackwardLanes) {  // a constant trip count: vectorised
        for (int64_t k = 0; k < kBackwardLanes; ++k) accumulate(j, k);
      } else {
        for (int64_t k = 0; k < width; ++k) accumulate(j, k);
      }
    }
    for (int64_t k = 0; k < kBackwardLanes; ++k) {
      total_g += lane_g[k];
      total_gx += lane_gx[k];
    }
  }
  sum_g = static_cast<acc_t>(total_g);
  sum_gx = static_cast<acc_t>(total_gx);
}

// dx for rows [begin, end), and their dweight / dbias contributions added into dw / db (this chunk's own rows).
// Two fused passes over each row, as torch's kernel has it: the first reads dy and xs once for the row sums and
// the parameter gradients, the second (the row still in L1 / L2) writes dx. No scratch rows: each element is
// widened and normalised where it is used. (dw is given exactly when w is.)
template <typename scalar_t, typename acc_t>
FASTENC_INLINE void backward_rows(const scalar_t* __restrict dy, const scalar_t* __restrict dsum,
                                  const scalar_t* __restrict xs, const acc_t* __restrict w,
                                  const acc_t* __restrict mean, const acc_t* __restrict rstd, scalar_t* __restrict dx,
                                  acc_t* __restrict dw, acc_t* __restrict db, int64_t n, int64_t begin, int64_t end) {
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * n;
    const scalar_t* __restrict dyr = dy + off;
    const scalar_t* __restrict xr = xs + off;
    const acc_t mu = mean[row];
    const acc_t rs = rstd[row];
    acc_t sum_g, sum_gx;
    if (w && db) {
      backward_row_sums<true, true>(dyr, xr, w, mu, rs, dw, db, n, sum_g, sum_gx);
    } else if (w) {
      backward_row_sums<true, false>(dyr, xr, w, mu, rs, dw, db, n, sum_g, sum_gx);
    } else if (db) {
      backward_row_sums<false, true>(dyr, xr, w, mu, rs, dw, db, n, sum_g, sum_gx);
    } else {
      backward_row_sums<false, false>(dyr, xr, w, mu, rs, dw, db, n, sum_g, sum_gx);
    }
    const acc_t mean_g = sum_g * inv_n;
    const acc_t mean_gx = sum_gx * inv_n;
    scalar_t* __restrict dxr = dx + off;
    if (dsum) {
      const scalar_t* __restrict dsr = dsum + off;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t d = static_cast<acc_t>(dyr[i]);
        const acc_t xhat = (static_cast<acc_t>(xr[i]) - mu) * rs;
        const acc_t g = w ? d * w[i] : d;
        dxr[i] = static_cast<scalar_t>(rs * (g - mean_g - xhat * mean_gx) + static_cast<acc_t>(dsr[i]));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const acc_t d = static_cast<acc_t>(dyr[i]);
        const acc_t xhat = (static_cast<acc_t>(xr[i]) - mu) * rs;
        const acc_t g = w ? d * w[i] : d;
        dxr[i] = static_cast<scalar_t>(rs * (g - mean_g - xhat * mean_gx));
      }
    }
  }
}

// The float32 rows, multi-versioned (target_clones does not apply to templates); other dtypes run the template.
FASTENC_CPU_CLONES void backward_rows_f32(const float* dy, const float* dsum, const float* xs, const float* w,
                                          const float* mean, const float* rstd, float* dx, float* dw, float* db,
                                          int64_t n, int64_t begin, int64_t end) {
  backward_rows(dy, dsum, xs, w, mean, rstd, dx, dw, db, n, begin, end);
}

template <typename scalar_t, typename acc_t>
void backward_rows_any(const scalar_t* dy, const scalar_t* dsum, const scalar_t* xs, const acc_t* w,
                       const acc_t* mean, const acc_t* rstd, scalar_t* dx, acc_t* dw, acc_t* db, int64_t n,
                       int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    backward_rows_f32(dy, dsum, xs, w, mean, rstd, dx, dw, db, n, begin, end);
  } else {
    backward_rows(dy, dsum, xs, w, mean, rstd, dx, dw, db, n, begin, end);
  }
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* dy, const scalar_t* dsum, const scalar_t* xs, const acc_t* w, const acc_t* mean,
                     const acc_t* rstd, scalar_t* dx, acc_t* dw_partial, acc_t* db_partial, int64_t m, int64_t n,
                     int64_t chunks) {
  // Chunk c owns rows [c*m/chunks, (c+1)*m/chunks) and row c of the partial buffers: no two threads write the same
  // memory, and the caller sums the partials in chunk order, so the result depends only on `chunks`.
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      backward_rows_any(dy, dsum, xs, w, mean, rstd, dx, dw_partial ? dw_partial + c * n : nullptr,
                    db_partial ? db_partial + c * n : nullptr, n, c * m / chunks, (c + 1) * m / chunks);
    }
  });
}

at::ScalarType stat_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// weight / bias in the op-math dtype, contiguous (a no-op for float32 / float64 parameters).
std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value()) return std::nullopt;
  return p->to(acc).contiguous();
}

}  // namespace

LayerNormForward layer_norm_forward_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
                                        const std::optional<at::Tensor>& weight_in,
                                        const std::optional<at::Tensor>& bias_in, double eps, bool store_sum) {
  const at::Tensor x = x_in.contiguous();
  const std::optional<at::Tensor> residual =
      residual_in.has_value() ? std::optional<at::Tensor>(residual_in->contiguous()) : std::nullopt;
  const int64_t m = x.size(0), n = x.size(1);
  const auto acc = stat_type(x.scalar_type());
  const auto weight = as_acc(weight_in, acc);
  const auto bias = as_acc(bias_in, acc);

  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor sum = store_sum && residual ? at::empty({m, n}, x.options()) : x.new_empty({0});
  at::Tensor mean = at::empty({m}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({m}, x.options().dtype(acc));
  if (m == 0) return {y, sum, mean, rstd};
  if (n == 0) {  // the mean of nothing, as torch has it
    mean.fill_(NAN);
    rstd.fill_(NAN);
    return {y, sum, mean, rstd};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastenc_layer_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), residual ? residual->const_data_ptr<scalar_t>() : nullptr,
        weight ? weight->const_data_ptr<acc_t>() : nullptr, bias ? bias->const_data_ptr<acc_t>() : nullptr,
        y.mutable_data_ptr<scalar_t>(), sum.numel() ? sum.mutable_data_ptr<scalar_t>() : nullptr,
        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), m, n, static_cast<acc_t>(eps));
  });
  return {y, sum, mean, rstd};
}

LayerNormBackward layer_norm_backward_cpu(const at::Tensor& dy_in, const std::optional<at::Tensor>& dsum_in,
                                          const at::Tensor& xs_in, const std::optional<at::Tensor>& weight_in,
                                          const at::Tensor& mean_in, const at::Tensor& rstd_in, bool has_bias) {
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor xs = xs_in.contiguous();
  const std::optional<at::Tensor> dsum =
      dsum_in.has_value() ? std::optional<at::Tensor>(dsum_in->contiguous()) : std::nullopt;
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t m = xs.size(0), n = xs.size(1);
  const auto acc = stat_type(xs.scalar_type());
  const auto weight = as_acc(weight_in, acc);

  at::Tensor dx = at::empty({m, n}, xs.options());
  const auto acc_opts = xs.options().dtype(acc);
  if (m == 0 || n == 0) {
    // No rows: the parameter gradients are sums over nothing, zeros.
    return {dx, weight ? at::zeros({n}, acc_opts) : at::empty({0}, acc_opts),
            has_bias ? at::zeros({n}, acc_opts) : at::empty({0}, acc_opts)};
  }
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), at::divup(m, row_grain(n))));
  at::Tensor dw_partial = weight ? at::zeros({chunks, n}, acc_opts) : at::Tensor();
  at::Tensor db_partial = has_bias ? at::zeros({chunks, n}, acc_opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "fastenc_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t>(
        dy.const_data_ptr<scalar_t>(), dsum ? dsum->const_data_ptr<scalar_t>() : nullptr,
        xs.const_data_ptr<scalar_t>(), weight ? weight->const_data_ptr<acc_t>() : nullptr,
        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
        weight ? dw_partial.mutable_data_ptr<acc_t>() : nullptr,
        has_bias ? db_partial.mutable_data_ptr<acc_t>() : nullptr, m, n, chunks);
  });
  at::Tensor dweight = weight ? sum_partials(dw_partial) : at::empty({0}, acc_opts);
  at::Tensor dbias = has_bias ? sum_partials(db_partial) : at::empty({0}, acc_opts);
  return {dx, dweight, dbias};
}

}  // namespace fastenc
