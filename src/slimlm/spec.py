"""ModelSpec: the architecture facts of a decoder-only LLM, read from a Hugging Face config dict.

Every size computation starts from a ModelSpec, so a model can be sized from its config.json alone. Field names
are the same for every family (``n_experts`` is Mixtral's ``num_local_experts``, DeepSeek's ``n_routed_experts``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from slimlm.errors import SlimlmError

LayerType = Literal["full", "sliding"]

# model_type -> (its HF `architectures` class name, for configs that lack model_type; whether input embeddings
# and lm_head are tied when the config does not say: the defaults of the transformers config classes).
_FAMILIES = {
    "llama": ("LlamaForCausalLM", False),
    "mistral": ("MistralForCausalLM", False),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
    "gemma": ("GemmaForCausalLM", True),
    "gemma2": ("Gemma2ForCausalLM", True),
    "gemma3_text": ("Gemma3ForCausalLM", True),
    "mixtral": ("MixtralForCausalLM", False),
    "qwen2_moe": ("Qwen2MoeForCausalLM", False),
    "deepseek_v2": ("DeepseekV2ForCausalLM", False),
    "deepseek_v3": ("DeepseekV3ForCausalLM", False),
}
_TIE_DEFAULT = {model_type: tie for model_type, (_, tie) in _FAMILIES.items()}
_ARCH_TO_TYPE = {arch: model_type for model_type, (arch, _) in _FAMILIES.items()}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only transformer; enough to count its parameters and size its KV cache.

    Conventions:
    - ``head_dim`` is the query/key head size (for MLA: ``qk_nope_head_dim + qk_rope_head_dim``);
      ``v_head_dim`` is the value head size (equal to ``head_dim`` outside MLA).
    - MLA fields (``kv_lora_rank``, ``q_lora_rank``, ``qk_rope_head_dim``, ``qk_nope_head_dim``) are None for
      ordinary attention; ``q_lora_rank`` is also None for MLA models whose queries are not compressed
      (DeepSeek-V2-Lite).
    - ``n_experts`` is 0 for dense models. ``moe_layers`` lists the decoder layers whose MLP is a mixture of
      experts; the others use a dense MLP of ``intermediate_size``.
    - ``shared_expert_intermediate_size`` is the total FFN width of the always-on shared expert(s)
      (DeepSeek: ``n_shared_experts * moe_intermediate_size``; Qwen2-MoE: ``shared_expert_intermediate_size``).
    - ``layer_types[i]`` is ``'sliding'`` when layer i attends within ``sliding_window`` tokens only.
    - ``mtp_layers`` counts DeepSeek-V3's multi-token-prediction modules, which are not part of the model
      used for ordinary generation and are reported separately.
    """

    model_type: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    n_experts: int = 0
    n_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    router_bias: bool = False
    first_dense_layers: int = 0
    moe_layers: tuple[int, ...] = ()
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int = 0
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] = ()
    mtp_layers: int = 0
    max_position_embeddings: int | None = None
    rope_theta: float | None = None

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0 and bool(self.moe_layers)

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3): K and V come from one cached latent per token."""
        return self.kv_lora_rank is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["moe_layers"] = list(self.moe_layers)
        data["layer_types"] = list(self.layer_types)
        return data

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelSpec":
        """Read a HF config dict (config.json contents); unknown families raise SlimlmError."""
        if not isinstance(config, dict):
            raise SlimlmError("a model config must be a JSON object")
        return _from_config(config)


# --------------------------------------------------------------------------------------------- parsing

def _model_type(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if not model_type:
        archs = config.get("architectures")
        for arch in archs if isinstance(archs, list) else []:
            if isinstance(arch, str) and arch in _ARCH_TO_TYPE:
                return _ARCH_TO_TYPE[arch]
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise SlimlmError(f"unsupported model_type {_short(model_type)}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


MAX_LAYERS = 10_000  # the deepest released LLMs have a few hundred
# The most a config may ask for: far above any released model (hidden 16k, vocab 256k, FFN 50k, 128 heads), far
# below what would exhaust memory or time while planning from it (per-layer tables, tensor shapes); a config
# beyond these is corrupt or hostile, not a model. Any other integer field is bounded by DEFAULT_LIMIT.
LIMITS = {"num_hidden_layers": MAX_LAYERS, "hidden_size": 1 << 20, "intermediate_size": 1 << 22,
          "moe_intermediate_size": 1 << 22, "shared_expert_intermediate_size": 1 << 22, "vocab_size": 1 << 24,
          "num_attention_heads": 1 << 14, "num_key_value_heads": 1 << 14, "head_dim": 1 << 16,
          "v_head_dim": 1 << 16, "qk_rope_head_dim": 1 << 16, "qk_nope_head_dim": 1 << 16, "kv_lora_rank": 1 << 20,
          "q_lora_rank": 1 << 20, "max_position_embeddings": 1 << 27, "num_local_experts": 1 << 16, "num_experts": 1 << 16, "n_routed_experts": 1 << 16}
DEFAULT_LIMIT = 1 << 31


def _int(config: dict[str, Any], key: str, default: Any = ..., *, minimum: int = 0) -> Any:
    """A bounded non-negative int from the config; missing required keys, wrong types and values beyond
    ``LIMITS`` are user errors."""
    value = config.get(key)
    if value is None:
        if default is ...:
            raise SlimlmError(f"model config lacks {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SlimlmError(f"model config has {key}={_short(value)}; expected an integer >= {minimum}")
    limit = LIMITS.get(key, DEFAULT_LIMIT)
    if value > limit:
        raise SlimlmError(f"model config has {key}={value}; no real model has over {limit:,} (a corrupt config?)")
    return value


# GPT-2-style names of the same sizes, for configs of families ModelSpec does not read
_ALIASES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
            "n_inner": "intermediate_size", "ffn_dim": "intermediate_size", "num_layers": "num_hidden_layers",
            "d_model": "hidden_size", "n_positions": "max_position_embeddings"}


def is_supported(config: dict[str, Any]) -> bool:
    """Whether ModelSpec reads this config's family (else only ``check_bounds`` applies)."""
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        return True
    if not isinstance(config.get("model_type", ""), str):
        return True  # not a family name at all: ModelSpec refuses it, naming the field
    try:
        _model_type(config)
    except SlimlmError:
        return False
    return True


