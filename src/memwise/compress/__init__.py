"""Compression with an accuracy guard: prune, quantize, distill, sparse storage (`memwise compress`)."""

from memwise.compress.load import load_compressed
from memwise.compress.result import CompressionResult, Method, Objective, Trial
from memwise.compress.search import compress

__all__ = ["CompressionResult", "Method", "Objective", "Trial", "compress", "load_compressed"]
