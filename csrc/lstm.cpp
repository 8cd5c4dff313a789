// The LSTM sequence driver, the same code for CPU and CUDA tensors: the input projection of all steps as one GEMM
// (gates_x = x W_ih^T + bias), then the whole time loop in C++ (no Python per step), per step one GEMM
// (h_{t-1} W_hh^T) and one fused pointwise cell (adds the step's input gates, activates, writes the saved gates,
// updates c and h); or on x86 CPUs with AVX-512 one fused step kernel doing all three, x_t W_ih^T included (no
// GEMM before the loop; cpu/lstm.cpp). The backward likewise; in it dx and the weight gradients are one GEMM each
// over all steps after the loop. The fused path without a projection also gives each thread a share of the batch
// to take through the whole sequence: rows of an LSTM never read each other, so the threads never wait for each
// other.
//
// Rows: x is (T, B, I), or (N, I) packed with batch_sizes; either way N flat rows, step t owning rows
// off_t .. off_t + n_t. A step reads h_{t-1} from the rows of the step processed before it (out) and c_{t-1} from
// the saved cell states; rows that were not active then (only in the reverse direction of a packed batch) start
// from h0 / c0. Math in float32 (float64 for float64 input); h is stored in the input dtype, as the next step's
// GEMM reads it.
#include "lstm.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <numeric>
#include <vector>


