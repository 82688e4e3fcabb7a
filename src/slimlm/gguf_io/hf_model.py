"""Load a model for calibration: an HF dir, or a GGUF (dequantized by transformers' GGUF loader), in float32."""

from __future__ import annotations

from pathlib import Path

from slimlm.errors import SlimlmError


def load_hf_model(path: Path):
    """(model in eval mode, tokenizer) in float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar reports calibration; no per-weight bar
    path = Path(path)
    if not path.exists():
        raise SlimlmError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SlimlmError(f"{path} is a file but not .gguf; pass a Hugging Face model dir or a .gguf")
        kwargs = {"gguf_file": path.name}
        path_dir = path.parent
    else:
        from slimlm.gguf_io.architectures import arch_spec
        import json

        if not (path / "config.json").is_file():
            raise SlimlmError(f"{path} has no config.json")
        arch_spec(json.loads((path / "config.json").read_text()))  # clear error for unsupported models
        kwargs, path_dir = {}, path
    model = AutoModelForCausalLM.from_pretrained(path_dir, dtype=torch.float32, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise SlimlmError(f"{path} has no usable tokenizer for calibration text ({exc})") from None
    return model.eval(), tokenizer
