"""Which Hugging Face architectures we can write as GGUF, the hyper-parameters llama.cpp expects for each, and
the way back (GGUF keys -> HF config fields, GGUF tensor -> HF tensor) so a GGUF we write loads as the same model.

The key names and their meaning follow llama.cpp's converter (convert_hf_to_gguf); the code is ours and
reads both the old ``rope_theta``/``rope_scaling`` and the transformers-5 ``rope_parameters`` layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gguf
import numpy as np

from slimlm.checkpoint.names import permute_for_rope, unpermute_for_rope
from slimlm.errors import SlimlmError


Config = dict[str, Any]
Keys = Callable[[str], Any]  # a GGUF file's ``{arch}.<name>`` value (None when absent)


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
    read: Callable[[Keys, Config], None] | None = None  # the inverse of ``hparams``: GGUF keys -> config fields
    experts: bool = False  # a mixture of experts (ffn_*_exps tensors); picks this entry for a GGUF with experts
    # checkpoint modules (inside a decoder layer) a compressed-tensors file keeps in full precision: the routers and
    # the shared-expert gate, as llm-compressor's MoE examples ignore them (tiny, and routing is precision-sensitive)
    float_modules: tuple[str, ...] = ()
    # DeepSeek's multi-head latent attention: llama.cpp sees one KV head of the latent's width (written by
    # ``hparams``) and kv_b_proj split in two (checkpoint.mla)
    mla: bool = False


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
    scale_dim = gemma_query_scale_dim(config, GEMMA3_27B_LAYERS)
    if int(config.get("query_pre_attn_scalar", scale_dim)) != scale_dim:
        _unsupported(config, "query_pre_attn_scalar", config["query_pre_attn_scalar"],
                     f"llama.cpp scales attention by 1/sqrt({scale_dim}) for this shape")


def _gemma3_hparams(writer: gguf.GGUFWriter, config: Config) -> None:
    writer.add_sliding_window(int(config["sliding_window"]))


GEMMA2_27B_LAYERS, GEMMA3_27B_LAYERS = 46, 62  # llama.cpp recognises the 27B models by their layer count


def gemma_query_scale_dim(config: Config, big_layers: int) -> int:
    """llama.cpp scales Gemma queries by 1/sqrt(head_dim), except the 27B model: 1/sqrt(hidden / heads)."""
    if int(config["num_hidden_layers"]) == big_layers:
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return head_dim(config)


def _read_gemma2(keys: Keys, config: Config) -> None:
    config["attn_logit_softcapping"] = f32(need(keys, "attn_logit_softcapping"))
    config["final_logit_softcapping"] = f32(need(keys, "final_logit_softcapping"))
    config["sliding_window"] = int(need(keys, "attention.sliding_window"))
    config["query_pre_attn_scalar"] = gemma_query_scale_dim(config, GEMMA2_27B_LAYERS)


def _read_gemma3(keys: Keys, config: Config) -> None:
    """The sliding-window gemma3 llama.cpp runs: its fixed layer pattern, local rope base and query scale."""
    n_layers = int(config["num_hidden_layers"])
    config["sliding_window"] = int(need(keys, "attention.sliding_window"))
    config["layer_types"] = ["sliding_attention" if (i + 1) % GEMMA3_SWA_PERIOD else "full_attention"
                             for i in range(n_layers)]
    config["rope_parameters"] = {"full_attention": config["rope_parameters"],
                                 "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_BASE}}
    config["query_pre_attn_scalar"] = gemma_query_scale_dim(config, GEMMA3_27B_LAYERS)
    config["final_logit_softcapping"] = config["attn_logit_softcapping"] = None


def _expert_reader(*, norm_topk: bool | None) -> Callable[[Keys, Config], None]:
    """The inverse of :func:`_expert_hparams`, with the top-k renormalization llama.cpp hard-codes per family."""
    def read(keys: Keys, config: Config) -> None:
        count_key = "num_local_experts" if config["model_type"] == "mixtral" else "num_experts"
        config[count_key] = int(need(keys, "expert_count"))
        config["num_experts_per_tok"] = int(need(keys, "expert_used_count"))
        if keys("expert_feed_forward_length") is not None:
            config["moe_intermediate_size"] = int(keys("expert_feed_forward_length"))
        if keys("expert_shared_feed_forward_length") is not None:
            config["shared_expert_intermediate_size"] = int(keys("expert_shared_feed_forward_length"))
        if norm_topk is not None:
            config["norm_topk_prob"] = norm_topk
    return read


DEEPSEEK_YARN_LOG_MUL = 0.1  # llama.cpp's deepseek2: rope.scaling.yarn_log_multiplier = 0.1 x mscale_all_dim
DEEPSEEK_TOPK_METHODS = ("noaux_tc", "greedy")  # what transformers' and llama.cpp's grouped sigmoid top-k compute


def _check_deepseek(config: Config) -> None:
    """DeepSeek-V3 options neither transformers' model nor llama.cpp's deepseek2 graph runs as the config says."""
    method = config.get("topk_method", "noaux_tc")
    if method not in DEEPSEEK_TOPK_METHODS:
        _unsupported(config, "topk_method", method, "llama.cpp routes by grouped top-k of biased sigmoid scores")
    if config.get("scoring_func", "sigmoid") != "sigmoid":
        _unsupported(config, "scoring_func", config["scoring_func"], "transformers' DeepSeek-V3 router is sigmoid")
    if config.get("rope_interleave", True) is not True:
        _unsupported(config, "rope_interleave", config["rope_interleave"], "slimlm writes interleaved rope weights")
    if config.get("attention_bias"):
        _unsupported(config, "attention_bias", True, "llama.cpp's deepseek2 graph has no attention biases")
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "yarn"):
        _unsupported(config, "rope_type", rope_type, "llama.cpp's deepseek2 graph runs default or yarn rope")
    if rope_type == "yarn":
        _check_deepseek_yarn(config, rope)
    if config.get("hidden_act", "silu") != "silu":
        _unsupported(config, "hidden_act", config["hidden_act"], "llama.cpp's deepseek2 FFNs are SiLU-gated")


def _check_deepseek_yarn(config: Config, rope: Config) -> None:
    """DeepSeek's yarn as llama.cpp's deepseek2 graph runs it: the softmax scale grows by
    ``(1 + 0.1 mscale_all_dim ln factor)²`` and the rotary cos/sin are not scaled, which is transformers' rule when
    ``mscale == mscale_all_dim`` (their ratio is its cos/sin factor); llama.cpp's yarn betas are fixed at 32 / 1."""
    if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
        _unsupported(config, "rope_scaling", rope, "yarn needs factor and original_max_position_embeddings")
    if rope.get("attention_factor") is not None:
        _unsupported(config, "attention_factor", rope["attention_factor"],
                     "llama.cpp's deepseek2 graph leaves the rotary cos/sin unscaled")
    if not rope.get("mscale_all_dim") or float(rope.get("mscale") or 0.0) != float(rope["mscale_all_dim"]):
        _unsupported(config, "mscale", rope.get("mscale"),
                     f"llama.cpp's deepseek2 graph needs mscale == mscale_all_dim ({rope.get('mscale_all_dim')})")
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if float(rope.get(key) or default) != default:
            _unsupported(config, key, rope[key], f"llama.cpp's deepseek2 yarn uses {key} {default:g}")