namespace fastenc {
namespace {

struct Step {
  int64_t off, n;            // this step's rows
  int64_t prev_off, prev_n;  // the rows of the step processed before it (0 rows for the first)
};

// Host-side row maps; the forward needs `last` on the device, the backward `first` and `previous` (see index()).
struct Schedule {
  std::vector<Step> steps;                // in processing order (time order, or reversed)
  std::vector<int64_t> first, last;       // per batch row: its flat row at its first / last processed step
  std::vector<int64_t> previous;          // per flat row: its row in cat([out, h0]) holding the h it started from
};

at::Tensor index(const std::vector<int64_t>& rows, const at::Device& device) {
  return at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(device);
}

// `rows_lead`: the leading size of x / out, i.e. T, or N when packed.
Schedule make_schedule(const std::optional<at::Tensor>& batch_sizes, int64_t rows_lead, int64_t batch, bool reverse) {
  const int64_t steps = batch_sizes.has_value() ? batch_sizes->numel() : rows_lead;
  std::vector<int64_t> sizes(steps, batch);
  if (batch_sizes.has_value()) {
    const auto sizes_cpu = batch_sizes->to(at::kLong).contiguous();
    std::copy_n(sizes_cpu.data_ptr<int64_t>(), steps, sizes.begin());
  }
  std::vector<int64_t> offsets(steps + 1, 0);
  for (int64_t t = 0; t < steps; ++t) offsets[t + 1] = offsets[t] + sizes[t];
  const int64_t rows = offsets[steps];

  Schedule plan{{}, std::vector<int64_t>(batch), std::vector<int64_t>(batch), std::vector<int64_t>(rows)};
  int64_t prev_off = 0, prev_n = 0;
  for (int64_t k = 0; k < steps; ++k) {
    const int64_t t = reverse ? steps - 1 - k : k;
    const int64_t off = offsets[t], n = sizes[t];
    plan.steps.push_back({off, n, prev_off, prev_n});
    for (int64_t b = 0; b < n; ++b) {
      const bool continues = b < prev_n;
      plan.previous[off + b] = continues ? prev_off + b : rows + b;
      if (!continues) plan.first[b] = off + b;
      plan.last[b] = off + b;
    }
    prev_off = off;
    prev_n = n;
  }
  return plan;
}

// The n rows a step starts from: `prev` (the previous step's rows) where they were active, `initial` after.
at::Tensor rows_before(const at::Tensor& prev, const at::Tensor& initial, int64_t n) {
  const int64_t k = std::min(n, prev.size(0));
  if (k == n) return prev.narrow(0, 0, n);
  if (k == 0) return initial.narrow(0, 0, n);
  return at::cat({prev.narrow(0, 0, k), initial.narrow(0, k, n - k)});
}

// rows_before on raw float32 rows of `width`: a pointer to the n rows, gathered into `scratch` where they mix
// the previous step's rows and the initial ones. For the fused CPU step, which takes no tensors per step.
const float* rows_before(const float* prev, int64_t prev_n, const float* initial, int64_t n, int64_t width,
                         float* scratch) {
  const int64_t k = std::min(n, prev_n);
  if (k == n) return prev;
  if (k == 0) return initial;
  std::copy_n(prev, k * width, scratch);
  std::copy_n(initial + k * width, (n - k) * width, scratch + k * width);
  return scratch;
}

void cell_forward(const at::Tensor& hw, const at::Tensor& gates_x, const at::Tensor& c_prev, at::Tensor& gates,
                  at::Tensor& c, at::Tensor& r) {
  if (hw.is_cuda()) {
#ifdef FASTENC_WITH_CUDA
    return lstm_cell_forward_cuda(hw, gates_x, c_prev, gates, c, r);
#endif
  }
  lstm_cell_forward_cpu(hw, gates_x, c_prev, gates, c, r);
}

void cell_backward(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_prev, const at::Tensor& dr,
                   at::Tensor& dc, at::Tensor& d_gates) {
  if (gates.is_cuda()) {
#ifdef FASTENC_WITH_CUDA
    return lstm_cell_backward_cuda(gates, c, c_prev, dr, dc, d_gates);
#endif
  }
  lstm_cell_backward_cpu(gates, c, c_prev, dr, dc, d_gates);
}

// x W^T (+ bias) for x of up to `rows` rows, W fixed: the input projection, h_{t-1} W_hh^T each step of the
// forward, d_gates_{t+1} W_hh each step of the backward. On CPU in float32 through oneDNN, with W packed once, via
// the mkldnn ops libtorch registers for its own compiler: at these shapes that was ~1.4x the at::mm (MKL) rate on
// the AMD EPYC we measured. Elsewhere, or where torch lacks those ops, at::mm / at::addmm into a scratch buffer.
class Linear {
 public:
  Linear(const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t rows) : w_t_(w.t()), bias_(bias) {
    static const auto ops = find_onednn_ops();
    if (w.is_cpu() && w.scalar_type() == at::kFloat && ops.has_value()) {
      try {  // a torch whose ops changed signature gets at::mm, not an error
        packed_ = ops->first.typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>().call(w.contiguous(), rows);
        linear_ = ops->second;
        return;
      } catch (const c10::Error&) {
      }
    }
    scratch_ = at::empty({rows, w.size(0)}, w.options());
  }

