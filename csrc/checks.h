// Argument checks shared by the entry points. They cover what the kernels rely on (rank, shape, dtype, device);
// the Python side (fastenc.functional) owns the user-facing validation.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastenc {

inline void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, features), got ", t.dim(), "-D");
}

// `t` must match `ref` in shape, dtype and device (for tensors combined element by element).
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_like(const std::optional<at::Tensor>& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  if (t.has_value()) check_like(*t, ref, name, ref_name);
}

// A per-feature parameter (weight, bias): (n,) on x's device, in x's dtype or, for half / bfloat16 x, float32
// (torch accepts that mix too).
inline void check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value()) return;
  const int64_t n = x.size(1);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, name, " must have shape (", n, ",), got ", p->sizes());
  const bool reduced = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || (reduced && p->scalar_type() == at::kFloat), name,
              " must have dtype ", x.scalar_type(), reduced ? " or float32" : "", ", got ", p->scalar_type());
  TORCH_CHECK(p->device() == x.device(), name, " must be on ", x.device(), ", got ", p->device());
}

// Per-row statistics (mean, rstd): (m,) in the statistics dtype, on x's device.
inline void check_stats(const at::Tensor& s, const at::Tensor& x, const char* name) {
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(0), name, " must have shape (", x.size(0), ",), got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == want, name, " must have dtype ", want, ", got ", s.scalar_type());
  TORCH_CHECK(s.device() == x.device(), name, " must be on ", x.device(), ", got ", s.device());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", d);
}

}  // namespace fastenc
