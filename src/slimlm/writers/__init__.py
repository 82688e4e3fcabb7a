"""The write side: GGUF files (gguf: writer and parallel tensor layout; gguf_metadata, gguf_tokenizer), the
compressed-tensors writer and reader (compressed_tensors), and the GGUF equivalent of a compressed-tensors
dir written forward from its integer codes (gguf_equivalent)."""
