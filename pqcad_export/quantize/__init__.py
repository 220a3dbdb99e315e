"""Quantization core: quantizers, quantized layers, block reconstruction, PQ, saved format.

Public entry points: `quantize_model`, `ReconConfig`, `save_quantized`, `load_quantized`, `QuantizedModel`.
"""

from .model import QuantizedModel
from .reconstruction import METHODS, PQConfig, ReconConfig, quantize_model
from .saved import load_quantized, save_quantized

__all__ = ["METHODS", "PQConfig", "QuantizedModel", "ReconConfig", "load_quantized", "quantize_model",
           "save_quantized"]
