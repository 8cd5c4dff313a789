// fastenc._C: the kernels as dispatcher ops, namespace fastenc_native (torch.ops.fastenc_native.<name>). One schema
// per kernel entry point (TORCH_LIBRARY below), one implementation per device (TORCH_LIBRARY_IMPL), so torch's
// dispatcher routes by device; each implementation checks its arguments once, then runs that device's kernel.
// fastenc/native.py is the native backend over these ops; the custom ops of fastenc.ops carry their autograd and
// fake kernels. The pybind11 module itself only says what was built and what this CPU runs.
#include <torch/extension.h>
#include <torch/library.h>

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

// `kernel`: layer_norm_forward_cpu or _cuda (and likewise for the backward): the checks are the same on both.
template <auto kernel>
LayerNormForward layer_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                    double eps, bool store_sum) {
  check_2d(x, "x");
  check_floating(x, "x");
  check_like(residual, x, "residual", "x");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  return kernel(x, residual, weight, bias, eps, store_sum);
}

template <auto kernel>
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
  return kernel(dy, dsum, xs, weight, mean, rstd, has_bias);
}

// The bias_activation entry points' common operands (CPU kernels only).
void check_bias_activation(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation,
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
}

at::Tensor bias_activation_forward(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                   c10::string_view activation, double dropout_p,
                                   const std::optional<at::Tensor>& dropout_seed) {
  check_bias_activation(x, bias, activation, dropout_p, dropout_seed);
  return bias_activation_forward_cpu(x, bias, std::string(activation), dropout_p, dropout_seed);
}

BiasActivationBackward bias_activation_backward(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& bias, c10::string_view activation,
                                                double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  check_bias_activation(x, bias, activation, dropout_p, dropout_seed);
  check_like(dy, x, "dy", "x");
  return bias_activation_backward_cpu(dy, x, bias, std::string(activation), dropout_p, dropout_seed);
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
  if (packed) {
    const auto& sizes = *batch_sizes;
    TORCH_CHECK(sizes.dim() == 1 && sizes.is_cpu() && sizes.scalar_type() == at::kLong,
                "batch_sizes must be a 1-D int64 CPU tensor");
    TORCH_CHECK(sizes.numel() == 0 || (sizes[0].item<int64_t>() == batch && sizes.sum().item<int64_t>() ==
                                       x.size(0)),
                "batch_sizes must start at the batch size ", batch, " and sum to ", x.size(0));
  }
}

// The LSTM driver's GEMMs (at::mm where oneDNN's matmul is not found) run in the dtypes it chose: an autocast
// region the caller's forward or backward runs in must not cast them again (functional applied autocast already).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

LstmForward lstm_layer_forward_checked(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
                                       const std::optional<at::Tensor>& batch_sizes, bool reverse, bool save) {
  const NoAutocast no_autocast;
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
                                         const at::Tensor& rs, std::array<bool, 7> output_mask) {
  const NoAutocast no_autocast;
  check_lstm(x, h0, c0, w_ih, w_hh, w_hr, batch_sizes);
  check_like(d_out, out, "d_out", "out");
  check_like(d_hn, h0, "d_hn", "h0");
  check_like(d_cn, c0, "d_cn", "c0");
  const int64_t hidden = c0.size(1);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  // The states the forward saved are float32 (float64 for float64 x); out is in x's dtype.
  const auto saved = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto check_saved = [&](const at::Tensor& t, const char* name, int64_t width, at::ScalarType want) {
    TORCH_CHECK(t.sizes().slice(0, t.dim() - 1) == lead && t.size(-1) == width && t.scalar_type() == want &&
                    t.device() == x.device(),
                name, " must be saved by the forward: x's leading shape ", lead, " x ", width, ", ", want, " on ",
                x.device(), "; got ", t.sizes(), ", ", t.scalar_type(), " on ", t.device());
  };
  check_saved(gates, "gates", 4 * hidden, saved);
  check_saved(cs, "cs", hidden, saved);
  if (w_hr.has_value()) {
    check_saved(rs, "rs", hidden, saved);
  } else {
    TORCH_CHECK(rs.numel() == 0, "rs must be empty without w_hr");
  }
  check_saved(out, "out", h0.size(1), x.scalar_type());
  return lstm_layer_backward(d_out, d_hn, d_cn, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse, out, gates, cs,
                             rs, output_mask);
}

