"""Plain PyTorch versions of every op: the oracle for tests and benchmarks, and the fallback backend."""
