"""Quantization core: quantizers, quantized layers, block reconstruction, PQ, saved format.

Public entry points: `quantize_model`, `ReconConfig`, `save_quantized`, `load_quantized`, `QuantizedModel`.
"""

from .model import QuantizedModel
from .config import METHODS, ActInit, Method, PQConfig, ReconConfig, ReconLoss
from .driver import quantize_model
from .saved import load_quantized, save_quantized

__all__ = ["METHODS", "ActInit", "Method", "PQConfig", "QuantizedModel", "ReconConfig", "ReconLoss", "load_quantized", "quantize_model",
           "save_quantized"]