// Attention's operands: q, k, v (B, H, S, D), or packed (T, H, D) with cu_seqlens; CPU kernels only, no dropout.
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& cu_seqlens_q, double dropout_p) {
  const int64_t rank = cu_seqlens_q.has_value() ? 3 : 4;
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->dim() == rank, name, " must be ", rank, "-D, got ", t->sizes());
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse, bool bias_grad, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t, int64_t, bool is_causal, double scale, double dropout_p,
    const std::optional<at::Tensor>&) {
  check_attention(q, k, v, cu_seqlens_q, dropout_p);
  check_like(dout, out, "dout", "out");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(!bias_grad || bias.has_value(), "bias_grad needs a bias");
  return attention_backward_cpu(dout, out, lse, bias_grad, q, k, v, bias, key_padding_mask, cu_seqlens_q,
                                cu_seqlens_k, is_causal, scale);
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

TORCH_LIBRARY(fastenc_native, m) {
  m.def("layer_norm_forward(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool store_sum) "
        "-> (Tensor y, Tensor sum, Tensor mean, Tensor rstd)");
  m.def("layer_norm_backward(Tensor dy, Tensor? dsum, Tensor xs, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool has_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("bias_activation_forward(Tensor x, Tensor? bias, str activation, float dropout_p, Tensor? dropout_seed) "
        "-> Tensor");
  m.def("bias_activation_backward(Tensor dy, Tensor x, Tensor? bias, str activation, float dropout_p, "
        "Tensor? dropout_seed) -> (Tensor dx, Tensor dbias)");
  m.def("lstm_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? w_hr, "
        "Tensor? batch_sizes, bool reverse, bool save) "
        "-> (Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor cs, Tensor rs)");
  m.def("lstm_layer_backward(Tensor d_out, Tensor d_hn, Tensor d_cn, Tensor x, Tensor h0, Tensor c0, Tensor w_ih, "
        "Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, Tensor out, Tensor gates, Tensor cs, "
        "Tensor rs, bool[7] output_mask) "
        "-> (Tensor dx, Tensor dh0, Tensor dc0, Tensor dw_ih, Tensor dw_hh, Tensor d_bias, Tensor dw_hr)");
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? key_padding_mask, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool is_causal, "
        "float scale, float dropout_p, Tensor? dropout_seed) -> (Tensor out, Tensor lse)");
  m.def("attention_backward(Tensor dout, Tensor out, Tensor lse, bool bias_grad, Tensor q, Tensor k, Tensor v, "
        "Tensor? bias, Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, bool is_causal, float scale, float dropout_p, Tensor? dropout_seed) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(fastenc_native, CPU, m) {
  m.impl("layer_norm_forward", &fastenc::layer_norm_forward<fastenc::layer_norm_forward_cpu>);
  m.impl("layer_norm_backward", &fastenc::layer_norm_backward<fastenc::layer_norm_backward_cpu>);
  m.impl("bias_activation_forward", &fastenc::bias_activation_forward);
  m.impl("bias_activation_backward", &fastenc::bias_activation_backward);
  m.impl("lstm_layer_forward", &fastenc::lstm_layer_forward_checked);
  m.impl("lstm_layer_backward", &fastenc::lstm_layer_backward_checked);
  m.impl("attention_forward", &fastenc::attention_forward);
  m.impl("attention_backward", &fastenc::attention_backward);
}

#ifdef FASTENC_WITH_CUDA
// The LSTM's sequence driver is the same code on both devices (its cells are per device, csrc/lstm.cpp).
TORCH_LIBRARY_IMPL(fastenc_native, CUDA, m) {
  m.impl("layer_norm_forward", &fastenc::layer_norm_forward<fastenc::layer_norm_forward_cuda>);
  m.impl("layer_norm_backward", &fastenc::layer_norm_backward<fastenc::layer_norm_backward_cuda>);
  m.impl("lstm_layer_forward", &fastenc::lstm_layer_forward_checked);
  m.impl("lstm_layer_backward", &fastenc::lstm_layer_backward_checked);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastenc's C++/CUDA kernels: importing it registers the ops torch.ops.fastenc_native.*";
  m.def("_bias_activation_math", &fastenc::bias_activation_math_cpu,
        "Test hook: the float32 erfc or sigmoid the bias_activation kernels use, element by element",
        py::arg("x"), py::arg("name"));
  m.def("attention_cpu_available", &fastenc::attention_cpu_available,
        "Whether this CPU runs the native attention (x86 with AVX2 + FMA, or AVX-512)");
  m.def("lstm_fused_step_cpu_available", &fastenc::lstm_fused_step_cpu_available,
        "Whether this CPU runs the native LSTM's fused float32 step (x86 with AVX-512)");
  m.def("lstm_onednn_gemm_found", &fastenc::lstm_onednn_gemm_found,
        "Whether the LSTM's CPU gradient GEMMs found oneDNN's matmul in libtorch (else they run at::mm)");
  m.def("cuda_archs", &fastenc::cuda_archs, "The archs the CUDA kernels were compiled for; [] without CUDA");
}
