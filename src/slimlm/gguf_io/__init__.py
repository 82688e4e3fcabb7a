"""GGUF input/output: HF checkpoint → GGUF metadata and tensors, streaming quantization, importance matrices."""