def _deepseek_hparams(writer: gguf.GGUFWriter, config: Config) -> None:
    """MLA widths (the latent is one KV head of kv_lora_rank + rope dims), dense lead layers and the router."""
    rank, rope, nope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"]), int(config["qk_nope_head_dim"])
    writer.add_leading_dense_block_count(int(config.get("first_k_dense_replace") or 0))
    writer.add_q_lora_rank(int(config.get("q_lora_rank") or 0))  # llama.cpp needs the key; 0: attn_q, no latent
    writer.add_kv_lora_rank(rank)
    writer.add_key_length(rank + rope)
    writer.add_value_length(rank)
    writer.add_key_length_mla(nope + rope)
    writer.add_value_length_mla(int(config["v_head_dim"]))
    writer.add_rope_dimension_count(rope)
    yarn = rope_parameters(config)
    if yarn.get("rope_type") == "yarn":  # the softmax scale's growth (write_hparams wrote factor and context)
        writer.add_rope_scaling_yarn_log_mul(DEEPSEEK_YARN_LOG_MUL * float(yarn["mscale_all_dim"]))
    writer.add_expert_count(int(config["n_routed_experts"]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    writer.add_expert_shared_count(int(config.get("n_shared_experts") or 0))
    writer.add_expert_weights_scale(float(config.get("routed_scaling_factor", 1.0)))
    writer.add_expert_weights_norm(bool(config.get("norm_topk_prob", False)))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    groups, used = int(config.get("n_group") or 1), int(config.get("topk_group") or 1)
    if used < groups:  # else every group is used: no group limit (llama.cpp asserts used < groups)
        writer.add_expert_group_count(groups)
        writer.add_expert_group_used_count(used)


def _read_deepseek(keys: Keys, config: Config) -> None:
    """The inverse of :func:`_deepseek_hparams`; transformers' DeepSeek-V3 has as many KV heads as query heads."""
    rope = int(need(keys, "rope.dimension_count"))
    config.pop("head_dim", None)  # attention.key_length is the latent's width, not a head's
    config["num_key_value_heads"] = config["num_attention_heads"]
    config["first_k_dense_replace"] = int(keys("leading_dense_block_count") or 0)
    config["q_lora_rank"] = int(keys("attention.q_lora_rank") or 0) or None
    config["kv_lora_rank"] = int(need(keys, "attention.kv_lora_rank"))
    config["qk_rope_head_dim"] = rope
    config["qk_nope_head_dim"] = int(need(keys, "attention.key_length_mla")) - rope
    config["v_head_dim"] = int(need(keys, "attention.value_length_mla"))
    config["n_routed_experts"] = int(need(keys, "expert_count"))
    if config["rope_parameters"].get("rope_type") == "yarn":
        mscale = f32(float(need(keys, "rope.scaling.yarn_log_multiplier")) / DEEPSEEK_YARN_LOG_MUL)
        config["rope_parameters"].update(mscale=mscale, mscale_all_dim=mscale, beta_fast=32.0, beta_slow=1.0)
    config["num_experts_per_tok"] = int(need(keys, "expert_used_count"))
    config["moe_intermediate_size"] = int(need(keys, "expert_feed_forward_length"))
    config["n_shared_experts"] = int(keys("expert_shared_count") or 0)
    config["routed_scaling_factor"] = f32(keys("expert_weights_scale") or 1.0)
    config["norm_topk_prob"] = bool(keys("expert_weights_norm"))
    gating = keys("expert_gating_func")
    if gating is not None and int(gating) != int(gguf.ExpertGatingFuncType.SIGMOID):
        raise SlimlmError(f"GGUF expert_gating_func {gating} is not supported for deepseek2 (sigmoid: "
                          f"{int(gguf.ExpertGatingFuncType.SIGMOID)})")
    config["n_group"] = int(keys("expert_group_count") or 1)
    config["topk_group"] = int(keys("expert_group_used_count") or 1)
    config.update(topk_method="noaux_tc", scoring_func="sigmoid", rope_interleave=True)


SUPPORTED_ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, "llama", permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, "mistral", permute_qk=True),
    "MixtralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, "mixtral", permute_qk=True,
                                   check=lambda c: (_no_window(c), _check_moe(c, norm_topk=None)),
                                   hparams=_expert_hparams, read=_expert_reader(norm_topk=None), experts=True,
                                   float_modules=("block_sparse_moe.gate",)),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, "qwen2"),
    "Qwen2MoeForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2MOE, "qwen2_moe",
                                    check=lambda c: (_no_sliding_window(c), _check_moe(c, norm_topk=False)),
                                    hparams=_expert_hparams, read=_expert_reader(norm_topk=False), experts=True,
                                    float_modules=("mlp.gate", "mlp.shared_expert_gate")),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, "qwen3", check=_check_qwen3),
    "Qwen3MoeForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3MOE, "qwen3_moe",
                                    check=lambda c: (_check_qwen3(c), _check_moe(c, norm_topk=True)),
                                    hparams=_expert_hparams, read=_expert_reader(norm_topk=True), experts=True,
                                    float_modules=("mlp.gate",)),
    "GemmaForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA, "gemma", norm_plus_one=True, drop_lm_head=True),
    "Gemma2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA2, "gemma2", norm_plus_one=True, drop_lm_head=True,
                                  hparams=_gemma2_hparams, read=_read_gemma2),
    "Gemma3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA3, "gemma3_text", norm_plus_one=True, drop_lm_head=True,
                                  check=_check_gemma3, hparams=_gemma3_hparams, read=_read_gemma3),
    # llm-compressor's DeepSeek examples keep the router (mlp.gate) in full precision
    "DeepseekV3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.DEEPSEEK2, "deepseek_v3", check=_check_deepseek,
                                      hparams=_deepseek_hparams, read=_read_deepseek, experts=True,
                                      float_modules=("mlp.gate",), mla=True),
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


