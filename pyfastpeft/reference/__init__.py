"""Pure-PyTorch references: the oracle of the tests and benchmarks, and the fallback on any device."""
