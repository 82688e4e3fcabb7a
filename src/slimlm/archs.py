"""Which Hugging Face architectures we can write as GGUF, and the hyper-parameters llama.cpp expects for each.

The key names and their meaning follow llama.cpp's converter (convert_hf_to_gguf); the code is ours and
reads both the old ``rope_theta``/``rope_scaling`` and the transformers-5 ``rope_parameters`` layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gguf
import numpy as np

from slimlm.errors import SlimlmError


Config = dict[str, Any]


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture maps onto a llama.cpp architecture: the one place for per-family facts."""

    gguf_arch: gguf.MODEL_ARCH
    model_type: str  # config.json model_type, for configs saved without "architectures"
    permute_qk: bool = False  # llama.cpp's llama graph uses interleaved (GPT-J style) rope: Q/K rows are permuted
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
    drop_lm_head: bool = False  # Gemma always ties the output to the embedding
    check: Callable[[Config], None] | None = None  # raises on options of the family llama.cpp's graph lacks
    hparams: Callable[[gguf.GGUFWriter, Config], None] | None = None  # the family's own ``{arch}.*`` keys


def _unsupported(config: Config, option: str, value: Any, why: str) -> None:
    raise SlimlmError(f"{config.get('model_type')}: {option}={value!r} is not supported for GGUF export ({why})")


def _no_sliding_window(config: Config) -> None:
    """Qwen's optional sliding window: llama.cpp's qwen graphs attend to the whole context."""
    if config.get("use_sliding_window"):
        _unsupported(config, "use_sliding_window", True, "llama.cpp's graph for this family has no sliding window")


def _no_window(config: Config) -> None:
    """Mixtral's optional sliding window: llama.cpp's llama graph attends to the whole context."""
    if config.get("sliding_window") is not None:
        _unsupported(config, "sliding_window", config["sliding_window"], "llama.cpp's llama graph has no window")


def _check_qwen3(config: Config) -> None:
    _no_sliding_window(config)
    if config.get("attention_bias"):
        _unsupported(config, "attention_bias", True, "llama.cpp's qwen3 graphs have no q/k/v biases")


def _check_moe(config: Config, *, norm_topk: bool | None) -> None:
    """MoE routing llama.cpp hard-codes: softmax gating and, per family, whether the top-k weights are renormalized."""
    if norm_topk is not None and bool(config.get("norm_topk_prob", norm_topk)) != norm_topk:
        _unsupported(config, "norm_topk_prob", config.get("norm_topk_prob"),
                     f"llama.cpp's {config.get('model_type')} graph uses {norm_topk}")
    for key in ("mlp_only_layers",):
        if config.get(key):
            _unsupported(config, key, config[key], "llama.cpp expects experts in every layer")
    if int(config.get("decoder_sparse_step", 1)) != 1:
        _unsupported(config, "decoder_sparse_step", config["decoder_sparse_step"],
                     "llama.cpp expects experts in every layer")


def _expert_hparams(writer: gguf.GGUFWriter, config: Config) -> None:
    """Expert counts (Mixtral: num_local_experts; Qwen MoE: num_experts) and the experts' FFN widths."""
    writer.add_expert_count(int(config.get("num_local_experts") or config["num_experts"]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    if config.get("moe_intermediate_size") is not None:
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    if config.get("shared_expert_intermediate_size") is not None:
        writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))


def _gemma2_hparams(writer: gguf.GGUFWriter, config: Config) -> None:
    writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    writer.add_sliding_window(int(config["sliding_window"]))


GEMMA3_SWA_PERIOD = 6  # llama.cpp's gemma3: every 6th layer is global, the others slide (hard-coded there)
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's gemma3 rope base of the sliding layers (hard-coded there)


def gemma3_local_rope_base(config: Config) -> float:
    """The rope base of Gemma 3's sliding layers, from either config layout."""
    params = config.get("rope_parameters") or {}
    if isinstance(params.get("sliding_attention"), dict):
        return float(params["sliding_attention"].get("rope_theta", GEMMA3_LOCAL_ROPE_BASE))
    return float(config.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE))


