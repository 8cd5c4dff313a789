// Bias + activation (+ dropout) over the rows of (M, N) tensors: the CPU entry points. The argument checks run
// once, in fastenc.cpp, before either is called. Contract: fastenc/ops/bias_activation.py.
//
// forward(x, bias, activation, dropout_p, dropout_seed) -> y
//   y = act(x + bias) * keep / (1 - p) in x's dtype; activation "relu", "gelu" (exact) or "gelu_tanh"; keep is
//   drawn per element from (dropout_seed, row * N + col) by Philox 4x32-10, the stream Triton's tl.rand gives.
// backward(dy, x, bias, activation, dropout_p, dropout_seed) -> (dx, dbias)
//   dx = dy * act'(x + bias) * keep / (1 - p) in x's dtype (the forward's mask, regenerated); dbias: (N,) float32
//   (float64 for float64 x), the column sums of dx before rounding; empty without a bias.
// math(x, name): the float32 functions the kernels evaluate ("erfc", "sigmoid"), element by element over a
//   float32 tensor, so that tests can measure them against float64.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastenc {

using BiasActivationBackward = std::tuple<at::Tensor, at::Tensor>;

at::Tensor bias_activation_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                       const std::string& activation, double dropout_p,
                                       const std::optional<at::Tensor>& dropout_seed);
BiasActivationBackward bias_activation_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::string& activation, double dropout_p,
                                                    const std::optional<at::Tensor>& dropout_seed);
at::Tensor bias_activation_math_cpu(const at::Tensor& x, const std::string& name);

}  // namespace fastenc
