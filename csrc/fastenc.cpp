// fastenc._C: the pybind11 module. One function per kernel entry point; each checks its arguments once and routes
// by device to the CPU or CUDA implementation. The schemas live in Python (torch.library custom ops).
#include <torch/extension.h>

#include <sstream>
#include <string>
#include <vector>

#include "attention.h"
#include "bias_activation.h"
#include "checks.h"
#include "layer_norm.h"
#include "lstm.h"

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

// activation, dropout_p and dropout_seed of the bias_activation entry points; the kernels are CPU-only.
void check_bias_activation(const at::Tensor& x, const std::optional<at::Tensor>& bias, const std::string& activation,
                           double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_2d(x, "x");
  check_floating(x, "x");
  check_param(bias, x, "bias");
  TORCH_CHECK(activation == "relu" || activation == "gelu" || activation == "gelu_tanh",
              "activation must be \"relu\", \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0) {
    TORCH_CHECK(dropout_seed.has_value(), "dropout_seed must be given when dropout_p > 0");
    TORCH_CHECK(dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
                "dropout_seed must be an int64 scalar tensor, got ", dropout_seed->scalar_type(), " of shape ",
                dropout_seed->sizes());
  }
  TORCH_CHECK(x.is_cpu(), "fastenc._C has bias_activation kernels for CPU tensors only; x is on ", x.device());
}

at::Tensor bias_activation_forward(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                   const std::string& activation, double dropout_p,
                                   const std::optional<at::Tensor>& dropout_seed) {
  check_bias_activation(x, bias, activation, dropout_p, dropout_seed);
  return bias_activation_forward_cpu(x, bias, activation, dropout_p, dropout_seed);
}

BiasActivationBackward bias_activation_backward(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& bias, const std::string& activation,
                                                double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_bias_activation(x, bias, activation, dropout_p, dropout_seed);
  check_like(dy, x, "dy", "x");
  return bias_activation_backward_cpu(dy, x, bias, activation, dropout_p, dropout_seed);
}

// One LSTM layer's operands: x (T, B, I), or (N, I) with batch_sizes (T,) int64 on the CPU; h0 (B, P), c0 (B, H),
// w_ih (4H, I), w_hh (4H, P), w_hr (P, H), all of x's dtype and on x's device.
void check_lstm(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                const std::optional<at::Tensor>& batch_sizes) {
  check_floating(x, "x");
  check_2d(h0, "h0");
  check_2d(c0, "c0");
  check_2d(w_ih, "w_ih");
  const int64_t batch = h0.size(0), proj = h0.size(1), hidden = c0.size(1);
  const bool packed = batch_sizes.has_value();
  TORCH_CHECK(x.dim() == (packed ? 2 : 3), "x must be ", packed ? "(N, I)" : "(T, B, I)", ", got ", x.sizes());
  TORCH_CHECK(packed || x.size(1) == batch, "x has batch ", x.size(1), ", h0 has ", batch);
  TORCH_CHECK(c0.size(0) == batch, "c0 must have ", batch, " rows (as h0), got ", c0.size(0));
  const auto check_same = [&](const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ", cols,
                "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type(), ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  };
  check_same(h0, "h0", batch, proj);
  check_same(c0, "c0", batch, hidden);
  check_same(w_ih, "w_ih", 4 * hidden, x.size(-1));
  check_same(w_hh, "w_hh", 4 * hidden, proj);
  if (w_hr.has_value()) {
    check_same(*w_hr, "w_hr", proj, hidden);
  } else {
    TORCH_CHECK(proj == hidden, "h0 must have ", hidden, " columns without w_hr, got ", proj);
  }
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "x must be a CPU or CUDA tensor, got ", x.device());
#ifndef FASTENC_WITH_CUDA
  TORCH_CHECK(!x.is_cuda(), "fastenc._C was built without CUDA kernels; x is on ", x.device());
#endif
  if (packed) {
    const auto& sizes = *batch_sizes;
    TORCH_CHECK(sizes.dim() == 1 && sizes.is_cpu() && sizes.scalar_type() == at::kLong,
                "batch_sizes must be a 1-D int64 CPU tensor");
    TORCH_CHECK(sizes.numel() == 0 || (sizes[0].item<int64_t>() == batch && sizes.sum().item<int64_t>() ==
                                       x.size(0)),
                "batch_sizes must start at the batch size ", batch, " and sum to ", x.size(0));
  }
}

LstmForward lstm_layer_forward_checked(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
                                       const std::optional<at::Tensor>& batch_sizes, bool reverse, bool save) {
  check_lstm(x, h0, c0, w_ih, w_hh, w_hr, batch_sizes);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w_ih.size(0), "bias must have shape (", w_ih.size(0),
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), "bias must be ",
                x.scalar_type(), " on ", x.device(), ", got ", bias->scalar_type(), " on ", bias->device());
  }
  return lstm_layer_forward(x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, save);
}

