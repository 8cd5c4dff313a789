"""One LSTM layer in one direction, in plain PyTorch: the cell loop and its backward (BPTT) written out.

Contract: fastenc/ops/lstm.py. Math in float32 (float64 for float64 input); h_{t-1} is read back from the
stored output (in the input dtype), as the kernels do. The backward is explicit because autograd is switched off
inside a custom op's implementation; tests check it against autograd of `lstm_layer_forward`.

Rows: fastenc/ops/lstm_plan.py (the plan every Python implementation walks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastenc.ops import accumulation_dtype
from fastenc.ops.lstm_plan import row_maps, schedule


def _previous(states: Tensor, initial: Tensor, off_prev: int, n_prev: int, n: int) -> Tensor:
    """The n rows a step starts from: the previous step's rows where they were active, the initial state after."""
    k = min(n, n_prev)
    return torch.cat([states[off_prev:off_prev + k], initial[k:n]])


def lstm_layer_forward(a):
    # the saved tensors are computed anyway (save is for implementations that can skip them).
    x, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, _ = a
    acc = accumulation_dtype(x.dtype)
    hidden, proj = c0.shape[1], h0.shape[1]
    lead = x.shape[:-1]
    gx = torch.nn.functional.linear(x, w_ih, bias).reshape(-1, 4 * hidden).to(acc)
    rows_total = gx.shape[0]
    plan = schedule(batch_sizes, x.shape[0], h0.shape[0], reverse)
    out = x.new_empty(rows_total, proj)
    gates = gx.new_empty(rows_total, 4 * hidden)
    cs = gx.new_empty(rows_total, hidden)
    rs = gx.new_empty(rows_total, hidden) if w_hr is not None else gx.new_empty(0)
    w = w_hh.to(acc)
    for off, n, off_prev, n_prev in plan:
        h_prev = _previous(out, h0, off_prev, n_prev, n).to(acc)
        c_prev = _previous(cs, c0.to(acc), off_prev, n_prev, n)
        pre = gx[off:off + n] + h_prev @ w.t()
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c_prev + i * g
        r = o * torch.tanh(c)
        gates[off:off + n] = torch.cat([i, f, g, o], dim=1)
        cs[off:off + n] = c
        if w_hr is not None:
            rs[off:off + n] = r
            r = r @ w_hr.to(acc).t()
        out[off:off + n] = r.to(out.dtype)
    _, last, _ = row_maps(batch_sizes, len(plan), h0.shape[0], reverse, out.device)
    h_n = out[last].to(h0.dtype)
    c_n = cs[last].to(c0.dtype)
    return (out.reshape(*lead, proj), h_n, c_n, gates.reshape(*lead, 4 * hidden), cs.reshape(*lead, hidden),
            rs.reshape(*lead, hidden) if w_hr is not None else rs)


def lstm_layer_backward(g, a):
    d_out, d_hn, d_cn, out, gates, cs, rs, output_mask = g
    x, h0, c0, w_ih, w_hh, _, w_hr, batch_sizes, reverse, _ = a
    acc = gates.dtype
    hidden, proj = c0.shape[1], h0.shape[1]
    lead = gates.shape[:-1]
    d_out = d_out.reshape(-1, proj).to(acc)
    gates, cs, out = gates.reshape(-1, 4 * hidden), cs.reshape(-1, hidden), out.reshape(-1, proj)
    rows_total = gates.shape[0]
    plan = schedule(batch_sizes, lead[0], h0.shape[0], reverse)
    w = w_hh.to(acc)
    d_hn, dc = d_hn.to(acc), d_cn.to(acc).clone()  # dc: the running gradient of each row's cell state
    c0_acc = c0.to(acc)
    d_gates = gates.new_zeros(rows_total, 4 * hidden)
    d_h = gates.new_zeros(rows_total, proj) if w_hr is not None else None
    nxt = (0, 0)  # the step processed after this one in the forward: (offset, rows)
    for off, n, off_prev, n_prev in reversed(plan):
        off_next, n_next = nxt
        k = min(n, n_next)
        # A row active at the next step feeds its h into that step's gates; otherwise its h is h_n.
        dh = d_out[off:off + n] + torch.cat([d_gates[off_next:off_next + k] @ w, d_hn[k:n]])
        dr = dh
        if w_hr is not None:
            d_h[off:off + n] = dh
            dr = dh @ w_hr.to(acc)
        i, f, g, o = gates[off:off + n].chunk(4, dim=1)
        tc = torch.tanh(cs[off:off + n])
        c_prev = _previous(cs, c0_acc, off_prev, n_prev, n)
        dc_t = dc[:n] + dr * o * (1 - tc * tc)
        d_gates[off:off + n] = torch.cat(
            [dc_t * g * i * (1 - i), dc_t * c_prev * f * (1 - f), dc_t * i * (1 - g * g), dr * tc * o * (1 - o)], dim=1
        )
        dc[:n] = dc_t * f
        nxt = (off, n)
    first, _, previous = row_maps(batch_sizes, len(plan), h0.shape[0], reverse, out.device)
    want_dx, want_dh0, want_dc0, want_dw_ih, want_dw_hh, want_d_bias, want_dw_hr = output_mask
    h_prev = torch.cat([out, h0]).to(acc)[previous] if want_dw_hh else None
    x_rows = x.reshape(-1, x.shape[-1]).to(acc) if want_dw_ih else None
    return (
        (d_gates @ w_ih.to(acc)).to(x.dtype).reshape(x.shape) if want_dx else x.new_empty(0),
        (d_gates[first] @ w).to(h0.dtype) if want_dh0 else h0.new_empty(0),
        dc.to(c0.dtype) if want_dc0 else c0.new_empty(0),
        d_gates.t() @ x_rows if want_dw_ih else gates.new_empty(0),
        d_gates.t() @ h_prev if want_dw_hh else gates.new_empty(0),
        d_gates.sum(0) if want_d_bias else gates.new_empty(0),
        d_h.t() @ rs.reshape(-1, hidden) if want_dw_hr and w_hr is not None else gates.new_empty(0),
    )
