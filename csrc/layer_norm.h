// Residual-add + LayerNorm over the last dim of (M, N) tensors: the CPU and CUDA entry points.
// The argument checks run once, in fastenc.cpp, before either is called.
//
// forward(x, residual, weight, bias, eps, store_sum) -> (y, sum, mean, rstd)
//   xs = x + residual rounded to x's dtype (or x); y = (xs - mean) * rstd * weight + bias in x's dtype;
//   sum = xs when store_sum and a residual is given, else an empty tensor; mean, rstd: (M,) float32
//   (float64 for float64 x), of the rounded xs.
// backward(dy, dsum, xs, weight, mean, rstd, has_bias) -> (dx, dweight, dbias)
//   dx in xs's dtype (plus dsum when given); dweight / dbias: (N,) in the statistics dtype, empty when there is
//   no weight / no bias.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastenc {

using LayerNormForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerNormBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

LayerNormForward layer_norm_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, double eps, bool store_sum);
LayerNormBackward layer_norm_backward_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dsum,
                                          const at::Tensor& xs, const std::optional<at::Tensor>& weight,
                                          const at::Tensor& mean, const at::Tensor& rstd, bool has_bias);

#ifdef FASTENC_WITH_CUDA
LayerNormForward layer_norm_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, double eps, bool store_sum);
LayerNormBackward layer_norm_backward_cuda(const at::Tensor& dy, const std::optional<at::Tensor>& dsum,
                                           const at::Tensor& xs, const std::optional<at::Tensor>& weight,
                                           const at::Tensor& mean, const at::Tensor& rstd, bool has_bias);
#endif

}  // namespace fastenc
