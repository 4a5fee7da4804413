"""Deployment: verified export (ONNX, torch.export, TorchScript), layer offload and memory-mapped loading."""

from memwise.export.api import ExportError, export
from memwise.export.result import ExportCheck, ExportResult, ExportTarget

__all__ = ["ExportCheck", "ExportError", "ExportResult", "ExportTarget", "export"]
