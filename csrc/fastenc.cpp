// fastenc._C: the pybind11 module. One function per kernel entry point; each checks its arguments once and routes
// by device to the CPU or CUDA implementation. The schemas live in Python (torch.library custom ops).
#include <torch/extension.h>

#include <sstream>
#include <string>
#include <vector>

#include "checks.h"
#include "layer_norm.h"

namespace fastenc {
namespace {

LayerNormForward layer_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                    double eps, bool store_sum) {
  check_2d(x, "x");
  check_floating(x, "x");
  check_like(residual, x, "residual", "x");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  if (x.is_cuda()) {
#ifdef FASTENC_WITH_CUDA
    return layer_norm_forward_cuda(x, residual, weight, bias, eps, store_sum);
#else
    TORCH_CHECK(false, "fastenc._C was built without CUDA kernels; x is on ", x.device());
#endif
  }
  TORCH_CHECK(x.is_cpu(), "x must be a CPU or CUDA tensor, got ", x.device());
  return layer_norm_forward_cpu(x, residual, weight, bias, eps, store_sum);
}

LayerNormBackward layer_norm_backward(const at::Tensor& dy, const std::optional<at::Tensor>& dsum,
                                      const at::Tensor& xs, const std::optional<at::Tensor>& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool has_bias) {
  check_2d(xs, "xs");
  check_floating(xs, "xs");
  check_like(dy, xs, "dy", "xs");
  check_like(dsum, xs, "dsum", "xs");
  check_param(weight, xs, "weight");
  check_stats(mean, xs, "mean");
  check_stats(rstd, xs, "rstd");
  if (xs.is_cuda()) {
#ifdef FASTENC_WITH_CUDA
    return layer_norm_backward_cuda(dy, dsum, xs, weight, mean, rstd, has_bias);
#else
    TORCH_CHECK(false, "fastenc._C was built without CUDA kernels; xs is on ", xs.device());
#endif
  }
  TORCH_CHECK(xs.is_cpu(), "xs must be a CPU or CUDA tensor, got ", xs.device());
  return layer_norm_backward_cpu(dy, dsum, xs, weight, mean, rstd, has_bias);
}

// The build passes the arch list as a bare comma-separated token list (-DFASTENC_CUDA_ARCHS=sm_80,sm_90): string
// literals do not survive the quoting of every build tool on the way.
#define FASTENC_STRINGIFY_(...) #__VA_ARGS__
#define FASTENC_STRINGIFY(...) FASTENC_STRINGIFY_(__VA_ARGS__)

std::vector<std::string> cuda_archs() {
  std::vector<std::string> archs;
#if defined(FASTENC_WITH_CUDA) && defined(FASTENC_CUDA_ARCHS)
  std::stringstream list(FASTENC_STRINGIFY(FASTENC_CUDA_ARCHS));
  for (std::string arch; std::getline(list, arch, ',');) {
    if (!arch.empty()) archs.push_back(arch);
  }
#endif
  return archs;
}

}  // namespace
}  // namespace fastenc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastenc's C++/CUDA kernels (wrapped as torch.library custom ops in fastenc.ops)";
  m.def("layer_norm_forward", &fastenc::layer_norm_forward, "Residual-add + LayerNorm forward -> (y, sum, mean, rstd)",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("store_sum"));
  m.def("layer_norm_backward", &fastenc::layer_norm_backward, "LayerNorm backward -> (dx, dweight, dbias)",
        py::arg("dy"), py::arg("dsum"), py::arg("xs"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
        py::arg("has_bias"));
  m.def("cuda_archs", &fastenc::cuda_archs, "The archs the CUDA kernels were compiled for; [] without CUDA");
}
