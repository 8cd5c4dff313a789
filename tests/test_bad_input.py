"""The bad-input matrix: every condition fastenc validates, the exception it raises, and a message that names the
offending argument. CASES is the one table; it drives the test below and docs/bad-input.md, which is regenerated
with `.venv/bin/python -m tests.test_bad_input > docs/bad-input.md` (a test fails when the two differ).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from tests.conftest import REQUIRED  # before fastenc: it sets TRITON_INTERPRET, read when fastenc is imported
import fastenc
from fastenc import backends
from fastenc import functional as F
from fastenc.nn._errors import ArgumentTypeError, ArgumentValueError

DOC = Path(__file__).parent.parent / "docs" / "bad-input.md"
fnn = fastenc.nn
# Triton runs CPU tensors only through its interpreter (set by conftest where there is no GPU).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    api: str
    condition: str
    call: Callable  # a module row takes the namespace of its classes: fastenc.nn by default, torch.nn to compare
    error: type[Exception]
    match: str  # a regex the message must match; it names the offending argument
    torch: type[Exception] | None = None  # what torch.nn raises for the same call (module rows that compare)
    backend: str | None = None  # the backend selected for the call

    @property
    def id(self) -> str:
        return f"{self.api}: {self.condition}"


X = torch.randn(3, 8)
Q, K = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)  # (B, H, S, D)
PACKED_Q = torch.randn(8, 2, 16)  # (T, H, D): sequences of 3 and 5 tokens
CU = torch.tensor([0, 3, 8], dtype=torch.int32)
E, HEADS = 12, 3
SEQ = torch.randn(2, 5, E)  # (N, S, E) for the batch_first attention modules
PAD = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # (N, S) key padding, True = pad
STEPS = torch.randn(4, 3, 5)  # (T, B, input_size) for an LSTM(5, 6)
PACKED = pack_padded_sequence(STEPS, torch.tensor([4, 2, 1]))  # 7 rows, batch_sizes [3, 2, 1, 1]
W_IH, W_HH = torch.randn(24, 5), torch.randn(24, 6)  # one LSTM layer: input 5, hidden 6


def _meta(*shape, dtype=torch.float32):
    """A tensor on another device than the inputs (meta: no data, any machine)."""
    return torch.empty(*shape, dtype=dtype, device="meta")


def _mha(nn, query=SEQ, key=SEQ, value=SEQ, **kwargs):
    """A batch_first MultiheadAttention(E, HEADS) on its fused path (need_weights=False)."""
    return nn.MultiheadAttention(E, HEADS, batch_first=True)(query, key, value, need_weights=False, **kwargs)


def _layer(nn, src=SEQ, **kwargs):
    return nn.TransformerEncoderLayer(E, HEADS, 16, batch_first=True)(src, **kwargs)


def _encoder(nn, src=SEQ, **kwargs):
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, batch_first=True)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)(src, **kwargs)


def _lstm(nn, input=STEPS, hx=None):
    return nn.LSTM(5, 6)(input, hx)


def _lstm_layer(**change):
    args = dict(input=STEPS, h0=None, c0=None, weight_ih=W_IH, weight_hh=W_HH)
    return F.lstm_layer(**{**args, **change})


def _select(name):
    with fastenc.backend(name):
        pass


def _select_unavailable(name, reason):
    with mock.patch.dict(backends.UNAVAILABLE, {name: reason}):
        _select(name)


def _triton_without_interpreter():
    with mock.patch.object(backends, "INTERPRETER", False):
        F.layer_norm(X, (8,))


LN, ATT, VARLEN, BA, LSTM_F = ("functional." + n for n in
                               ("layer_norm", "attention", "attention_varlen", "bias_activation", "lstm_layer"))
SHAPES = r"must have shape"
CASES = [
    # functional.layer_norm
    Case(LN, "input is not a Tensor", lambda: F.layer_norm([0.0] * 8, (8,)), TypeError, "input must be a Tensor"),
    Case(LN, "integer input", lambda: F.layer_norm(X.long(), (8,)), TypeError, "input must be float16"),
    Case(LN, "normalized_shape empty or not positive", lambda: F.layer_norm(X, (0,)), ValueError,
         "normalized_shape must be a non-empty sequence of positive ints"),
    Case(LN, "normalized_shape is not input's trailing dims", lambda: F.layer_norm(X, (7,)), ValueError,
         r"normalized_shape \(7,\) does not match the trailing dimensions of input"),
    Case(LN, "weight of another shape", lambda: F.layer_norm(X, (8,), torch.ones(7)), ValueError,
         rf"weight {SHAPES} \(8,\)"),
    Case(LN, "weight is not a Tensor", lambda: F.layer_norm(X, (8,), [1.0] * 8), TypeError,
         "weight must be a Tensor or None"),
    Case(LN, "weight on another device", lambda: F.layer_norm(X, (8,), _meta(8)), ValueError, "weight is on meta"),
    Case(LN, "weight of another dtype (float32 only with half / bfloat16 input)",
         lambda: F.layer_norm(X, (8,), X[0].double()), TypeError, "weight has dtype torch.float64"),
    Case(LN, "bias of another shape", lambda: F.layer_norm(X, (8,), None, torch.ones(9)), ValueError,
         rf"bias {SHAPES} \(8,\)"),
    Case(LN, "residual of another shape", lambda: F.layer_norm(X, (8,), residual=X[:2]), ValueError,
         rf"residual {SHAPES} \(3, 8\)"),
    Case(LN, "residual of another dtype", lambda: F.layer_norm(X, (8,), residual=X.half()), TypeError,
         "residual has dtype torch.float16"),
    Case(LN, "a row wider than the Triton kernel holds",
         lambda: F.layer_norm(torch.randn(1, 65537, device=TRITON_DEVICE), (65537,)), ValueError,
         r"the triton layer_norm .* supports N <= 65536", backend="triton"),
    # functional.attention
    Case(ATT, "q is not a Tensor", lambda: F.attention(None, K, K), TypeError, "q must be a Tensor"),
    Case(ATT, "q not 4-D", lambda: F.attention(Q[0], K, K), ValueError, r"q must be 4-D \(B, H, S, D\)"),
    Case(ATT, "integer q", lambda: F.attention(Q.long(), K, K), TypeError, "q must be float16"),
    Case(ATT, "k of another dtype than q", lambda: F.attention(Q, K.double(), K), ValueError,
         "k is torch.float64 on cpu but q is torch.float32 on cpu"),
    Case(ATT, "v on another device than q", lambda: F.attention(Q, K, _meta(*K.shape)), ValueError,
         "v is torch.float32 on meta but q"),
    Case(ATT, "k and v of different shapes", lambda: F.attention(Q, K, K[:, :, :6]), ValueError,
         "k and v must have the same shape"),
    Case(ATT, "q and k differ in heads or head dim", lambda: F.attention(Q, K[:, :2], K[:, :2]), ValueError,
         r"q \(2, 3, 5, 8\) and k \(2, 2, 7, 8\) must agree in heads and head dim"),
    Case(ATT, "q and k differ in batch", lambda: F.attention(Q, K[:1], K[:1]), ValueError,
         "q and k must have the same batch size"),
    Case(ATT, "attn_mask neither bool nor float", lambda: F.attention(Q, K, K, attn_mask=torch.ones(5, 7).int()),
         TypeError, "attn_mask must be a bool or floating-point Tensor"),
    Case(ATT, "attn_mask on another device", lambda: F.attention(Q, K, K, attn_mask=_meta(5, 7)), ValueError,
         "attn_mask is on meta"),
    Case(ATT, "attn_mask does not broadcast to (B, H, S_q, S_k)", lambda: F.attention(Q, K, K, attn_mask=X), ValueError,
         r"attn_mask of shape \(3, 8\) does not broadcast"),
    Case(ATT, "key_padding_mask not bool", lambda: F.attention(Q, K, K, key_padding_mask=torch.zeros(2, 7)),
         TypeError, "key_padding_mask must be a bool Tensor"),
    Case(ATT, "key_padding_mask not (B, S_k)",
         lambda: F.attention(Q, K, K, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(B, S_k\) = \(2, 7\)"),
    Case(ATT, "dropout_p outside [0, 1)", lambda: F.attention(Q, K, K, dropout_p=1.0), ValueError,
         r"dropout_p must be in \[0, 1\)"),
    Case(ATT, "float64 on the Triton kernel",
         lambda: F.attention(*(t.double().to(TRITON_DEVICE) for t in (Q, K, K))), ValueError,
         "backend 'triton' cannot run op 'attention' on these inputs: the triton attention supports float16, "
         "bfloat16 and float32", backend="triton"),
    # functional.attention_varlen
    Case(VARLEN, "q not 3-D", lambda: F.attention_varlen(Q, Q, Q, CU, CU), ValueError, r"q must be 3-D \(T, H, D\)"),
    Case(VARLEN, "cu_seqlens_q not an integer vector", lambda: F.attention_varlen(PACKED_Q, PACKED_Q, PACKED_Q,
                                                                                 CU.float(), CU),
         ValueError, "cu_seqlens_q must be a 1-D int32 tensor"),
    Case(VARLEN, "cu_seqlens_k not 1-D", lambda: F.attention_varlen(PACKED_Q, PACKED_Q, PACKED_Q, CU, CU[None]),
         ValueError, "cu_seqlens_k must be a 1-D int32 tensor"),
    Case(VARLEN, "cu_seqlens_q on another device",
         lambda: F.attention_varlen(PACKED_Q, PACKED_Q, PACKED_Q, _meta(3, dtype=torch.int32), CU), ValueError,
         "cu_seqlens_q is on meta"),
    Case(VARLEN, "cu_seqlens_q does not end at the token count",
         lambda: F.attention_varlen(PACKED_Q, PACKED_Q, PACKED_Q, torch.tensor([0, 3, 9]), CU), ValueError,
         r"cu_seqlens_q must rise from 0 to the number of tokens \(8\)"),
    Case(VARLEN, "cu_seqlens_k decreases",
         lambda: F.attention_varlen(PACKED_Q, PACKED_Q, PACKED_Q, CU, torch.tensor([0, 5, 3, 8])), ValueError,
         "cu_seqlens_k must rise from 0"),
    Case(VARLEN, "cu_seqlens_q and cu_seqlens_k count different sequences",
         lambda: F.attention_varlen(PACKED_Q, PACKED_Q, PACKED_Q, CU, torch.tensor([0, 2, 6, 8])), ValueError,
         "cu_seqlens_q and cu_seqlens_k must describe as many sequences"),
    Case(VARLEN, "max_seqlen_q below the longest sequence (CPU)",
         lambda: F.attention_varlen(PACKED_Q, PACKED_Q, PACKED_Q, CU, CU, 4, 5), ValueError,
         r"max_seqlen_q \(4\) is less than the longest sequence in cu_seqlens_q \(5\)"),
    Case(VARLEN, "max_seqlen_k below the longest sequence (CPU)",
         lambda: F.attention_varlen(PACKED_Q, PACKED_Q, PACKED_Q, CU, CU, 5, 3), ValueError,
         r"max_seqlen_k \(3\) is less than the longest sequence in cu_seqlens_k \(5\)"),
    # functional.bias_activation
    Case(BA, "integer input", lambda: F.bias_activation(X.long(), None), TypeError,
         "input must be a floating-point Tensor with at least one dimension"),
    Case(BA, "0-D input", lambda: F.bias_activation(X[0, 0], None), TypeError,
         "input must be a floating-point Tensor with at least one dimension"),
    Case(BA, "unknown activation", lambda: F.bias_activation(X, None, "swish"), ValueError,
         r"activation must be one of \('relu', 'gelu', 'gelu_tanh'\), got 'swish'"),
    Case(BA, "bias not (N,)", lambda: F.bias_activation(X, torch.ones(3)), ValueError, rf"bias {SHAPES} \(8,\)"),
    Case(BA, "bias of another dtype", lambda: F.bias_activation(X, torch.ones(8).double()), TypeError,
         "bias has dtype torch.float64"),
    Case(BA, "bias on another device", lambda: F.bias_activation(X, _meta(8)), ValueError, "bias is on meta"),
    Case(BA, "dropout_p outside [0, 1)", lambda: F.bias_activation(X, None, "relu", -0.1), ValueError,
         r"dropout_p must be in \[0, 1\)"),
    # functional.lstm_layer
    Case(LSTM_F, "integer input", lambda: _lstm_layer(input=STEPS.long()), TypeError, "input must be a float16"),
    Case(LSTM_F, "input not (T, B, input_size)", lambda: _lstm_layer(input=STEPS[0]), ValueError,
         r"input must be \(T, B, input_size\), got shape \(3, 5\)"),
    Case(LSTM_F, "input not (N, input_size) with batch_sizes",
         lambda: _lstm_layer(batch_sizes=torch.tensor([3, 3, 3, 3])), ValueError,
         r"input must be \(N, input_size\) with batch_sizes"),
    Case(LSTM_F, "weight_ih rows not a multiple of 4", lambda: _lstm_layer(weight_ih=W_IH[:22]), ValueError,
         r"weight_ih must be a \(4 \* hidden_size, input_size\) Tensor"),
    Case(LSTM_F, "weight_ih of another input_size", lambda: _lstm_layer(weight_ih=W_IH[:, :4]), ValueError,
         rf"weight_ih {SHAPES} \(24, 5\)"),
    Case(LSTM_F, "weight_hh missing", lambda: _lstm_layer(weight_hh=None), TypeError, "weight_hh must be a Tensor"),
    Case(LSTM_F, "weight_hh not (4 * hidden, proj)", lambda: _lstm_layer(weight_hh=W_HH[:, :5]), ValueError,
         rf"weight_hh {SHAPES} \(24, 6\)"),
    Case(LSTM_F, "bias_ih not (4 * hidden,)", lambda: _lstm_layer(bias_ih=torch.ones(23)), ValueError,
         rf"bias_ih {SHAPES} \(24,\)"),
    Case(LSTM_F, "bias_hh of another dtype", lambda: _lstm_layer(bias_hh=torch.ones(24).double()), TypeError,
         "bias_hh has dtype torch.float64"),
    Case(LSTM_F, "weight_hr not (proj, hidden)", lambda: _lstm_layer(weight_hr=torch.ones(4, 5)), ValueError,
         rf"weight_hr {SHAPES} \(4, 6\)"),
    Case(LSTM_F, "weight_hr is not a Tensor", lambda: _lstm_layer(weight_hr=[[1.0] * 6] * 4), TypeError,
         "weight_hr must be a Tensor or None"),
    Case(LSTM_F, "h0 not (B, proj)", lambda: _lstm_layer(h0=torch.zeros(2, 6)), ValueError, rf"h0 {SHAPES} \(3, 6\)"),
    Case(LSTM_F, "h0 on another device", lambda: _lstm_layer(h0=_meta(3, 6)), ValueError, "h0 is on meta"),
    Case(LSTM_F, "c0 not (B, hidden)", lambda: _lstm_layer(c0=torch.zeros(3, 5)), ValueError, rf"c0 {SHAPES} \(3, 6\)"),
    Case(LSTM_F, "c0 of another dtype", lambda: _lstm_layer(c0=torch.zeros(3, 6).double()), TypeError,
         "c0 has dtype torch.float64"),
    Case(LSTM_F, "batch_sizes not int64", lambda: _lstm_layer(input=PACKED.data, batch_sizes=PACKED.batch_sizes.int()),
         ValueError, "batch_sizes must be a 1-D int64 tensor"),
    Case(LSTM_F, "batch_sizes not on the CPU",
         lambda: _lstm_layer(input=PACKED.data, batch_sizes=_meta(4, dtype=torch.int64)), ValueError,
         "batch_sizes must be on the CPU"),
    Case(LSTM_F, "batch_sizes increase", lambda: _lstm_layer(input=PACKED.data, batch_sizes=torch.tensor([2, 3, 1, 1])),
         ValueError, r"batch_sizes must be positive and non-increasing, got \[2, 3, 1, 1\]"),
    Case(LSTM_F, "batch_sizes with a zero", lambda: _lstm_layer(input=PACKED.data, batch_sizes=torch.tensor([7, 0])),
         ValueError, r"batch_sizes must be positive and non-increasing, got \[7, 0\]"),
    Case(LSTM_F, "batch_sizes do not sum to input's rows",
         lambda: _lstm_layer(input=PACKED.data, batch_sizes=torch.tensor([3, 2, 1])), ValueError,
         "batch_sizes sum to 6 but input has 7 rows"),
    Case(LSTM_F, "float64 on the Triton kernel",
         lambda: _lstm_layer(**{k: v.double().to(TRITON_DEVICE) for k, v in
                                dict(input=STEPS, weight_ih=W_IH, weight_hh=W_HH).items()}), ValueError,
         "backend 'triton' cannot run op 'lstm' on these inputs: the triton lstm supports float16, bfloat16 and "
         "float32", backend="triton"),
    # nn.LayerNorm
    Case("nn.LayerNorm", "input width is not normalized_shape", lambda nn=fnn: nn.LayerNorm(8)(X[:, :7]), ValueError,
         r"normalized_shape \(8,\) does not match the trailing dimensions of input \(3, 7\)", RuntimeError),
    Case("nn.LayerNorm", "input of another dtype than the parameters", lambda nn=fnn: nn.LayerNorm(8)(X.double()),
         TypeError, "weight has dtype torch.float32 but input has torch.float64", RuntimeError),
    Case("nn.LayerNorm", "residual of another shape", lambda: fnn.LayerNorm(8)(X, X[:2]), ValueError,
         rf"residual {SHAPES} \(3, 8\)"),
    # nn.MultiheadAttention (need_weights=False; with weights torch's own forward runs)
    Case("nn.MultiheadAttention", "constructor: num_heads does not divide embed_dim",
         lambda nn=fnn: nn.MultiheadAttention(10, 3), AssertionError, "embed_dim must be divisible by num_heads",
         AssertionError),
    Case("nn.MultiheadAttention", "query width is not embed_dim", lambda nn=fnn: _mha(nn, query=SEQ[..., :11]),
         ArgumentValueError, r"query must be \(L, N, 12\)", AssertionError),
    Case("nn.MultiheadAttention", "query neither 2-D nor 3-D", lambda nn=fnn: _mha(nn, query=SEQ[None]),
         AssertionError, "query should be unbatched 2D or batched 3D tensor", AssertionError),
    Case("nn.MultiheadAttention", "key 2-D with a 3-D query", lambda nn=fnn: _mha(nn, key=SEQ[0], value=SEQ[0]),
         AssertionError, r"For batched \(3-D\) `query`, expected `key` and `value` to be 3-D", AssertionError),
    Case("nn.MultiheadAttention", "key and value of different lengths", lambda nn=fnn: _mha(nn, value=SEQ[:, :4]),
         ArgumentValueError, "key and value must have the same length", AssertionError),
    Case("nn.MultiheadAttention", "key of another batch than query",
         lambda nn=fnn: _mha(nn, key=SEQ[:1], value=SEQ[:1]), ValueError,
         r"key and value must have query's batch size: got query \(2, 5, 12\), key \(1, 5, 12\)",
         RuntimeError),
    Case("nn.MultiheadAttention", "query of another dtype than the parameters",
         lambda nn=fnn: _mha(nn, query=SEQ.double(), key=SEQ.double(), value=SEQ.double()), RuntimeError,
         "query has dtype torch.float64 but the module's parameters are torch.float32", RuntimeError),
    Case("nn.MultiheadAttention", "attn_mask neither bool nor float",
         lambda nn=fnn: _mha(nn, attn_mask=torch.zeros(5, 5, dtype=torch.int64)), ArgumentTypeError,
         "attn_mask must be bool or float, got torch.int64", AssertionError),
    Case("nn.MultiheadAttention", "attn_mask not (L, S)",
         lambda nn=fnn: _mha(nn, attn_mask=torch.zeros(5, 4, dtype=torch.bool)), RuntimeError,
         rf"attn_mask {SHAPES} \(L, S\) = \(5, 5\) or \(N \* num_heads, L, S\) = \(6, 5, 5\)", RuntimeError),
    Case("nn.MultiheadAttention", "attn_mask not (N * num_heads, L, S)",
         lambda nn=fnn: _mha(nn, attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool)), RuntimeError,
         rf"attn_mask {SHAPES} .* got \(2, 5, 5\)", RuntimeError),
    Case("nn.MultiheadAttention", "key_padding_mask neither bool nor float",
         lambda nn=fnn: _mha(nn, key_padding_mask=PAD.long()), ArgumentTypeError,
         "key_padding_mask must be bool or float, got torch.int64", AssertionError),
    Case("nn.MultiheadAttention", "key_padding_mask not (N, S)", lambda nn=fnn: _mha(nn, key_padding_mask=PAD[:, :4]),
         ArgumentValueError, rf"key_padding_mask {SHAPES} \(N, S\) = \(2, 5\)", AssertionError),
    Case("nn.MultiheadAttention", "key_padding_mask not (S,) for unbatched input",
         lambda nn=fnn: _mha(nn, query=SEQ[0], key=SEQ[0], value=SEQ[0], key_padding_mask=PAD[:1]),
         AssertionError, r"expected `key_padding_mask` to be `None` or 1-D", AssertionError),
    Case("nn.MultiheadAttention", "is_causal without attn_mask", lambda nn=fnn: _mha(nn, is_causal=True),
         RuntimeError, "is_causal=True is a hint that attn_mask is the causal mask", RuntimeError),
    Case("nn.MultiheadAttention", "forward_packed with add_bias_kv",
         lambda: fnn.MultiheadAttention(E, HEADS, add_bias_kv=True).forward_packed(SEQ[0], CU[:2], 5),
         NotImplementedError, "forward_packed supports self-attention without add_bias_kv"),
    # nn.TransformerEncoderLayer
    Case("nn.TransformerEncoderLayer", "constructor: nhead does not divide d_model",
         lambda nn=fnn: nn.TransformerEncoderLayer(10, 3), ArgumentValueError,
         r"nhead \(3\) must be positive and divide d_model \(10\)", AssertionError),
    Case("nn.TransformerEncoderLayer", "src width is not d_model", lambda nn=fnn: _layer(nn, SEQ[..., :11]),
         ArgumentValueError, r"src must be .* with E = d_model = 12, got \(2, 5, 11\)", AssertionError),
    Case("nn.TransformerEncoderLayer", "src neither 2-D nor 3-D", lambda nn=fnn: _layer(nn, SEQ[None]),
         ArgumentValueError,
         r"src must be \(S, E\), \(S, N, E\) or \(N, S, E\)", AssertionError),
    Case("nn.TransformerEncoderLayer", "src of another dtype than the parameters",
         lambda nn=fnn: _layer(nn, SEQ.double()), RuntimeError,
         "src has dtype torch.float64 but the module's parameters are torch.float32", RuntimeError),
    Case("nn.TransformerEncoderLayer", "src_mask neither bool nor float",
         lambda nn=fnn: _layer(nn, src_mask=torch.zeros(5, 5, dtype=torch.int64)), ArgumentTypeError,
         "src_mask must be bool or float", AssertionError),
    Case("nn.TransformerEncoderLayer", "src_mask not (S, S) or (N * nhead, S, S)",
         lambda nn=fnn: _layer(nn, src_mask=torch.zeros(4, 4, dtype=torch.bool)), RuntimeError,
         rf"src_mask {SHAPES} \(L, S\) = \(5, 5\)", RuntimeError),
    Case("nn.TransformerEncoderLayer", "src_key_padding_mask neither bool nor float",
         lambda nn=fnn: _layer(nn, src_key_padding_mask=PAD.long()), ArgumentTypeError,
         "src_key_padding_mask must be bool or float", AssertionError),
    Case("nn.TransformerEncoderLayer", "src_key_padding_mask not (N, S)",
         lambda nn=fnn: _layer(nn, src_key_padding_mask=PAD.t()), ArgumentValueError,
         rf"src_key_padding_mask {SHAPES} \(N, S\) = \(2, 5\), got \(5, 2\)", AssertionError),
    # nn.TransformerEncoder
    Case("nn.TransformerEncoder", "src width is not d_model (padding-free path)",
         lambda nn=fnn: _encoder(nn, SEQ[..., :11], src_key_padding_mask=PAD), ArgumentValueError,
         r"src must be .* with E = d_model = 12", AssertionError),
    Case("nn.TransformerEncoder", "mask neither bool nor float",
         lambda nn=fnn: _encoder(nn, mask=torch.zeros(5, 5, dtype=torch.int64)), ArgumentTypeError,
         "mask must be bool or float", AssertionError),
    Case("nn.TransformerEncoder", "mask not (S, S) or (N * nhead, S, S)",
         lambda nn=fnn: _encoder(nn, mask=torch.zeros(4, 4, dtype=torch.bool)), RuntimeError,
         rf"mask {SHAPES} \(L, S\) = \(5, 5\)", RuntimeError),
    Case("nn.TransformerEncoder", "src_key_padding_mask not (N, S)",
         lambda nn=fnn: _encoder(nn, src_key_padding_mask=PAD[:1]), ArgumentValueError,
         rf"src_key_padding_mask {SHAPES} \(N, S\) = \(2, 5\)", AssertionError),
    # nn.LSTM (torch's own checks where torch has them, so the messages are torch's)
    Case("nn.LSTM", "input neither 2-D nor 3-D", lambda nn=fnn: _lstm(nn, STEPS[None]), ValueError,
         "LSTM: Expected input to be 2D or 3D, got 4D", ValueError),
    Case("nn.LSTM", "input width is not input_size", lambda nn=fnn: _lstm(nn, STEPS[..., :4]), RuntimeError,
         r"input.size\(-1\) must be equal to input_size. Expected 5, got 4", RuntimeError),
    Case("nn.LSTM", "input of another dtype than the parameters", lambda nn=fnn: _lstm(nn, STEPS.double()),
         ValueError, r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)", ValueError),
    Case("nn.LSTM", "h0 not (layers * directions, B, proj)",
         lambda nn=fnn: _lstm(nn, hx=(torch.zeros(1, 2, 6), torch.zeros(1, 3, 6))), RuntimeError,
         r"Expected hidden\[0\] size \(1, 3, 6\), got \[1, 2, 6\]", RuntimeError),
    Case("nn.LSTM", "c0 not (layers * directions, B, hidden)",
         lambda nn=fnn: _lstm(nn, hx=(torch.zeros(1, 3, 6), torch.zeros(1, 3, 7))), RuntimeError,
         r"Expected hidden\[1\] size \(1, 3, 6\), got \[1, 3, 7\]", RuntimeError),
    Case("nn.LSTM", "h0 and c0 2-D with a 3-D input",
         lambda nn=fnn: _lstm(nn, hx=(torch.zeros(3, 6), torch.zeros(3, 6))), RuntimeError,
         "For batched 3-D input, hx and cx should also be 3-D", RuntimeError),
    Case("nn.LSTM", "h0 of another dtype than input",
         lambda nn=fnn: _lstm(nn, hx=(torch.zeros(1, 3, 6).double(), torch.zeros(1, 3, 6))), TypeError,
         "h0 has dtype torch.float64 but input has torch.float32", RuntimeError),
    Case("nn.LSTM", "PackedSequence width is not input_size",
         lambda nn=fnn: _lstm(nn, PackedSequence(PACKED.data[:, :4], PACKED.batch_sizes)), RuntimeError,
         r"input.size\(-1\) must be equal to input_size", RuntimeError),
    Case("nn.LSTM", "PackedSequence of another batch than h0",
         lambda nn=fnn: _lstm(nn, PACKED, (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6))), RuntimeError,
         r"Expected hidden\[0\] size \(1, 3, 6\)", RuntimeError),
    Case("nn.LSTM", "PackedSequence of another dtype than the parameters",
         lambda nn=fnn: _lstm(nn, PackedSequence(PACKED.data.double(), PACKED.batch_sizes)), ValueError,
         r"input dtype \(torch.float64\) does not match weight dtype", RuntimeError),
    Case("nn.LSTM", "PackedSequence whose batch_sizes increase",
         lambda nn=fnn: _lstm(nn, PackedSequence(PACKED.data, torch.tensor([3, 1, 2, 1]))), ValueError,
         r"batch_sizes must be positive and non-increasing", RuntimeError),
    Case("nn.LSTM", "PackedSequence whose batch_sizes do not sum to its rows (torch ignores the rest)",
         lambda: _lstm(fnn, PackedSequence(PACKED.data, torch.tensor([3, 2, 1]))), ValueError,
         "batch_sizes sum to 6 but input has 7 rows"),
    # backend selection
    Case("fastenc.backend", "unknown backend name", lambda: _select("cudnn"), ValueError,
         r"backend 'cudnn' is not available: unknown backend 'cudnn'; expected one of \('reference', 'torch', "
         r"'triton', 'native'\) or 'auto'"),
    Case("fastenc.set_backend", "unknown backend name (also FASTENC_BACKEND)", lambda: fastenc.set_backend("Triton"),
         ValueError, "backend 'Triton' is not available: unknown backend"),
    Case("fastenc.backend", "a backend this machine cannot run",
         lambda: _select_unavailable("native", "the extension fastenc._C is not built"), ValueError,
         "backend 'native' is not available: the extension fastenc._C is not built"),
    Case("functional.*", "triton on CPU tensors without TRITON_INTERPRET=1 set before import",
         _triton_without_interpreter, RuntimeError,
         "backend 'triton' cannot run op 'layer_norm' on cpu tensors: Triton runs CPU tensors only under "
         "TRITON_INTERPRET=1", backend="triton"),
    Case("functional.*", "a device type no backend supports", lambda: F.layer_norm(_meta(3, 8), (8,)), RuntimeError,
         "backend 'reference' cannot run op 'layer_norm' on meta tensors: device type 'meta' is not supported",
         backend="reference"),
]


def _raised(case: Case, nn=None) -> BaseException | None:
    """What the case's call raises (with the classes of `nn`, when given), or None."""
    with fastenc.backend(case.backend) if case.backend else contextlib.nullcontext():
        try:
            case.call() if nn is None else case.call(nn)
        except Exception as e:  # the row says which
            return e
    return None