def check_bounds(config: dict[str, Any]) -> None:
    """For a family ModelSpec does not read (transformers builds it): no integer size beyond ``LIMITS``, so a
    corrupt config is refused before anything allocates for it."""
    for key, value in config.items():
        name = _ALIASES.get(key, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > LIMITS.get(name, DEFAULT_LIMIT):
            raise SlimlmError(f"model config has {key}={value}; no real model has over "
                              f"{LIMITS.get(name, DEFAULT_LIMIT):,} (a corrupt config?)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bool(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SlimlmError(f"model config has {key}={_short(value)}; expected true or false")
    return value


def _rope_theta(config: dict[str, Any]) -> float | None:
    """rope_theta from either the classic key or transformers v5 ``rope_parameters`` (possibly per layer type)."""
    theta = config.get("rope_theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < 1e15):
        raise SlimlmError(f"model config has rope_theta={_short(theta)}; expected a positive number")
    if theta is not None:
        return float(theta)
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if isinstance(params.get("rope_theta"), (int, float)):
            return float(params["rope_theta"])
        full = params.get("full_attention")
        if isinstance(full, dict) and isinstance(full.get("rope_theta"), (int, float)):
            return float(full["rope_theta"])
    return None


def _layer_types(config: dict[str, Any], model_type: str, n_layers: int,
                 sliding_window: int | None) -> tuple[LayerType, ...]:
    """Which layers use sliding-window attention, following each family's config rules."""
    explicit = config.get("layer_types")
    if isinstance(explicit, list) and explicit:
        if len(explicit) != n_layers:
            raise SlimlmError(f"model config lists {len(explicit)} layer_types for {n_layers} layers")
        kinds = []
        for kind in explicit:
            if not isinstance(kind, str):
                raise SlimlmError(f"model config has a layer type {kind!r}; expected a string")
            sliding = ("sliding" in kind or "chunked" in kind) and sliding_window is not None
            kinds.append("sliding" if sliding else "full")
        return tuple(kinds)  # type: ignore[return-value]
    if sliding_window is None:
        return ("full",) * n_layers
    if model_type == "gemma2":
        # Gemma-2 alternates: even layers slide, odd layers attend globally.
        return tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))  # type: ignore[misc]
    if model_type == "gemma3_text":
        pattern = _int(config, "sliding_window_pattern", 6, minimum=1)
        return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers))  # type: ignore[misc]
    if model_type in ("qwen2", "qwen3", "qwen2_moe"):
        first_sliding = _int(config, "max_window_layers", n_layers)
        return tuple("sliding" if i >= first_sliding else "full" for i in range(n_layers))  # type: ignore[misc]
    return ("sliding",) * n_layers


