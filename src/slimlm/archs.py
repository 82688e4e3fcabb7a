"""Which Hugging Face architectures we can write as GGUF, and the hyper-parameters llama.cpp expects for each.

The key names and their meaning follow llama.cpp's converter (convert_hf_to_gguf); the code is ours and
reads both the old ``rope_theta``/``rope_scaling`` and the transformers-5 ``rope_parameters`` layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture maps onto a llama.cpp architecture."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's llama graph uses interleaved (GPT-J style) rope: Q/K rows are permuted
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    drop_lm_head: bool = False  # Gemma always ties the output to the embedding


SUPPORTED_ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    "GemmaForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA, norm_plus_one=True, drop_lm_head=True),
    "Gemma2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True, drop_lm_head=True),
}


_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def arch_spec(config: dict[str, Any]) -> tuple[str, ArchSpec]:
    """The (HF architecture name, spec) of a config.json, or a clear error listing what is supported."""
    names = list(config.get("architectures") or [])
    if not names and config.get("model_type") in _BY_MODEL_TYPE:  # configs saved without "architectures"
        names = [_BY_MODEL_TYPE[config["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name, SUPPORTED_ARCHITECTURES[name]
    got = ", ".join(names) if names else f"model_type={config.get('model_type')!r}"
    raise SlimlmError(f"unsupported architecture {got}; GGUF export supports: {', '.join(SUPPORTED_ARCHITECTURES)}")


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """One dict with rope_theta, rope_type, factor, ... from either config layout."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in params:  # per-layer-type layout: the global layers are what llama.cpp's freq_base means
        params = dict(params["full_attention"])
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama3_rope_factors(config: dict[str, Any], rope: dict[str, Any]) -> np.ndarray:
    """Per-frequency scale factors of llama3-style rope (written as the ``rope_freqs`` tensor)."""
    dim = head_dim(config)
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def write_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], spec: ArchSpec) -> None:
    """Architecture hyper-parameters under ``{arch}.*`` keys."""
    n_head = int(config["num_attention_heads"])
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    if config.get("head_dim") is not None:
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    if spec.gguf_arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(head_dim(config))
    rope = rope_parameters(config)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in (None, "default", "llama3"):
        raise SlimlmError(f"rope_type {rope_type!r} is not supported for GGUF export (default, linear, yarn, llama3)")
    if spec.gguf_arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        writer.add_sliding_window(int(config["sliding_window"]))
