// One LSTM layer in one direction: the sequence driver (lstm.cpp, device-neutral: the input projection, the time
// loop in C++ and the weight gradients, GEMMs through oneDNN on CPU and cuBLAS on CUDA) and the fused pointwise
// cell of one step, per device (cpu/lstm.cpp, cuda/lstm.cu). The contract is fastenc/ops/lstm.py's; the argument
// checks run once, in fastenc.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastenc {

using LstmForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LstmBackward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// -> (out, h_n, c_n, gates, cs, rs); with save false (no backward will run) the last three are empty.
LstmForward lstm_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
                               bool reverse, bool save);

// Whether the driver found oneDNN's matmul in libtorch for its CPU gradient GEMMs (else it runs at::mm).
bool lstm_onednn_gemm_found();
// -> (dx, dh0, dc0, dw_ih, dw_hh, d_bias, dw_hr); those output_mask does not ask for are empty, never computed.
LstmBackward lstm_layer_backward(const at::Tensor& d_out, const at::Tensor& d_hn, const at::Tensor& d_cn,
                                 const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                 const std::optional<at::Tensor>& batch_sizes, bool reverse, const at::Tensor& out,
                                 const at::Tensor& gates, const at::Tensor& cs, const at::Tensor& rs,
                                 std::array<bool, 7> output_mask);

// The cells work on n contiguous rows of float32 / float64 tensors (H = hidden size).
// forward: from hw = h_{t-1} W_hh^T and the step's rows of gates_x (both (n, 4H)) writes `gates`, the
//          nonlinearities of i f g o, and c = f * c_prev + i * g and r = o * tanh(c), both (n, H).
// backward: from the step's gates, c, c_prev, dr = dL/dr (n, H) and dc (n, H) = dL/dc_t from the later steps,
//           writes d_gates (n, 4H) (gradients of the preactivations) and replaces dc by dL/dc_{t-1}.
void lstm_cell_forward_cpu(const at::Tensor& hw, const at::Tensor& gates_x, const at::Tensor& c_prev,
                           at::Tensor& gates, at::Tensor& c, at::Tensor& r);
void lstm_cell_backward_cpu(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
                            const at::Tensor& dr, at::Tensor& dc, at::Tensor& d_gates);
// The fused CPU step (float32, x86 with AVX-512): x (n, I) W_ih^T + h_prev (n, P) W_hh^T + bias (4H), and the cell,
// in one pass, as lstm_cell_forward_cpu; each weight (4H, depth) packed once per sequence by lstm_pack_forward_cpu.
// Whether this build and CPU run it (for float32 CPU tensors; lstm_fused_step_takes says whether w_hh is one).
bool lstm_fused_step_cpu_available();
inline bool lstm_fused_step_takes(const at::Tensor& w_hh) {
  return w_hh.is_cpu() && w_hh.scalar_type() == at::kFloat && lstm_fused_step_cpu_available();
}
at::Tensor lstm_pack_forward_cpu(const at::Tensor& w);
// Raw rows (contiguous, row strides P, I, H, 4H, H, H), as it runs once per step and a tensor costs ~1 us to make;
// gates may be null (not kept).
void lstm_step_forward_cpu(const float* h_prev, const float* x, int64_t rows, int64_t proj, int64_t input_size,
                           int64_t hidden, const at::Tensor& packed_hh, const at::Tensor& packed_ih, const float* bias,
                           const float* c_prev, float* gates, float* c, float* r);
// Its backward step, without a projection (P = H): from the next step's d_gates (its first `continuing` rows are
// this step's rows that go on), d_out and d_hn (the step's rows of each) writes d_gates and updates dc as
// lstm_cell_backward_cpu with dr = dh; W_hh packed once per sequence by lstm_pack_feedback_cpu. Raw rows as the
// forward step's (`rows` of them, strides 4H, H, H, 4H, H, H, H, 4H).
at::Tensor lstm_pack_feedback_cpu(const at::Tensor& w_hh);
void lstm_step_backward_cpu(const float* d_gates_next, int64_t continuing, const float* d_out, const float* d_hn,
                            const at::Tensor& packed, const float* gates, const float* c, const float* c_prev,
                            float* dc, float* d_gates, int64_t rows, int64_t hidden);
#ifdef FASTENC_WITH_CUDA
void lstm_cell_forward_cuda(const at::Tensor& hw, const at::Tensor& gates_x, const at::Tensor& c_prev,
                            at::Tensor& gates, at::Tensor& c, at::Tensor& r);
void lstm_cell_backward_cuda(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev,
                             const at::Tensor& dr, at::Tensor& dc, at::Tensor& d_gates);
#endif

}  // namespace fastenc