def family(config: Config) -> ArchSpec | None:
    """The table's entry for a config (by architecture, else model_type) without the GGUF-only checks; None if absent.
    Other formats (compressed-tensors) read the family facts they need from it."""
    names = list(config.get("architectures") or [])
    if config.get("model_type") in _BY_MODEL_TYPE:
        names.append(_BY_MODEL_TYPE[config["model_type"]])
    return next((SUPPORTED_ARCHITECTURES[n] for n in names if n in SUPPORTED_ARCHITECTURES), None)


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


def llama3_rope_from_factors(config: dict[str, Any], factors: np.ndarray) -> dict[str, Any] | None:
    """The llama3 ``rope_parameters`` whose :func:`llama3_rope_factors` are ``factors`` (a GGUF's ``rope_freqs``),
    or None. llama.cpp's converter keeps only the factors; they fix ``factor`` (the largest) and, over the
    power-of-two contexts and the frequency-factor values Llama releases use, at most one combination, so a
    config transformers runs the same way can be written back (searched: no closed form recovers all four)."""
    rope = rope_parameters(config)
    factor = float(np.max(factors))
    for log_ctx in range(4, 21):
        for low in (1.0, 2.0, 4.0):
            for high in (2.0, 4.0, 8.0, 16.0, 32.0):
                if high <= low:
                    continue
                cand = {"rope_type": "llama3", "rope_theta": float(rope.get("rope_theta", 10000.0)),
                        "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": 2 ** log_ctx}
                if np.allclose(llama3_rope_factors(config, cand), factors, rtol=1e-5, atol=0):
                    return cand
    return None


