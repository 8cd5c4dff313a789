"""Compile the Triton kernels that the interpreter cannot vouch for into a GPU binary (sm_90), without a GPU.

The interpreter runs one program at a time and treats barriers as no-ops, so it checks what a kernel computes, not
whether the GPU code generator accepts it (a time loop around barriers, tuples from jit functions, layouts).
triton.compile runs that code generator and the ptxas bundled with triton. It proves the kernels compile; whether
they are right and fast on a GPU still takes a GPU run. Each group runs the launchers on meta tensors in float16
and compiles what their launches would (bench/resources.py records them), with the first config an autotuner may
choose. Run as a script (`python -m tests.triton_aot [group ...]`) in a process where TRITON_INTERPRET is unset
(tests/test_triton_aot.py does), since triton.jit reads it at import. `python -m bench --resources` compiles every
config and reports what each asks of the GPU.
"""

from __future__ import annotations

import sys

from bench import resources


def _cases(group: str) -> list[resources.Case]:
    if group == "lstm":  # both forms, with and without a projection
        return [resources.lstm_case("fp16", 16, (64,), projected, persistent)
                for projected in (False, True) for persistent in (False, True)]
    if group == "attention":  # causal, dropout, and on the padded layout a bias and a key padding mask
        return [resources.attention_case("fp16", 64, heavy=True, varlen=varlen) for varlen in (False, True)]
    if group == "layer_norm":  # a residual (stored and its gradient added), a weight and a bias
        return [resources.layer_norm_case("fp16", 768)]
    return [resources.bias_activation_case("fp16")]  # a bias, exact GELU and dropout


GROUPS = ("lstm", "attention", "layer_norm", "bias_activation")


def compiles(group: str) -> list[resources.Compile]:
    """The group's distinct compiles: every kernel its cases launch, with the first config its autotuner may
    choose (in every argument specialization the cases make)."""
    chosen = {}
    for case in _cases(group):
        first_config = {}
        for c in resources.compiles_of(case.call):
            if first_config.setdefault(c.name, c.config()) == c.config():
                chosen[c.key()] = c
    return list(chosen.values())


def main(groups: list[str]) -> None:
    for group in groups:
        for c in compiles(group):
            measured = resources.compile_for_sm90(c)
            print(f"{group}: {c.name} {c.meta} {c.config()}: sm_90 cubin, {measured['registers']} registers")


if __name__ == "__main__":
    main(sys.argv[1:] or list(GROUPS))
