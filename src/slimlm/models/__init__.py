"""Load any model file slimlm understands into a torch model + tokenizer, for eval, bench and distill.

    from slimlm.models import load_model
    model, tokenizer, info = load_model("path/to/model-or.gguf", dtype="bf16")

Formats: Hugging Face dirs (safetensors), compressed-tensors dirs (decompressed to dense), and GGUF files
(dequantized into torch by transformers' GGUF loader). Other areas add loaders with ``register_loader``.
"""

from slimlm.models.loader import (
    LoadedModel,
    ModelInfo,
    detect_format,
    load_model,
    load_tokenizer,
    parse_dtype,
    register_loader,
)

__all__ = ["LoadedModel", "ModelInfo", "detect_format", "load_model", "load_tokenizer", "parse_dtype",
           "register_loader"]
