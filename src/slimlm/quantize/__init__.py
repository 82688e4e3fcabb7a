"""Quantization drivers: the scheme vocabulary (schemes), the layer-stream driver that writes compressed-tensors
(layers), the GGUF tensor-stream driver (gguf) over lazy tensor sources (sources), and importance matrices
(imatrix). Algorithms live in slimlm.algorithms, codecs in slimlm.formats, file writing in slimlm.writers."""
