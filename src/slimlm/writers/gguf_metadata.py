"""Write a source's model metadata into a new GGUF: the write side of quantize.sources.

For a Hugging Face dir: name, hyper-parameters (llama.cpp's keys for the architecture) and the tokenizer.
For a GGUF: every field copied as stored, except the keys that describe the old file's encoding.
"""

from __future__ import annotations

from typing import Any

import gguf

from slimlm.archs import arch_spec, write_hparams
from slimlm.quantize.sources import ModelSource
from slimlm.writers.gguf_tokenizer import write_tokenizer
from slimlm.writers.gguf import FastGGUFWriter, RawValue

# Keys that describe the file's encoding, not the model: rewritten by whoever writes a new file.
_ENCODING_KEYS = ("general.file_type", "general.quantization_version", "general.architecture")


def write_source_metadata(writer: gguf.GGUFWriter, source: ModelSource) -> dict[str, Any]:
    """Add ``source``'s metadata to ``writer``; returns what was written about the tokenizer."""
    if source.header is None:
        config, model_dir = source.config, source.path
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(config.get("_name_or_path") or model_dir.name).split("/")[-1] or model_dir.name)
        write_hparams(writer, config, arch_spec(config)[1])
        return write_tokenizer(writer, model_dir, int(config["vocab_size"]))
    if not isinstance(writer, FastGGUFWriter):
        raise TypeError("copying GGUF metadata as bytes needs slimlm.writers.gguf.FastGGUFWriter")
    for f in source.header.fields:
        if f.key.startswith(("GGUF.", "quantize.")) or f.key in _ENCODING_KEYS:
            continue
        if source.header.big_endian:  # stored bytes are big-endian: re-encode the value for this file
            writer.add_key_value(f.key, f.value(), f.type, f.sub_type)
        else:
            writer.add_key_value(f.key, RawValue(f.raw), f.type, f.sub_type)
    return {"model": "copied"}
