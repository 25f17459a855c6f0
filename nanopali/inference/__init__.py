"""The inference runtime: KV cache, decoding, sampling, beams, streaming, and the transforms that speed a loaded
model up (CPU kernels, CUDA graphs, quantization), applied by runtime.prepare."""
