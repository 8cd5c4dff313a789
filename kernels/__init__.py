"""fastenc's Triton kernels (installed as fastenc.kernels), one file per op; see fastenc/ops for the contracts."""