_DTYPES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2", "auto")


def _check_dtype(config: dict[str, Any]) -> None:
    """The stored dtype a config names (``torch_dtype`` or transformers v5's ``dtype``), if any, is a real one."""
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or value.removeprefix("torch.") not in _DTYPES):
            raise SlimlmError(f"model config has {key}={_short(value)}; expected one of {', '.join(_DTYPES)}")


def _sliding_window(config: dict[str, Any], model_type: str) -> int | None:
    window = config.get("sliding_window")
    if window is None or window == 0:  # some configs write 0 for "no window"
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise SlimlmError(f"model config has sliding_window={_short(window)}; expected a positive integer or null")
    # Qwen configs carry a sliding_window value even when use_sliding_window is false (then it is unused).
    if model_type in ("qwen2", "qwen3", "qwen2_moe") and not config.get("use_sliding_window", False):
        return None
    return window


def _from_config(config: dict[str, Any]) -> ModelSpec:
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        # Gemma-3 multimodal checkpoints nest the language model's config.
        config = {**config["text_config"], "model_type": "gemma3_text"}
    model_type = _model_type(config)
    n_layers = _int(config, "num_hidden_layers", minimum=1)
    hidden = _int(config, "hidden_size", minimum=1)
    n_heads = _int(config, "num_attention_heads", minimum=1)
    n_kv_heads = _int(config, "num_key_value_heads", n_heads, minimum=1)
    vocab = _int(config, "vocab_size", minimum=1)
    intermediate = _int(config, "intermediate_size", 0)
    tie = _bool(config, "tie_word_embeddings", _TIE_DEFAULT[model_type])
    window = _sliding_window(config, model_type)
    common: dict[str, Any] = dict(
        model_type=model_type, n_layers=n_layers, hidden_size=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=vocab, intermediate_size=intermediate, tie_word_embeddings=tie,
        mlp_bias=_bool(config, "mlp_bias", False), sliding_window=window,
        layer_types=_layer_types(config, model_type, n_layers, window),
        max_position_embeddings=_int(config, "max_position_embeddings", None, minimum=1), rope_theta=_rope_theta(config))
    _check_dtype(config)
    if n_heads % n_kv_heads:
        raise SlimlmError(f"model config has {n_heads} attention heads, not a multiple of {n_kv_heads} KV heads")

    if model_type in ("deepseek_v2", "deepseek_v3"):
        return _deepseek(config, common)

    head_dim = _int(config, "head_dim", None, minimum=1)
    if head_dim is None:
        if hidden % n_heads:
            raise SlimlmError(f"hidden_size {hidden} is not divisible by {n_heads} heads and head_dim is not given")
        head_dim = hidden // n_heads
    common.update(head_dim=head_dim, v_head_dim=head_dim)

    if model_type == "qwen2" or model_type == "qwen2_moe":
        # Qwen2 projections q, k, v carry biases (o does not); the config has no switch for it.
        common["attention_bias"] = True
    else:
        bias = _bool(config, "attention_bias", False)
        common["attention_bias"] = bias
        common["attention_out_bias"] = bias
    if model_type in ("qwen3", "gemma3_text"):
        common["qk_norm"] = True
    if model_type in ("gemma2", "gemma3_text"):
        common["norms_per_layer"] = 4  # input, post-attention, pre- and post-feedforward

    if model_type == "mixtral":
        n_experts = _int(config, "num_local_experts", minimum=1)
        common.update(n_experts=n_experts, n_experts_per_tok=_int(config, "num_experts_per_tok", 2, minimum=1),
                      moe_intermediate_size=intermediate, moe_layers=tuple(range(n_layers)))
    elif model_type == "qwen2_moe":
        n_experts = _int(config, "num_experts", minimum=1)
        step = _int(config, "decoder_sparse_step", 1, minimum=1)
        dense_only = config.get("mlp_only_layers") or []
        if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
            raise SlimlmError(f"model config has mlp_only_layers={_short(dense_only)}; expected a list of layer indices")
        shared = _int(config, "shared_expert_intermediate_size", 0)
        common.update(
            n_experts=n_experts, n_experts_per_tok=_int(config, "num_experts_per_tok", minimum=1),
            moe_intermediate_size=_int(config, "moe_intermediate_size", minimum=1), n_shared_experts=1 if shared else 0,
            shared_expert_intermediate_size=shared, shared_expert_gate=bool(shared),
            moe_layers=tuple(i for i in range(n_layers) if i not in set(dense_only) and (i + 1) % step == 0))
    return _spec(common)


