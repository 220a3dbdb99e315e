"""QDQ ONNX export of quantized UNets, the TensorRT QDQ rule check (lint) and ONNX-vs-PyTorch parity."""
