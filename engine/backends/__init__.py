"""Backends behind one Runner interface: torch (reference and fallback), onnxruntime, tensorrt."""
