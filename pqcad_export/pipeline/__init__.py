"""The end-to-end build and the compare report (composes calibration, quantize, distill, export, engines)."""
