"""pqcad-export: PQ + CAD for diffusion UNets, exported to QDQ ONNX and compiled to TensorRT / ONNX Runtime."""

__version__ = "0.1.0"
