"""Storage formats: GGML block codecs, llama.cpp's GGUF type mixes, int4/int8 group-wise packing."""