def write_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], spec: ArchSpec) -> None:
    """Architecture hyper-parameters under ``{arch}.*`` keys."""
    n_head = int(config["num_attention_heads"])
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(1 if spec.mla else int(config.get("num_key_value_heads") or n_head))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    if config.get("head_dim") is not None and not spec.mla:
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


# ---- the way back: a GGUF we write -> the HF config and tensors it was written from --------------------------

def f32(value: Any) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07), as configs spell it."""
    return float(str(np.float32(value)))


def need(keys: Keys, name: str) -> Any:
    value = keys(name)
    if value is None:
        raise SlimlmError(f"the GGUF lacks the key {name!r} its architecture needs")
    return value


def gguf_arch_names() -> str:
    """Every loadable (GGUF architecture, HF class) pair, for error messages."""
    return ", ".join(f"{gguf.MODEL_ARCH_NAMES[s.gguf_arch]}{' with experts' if s.experts else ''} ({n})"
                     for n, s in SUPPORTED_ARCHITECTURES.items() if n != "MistralForCausalLM")


def spec_for_gguf(arch: str, has_experts: bool) -> tuple[str, ArchSpec]:
    """The (HF architecture, spec) a GGUF of ``general.architecture`` ``arch`` is loaded as. llama.cpp's ``llama``
    serves Llama, Mistral and (with experts) Mixtral; Llama's model is Mistral's without a window, so Llama."""
    for name, spec in SUPPORTED_ARCHITECTURES.items():
        if gguf.MODEL_ARCH_NAMES[spec.gguf_arch] == arch and spec.experts == has_experts:
            return name, spec
    got = f"{arch!r}{' with experts' if has_experts else ''}"
    raise SlimlmError(f"unsupported GGUF architecture {got}; slimlm loads: {gguf_arch_names()}")


def read_rope(keys: Keys) -> Config:
    """The inverse of :func:`write_hparams`' rope keys, as transformers-5 ``rope_parameters`` (llama3's per-frequency
    factors are a tensor, ``rope_freqs``: the loader applies them to the rotary embedding)."""
    rope: Config = {"rope_type": "default", "rope_theta": f32(keys("rope.freq_base") or 10000.0)}
    kind = keys("rope.scaling.type")
    if kind in (None, "none"):
        return rope
    if kind not in ("linear", "yarn"):
        raise SlimlmError(f"GGUF rope scaling {kind!r} is not supported (none, linear, yarn)")
    rope.update(rope_type=kind, factor=f32(need(keys, "rope.scaling.factor")))
    if kind == "yarn":
        rope["original_max_position_embeddings"] = int(need(keys, "rope.scaling.original_context_length"))
    return rope


def read_hparams(keys: Keys, name: str, spec: ArchSpec) -> Config:
    """The inverse of :func:`write_hparams`: the HF config fields (architecture ``name``) a GGUF's keys encode.
    Token ids, vocabulary size and tying come from the tokenizer keys and the tensor table (the caller's)."""
    n_head = int(need(keys, "attention.head_count"))
    config: Config = {
        "architectures": [name], "model_type": spec.model_type,
        "num_hidden_layers": int(need(keys, "block_count")),
        "max_position_embeddings": int(need(keys, "context_length")),
        "hidden_size": int(need(keys, "embedding_length")),
        "intermediate_size": int(need(keys, "feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(keys("attention.head_count_kv") or n_head),
        "rms_norm_eps": f32(need(keys, "attention.layer_norm_rms_epsilon")),
        "rope_parameters": read_rope(keys),
    }
    if keys("attention.key_length") is not None:
        config["head_dim"] = int(keys("attention.key_length"))
    if keys("vocab_size") is not None:
        config["vocab_size"] = int(keys("vocab_size"))
    if spec.read is not None:
        spec.read(keys, config)
    return config


def rope_heads(hf_name: str, spec: ArchSpec, n_head: int, n_head_kv: int) -> int | None:
    """The head count of llama.cpp's Q/K row permutation (:func:`permute_for_rope`) for this tensor, else None."""
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_head_kv
    return None


def to_gguf(hf_name: str, spec: ArchSpec, n_head: int, n_head_kv: int) -> Callable[[np.ndarray], np.ndarray]:
    """llama.cpp's layout of an HF tensor: Q/K rows permuted for its rope, Gemma norms stored as 1 + w."""
    heads = rope_heads(hf_name, spec, n_head, n_head_kv)
    if heads is not None:
        return lambda a: permute_for_rope(a, heads)
    if spec.norm_plus_one and hf_name.endswith("norm.weight"):
        return lambda a: a + np.float32(1.0)
    return lambda a: a


def from_gguf(hf_name: str, spec: ArchSpec, n_head: int, n_head_kv: int) -> Callable[[np.ndarray], np.ndarray]:
    """The inverse of :func:`to_gguf`: the GGUF tensor of HF tensor ``hf_name`` in HF's layout."""
    heads = rope_heads(hf_name, spec, n_head, n_head_kv)
    if heads is not None:
        return lambda a: unpermute_for_rope(a, heads)
    if spec.norm_plus_one and hf_name.endswith("norm.weight"):
        return lambda a: a - np.float32(1.0)
    return lambda a: a
