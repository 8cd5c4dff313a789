"""fastenc::lstm_layer: one LSTM layer in one direction as a torch.library custom op, one autograd for all backends.

The op is the whole layer: the input projection of every step (gates_x = x @ W_ih^T + bias: one GEMM, or inside
the native CPU backend's fused step kernel on AVX-512) and the recurrence; so each backend computes the
projection's gradients (dx, dW_ih, d bias) with the GEMMs it runs fastest (the native CPU backend through oneDNN,
which torch's own matmul does not use for float32).
Gate order i, f, g, o (torch's). P = proj_size if W_hr is given, else H.

Contract every implementation follows (reference, kernels/lstm.py, fastenc.native from csrc/lstm.cpp), over the
argument records LstmArgs (x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, save) and LstmBackwardArgs
(d_out, d_hn, d_cn, out, gates, cs, rs, output_mask), below:
  lstm_layer_forward(a) -> (out, h_n, c_n, gates, cs, rs)
      x: (T, B, I) with batch_sizes None, or (N, I) packed as PackedSequence.data with batch_sizes (T,) int64 on
      the CPU (non-increasing, batch_sizes[0] = B, sum N): at step t only the first batch_sizes[t] rows are active,
      the others keep their state. Step t's rows are the flat rows offset_t .. offset_t + n_t either way.
      reverse: the steps run T-1 .. 0 (in a packed batch the active rows then grow; a row starts from h0 / c0 at its
      last time step).
      h0: (B, P), c0: (B, H), w_ih: (4H, I), w_hh: (4H, P), bias: (4H,) (b_ih + b_hh) or None, w_hr: (P, H) or None;
      all in x's dtype. gates_x = x @ w_ih^T + bias is computed in x's dtype.
      out: x's leading shape x P, in x's dtype (h_t = W_hr (o * tanh c_t), or o * tanh c_t).
      h_n: (B, P), c_n: (B, H): each row's state after its last processed step, in h0's / c0's dtype.
      Saved for the backward, in float32 (float64 for float64 input): gates (leading x 4H, i f g o after their
      nonlinearities), cs (leading x H, every c_t), rs (leading x H, every o * tanh c_t; empty without w_hr).
      A step reads h_{t-1} from the stored out (in its dtype) and c_{t-1} from cs.
      save=False (no backward will run: inference): gates, cs and rs are not wanted. An implementation may skip
      storing them (the native one keeps one step's worth); the op returns them empty either way.
  lstm_layer_backward(g, a) -> (dx, dh0, dc0, dw_ih, dw_hh, d_bias, dw_hr)
      dx like x; dh0 / dc0 in h0's / c0's dtype; dw_ih (4H, I), dw_hh (4H, P), d_bias (4H,) and dw_hr (P, H, or
      empty without w_hr) in the saved dtype (the op rounds them to the parameters' dtype). With d_gates the
      gradients of the preactivations (every step's rows): dx = d_gates @ W_ih, dw_ih = d_gates^T @ x,
      d_bias = the column sums, dw_hh = d_gates^T @ (the h each step started from); each one GEMM over all steps.
      output_mask: 7 bools, whether each of the 7 is wanted (autograd's needs_input_grad: a first layer's dx and
      a frozen layer's weights are not). One that is not is neither computed nor allocated: an empty (0,) tensor
      of its dtype.
The ops take the backend's name (from backends.select, in functional); the backward runs the forward's.

Designed for a native implementation to slot in: everything is plain tensors and ints, batch_sizes stays on the
CPU (the step loop needs its values on the host, as cuDNN's does), and the saved tensors are backend-neutral, so
a C++/CUDA backward may consume what any forward saved. The triton backend's persistent kernels (the time loop
inside one launch) run under the same contract.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastenc import backends
from fastenc.ops import accumulation_dtype, autograd_gradients, save_args, saved_args, spec_op


class LstmArgs(NamedTuple):
    """One layer in one direction (the contract above says what each argument is)."""
    x: Tensor
    h0: Tensor
    c0: Tensor
    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor | None
    w_hr: Tensor | None
    batch_sizes: Tensor | None
    reverse: bool
    save: bool


class LstmBackwardArgs(NamedTuple):
    """The gradients of the forward's three outputs, what it saved, and which of the 7 gradients are wanted."""
    d_out: Tensor
    d_hn: Tensor
    d_cn: Tensor
    out: Tensor
    gates: Tensor
    cs: Tensor
    rs: Tensor
    output_mask: list[bool]


def _triton_supports(a: LstmArgs) -> str | None:
    return "the triton lstm supports float16, bfloat16 and float32" if a.x.dtype == torch.float64 else None


