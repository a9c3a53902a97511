"""The offline export stage: torch -> ONNX -> cleanup -> validation -> TensorRT -> engine store."""
