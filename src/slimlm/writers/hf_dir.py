"""A GGUF written back as a Hugging Face dir: config.json, fp32/bf16 safetensors and
the tokenizer, so transformers, llm-compressor and ``slimlm quantize --scheme`` can start from a GGUF.

The weights are the file's dequantized values. llama.cpp keeps llama3 rope only as the ``rope_freqs`` factors;
the config gets the llama3 ``rope_parameters`` those factors come from (archs.llama3_rope_from_factors), or
the export is refused rather than written with rope transformers would run differently."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from slimlm.errors import SlimlmError


def _llama3_rope(model_path: Path, config) -> None:
    """Replace the loader's default rope + divided frequencies by the llama3 parameters they encode."""
    from slimlm.archs import llama3_rope_from_factors
    from slimlm.models.from_gguf import open_gguf_model

    factors = open_gguf_model(model_path).rope_factors()
    if factors is None:
        return
    rope = llama3_rope_from_factors(config.to_dict(), factors.numpy())
    if rope is None:
        raise SlimlmError(f"{model_path}: its rope_freqs match no llama3 rope parameters; a config.json would "
                          "make transformers run another rope")
    config.rope_parameters = rope


def write_hf_dir(model: str | Path, out: str | Path, dtype: str = "fp32", overwrite: bool = False,
                 name: str | None = None) -> Path:
    """Write ``model`` (a GGUF file) as an HF dir at ``out`` (temp dir, then rename: never half-written)."""
    from slimlm.models import load_model
    from slimlm.models.loader import parse_dtype
    from slimlm.models.skeleton import is_gguf_file

    model, out = Path(model), Path(out)
    parse_dtype(dtype)  # a bad dtype fails before the model loads
    if not is_gguf_file(model):
        raise SlimlmError(f"{model} is not a GGUF file (an HF dir is already one: use it as it is)")
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} exists; pass --overwrite to replace it")
    loaded = load_model(model, dtype, tokenizer=model)  # an explicit tokenizer: its errors surface
    net, tokenizer = loaded.model, loaded.tokenizer
    _llama3_rope(model, net.config)
    net.config._name_or_path = name or model.stem
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
