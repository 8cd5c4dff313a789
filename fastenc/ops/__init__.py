"""torch.library custom ops (namespace `fastenc`), one file per op, each with fake kernels and autograd."""
