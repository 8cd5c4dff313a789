"""The "torch" backend: torch's own fastest op for each of fastenc's ops, under fastenc's op contracts.

"auto" runs these where fastenc has no kernel that takes the inputs (fastenc/backends.py), so a converted model
is never slower than the torch model it came from. Each module follows its op's contract (fastenc/ops/).
"""
