// Scaled dot-product attention on CPU (cpu/attention.cpp): flash style, K/V in tiles, an online softmax with
// float32 running max and sum, the log-sum-exp saved for the backward, which recomputes the probabilities from
// it; no S_q x S_k buffer is stored. The contract is fastenc/ops/attention.py's (padded (B, H, S, D) or packed
// (T, H, D) with cu_seqlens; an additive float bias broadcast to (B, H, S_q, S_k); a (B, S_k) bool key padding
// mask; causal, top-left aligned). float32, no dropout.
// x86 with AVX2 + FMA or AVX-512: attention_cpu_available() says whether this CPU runs it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastenc {

bool attention_cpu_available();

// -> (out, lse): out in q's layout and dtype, contiguous; lse float32, (B, H, S_q) or (H, T_q), +inf for a query
// that sees no key (its output is 0).
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, bool is_causal, double scale);

// -> (dq, dk, dv, dbias), contiguous, in the inputs' dtypes; dbias: the gradient of the additive bias, (B, H, S_q,
// S_k) float32, when bias_grad (padded layout only), else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse, bool bias_grad, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, bool is_causal, double scale);

}  // namespace fastenc