  at::Tensor operator()(const at::Tensor& x) {
    if (!linear_.has_value()) {
      auto out = scratch_.narrow(0, 0, x.size(0));
      return bias_.has_value() ? at::addmm_out(out, *bias_, x, w_t_) : at::mm_out(out, x, w_t_);
    }
    torch::jit::Stack stack{x.contiguous(), packed_, bias_.has_value() ? c10::IValue(*bias_) : c10::IValue(),
                            c10::IValue("none"), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    linear_->callBoxed(stack);
    return stack[0].toTensor();
  }

 private:
  using Ops = std::pair<c10::OperatorHandle, c10::OperatorHandle>;  // (reorder weight, linear)
  static std::optional<Ops> find_onednn_ops() {
    auto& dispatcher = c10::Dispatcher::singleton();
    auto reorder = dispatcher.findSchema({"mkldnn::_reorder_linear_weight", ""});
    auto linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
    if (!at::hasMKLDNN() || !reorder.has_value() || !linear.has_value()) return std::nullopt;
    return Ops{*reorder, *linear};
  }

  at::Tensor w_t_, packed_, scratch_;
  std::optional<at::Tensor> bias_;
  std::optional<c10::OperatorHandle> linear_;
};

// result = beta result + alpha mat1 mat2 through oneDNN, as libtorch exports it: at::native::mkldnn_matmul (whose
// header, ATen/native/mkldnn/Matmul.h, the wheels do not ship), looked up by its symbol at run time, so that a
// torch without it loses only this fast path. It throws where oneDNN is missing or declines the CPU.
using MkldnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

MkldnnMatmul find_mkldnn_matmul() {
  void* libtorch = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);  // loaded already: this extension links it
  if (libtorch == nullptr || !at::hasMKLDNN()) return nullptr;
  return reinterpret_cast<MkldnnMatmul>(dlsym(libtorch, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
}

// a b for the gradients' GEMMs over all steps (long K, operands transposed views). On CPU in float32 through
// oneDNN's matmul, which reads transposed operands in place (~1.2-1.4x at::mm's MKL rate on the EPYC above); at::mm
// where torch lacks it, and from the first refusal on (CPUs without AVX-512).
const MkldnnMatmul mkldnn_matmul = find_mkldnn_matmul();

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  static std::atomic<bool> onednn{mkldnn_matmul != nullptr};
  if (a.is_cpu() && a.scalar_type() == at::kFloat && onednn.load()) {
    auto out = at::empty({a.size(0), b.size(1)}, a.options());
    try {
      mkldnn_matmul(a, b, out, /*beta=*/0.0f, /*alpha=*/1.0f);
      return out;
    } catch (const c10::Error&) {
      onednn.store(false);
    }
  }
  return at::mm(a, b);
}

// A thread's share of the batch in the fused steps: at least one whole row tile of the step kernel (6 rows).
constexpr int64_t kMinShareRows = 6;

// Bounds 0 = b_0 < b_1 < ... = batch of the batch rows' shares: up to `threads` of them and batch / kMinShareRows
// (a whole row tile each on average), of about equal work: a row counts the steps it is active in (a packed batch
// has its longest rows first).
std::vector<int64_t> batch_shares(const Schedule& plan, int64_t batch, int64_t threads) {
  const int64_t parts = std::clamp<int64_t>(batch / kMinShareRows, 1, threads);
  std::vector<int64_t> length(batch, 0);
  for (const Step& s : plan.steps) {
    for (int64_t b = 0; b < s.n; ++b) ++length[b];
  }
  const int64_t total = std::accumulate(length.begin(), length.end(), int64_t{0});
  std::vector<int64_t> bounds{0};
  int64_t done = 0;
  for (int64_t b = 0; b + 1 < batch; ++b) {
    done += length[b];
    if (static_cast<int64_t>(bounds.size()) < parts && done * parts >= total * static_cast<int64_t>(bounds.size())) {
      bounds.push_back(b + 1);
    }
  }
  bounds.push_back(batch);
  return bounds;
}

// run(b0, b1) for each share of `bounds`, the shares in parallel; each under the caller's thread-local state
// (inside the op autograd is off), which OpenMP's threads do not inherit, for the tensor calls a share makes.
template <typename Run>
void in_shares(const std::vector<int64_t>& bounds, const Run& run) {
  const at::ThreadLocalState caller;
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t i = begin; i < end; ++i) run(bounds[i], bounds[i + 1]);
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

bool lstm_onednn_gemm_found() { return mkldnn_matmul != nullptr; }

LstmForward lstm_layer_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
                               bool reverse, bool save) {
  const auto acc = acc_type(x.scalar_type());
  const bool same = x.scalar_type() == acc;
  const bool proj_on = w_hr.has_value();
  const int64_t hidden = c0.size(1), proj = h0.size(1), batch = h0.size(0);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  const auto x_rows = x.reshape({-1, x.size(-1)});
  const int64_t rows = x_rows.size(0);
  const auto acc_options = x.options().dtype(acc);
  // Fused (x86 CPUs with AVX-512, float32): our own step kernel, the input projection x_t W_ih^T, the recurrent
  // product and the cell in one pass (cpu/lstm.cpp; W_ih packed as W_hh is, the bias added at the cell), so there
  // is no GEMM before the loop. Elsewhere the input projection of all steps as one GEMM first, then per step a GEMM
  // (oneDNN on CPU, cuBLAS on CUDA) and the cell kernel.
  const bool fused = lstm_fused_step_takes(w_hh);
  // The fused step without a projection takes raw rows: no tensor is made per step (each narrow costs ~0.7 us,
  // several per step, against a step of ~100 us at hidden 256, batch 32).
  const bool raw = fused && !proj_on;
  const auto gx = fused ? at::Tensor() : Linear(w_ih, bias, rows)(x_rows).to(acc).contiguous();
  const auto packed = fused ? lstm_pack_forward_cpu(w_hh) : at::Tensor();
  const auto packed_ih = fused ? lstm_pack_forward_cpu(w_ih) : at::Tensor();
  const auto x_in = fused ? x_rows.contiguous() : at::Tensor();
  const auto bias_row = !fused             ? at::Tensor()
                        : bias.has_value() ? bias->contiguous()
                                           : at::zeros({4 * hidden}, acc_options);
  const int64_t input_size = x_rows.size(1);
  std::optional<Linear> recurrent;
  if (!fused) recurrent.emplace(w_hh.to(acc), std::nullopt, batch);
  const auto plan = make_schedule(batch_sizes, x.size(0), batch, reverse);
  const auto acc_rows = [&](int64_t n, int64_t width) { return at::empty({n, width}, acc_options); };

  auto out = at::empty({rows, proj}, x.options());
  // Saved: every step's rows. Not saved (no backward will run): one step's worth, the cell states alternating
  // between two buffers, and each row's last c copied out when it ends.
  auto gates = acc_rows(save ? rows : (raw ? 0 : batch), 4 * hidden);  // the fused steps keep none unsaved
  auto cs = acc_rows(save ? rows : 2 * batch, hidden);
  auto rs = proj_on ? acc_rows(save ? rows : batch, hidden) : at::empty({0}, acc_options);
  auto c_last = save ? at::Tensor() : acc_rows(batch, hidden);
  // o * tanh(c) when it is neither kept in rs nor the output itself (a low-precision out).
  auto r_scratch = (!proj_on && !same) ? acc_rows(batch, hidden) : at::Tensor();
  const auto w_hr_t = proj_on ? w_hr->to(acc).t() : at::Tensor();
  const auto c0_acc = c0.to(acc).contiguous();

  // Not saved: a step's rows that the next step does not continue (from `continuing` on) end here; keep their c.
  // Rows counted from batch row b0.
  const auto keep_ending_rows = [&](int64_t c_off, int64_t b0, int64_t continuing, int64_t n) {
    if (!save && continuing < n) {
      c_last.narrow(0, b0 + continuing, n - continuing).copy_(cs.narrow(0, c_off + continuing, n - continuing));
    }
  };
  const int64_t steps = static_cast<int64_t>(plan.steps.size());
  const auto c_offsets = [&](int64_t k) {  // (this step's, the previous step's) first row in cs
    const Step& s = plan.steps[k];
    return std::pair<int64_t, int64_t>{save ? s.off : (k % 2) * batch, save ? s.prev_off : ((k + 1) % 2) * batch};
  };

  if (raw) {
    // The batch rows [b0, b1) through every step: their rows of a step are one contiguous range of its rows.
    auto scratch = acc_rows(2 * batch, hidden);  // rows gathered for h_{t-1} and c_{t-1}
    const auto h0_rows = h0.contiguous();
    float *const out_p = out.data_ptr<float>(), *const cs_p = cs.data_ptr<float>(),
                 *const gates_p = gates.data_ptr<float>(), *const scratch_p = scratch.data_ptr<float>();
    const float *const h0_p = h0_rows.data_ptr<float>(), *const c0_p = c0_acc.data_ptr<float>(),
                *const x_p = x_in.data_ptr<float>(), *const bias_p = bias_row.data_ptr<float>();
    const auto forward_rows = [&](int64_t b0, int64_t b1) {
      const auto mine = [&](int64_t n) { return std::clamp<int64_t>(n - b0, 0, b1 - b0); };  // of a step's n rows
      float *const h_scratch = scratch_p + b0 * hidden, *const c_scratch = scratch_p + (batch + b0) * hidden;
      for (int64_t k = 0; k < steps; ++k) {
        const Step& s = plan.steps[k];
        const int64_t n = mine(s.n), prev_n = mine(s.prev_n);
        if (n == 0) continue;  // not started yet (the reverse direction of a packed batch)
        const auto [c_off, c_prev_off] = c_offsets(k);
        lstm_step_forward_cpu(
            rows_before(out_p + (s.prev_off + b0) * hidden, prev_n, h0_p + b0 * hidden, n, hidden, h_scratch),
            x_p + (s.off + b0) * input_size, n, hidden, input_size, hidden, packed, packed_ih, bias_p,
            rows_before(cs_p + (c_prev_off + b0) * hidden, prev_n, c0_p + b0 * hidden, n, hidden, c_scratch),
            save ? gates_p + (s.off + b0) * 4 * hidden : nullptr, cs_p + (c_off + b0) * hidden,
            out_p + (s.off + b0) * hidden);
        keep_ending_rows(c_off + b0, b0, std::min(n, k + 1 < steps ? mine(plan.steps[k + 1].n) : 0), n);
      }
    };
    // With more than one thread each takes a share of the batch through the whole sequence on its own: no step
    // waits for another thread (a step split over threads by panels does, every step, and reads the other
    // thread's half of h_{t-1} from its cache). Shares of equal work (a packed batch's rows, longest first, differ).
    in_shares(batch_shares(plan, batch, at::get_num_threads()), forward_rows);
  }
  for (int64_t k = 0; !raw && k < steps; ++k) {  // the tensor path (the fused raw path ran above)
    const Step& s = plan.steps[k];
    const auto step_rows = [&](const at::Tensor& all, int64_t off, int64_t n) {
      return save ? all.narrow(0, off, n) : all.narrow(0, 0, n);
    };
    const auto [c_off, c_prev_off] = c_offsets(k);
    const int64_t continuing = std::min(s.n, k + 1 < steps ? plan.steps[k + 1].n : 0);
    const auto h_prev = rows_before(out.narrow(0, s.prev_off, s.prev_n), h0, s.n);
    const auto c_prev = rows_before(cs.narrow(0, c_prev_off, s.prev_n), c0_acc, s.n).contiguous();
    auto g = step_rows(gates, s.off, s.n);
    auto c = cs.narrow(0, c_off, s.n);
    auto y = out.narrow(0, s.off, s.n);
    auto r = proj_on ? step_rows(rs, s.off, s.n) : (same ? y : r_scratch.narrow(0, 0, s.n));
    if (fused) {
      lstm_step_forward_cpu(h_prev.contiguous().data_ptr<float>(), x_in.data_ptr<float>() + s.off * input_size,
                            s.n, proj, input_size, hidden, packed, packed_ih, bias_row.data_ptr<float>(),
                            c_prev.data_ptr<float>(), save ? g.data_ptr<float>() : nullptr, c.data_ptr<float>(),
                            r.data_ptr<float>());
    } else {
      cell_forward((*recurrent)(h_prev.to(acc)), gx.narrow(0, s.off, s.n), c_prev, g, c, r);
    }
    if (proj_on && same) {
      at::mm_out(y, r, w_hr_t);
    } else if (proj_on) {
      y.copy_(at::mm(r, w_hr_t));
    } else if (!same) {
      y.copy_(r);
    }
    keep_ending_rows(c_off, 0, continuing, s.n);
  }
  auto lead_shape = [&](int64_t width) {
    std::vector<int64_t> shape(lead.begin(), lead.end());
    shape.push_back(width);
    return shape;
  };
  const auto last = index(plan.last, out.device());
  auto h_n = out.index_select(0, last).to(h0.scalar_type());
  auto c_n = (save ? cs.index_select(0, last) : c_last).to(c0.scalar_type());
  if (!save) {
    const auto none = at::empty({0}, acc_options);
    return {out.view(lead_shape(proj)), h_n, c_n, none, none, none};
  }
  return {out.view(lead_shape(proj)), h_n, c_n, gates.view(lead_shape(4 * hidden)), cs.view(lead_shape(hidden)),
          proj_on ? rs.view(lead_shape(hidden)) : rs};
}

LstmBackward lstm_layer_backward(const at::Tensor& d_out, const at::Tensor& d_hn, const at::Tensor& d_cn,
                                 const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                 const std::optional<at::Tensor>& batch_sizes, bool reverse, const at::Tensor& out,
                                 const at::Tensor& gates, const at::Tensor& cs, const at::Tensor& rs,
                                 std::array<bool, 7> output_mask) {
  const auto acc = gates.scalar_type();
  const int64_t hidden = c0.size(1), proj = h0.size(1), batch = h0.size(0);
  const auto g_all = gates.reshape({-1, 4 * hidden}).contiguous();
  const auto c_all = cs.reshape({-1, hidden}).contiguous();
  const auto out_all = out.reshape({-1, proj});
  const int64_t rows = g_all.size(0);
  const auto plan = make_schedule(batch_sizes, out.size(0), batch, reverse);

  const auto d_out_acc = d_out.reshape({-1, proj}).to(acc).contiguous();
  const auto d_hn_acc = d_hn.to(acc).contiguous();
  const auto c0_acc = c0.to(acc).contiguous();
  const auto w = w_hh.to(acc);
  // Fused as the forward's step (cpu/lstm.cpp), where there is no projection; else d_gates W_hh, what a step's
  // gates pass back to the h they read, as a GEMM, then the cell's backward.
  const bool fused = !w_hr.has_value() && lstm_fused_step_takes(w_hh);
  const auto packed = fused ? lstm_pack_feedback_cpu(w) : at::Tensor();
  std::optional<Linear> feedback;
  if (!fused) feedback.emplace(w.t(), std::nullopt, batch);
  const auto w_r = w_hr.has_value() ? w_hr->to(acc) : at::Tensor();
  auto d_gates = at::empty({rows, 4 * hidden}, g_all.options());
  // dL/dh of every row: kept whole for dW_hr with a projection, one step's worth otherwise.
  auto d_h = fused ? at::Tensor() : at::empty({w_hr.has_value() ? rows : batch, proj}, g_all.options());
  auto dr_scratch = w_hr.has_value() ? at::empty({batch, hidden}, g_all.options()) : at::Tensor();
  auto dc = d_cn.to(acc, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);  // updated in place

  if (fused) {
    // As the fused forward: each thread takes a share of the batch (rows [b0, b1)) through every step, on raw
    // rows (no tensors made per step).
    auto c_scratch = at::empty({batch, hidden}, g_all.options());  // c_{t-1} rows gathered from cs and c0
    const float *const g_p = g_all.data_ptr<float>(), *const c_p = c_all.data_ptr<float>(),
                *const d_out_p = d_out_acc.data_ptr<float>(), *const d_hn_p = d_hn_acc.data_ptr<float>(),
                *const c0_p = c0_acc.data_ptr<float>();
    float *const d_gates_p = d_gates.data_ptr<float>(), *const dc_p = dc.data_ptr<float>(),
                 *const c_scratch_p = c_scratch.data_ptr<float>();
    const auto backward_rows = [&](int64_t b0, int64_t b1) {
      const auto mine = [&](int64_t n) { return std::clamp<int64_t>(n - b0, 0, b1 - b0); };  // of a step's n rows
      Step next{0, 0, 0, 0};  // the step processed after this one in the forward
      for (auto it = plan.steps.rbegin(); it != plan.steps.rend(); ++it) {
        const Step& s = *it;
        const int64_t n = mine(s.n), k = std::min(n, mine(next.n)), next_off = next.off + b0;  // rows going on
        next = s;
        if (n == 0) continue;
        const int64_t off = s.off + b0;
        const float* c_prev = rows_before(c_p + (s.prev_off + b0) * hidden, mine(s.prev_n), c0_p + b0 * hidden, n,
                                          hidden, c_scratch_p + b0 * hidden);
        // Where no rows go on, next_off may lie past the last row: no pointer is formed there.
        lstm_step_backward_cpu(k > 0 ? d_gates_p + next_off * 4 * hidden : nullptr, k, d_out_p + off * hidden,
                               d_hn_p + b0 * hidden, packed, g_p + off * 4 * hidden, c_p + off * hidden, c_prev,
                               dc_p + b0 * hidden, d_gates_p + off * 4 * hidden, n, hidden);
      }
    };
    in_shares(batch_shares(plan, batch, at::get_num_threads()), backward_rows);
  }
  Step next{0, 0, 0, 0};  // the step processed after this one in the forward
  for (auto it = plan.steps.rbegin(); !fused && it != plan.steps.rend(); ++it) {  // (the fused path ran above)
    const Step& s = *it;
    const int64_t k = std::min(s.n, next.n), next_off = next.off;  // the rows that go on, and where
    next = s;
    const auto c_prev = rows_before(c_all.narrow(0, s.prev_off, s.prev_n), c0_acc, s.n).contiguous();
    auto dc_rows = dc.narrow(0, 0, s.n);
    auto dg = d_gates.narrow(0, s.off, s.n);
    const auto step_gates = g_all.narrow(0, s.off, s.n), step_c = c_all.narrow(0, s.off, s.n);
    // A row active at the next step feeds its h into that step's gates; otherwise its h is h_n.
    auto dh = d_h.narrow(0, w_hr.has_value() ? s.off : 0, s.n);
    dh.copy_(d_out_acc.narrow(0, s.off, s.n));
    if (k > 0) dh.narrow(0, 0, k).add_((*feedback)(d_gates.narrow(0, next_off, k)));
    if (k < s.n) dh.narrow(0, k, s.n - k).add_(d_hn_acc.narrow(0, k, s.n - k));
    auto dr = dh;
    if (w_hr.has_value()) {
      dr = dr_scratch.narrow(0, 0, s.n);
      at::mm_out(dr, dh, w_r);
    }
    cell_backward(step_gates, step_c, c_prev, dr, dc_rows, dg);
  }
  // The gradients asked for, each one GEMM over all steps; the others are empty, never computed.
  const auto [want_dx, want_dh0, want_dc0, want_dw_ih, want_dw_hh, want_d_bias, want_dw_hr] = output_mask;
  const auto none = [](const at::Tensor& like) { return at::empty({0}, like.options()); };
  const auto dw_hh = want_dw_hh ? gemm(d_gates.t(), at::cat({out_all, h0}).index_select(
                                                        0, index(plan.previous, out.device())).to(acc))
                                : none(g_all);
  const auto dh0 = want_dh0 ? gemm(d_gates.index_select(0, index(plan.first, out.device())), w).to(h0.scalar_type())
                            : none(h0);
  const auto dw_hr = want_dw_hr && w_hr.has_value() ? gemm(d_h.t(), rs.reshape({-1, hidden})) : none(g_all);
  const auto dx = want_dx ? gemm(d_gates, w_ih.to(acc)).to(x.scalar_type()).view(x.sizes()) : none(x);
  const auto dw_ih = want_dw_ih ? gemm(d_gates.t(), x.reshape({-1, x.size(-1)}).to(acc)) : none(g_all);
  return {dx, dh0, want_dc0 ? dc.to(c0.scalar_type()) : none(c0), dw_ih, dw_hh,
          want_d_bias ? d_gates.sum(0) : none(g_all), dw_hr};
}

}  // namespace fastenc
