"""ModelSpec and parameter counts from configs, checked against transformers' own models (built on the
meta device, so no memory is used): for every supported family, the count computed from the config, the
count from the state-dict tensor table, and transformers' tensors agree exactly, role by role."""

import pytest
import torch

from slimlm.checkpoint import TensorInfo
from slimlm.errors import SlimlmError
from slimlm.inspect.params import count_spec, count_tensors
from slimlm.spec import SUPPORTED_MODEL_TYPES, ModelSpec

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1)
FAMILIES = {
    "llama": dict(BASE, attention_bias=True, mlp_bias=True),
    "llama-tied": dict(BASE, tie_word_embeddings=True),
    "mistral": dict(BASE, sliding_window=32),
    "qwen2": dict(BASE),
    "qwen3": dict(BASE, head_dim=32),
    "gemma": dict(BASE, head_dim=32),
    "gemma2": dict(BASE, head_dim=32, sliding_window=16),
    "gemma3_text": dict(BASE, head_dim=32, sliding_window=16, num_hidden_layers=6),
    "mixtral": dict(BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2, mlp_only_layers=[3]),
    "deepseek_v2": dict(BASE, **MLA, q_lora_rank=None, n_shared_experts=2, topk_method="greedy"),
    "deepseek_v3": dict(BASE, **MLA, q_lora_rank=24, n_shared_experts=1, n_group=2, topk_group=1),
}


def _hf_model(model_type: str, kwargs: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type.split("-")[0], **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_counts_match_transformers(family):
    config, model = _hf_model(family, FAMILIES[family])
    spec = ModelSpec.from_config(config.to_dict())
    from_spec = count_spec(spec)
    state = model.state_dict()  # includes buffers stored in checkpoints (DeepSeek-V3's router bias)
    tensors = [TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), 0) for name, t in state.items()]
    from_tensors = count_tensors(tensors, spec)
    params = sum(p.numel() for p in model.parameters())
    buffers_in_state = sum(state[n].numel() for n, _ in model.named_buffers() if n in state)
    assert from_spec.total == from_tensors.total == params + buffers_in_state
    assert from_spec.roles == from_tensors.roles
    assert from_spec.tied_embeddings == bool(config.tie_word_embeddings)


def test_layer_types_follow_each_family():
    g2 = ModelSpec.from_config({"model_type": "gemma2", **BASE, "head_dim": 32, "sliding_window": 16})
    assert g2.layer_types == ("sliding", "full", "sliding", "full")
    g3 = ModelSpec.from_config({"model_type": "gemma3_text", **BASE, "num_hidden_layers": 12, "sliding_window": 16})
    assert g3.layer_types == tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(12))
    mistral = ModelSpec.from_config({"model_type": "mistral", **BASE, "sliding_window": 4096})
    assert mistral.layer_types == ("sliding",) * 4 and mistral.sliding_window == 4096
    qwen = ModelSpec.from_config({"model_type": "qwen2", **BASE, "sliding_window": 4096, "use_sliding_window": False})
    assert qwen.sliding_window is None and qwen.layer_types == ("full",) * 4
    qwen_swa = ModelSpec.from_config({"model_type": "qwen2", **BASE, "sliding_window": 4096,
                                      "use_sliding_window": True, "max_window_layers": 2})
    assert qwen_swa.layer_types == ("full", "full", "sliding", "sliding")
    explicit = ModelSpec.from_config({"model_type": "gemma3_text", **BASE, "sliding_window": 8,
                                      "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert explicit.layer_types == ("sliding", "full", "sliding", "full")


def test_deepseek_v3_fields_and_rope_styles():
    cfg = {"model_type": "deepseek_v3", **BASE, **MLA, "q_lora_rank": None, "n_shared_experts": 1,
           "num_nextn_predict_layers": 1, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0}}
    spec = ModelSpec.from_config(cfg)
    assert spec.is_mla and spec.is_moe and spec.q_lora_rank is None
    assert spec.head_dim == 24 and spec.v_head_dim == 16 and spec.kv_lora_rank == 16
    assert spec.moe_layers == (1, 2, 3) and spec.first_dense_layers == 1 and spec.mtp_layers == 1
    assert spec.shared_expert_intermediate_size == 32 and spec.rope_theta == 10000.0
    classic = ModelSpec.from_config({"model_type": "llama", **BASE, "rope_theta": 500000})
    assert classic.rope_theta == 500000.0 and classic.head_dim == 16 and not classic.is_moe


def test_gemma3_multimodal_config_uses_text_config():
    spec = ModelSpec.from_config({"model_type": "gemma3", "text_config": {**BASE, "head_dim": 32}})
    assert spec.model_type == "gemma3_text" and spec.head_dim == 32 and spec.tie_word_embeddings


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gpt2", **BASE}, "unsupported model_type 'gpt2'; supported: llama"),
    ({"model_type": "llama", **{k: v for k, v in BASE.items() if k != "hidden_size"}}, "lacks 'hidden_size'"),
    ({"model_type": "llama", **BASE, "num_hidden_layers": "4"}, "num_hidden_layers='4'"),
    ({"model_type": "llama", **BASE, "num_key_value_heads": 3}, "not a multiple of 3 KV heads"),
])
def test_bad_configs_raise_clear_errors(config, message):
    with pytest.raises(SlimlmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelSpec.from_config(config)
    assert "deepseek_v3" in SUPPORTED_MODEL_TYPES


def test_deepseek_v3_checkpoint_layout_mtp_and_fp8_scales():
    """A DeepSeek-V3-layout tensor table: MTP module stored as layer n_layers (as in the released weights)
    and FP8 block scales (weight_scale_inv) beside each weight; counts must match the config's."""
    kwargs = dict(FAMILIES["deepseek_v3"], num_nextn_predict_layers=1)
    config, model = _hf_model("deepseek_v3", kwargs)
    spec = ModelSpec.from_config(config.to_dict())
    state = model.state_dict()
    n, h, v = spec.n_layers, spec.hidden_size, spec.vocab_size
    tensors = [TensorInfo(k, tuple(t.shape), "F8_E4M3", 0) for k, t in state.items()]
    tensors += [TensorInfo(k.replace(".weight", ".weight_scale_inv"), (1, 1), "F32", 0)
                for k, t in state.items() if k.endswith("proj.weight")]
    last = f"model.layers.{n - 1}."
    tensors += [TensorInfo(k.replace(last, f"model.layers.{n}."), tuple(t.shape), "F8_E4M3", 0)
                for k, t in state.items() if k.startswith(last)]
    mtp = f"model.layers.{n}."
    tensors += [TensorInfo(mtp + "embed_tokens.weight", (v, h), "BF16", 0),
                TensorInfo(mtp + "enorm.weight", (h,), "BF16", 0), TensorInfo(mtp + "hnorm.weight", (h,), "BF16", 0),
                TensorInfo(mtp + "eh_proj.weight", (h, 2 * h), "BF16", 0),
                TensorInfo(mtp + "shared_head.norm.weight", (h,), "BF16", 0),
                TensorInfo(mtp + "shared_head.head.weight", (v, h), "BF16", 0)]
    from_tensors = count_tensors(tensors, spec)
    from_spec = count_spec(spec)
    assert from_tensors.total == from_spec.total and from_tensors.roles == from_spec.roles
    assert from_tensors.mtp == from_spec.mtp > 0
    assert from_tensors.mtp_shared_copies == from_spec.mtp_shared_copies == 2 * v * h
    assert any("quantization scales" in note for note in from_tensors.notes)
    assert from_tensors.active == from_spec.active