def _deepseek(config: dict[str, Any], common: dict[str, Any]) -> ModelSpec:
    """DeepSeek-V2/V3: multi-head latent attention, shared + routed experts after some dense layers, MTP."""
    n_layers = common["n_layers"]
    rope = _int(config, "qk_rope_head_dim", minimum=1)
    nope = _int(config, "qk_nope_head_dim", minimum=1)
    n_routed = _int(config, "n_routed_experts", 0)
    first_dense = _int(config, "first_k_dense_replace", 0)
    freq = _int(config, "moe_layer_freq", 1, minimum=1)
    moe_inter = _int(config, "moe_intermediate_size", 0)
    n_shared = _int(config, "n_shared_experts", 0)
    moe_layers = tuple(i for i in range(n_layers) if n_routed and i >= first_dense and i % freq == 0)
    if moe_layers and not moe_inter:
        raise SlimlmError("model config lacks 'moe_intermediate_size'")
    bias = _bool(config, "attention_bias", False)
    common.update(
        head_dim=nope + rope, v_head_dim=_int(config, "v_head_dim", minimum=1),
        kv_lora_rank=_int(config, "kv_lora_rank", minimum=1), q_lora_rank=_int(config, "q_lora_rank", None, minimum=1),
        qk_rope_head_dim=rope, qk_nope_head_dim=nope, attention_bias=bias, attention_out_bias=bias,
        n_experts=n_routed, n_experts_per_tok=_int(config, "num_experts_per_tok", 0) if n_routed else 0,
        n_shared_experts=n_shared if moe_layers else 0, moe_intermediate_size=moe_inter if moe_layers else 0,
        shared_expert_intermediate_size=n_shared * moe_inter if moe_layers else 0,
        # V3's aux-loss-free routing keeps a per-expert bias (e_score_correction_bias) in the checkpoint;
        # V2 has it only when its config asks for that routing.
        router_bias=bool(moe_layers) and config.get("topk_method", "noaux_tc" if common["model_type"] == "deepseek_v3"
                                                    else None) == "noaux_tc",
        first_dense_layers=min(first_dense, n_layers), moe_layers=moe_layers,
        mtp_layers=_int(config, "num_nextn_predict_layers", 0))
    return _spec(common)


def _spec(common: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of the parsed fields; layers with a dense MLP need intermediate_size."""
    if common["intermediate_size"] == 0 and len(common.get("moe_layers", ())) < common["n_layers"]:
        raise SlimlmError("model config lacks 'intermediate_size'")
    return ModelSpec(**common)