_FUSED_CPU_STEP = backends.native_cpu_feature("lstm_fused_step_cpu_available")  # x86 with AVX-512


def _native_slower(a: LstmArgs) -> str | None:
    """In float32 on a CPU, the native LSTM is ahead of torch's oneDNN LSTM with its fused step only; without it,
    a GEMM and a cell kernel per step, which torch's LSTM outruns (bench/results)."""
    if a.x.device.type == "cpu" and a.x.dtype == torch.float32 and not _FUSED_CPU_STEP:
        return "without AVX-512 the native float32 LSTM has no fused step, and torch's oneDNN LSTM is faster"
    return None


# The torch backend is torch's LSTM op itself, with its own autograd: functional runs it in place of this op.
backends.register(
    "lstm", {"reference": "fastenc.reference.lstm", "torch": "fastenc.torch_ops.lstm",
             "triton": "fastenc.kernels.lstm", "native": "fastenc.native"},
    supports={"triton": _triton_supports}, slower={"native": _native_slower},
)


@spec_op("fastenc::lstm_layer", LstmArgs, returns="(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def lstm_layer(a: LstmArgs, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out, h_n, c_n, *saved = backends.implementation("lstm", backend).lstm_layer_forward(a)
    if not a.save:
        saved = [t.new_empty(0) for t in saved]
    return out, h_n, c_n, *saved


@lstm_layer.fake
def _(a):
    lead, hidden = a.x.shape[:-1], a.c0.shape[1]
    saved = accumulation_dtype(a.x.dtype)
    shapes = ((*lead, 4 * hidden), (*lead, hidden), (*lead, hidden) if a.w_hr is not None else (0,))
    return (a.x.new_empty((*lead, a.h0.shape[1])), a.h0.new_empty(a.h0.shape), a.c0.new_empty(a.c0.shape),
            *(a.x.new_empty(shape if a.save else (0,), dtype=saved) for shape in shapes))


@spec_op("fastenc::lstm_layer_backward", LstmBackwardArgs, LstmArgs,
         returns="(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def lstm_layer_backward(g: LstmBackwardArgs, a: LstmArgs, backend: str) -> tuple[Tensor, ...]:
    return backends.implementation("lstm", backend).lstm_layer_backward(g, a)


@lstm_layer_backward.fake
def _(g, a):
    shapes = (a.x.shape, a.h0.shape, a.c0.shape, a.w_ih.shape, a.w_hh.shape, a.w_ih.shape[:1],
              (0,) if a.w_hr is None else a.w_hr.shape)
    like = (a.x, a.h0, a.c0, g.gates, g.gates, g.gates, g.gates)
    return tuple(t.new_empty(shape if wanted else (0,)) for t, shape, wanted in zip(like, shapes, g.output_mask))


def _setup_context(ctx, inputs, output):
    a, ctx.backend = lstm_layer.unflatten(inputs)
    out, _, _, gates, cs, rs = output
    ctx.mark_non_differentiable(gates, cs, rs)
    ctx.set_materialize_grads(False)  # else each backward gets a zero-filled (T, B, 4H) gradient for `gates`
    save_args(ctx, a, out, gates, cs, rs)


def _backward(ctx, d_out, d_hn, d_cn, *_saved_grads):
    (out, gates, cs, rs), a = saved_args(ctx)
    if not a.save:
        raise RuntimeError("fastenc::lstm_layer ran with save=False, so it has no backward; pass save=True")
    unused = [None] * (len(a) - 7 + 1)  # batch_sizes, the flags and the backend's name take no gradient
    if torch.is_grad_enabled():  # create_graph=True: the gradients are differentiated again
        from fastenc.reference import lstm as reference

        outputs = reference.lstm_layer_forward(a)[:3]
        return *autograd_gradients(outputs, (d_out, d_hn, d_cn), a[:7], ctx.needs_input_grad), *unused
    d_out = torch.zeros_like(out) if d_out is None else d_out
    d_hn = torch.zeros_like(a.h0) if d_hn is None else d_hn
    d_cn = torch.zeros_like(a.c0) if d_cn is None else d_cn
    wanted = list(ctx.needs_input_grad[:7])
    grads = lstm_layer_backward(d_out, d_hn, d_cn, out, gates, cs, rs, wanted, *a, ctx.backend)
    # d_bias takes w_ih's dtype: the op's bias is the sum of torch's two bias vectors, in the weights' dtype.
    like = (a.x, a.h0, a.c0, a.w_ih, a.w_hh, a.w_ih, a.w_hr)
    return *(g.to(t.dtype) if want else None for g, t, want in zip(grads, like, wanted)), *unused


lstm_layer.register_autograd(_backward, setup_context=_setup_context)