LstmBackward lstm_layer_backward_checked(const at::Tensor& d_out, const at::Tensor& d_hn, const at::Tensor& d_cn,
                                         const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const std::optional<at::Tensor>& w_hr,
                                         const std::optional<at::Tensor>& batch_sizes, bool reverse,
                                         const at::Tensor& out, const at::Tensor& gates, const at::Tensor& cs,
                                         const at::Tensor& rs) {
  check_lstm(x, h0, c0, w_ih, w_hh, w_hr, batch_sizes);
  check_like(d_out, out, "d_out", "out");
  check_like(d_hn, h0, "d_hn", "h0");
  check_like(d_cn, c0, "d_cn", "c0");
  const int64_t hidden = c0.size(1);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto check_saved = [&](const at::Tensor& t, const char* name, int64_t width) {
    TORCH_CHECK(t.sizes().slice(0, t.dim() - 1) == lead && t.size(-1) == width && t.scalar_type() == want &&
                    t.device() == x.device(),
                name, " must be saved by the forward: x's leading shape ", lead, " x ", width, ", ", want, " on ",
                x.device(), "; got ", t.sizes(), ", ", t.scalar_type(), " on ", t.device());
  };
  check_saved(gates, "gates", 4 * hidden);
  check_saved(cs, "cs", hidden);
  if (w_hr.has_value()) {
    check_saved(rs, "rs", hidden);
  } else {
    TORCH_CHECK(rs.numel() == 0, "rs must be empty without w_hr");
  }
  check_saved(out, "out", h0.size(1));
  return lstm_layer_backward(d_out, d_hn, d_cn, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse, out, gates, cs,
                             rs);
}

// Attention's operands: q, k, v (B, H, S, D), or packed (T, H, D) with cu_seqlens; CPU only, no dropout.
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& cu_seqlens_q, double dropout_p) {
  const int64_t rank = cu_seqlens_q.has_value() ? 3 : 4;
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->dim() == rank, name, " must be ", rank, "-D, got ", t->sizes());
    TORCH_CHECK(t->is_cpu(), "the native attention runs CPU tensors; ", name, " is on ", t->device());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type());
  }
  check_floating(q, "q");
  TORCH_CHECK(dropout_p == 0.0, "the native attention has no dropout, got dropout_p = ", dropout_p);
}

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t, int64_t, bool is_causal, double scale, double dropout_p,
    const std::optional<at::Tensor>&) {
  check_attention(q, k, v, cu_seqlens_q, dropout_p);
  return attention_forward_cpu(q, k, v, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k, is_causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t, int64_t,
    bool is_causal, double scale, double dropout_p, const std::optional<at::Tensor>&) {
  check_attention(q, k, v, cu_seqlens_q, dropout_p);
  check_like(dout, out, "dout", "out");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  return attention_backward_cpu(dout, q, k, v, out, lse, bias, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                is_causal, scale);
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
  m.def("bias_activation_forward", &fastenc::bias_activation_forward,
        "dropout(act(x + bias)) over the rows of x -> y", py::arg("x"), py::arg("bias"), py::arg("activation"),
        py::arg("dropout_p"), py::arg("dropout_seed"));
  m.def("bias_activation_backward", &fastenc::bias_activation_backward, "Its backward -> (dx, dbias)",
        py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("activation"), py::arg("dropout_p"),
        py::arg("dropout_seed"));
  m.def("_bias_activation_math", &fastenc::bias_activation_math_cpu,
        "Test hook: the float32 erfc or sigmoid the bias_activation kernels use, element by element",
        py::arg("x"), py::arg("name"));
  m.def("lstm_layer_forward", &fastenc::lstm_layer_forward_checked,
        "One LSTM layer in one direction -> (out, h_n, c_n, gates, cs, rs)", py::arg("x"), py::arg("h0"),
        py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"), py::arg("bias"), py::arg("w_hr"), py::arg("batch_sizes"),
        py::arg("reverse"), py::arg("save"));
  m.def("lstm_layer_backward", &fastenc::lstm_layer_backward_checked,
        "Its backward -> (dx, dh0, dc0, dw_ih, dw_hh, d_bias, dw_hr)", py::arg("d_out"), py::arg("d_hn"),
        py::arg("d_cn"), py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("w_ih"), py::arg("w_hh"),
        py::arg("w_hr"), py::arg("batch_sizes"), py::arg("reverse"), py::arg("out"), py::arg("gates"), py::arg("cs"),
        py::arg("rs"));
  m.def("attention_forward", &fastenc::attention_forward, "Attention forward on CPU -> (out, lse)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("key_padding_mask"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("is_causal"),
        py::arg("scale"), py::arg("dropout_p"), py::arg("dropout_seed"));
  m.def("attention_backward", &fastenc::attention_backward, "Its backward -> (dq, dk, dv)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
        py::arg("key_padding_mask"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("is_causal"), py::arg("scale"), py::arg("dropout_p"),
        py::arg("dropout_seed"));
  m.def("attention_cpu_available", &fastenc::attention_cpu_available,
        "Whether this CPU runs the native attention (x86 with AVX-512)");
  m.def("cuda_archs", &fastenc::cuda_archs, "The archs the CUDA kernels were compiled for; [] without CUDA");
}
