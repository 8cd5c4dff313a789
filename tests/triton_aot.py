"""Compile the Triton kernels that the interpreter cannot vouch for into a GPU binary (sm_90), without a GPU.

The interpreter runs one program at a time and treats barriers as no-ops, so it checks what a kernel computes, not
whether the GPU code generator accepts it (a time loop around barriers, tuples from jit functions, layouts).
triton.compile runs that code generator and the ptxas bundled with triton. It proves the kernels compile; whether
they are right and fast on a GPU still takes a GPU run. Run as a script (`python -m tests.triton_aot [group ...]`) in a process where
TRITON_INTERPRET is unset (tests/test_triton_aot.py does), since triton.jit reads it at import.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastenc.kernels import lstm


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


# Each group: a function yielding (kernel, argument types, constexprs) for the kernels to compile.
GROUPS = {"lstm": lstm_kernels}


def main(groups: list[str]) -> None:
    target = GPUTarget("cuda", 90, 32)
    for group in groups:
        for kernel, types, constexprs in GROUPS[group]():
            signature = {**types, **{name: "constexpr" for name in constexprs}}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
            print(f"{group}: {kernel.__name__} {constexprs}: {len(compiled.asm['cubin'])} bytes of sm_90 cubin")


if __name__ == "__main__":
    main(sys.argv[1:] or list(GROUPS))
