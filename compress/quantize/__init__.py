"""Int8 quantisation that matches the deployment runtime: ``qat`` and ``ptq`` recipe methods, their fake-quant
layers, the graph pass that places quantizers, calibration, and the lowering to a QDQ export form."""

from slimforge.compress.quantize import methods  # noqa: F401  registers qat and ptq
