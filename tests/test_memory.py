"""The memory model: weight bytes per format, GGUF file size, KV cache, from specs and checkpoints."""

import json

import pytest

from slimlm.checkpoint import open_checkpoint
from slimlm.errors import SlimlmError
from slimlm.inspect import catalog
from slimlm.inspect.memory import (
    ct_weight_estimate,
    estimate_memory,
    gguf_file_bytes,
    gguf_metadata_bytes,
    gguf_tensors_from_checkpoint,
    gguf_tensors_from_spec,
    kv_cache,
    normalize_variant,
)
from slimlm.inspect.params import count_spec
from slimlm.spec import ModelSpec


def spec_of(name: str) -> ModelSpec:
    return ModelSpec.from_config(catalog.lookup(name).config)


@pytest.mark.parametrize("name", [e.key for e in catalog.entries()])
def test_synthesized_gguf_tensors_hold_every_parameter(name):
    spec = spec_of(name)
    assert sum(t.n_elements for t in gguf_tensors_from_spec(spec)) == count_spec(spec).total


def test_distill_qwen_7b_q4_k_m_matches_public_files():
    # Public Q4_K_M GGUFs of DeepSeek-R1-Distill-Qwen-7B are 4.68 GB.
    est = estimate_memory(spec_of("DeepSeek-R1-Distill-Qwen-7B"), "Q4_K_M")
    assert abs(est.file_bytes / 4.68e9 - 1) < 0.01
    assert 4.85 < est.weights.bits_per_weight < 4.95


def test_bits_per_weight_of_uniform_types_are_the_block_costs():
    spec = spec_of("Llama-3.1-8B")  # rows of 4096/14336: no fallbacks
    assert estimate_memory(spec, "Q8_0").weights.bits_per_weight == pytest.approx(8.5, abs=0.01)
    assert estimate_memory(spec, "BF16").weights.bits_per_weight == pytest.approx(16.0, abs=0.01)
    q6 = estimate_memory(spec, "Q6_K").weights
    assert q6.bits_per_weight == pytest.approx(6.5625, abs=0.01)