def _unrunnable(case: Case) -> str | None:
    reason = case.backend and backends.unavailable_reason(case.backend)
    return reason if reason and case.backend not in REQUIRED else None


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=r)] if (r := _unrunnable(c)) else [])
    for c in CASES])
def test_bad_input_raises_the_documented_error(case):
    error = _raised(case)
    assert type(error) is case.error, f"expected {case.error.__name__}, got {error!r}"
    assert re.search(case.match, str(error)), f"{str(error)!r} does not match {case.match!r}"
    if case.torch is not None:
        theirs = _raised(case, torch.nn)
        assert type(theirs) is case.torch, f"torch.nn: expected {case.torch.__name__}, got {theirs!r}"


def test_module_errors_are_of_torchs_type_where_torch_asserts():
    """A drop-in raises what torch raises: where torch.nn's check is an assert, fastenc's error is an
    AssertionError too (and still a ValueError / TypeError)."""
    asserted = [c for c in CASES if c.torch is AssertionError]
    assert asserted and all(issubclass(c.error, AssertionError) for c in asserted), [
        c.id for c in asserted if not issubclass(c.error, AssertionError)]


def test_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


def render() -> str:
    """docs/bad-input.md from CASES: every row run for its message."""
    lines = [
        "# Bad input: what fastenc checks and what it raises",
        "",
        "Every condition fastenc validates, the exception and the message (which names the argument). Generated",
        "from the table in `tests/test_bad_input.py`, which tests every row; regenerate with",
        "`.venv/bin/python -m tests.test_bad_input > docs/bad-input.md`.",
        "",
        "The modules are drop-ins and raise torch's exception type. Where torch's check is a bare `assert`,",
        "fastenc's own check raises ArgumentValueError / ArgumentTypeError (`fastenc.nn._errors`): a ValueError or",
        "TypeError that is an AssertionError too, and that `python -O` does not strip. Not yet of torch's type:",
        "where torch fails later with a RuntimeError whose message does not name the argument, and `nn.LayerNorm`,",
        "whose checks are `fastenc.functional`'s. The *torch.nn* column is what torch raises for the same call,",
        "checked by the test too (blank: not compared).",
        "",
        "| API | condition | exception | torch.nn | message |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        error = _raised(case)
        assert type(error) is case.error, (case.id, error)
        message = " ".join(str(error).split()).replace("|", "\\|")
        api = f"{case.api} ({case.backend})" if case.backend else case.api
        torch_error = case.torch.__name__ if case.torch else ""
        lines.append(f"| `{api}` | {case.condition} | {case.error.__name__} | {torch_error} | `{message}` |")
    return "\n".join(lines) + "\n"


def test_doc_is_the_rendered_table():
    missing = [c.backend for c in CASES if c.backend and backends.unavailable_reason(c.backend)]
    if missing:
        pytest.skip(f"the table needs every backend; {sorted(set(missing))} cannot run here")
    assert DOC.read_text() == render(), "docs/bad-input.md is stale: python -m tests.test_bad_input > docs/bad-input.md"


if __name__ == "__main__":
    print(render(), end="")