def _check_gemma3(config: Config) -> None:
    """Gemma 3 options llama.cpp's gemma3 graph (sliding-window variant) cannot express."""
    n_layers = int(config["num_hidden_layers"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            _unsupported(config, key, config[key], "llama.cpp's sliding-window gemma3 graph applies no soft-capping")
    if config.get("sliding_window") is None:
        _unsupported(config, "sliding_window", None, "llama.cpp's gemma3 graph needs a window")
    for key in ("sliding_window_pattern", "_sliding_window_pattern"):  # the transformers-4 spelling, then 5's
        if config.get(key) is not None and int(config[key]) != GEMMA3_SWA_PERIOD:
            _unsupported(config, key, config[key], f"llama.cpp's gemma3 makes every {GEMMA3_SWA_PERIOD}th layer global")
    expected = ["sliding_attention" if (i + 1) % GEMMA3_SWA_PERIOD else "full_attention" for i in range(n_layers)]
    if config.get("layer_types") is not None and list(config["layer_types"]) != expected:
        _unsupported(config, "layer_types", config["layer_types"],
                     f"llama.cpp's gemma3 makes every {GEMMA3_SWA_PERIOD}th layer global, the others sliding")
    if gemma3_local_rope_base(config) != GEMMA3_LOCAL_ROPE_BASE:
        _unsupported(config, "sliding_attention rope_theta", gemma3_local_rope_base(config),
                     f"llama.cpp's gemma3 uses {GEMMA3_LOCAL_ROPE_BASE:g} for the sliding layers")
    params = config.get("rope_parameters") or {}
    local = params.get("sliding_attention") if isinstance(params.get("sliding_attention"), dict) else {}
    if local.get("rope_type", "default") != "default":
        _unsupported(config, "sliding_attention rope_type", local["rope_type"], "llama.cpp scales only global layers")
    # llama.cpp scales queries by 1/sqrt(head_dim), except the 62-layer (27B) model: 1/sqrt(hidden / heads)
    scale_dim = (int(config["hidden_size"]) // int(config["num_attention_heads"]) if n_layers == 62
                 else head_dim(config))
    if int(config.get("query_pre_attn_scalar", scale_dim)) != scale_dim:
        _unsupported(config, "query_pre_attn_scalar", config["query_pre_attn_scalar"],
                     f"llama.cpp scales attention by 1/sqrt({scale_dim}) for this shape")


def _gemma3_hparams(writer: gguf.GGUFWriter, config: Config) -> None:
    writer.add_sliding_window(int(config["sliding_window"]))


SUPPORTED_ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, "llama", permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, "mistral", permute_qk=True),
    "MixtralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, "mixtral", permute_qk=True,
                                   check=lambda c: (_no_window(c), _check_moe(c, norm_topk=None)),
                                   hparams=_expert_hparams),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, "qwen2"),
    "Qwen2MoeForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2MOE, "qwen2_moe",
                                    check=lambda c: (_no_sliding_window(c), _check_moe(c, norm_topk=False)),
                                    hparams=_expert_hparams),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, "qwen3", check=_check_qwen3),
    "Qwen3MoeForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3MOE, "qwen3_moe",
                                    check=lambda c: (_check_qwen3(c), _check_moe(c, norm_topk=True)),
                                    hparams=_expert_hparams),
    "GemmaForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA, "gemma", norm_plus_one=True, drop_lm_head=True),
    "Gemma2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA2, "gemma2", norm_plus_one=True, drop_lm_head=True,
                                  hparams=_gemma2_hparams),
    "Gemma3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA3, "gemma3_text", norm_plus_one=True, drop_lm_head=True,
                                  check=_check_gemma3, hparams=_gemma3_hparams),
}


_BY_MODEL_TYPE = {spec.model_type: name for name, spec in SUPPORTED_ARCHITECTURES.items()}


def arch_spec(config: dict[str, Any]) -> tuple[str, ArchSpec]:
    """The (HF architecture name, spec) of a config.json, or a clear error listing what is supported."""
    names = list(config.get("architectures") or [])
    if not names and config.get("model_type") in _BY_MODEL_TYPE:  # configs saved without "architectures"
        names = [_BY_MODEL_TYPE[config["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            spec = SUPPORTED_ARCHITECTURES[name]
            if spec.check is not None:
                spec.check(config)
            return name, spec
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
    if spec.hparams is not None:
        spec.hparams(writer, config)