def test_mixes_are_ordered_by_size():
    spec = spec_of("Llama-3.1-8B")
    sizes = [estimate_memory(spec, v).weights.bytes for v in
             ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K")]
    assert sizes == sorted(sizes, reverse=True)


def test_compressed_tensors_layouts():
    spec = spec_of("Llama-3.1-8B")
    tensors = gguf_tensors_from_spec(spec)
    w8 = ct_weight_estimate(tensors, "W8A8")
    w4 = ct_weight_estimate(tensors, "W4A16")
    emb = 2 * spec.vocab_size * spec.hidden_size  # untied: embedding and lm_head stay bf16
    linear = sum(t.n_elements for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    rows = sum(t.shape[0] for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    norms = sum(t.n_elements for t in tensors if len(t.shape) == 1)
    assert w8.bytes == linear + rows * 2 + (emb + norms) * 2
    n_mats = sum(1 for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    assert w4.bytes == linear // 2 + linear // 128 * 2 + 16 * n_mats + (emb + norms) * 2
    asym = ct_weight_estimate(tensors, "W4A16", symmetric=False)
    assert asym.bytes - w4.bytes == sum((t.shape[0] // 8) * (t.shape[1] // 128) * 4
                                        for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2)


def test_kv_cache_gqa_mla_and_sliding():
    llama = spec_of("Llama-3.1-8B")  # 32 layers, 8 KV heads x 128
    assert kv_cache(llama, 4096).bytes == 32 * 2 * 8 * 128 * 4096 * 2
    assert kv_cache(llama, 4096, batch=3).bytes == 3 * kv_cache(llama, 4096).bytes
    assert kv_cache(llama, 4096, cache_type="q8_0").bytes == 32 * 2 * 8 * 128 * 4096 * 34 // 32
    r1 = spec_of("DeepSeek-R1")  # MLA: 61 layers x (512 + 64), not doubled
    kv = kv_cache(r1, 4096)
    assert kv.bytes == 61 * (512 + 64) * 4096 * 2 and kv.kind == "mla"
    gemma2 = ModelSpec.from_config({"model_type": "gemma2", "num_hidden_layers": 4, "hidden_size": 256,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                                    "intermediate_size": 512, "vocab_size": 1000, "sliding_window": 1024})
    kv = kv_cache(gemma2, 8192)
    per_token_layer = 2 * 2 * 64 * 2
    assert kv.sliding_layers == 2
    assert kv.bytes == per_token_layer * (2 * 8192 + 2 * 1024)
    with pytest.raises(SlimlmError, match="cache type"):
        kv_cache(llama, 4096, cache_type="q3")


def test_file_size_of_the_shipped_gguf_is_exact(smollm2_gguf):
    from slimlm.inspect.memory import metadata_bytes_of

    ckpt = open_checkpoint(smollm2_gguf)
    tensors = gguf_tensors_from_checkpoint(ckpt)
    plan = {t.name: t.type for t in tensors}
    assert gguf_file_bytes(tensors, plan, metadata_bytes_of(ckpt.tensors)) == smollm2_gguf.stat().st_size
    assert gguf_metadata_bytes(str(smollm2_gguf)) == metadata_bytes_of(ckpt.tensors)


def test_checkpoint_tensor_lists_match_the_spec(tiny_llama_dir, smollm2_gguf):
    ckpt = open_checkpoint(tiny_llama_dir)
    mapped = gguf_tensors_from_checkpoint(ckpt)
    synthesized = gguf_tensors_from_spec(ModelSpec.from_config(json.loads((tiny_llama_dir / "config.json").read_text())))
    assert sorted((t.name, t.shape) for t in mapped) == sorted((t.name, t.shape) for t in synthesized)
    gguf_ckpt = open_checkpoint(smollm2_gguf)
    from_gguf = gguf_tensors_from_checkpoint(gguf_ckpt)
    assert sorted((t.name, t.shape) for t in from_gguf) == sorted(
        (t.name, t.shape) for t in gguf_tensors_from_spec(spec_of("SmolLM2-135M")))


def test_variant_names():
    assert normalize_variant("q4_k_m") == "Q4_K_M"
    assert normalize_variant("fp16") == "F16"
    assert normalize_variant("w4a16") == "W4A16"
    with pytest.raises(SlimlmError, match="did you mean"):
        normalize_variant("Q4_K_X")


def _deepseek_hf_names(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a DeepSeek-V3 HF checkpoint (per-expert matrices, kv_b unsplit, one MTP layer)."""
    h, f, fe = spec.hidden_size, spec.intermediate_size, spec.moe_intermediate_size
    names = [("model.embed_tokens.weight", (spec.vocab_size, h)), ("model.norm.weight", (h,)),
             ("lm_head.weight", (spec.vocab_size, h))]
    for i in range(spec.n_layers + spec.mtp_layers):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_a_proj.weight", (spec.q_lora_rank, h)),
                  (p + "self_attn.q_a_layernorm.weight", (spec.q_lora_rank,)),
                  (p + "self_attn.q_b_proj.weight", (spec.n_heads * spec.head_dim, spec.q_lora_rank)),
                  (p + "self_attn.kv_a_proj_with_mqa.weight", (spec.kv_lora_rank + spec.qk_rope_head_dim, h)),
                  (p + "self_attn.kv_a_layernorm.weight", (spec.kv_lora_rank,)),
                  (p + "self_attn.kv_b_proj.weight",
                   (spec.n_heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank)),
                  (p + "self_attn.o_proj.weight", (h, spec.n_heads * spec.v_head_dim))]
        if i in spec.moe_layers or i >= spec.n_layers:
            names += [(p + "mlp.gate.weight", (spec.n_experts, h)),
                      (p + "mlp.gate.e_score_correction_bias", (spec.n_experts,))]
            for e in range(spec.n_experts):
                names += [(p + f"mlp.experts.{e}.gate_proj.weight", (fe, h)),
                          (p + f"mlp.experts.{e}.up_proj.weight", (fe, h)),
                          (p + f"mlp.experts.{e}.down_proj.weight", (h, fe))]
            fs = spec.shared_expert_intermediate_size
            names += [(p + "mlp.shared_experts.gate_proj.weight", (fs, h)),
                      (p + "mlp.shared_experts.up_proj.weight", (fs, h)),
                      (p + "mlp.shared_experts.down_proj.weight", (h, fs))]
        else:
            names += [(p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                      (p + "mlp.down_proj.weight", (h, f))]
    return names


def test_hf_moe_names_map_to_the_same_gguf_tensors_as_the_spec():
    from slimlm.inspect.memory import hf_to_gguf_tensors

    config = dict(catalog.lookup("deepseek-r1").config, num_hidden_layers=5, n_routed_experts=8)
    spec = ModelSpec.from_config(config)
    mapped = hf_to_gguf_tensors(_deepseek_hf_names(spec), spec)
    assert sorted((t.name, t.shape) for t in mapped) == sorted((t.name, t.shape) for t in gguf_tensors_from_spec(spec))


def test_fp8_awq_gptq_layouts_per_matrix():
    from slimlm.formats.gguf_mix import PlanTensor

    t = [PlanTensor("blk.0.attn_q.weight", (256, 384)), PlanTensor("blk.0.attn_norm.weight", (384,))]
    norm = 384 * 2
    assert ct_weight_estimate(t, "FP8").bytes == 256 * 384 + 2 * 3 * 4 + norm        # 128x128 blocks, f32 scales
    awq = 256 * 384 // 2 + 3 * 256 * 2 + 3 * (256 // 8) * 4                          # qweight, scales, qzeros
    assert ct_weight_estimate(t, "AWQ").bytes == awq + norm
    assert ct_weight_estimate(t, "GPTQ").bytes == awq + 384 * 4 + norm               # + g_idx
