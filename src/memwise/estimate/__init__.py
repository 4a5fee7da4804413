"""Estimating a step's peak memory without allocating its tensors (fake tensors + allocator models)."""
