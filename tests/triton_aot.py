"""Compile the Triton kernels that the interpreter cannot vouch for into a GPU binary (sm_90), without a GPU.

The interpreter runs one program at a time and treats barriers as no-ops, so it checks what a kernel computes, not
whether the GPU code generator accepts it (a time loop around barriers, tuples from jit functions, layouts).
triton.compile runs that code generator and the ptxas bundled with triton. It proves the kernels compile; whether
they are right and fast on a GPU still takes a GPU run. Run as a script (`python -m tests.triton_aot [group ...]`)
in a process where TRITON_INTERPRET is unset (tests/test_triton_aot.py does), since triton.jit reads it at import.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastenc.kernels import attention, bias_activation, layer_norm, lstm


def lstm_kernels():
    """(kernel, argument types, constexprs): every Triton LSTM kernel in float16, the persistent ones with and
    without a projection."""
    f16, f32, i32 = "*fp16", "*fp32", "i32"
    blocks = dict(BLOCK_B=16, BLOCK_K=64, DOT_PRECISION="tf32")
    cell = dict(GX=f16, HP=f16, H0W=f32, W=f16, C0=f16, GATES=f32, CS=f32, Y=f16, off=i32, n=i32, off_prev=i32,
                n_prev=i32, H=i32, P=i32, stride_wk=i32, stride_wn=i32)
    yield lstm._lstm_forward_cell_kernel, cell, dict(BLOCK_H=32, **blocks)
    rows_times = dict(A=f16, M=f16, ALT=f16, ADD=f16, OUT=f16, a_off=i32, n_a=i32, off=i32, n=i32, K=i32,
                      N_COLS=i32, stride_a=i32, stride_mk=i32, stride_mn=i32)
    yield lstm._rows_times_kernel, rows_times, dict(HAS_ALT=True, HAS_ADD=True, BLOCK_N=32, **blocks)
    cell_backward = dict(A=f16, M=f16, ALT=f16, DOUT=f16, GATES=f32, CS=f32, C0=f16, DC=f32, DGX=f16, off=i32,
                         n=i32, off_prev=i32, n_prev=i32, a_off=i32, n_a=i32, K=i32, H=i32, stride_a=i32,
                         stride_mk=i32, stride_mn=i32)
    yield lstm._lstm_backward_cell_kernel, cell_backward, dict(HAS_ALT=True, HAS_DOUT=True, BLOCK_H=32, **blocks)
    forward = dict(PLAN="*i32", steps=i32, GX=f16, OUT=f16, H0W=f32, W=f16, C0=f16, GATES=f32, CS=f32, Y=f16,
                   W_HR=f16, H=i32, P=i32, stride_wk=i32, stride_wn=i32)
    backward = dict(PLAN="*i32", steps=i32, D_GX=f16, W_HH=f16, D_HN=f16, D_OUT=f16, GATES=f32, CS=f32, C0=f16,
                    DC=f32, D_H=f32, W_HR=f16, H=i32, P=i32)
    for proj in (False, True):
        yield lstm._lstm_forward_persistent_kernel, forward, dict(
            HAS_PROJ=proj, BLOCK_H=32, BLOCK_P=32, BLOCK_KR=64, **blocks)
        yield lstm._lstm_backward_persistent_kernel, backward, dict(
            HAS_PROJ=proj, BLOCK_B=16, BLOCK_H=32, BLOCK_P=32, BLOCK_K4=64, BLOCK_KP=64, DOT_PRECISION="tf32")


def attention_kernels():
    """(kernel, argument types, constexprs, options): the three attention kernels in float16, causal with a bias, a
    key padding mask and dropout, on the padded and the packed (varlen) layout, each compiled with the first config
    of its autotuner. On the padded layout the launchers pass q for the unused cu_seqlens pointers."""
    f16, f32, i32 = "*fp16", "*fp32", "i32"
    for varlen in (False, True):
        cu_seqlens = "*i32" if varlen else f16
        shared = dict(Q=f16, K=f16, V=f16, Bias=f16, KPM="*u1", CuQ=cu_seqlens, CuK=cu_seqlens, Lse=f32, H=i32,
                      seqlen_q=i32, seqlen_k=i32, head_dim=i32, qk_scale="fp32", dropout_p="fp32", seed=i32)
        shared.update({f"stride_{tensor}{dim}": i32 for tensor in "qkvol" for dim in "bhs"})
        shared.update(stride_bb=i32, stride_bh=i32, stride_bm=i32, stride_bn=i32, stride_kpm=i32)
        backward = dict(DO=f16, Delta=f32, sm_scale="fp32", **shared)
        flags = dict(BLOCK_D=64, IS_VARLEN=varlen, HAS_BIAS=True, HAS_KPM=True, IS_CAUSAL=True, HAS_DROPOUT=True,
                     DOT_PRECISION="tf32")
        for autotuner, types in ((attention._attention_forward_kernel, dict(Out=f16, **shared)),
                                 (attention._attention_backward_dkdv_kernel, dict(DK=f16, DV=f16, **backward)),
                                 (attention._attention_backward_dq_kernel, dict(DQ=f16, **backward))):
            config = autotuner.configs[0]
            yield autotuner.fn, types, {**flags, **config.kwargs}, dict(num_warps=config.num_warps,
                                                                        num_stages=config.num_stages)


def layer_norm_kernels():
    """(kernel, argument types, constexprs, options): both LayerNorm kernels in float16 with a residual (its sum
    stored and its gradient added), a weight and a bias, on 768-wide rows launched as the launchers do."""
    f16, f32, i32 = "*fp16", "*fp32", "i32"
    block_n, num_warps = layer_norm._launch_shape(768)
    forward = dict(X=f16, R=f16, W=f16, B=f16, Y=f16, S=f16, Mean=f32, Rstd=f32, stride_x=i32, stride_r=i32, N=i32,
                   eps="fp32")
    yield layer_norm._layer_norm_forward_kernel, forward, dict(
        BLOCK_N=block_n, HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, STORE_SUM=True), dict(num_warps=num_warps)
    backward = dict(DY=f16, DS=f16, XS=f16, W=f16, Mean=f32, Rstd=f32, DX=f16, DW_PARTIAL=f32, DB_PARTIAL=f32,
                    stride_dy=i32, stride_ds=i32, stride_xs=i32, M=i32, N=i32, rows_per_program=i32)
    yield layer_norm._layer_norm_backward_kernel, backward, dict(
        BLOCK_N=block_n, HAS_DSUM=True, HAS_WEIGHT=True, HAS_BIAS=True), dict(num_warps=num_warps)


def bias_activation_kernels():
    """(kernel, argument types, constexprs): both bias + activation kernels in float16 with a bias, exact GELU and
    dropout, in the launcher's tile (and its default warps and stages)."""
    f16, i32 = "*fp16", "i32"
    scalars = dict(M=i32, N=i32, dropout_p="fp32", seed=i32)
    flags = dict(BLOCK_M=bias_activation.BLOCK_M, BLOCK_N=bias_activation.BLOCK_N,
                 ACTIVATION=bias_activation.ACTIVATIONS["gelu"], HAS_BIAS=True, HAS_DROPOUT=True)
    yield bias_activation._bias_activation_forward_kernel, dict(X=f16, B=f16, Y=f16, stride_x=i32, **scalars), flags
    backward = dict(DY=f16, X=f16, B=f16, DX=f16, DB_PARTIAL="*fp32", stride_dy=i32, stride_x=i32, **scalars)
    yield bias_activation._bias_activation_backward_kernel, backward, flags


# Each group: a function yielding (kernel, argument types, constexprs) for the kernels to compile, and optionally
# the compile options (num_warps, num_stages) that the launcher or autotuner would use.
GROUPS = {"lstm": lstm_kernels, "attention": attention_kernels, "layer_norm": layer_norm_kernels,
          "bias_activation": bias_activation_kernels}


def main(groups: list[str]) -> None:
    target = GPUTarget("cuda", 90, 32)
    for group in groups:
        for kernel, types, constexprs, *options in GROUPS[group]():
            options = dict(*options)
            signature = {**types, **{name: "constexpr" for name in constexprs}}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=target, options=options)
            launch = f" {options}" if options else ""
            print(f"{group}: {kernel.__name__} {constexprs}{launch}: {len(compiled.asm['cubin'])} bytes of sm_90 cubin")


if __name__ == "__main__":
    main(sys.argv[1:] or list(GROUPS))
