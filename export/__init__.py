"""slimforge export: ONNX / TorchScript / int8 ONNX artifacts, parity checks, and the benchmark of every runtime."""
