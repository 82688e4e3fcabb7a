"""THE torch loader: any model file slimlm understands as a torch model + tokenizer, dense or on low-bit kernels.

    from slimlm.models import load_model
    model, tokenizer, info = load_model("path/to/model-or.gguf", dtype="bf16")
    model, tokenizer, info = load_model("path/to/model.gguf", kernels=True)  # integer weights on our kernels
"""

from slimlm.models.loader import (
    LoadedModel, ModelInfo, detect_format, load_model, load_tokenizer, parse_dtype, tokenizer_adds_bos,
)
from slimlm.models.skeleton import empty_model, load_config, random_model

__all__ = ["LoadedModel", "ModelInfo", "detect_format", "empty_model", "load_config", "load_model",
           "load_tokenizer", "parse_dtype", "random_model", "tokenizer_adds_bos"]
