"""GGUF export per architecture, with llama.cpp as the oracle.

For each family: a tiny random model (transformers, random non-trivial norms and biases) -> our F32 GGUF ->
llama.cpp loads it and its logits match transformers'; then our Q8_0 file has the tensor types and the exact
byte size of what llama_model_quantize writes from our F32 file, and llama.cpp loads it.

Measured max |logit difference| of our F32 file under llama.cpp vs transformers (40 tokens, |logits| <= ~4.3;
the bound is max_diff * max(1, max |logit|), 2e-3 -> ~8e-3), llama-cpp-python 0.3.36, transformers 5.24:

    case        llama.cpp arch   max abs diff   notes
    llama3      llama            3.1e-3         rope_type llama3 -> rope_freqs (2.9 without it)
    mistral     llama            3.0e-3
    qwen2       qwen2            3.0e-3         q/k/v biases
    qwen3       qwen3            2.7e-3         q/k norms, head_dim 64 != hidden / heads
    gemma3      gemma3           3.1e-3         6 layers (5 sliding, window 16 < 40 tokens; 1 global)
    mixtral     llama            5.7e-3         8 experts, top-2
    qwen2_moe   qwen2moe         3.3e-3         4 experts + gated shared expert
    qwen3_moe   qwen3moe         3.5e-3         4 experts, renormalized top-2
    deepseek_v3 deepseek2        4.3e-6 (*)     MLA (q_lora 64, kv_lora 64); dense layer + 4 experts (2 groups,
                                                top-1 group, biased sigmoid top-2, scale 2.5) + shared expert
    ..._noqlora deepseek2        8.9e-6 (*)     deepseek_v3 with q_lora_rank None (attn_q), 3 layers, no group limit
    ..._yarn    deepseek2        3.9e-6 (*)     deepseek_v3 with DeepSeek's yarn (factor 4 over 256, mscale_all_dim 1:
                                                softmax scale x (1 + 0.1 ln 4)^2); 2.7 if the log multiplier is dropped

(*) with llama.cpp's K/V cache in F32; its default F16 cache gives 2.5e-3 and 1.1e-2 (one token), so the
DeepSeek cases run with F32 K/V and a bound of 1e-4 * max |logit|, which checks the MLA layout to float noise.

Q8_0: for every case our file's tensor types, tensor bytes and file size equal llama_model_quantize's from our
F32 file; MoE cases also compare llama.cpp's types for Q4_K_M (and Mixtral Q2_K, Q3_K_M; DeepSeek Q2_K) with our plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from test_gguf_mix_llamacpp import llama_quantize, read_types  # noqa: E402
from test_gguf_tiny import make_tokenizer  # noqa: E402

from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.evaluate.llamacpp import open_llama  # noqa: E402
from slimlm.formats.gguf_mix import ArchFacts, PlanTensor, plan_types  # noqa: E402
from slimlm.quantize.gguf import quantize_gguf  # noqa: E402

pytestmark = pytest.mark.llamacpp


@dataclass(frozen=True)
class Case:
    """A tiny model of one family: HF model_type, config overrides, and the logit bound llama.cpp must meet."""

    model_type: str
    gguf_arch: str
    config: dict[str, Any] = field(default_factory=dict)
    max_diff: float = 2e-3
    gemma_norms: bool = False  # Gemma-style RMSNorm weights (1 + w): random around 0
    mixes: tuple[str, ...] = ()  # more mixes whose tensor types must equal llama_model_quantize's (MoE rules)
    f32_cache: bool = False  # llama.cpp keeps K/V in F32, not F16: its logits then match to float noise


DEEPSEEK_V3 = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
               "moe_intermediate_size": 64, "first_k_dense_replace": 1, "q_lora_rank": 64, "kv_lora_rank": 64,
               "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "routed_scaling_factor": 2.5,
               "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "num_key_value_heads": 4,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False}
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
                 "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")

CASES: dict[str, Case] = {
    "llama3": Case("llama", "llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "tie_word_embeddings": False}),
    "mistral": Case("mistral", "llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0},
                                         "sliding_window": None, "tie_word_embeddings": False}),
    "qwen2": Case("qwen2", "qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 20000.0},
                                     "tie_word_embeddings": False}),
    # head_dim explicit and unlike hidden / heads; q_norm / k_norm per head
    "qwen3": Case("qwen3", "qwen3", {"head_dim": 64, "rope_parameters": {"rope_type": "default",
                                                                         "rope_theta": 20000.0}}),
    # 6 layers: llama.cpp's pattern makes layer 5 global; a 16-token window, shorter than the 40 tokens
    "gemma3": Case("gemma3_text", "gemma3", {"num_hidden_layers": 6, "head_dim": 32, "query_pre_attn_scalar": 32,
                                             "sliding_window": 16}, gemma_norms=True),
    # 8 experts: llama.cpp's mix rules special-case n_expert == 8 (attn_v / attn_k / attn_output)
    "mixtral": Case("mixtral", "llama", {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
                                         "tie_word_embeddings": False}, mixes=("Q4_K_M", "Q2_K", "Q3_K_M")),
    "qwen2_moe": Case("qwen2_moe", "qwen2moe", {"num_experts": 4, "num_experts_per_tok": 2,
                                                "moe_intermediate_size": 64, "shared_expert_intermediate_size": 192,
                                                "tie_word_embeddings": False}, mixes=("Q4_K_M",)),
    "qwen3_moe": Case("qwen3_moe", "qwen3moe", {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
                                                "moe_intermediate_size": 64, "head_dim": 64}, mixes=("Q4_K_M",)),
    # MLA (q and kv latents, kv_b split into attn_k_b / attn_v_b), a dense first layer, then 4 experts in 2 groups
    # (top-1 group, top-2 experts) by biased sigmoid scores, renormalized and scaled, plus a shared expert
    # (F32 K/V cache: llama.cpp's default F16 cache alone moves these logits by up to 1.1e-2)
    "deepseek_v3": Case("deepseek_v3", "deepseek2", DEEPSEEK_V3, max_diff=1e-4, mixes=("Q4_K_M", "Q2_K"),
                        f32_cache=True),
    # no query latent (q_proj -> attn_q, as DeepSeek-V2-Lite), 3 layers (2 with experts), top-2 of 2 groups
    "deepseek_v3_noqlora": Case("deepseek_v3", "deepseek2", {**DEEPSEEK_V3, "q_lora_rank": None,
                                                              "num_hidden_layers": 3, "topk_group": 2},
                                max_diff=1e-4, f32_cache=True),
    # DeepSeek-V3's own rope: yarn (factor 40 over 4096 in the real config; here 4 over 256) with mscale_all_dim,
    # which scales the softmax by (1 + 0.1 ln 4)² and moves the low rotary frequencies
    "deepseek_v3_yarn": Case("deepseek_v3", "deepseek2", {**DEEPSEEK_V3, "rope_parameters": DEEPSEEK_YARN},
                             max_diff=1e-4, f32_cache=True),
}

IDS = list(range(5, 45))


def make_model(path: Path, case: Case, *, hidden: int = 128, ffn: int = 256, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, seed: int = 0) -> Path:
    """A tiny random ``case`` model with a trained tokenizer; norms and biases random so layout errors show."""
    import transformers

    tok = make_tokenizer(path)
    config = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=len(tok), max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config.update(case.config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(case.model_type, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p) + (0.0 if case.gemma_norms else 1.0))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0.0, 0.5)  # decisive routing: a near-tie top-k flips on float noise alone
            elif p.ndim >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return path


def hf_logits(src: Path) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def llama_logits(path: Path, f32_cache: bool = False) -> np.ndarray:
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    llm = open_llama(path, n_ctx=64, logits_all=True, **cache)
    llm.eval(IDS)
    return np.asarray(llm.scores[: len(IDS)])


def tensor_bytes(path: Path) -> dict[str, bytes]:
    import gguf

    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def plan_of(path: Path, ftype: str) -> dict:
    """Our plan for ``ftype`` over the F32 file's tensor list (facts from its header)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def u32(key: str) -> int:
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.parts[f.data[0]][0]) if f else 0

    tensors = [PlanTensor(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type) for t in reader.tensors]
    facts = ArchFacts(u32("block_count"), u32("attention.head_count"), u32("attention.head_count_kv"),
                      u32("expert_count"), arch)
    return plan_types(tensors, facts, ftype)


@pytest.mark.parametrize("name", CASES)
def test_arch_logits_and_q8_0_match_llama_cpp(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    src = make_model(tmp_path / "m", case)
    f32 = tmp_path / "m-f32.gguf"
    quantize_gguf(src, "f32", f32)
    ref, got = hf_logits(src), llama_logits(f32, case.f32_cache)
    diff = float(np.abs(got - ref).max())
    print(f"{name}: max abs logit diff {diff:.2e} (|logits| <= {np.abs(ref).max():.2f})")
    assert diff < case.max_diff * max(1.0, float(np.abs(ref).max()))
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    ours, theirs = tmp_path / "ours-q8_0.gguf", tmp_path / "llama-q8_0.gguf"
    quantize_gguf(src, "q8_0", ours)
    llama_quantize(f32, theirs, "Q8_0")
    assert read_types(ours) == read_types(theirs) == plan_of(f32, "Q8_0")
    assert ours.stat().st_size == theirs.stat().st_size
    assert tensor_bytes(ours) == tensor_bytes(theirs)  # bit-exact blocks, so llama.cpp computes the same
    q8 = llama_logits(ours, case.f32_cache)
    assert np.array_equal(q8, llama_logits(theirs, case.f32_cache))
    assert (q8.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    for mix in case.mixes:
        llama_quantize(f32, tmp_path / f"{mix}.gguf", mix)
        assert read_types(tmp_path / f"{mix}.gguf") == plan_of(f32, mix), mix


def test_deepseek_v3_mixes_at_k_quant_widths_equal_llama_cpp(tmp_path: Path) -> None:
    """Rows of 256 (hidden, latents, nope and value heads, experts) so llama.cpp's mix rules, not its fallbacks for
    narrow rows, pick each type; 8 experts and 8 layers reach its 8-expert and use_more_bits cases."""
    import dataclasses

    wide = {**DEEPSEEK_V3, "q_lora_rank": 256, "kv_lora_rank": 256, "qk_nope_head_dim": 256, "qk_rope_head_dim": 64,
            "v_head_dim": 256, "moe_intermediate_size": 256, "n_routed_experts": 8, "num_key_value_heads": 2}
    case = dataclasses.replace(CASES["deepseek_v3"], config=wide)
    src = make_model(tmp_path / "m", case, hidden=256, ffn=512, layers=8, heads=2, kv_heads=2)
    f32 = tmp_path / "m-f32.gguf"
    quantize_gguf(src, "f32", f32)
    for mix in ("Q4_K_M", "Q2_K", "Q3_K_M", "Q4_K_S"):
        llama_quantize(f32, tmp_path / f"{mix}.gguf", mix)
        assert read_types(tmp_path / f"{mix}.gguf") == plan_of(f32, mix), mix


def test_unsupported_architecture_is_one_line_listing_the_supported(tmp_path: Path) -> None:
    import json

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"]}))
    from safetensors.numpy import save_file

    save_file({"model.embed_tokens.weight": np.zeros((8, 4), np.float32)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(SlimlmError) as err:
        quantize_gguf(tmp_path / "m", "f32", tmp_path / "m.gguf")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unsupported architecture Phi3ForCausalLM; GGUF export supports: ")
    for name in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM"):
        assert name in msg


@pytest.mark.parametrize("name, change, option", [
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("gemma3", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar"),
    ("gemma3", {"layer_types": ["full_attention"] * 6}, "layer_types"),
    ("gemma3", {"sliding_window_pattern": 4, "layer_types": None}, "sliding_window_pattern"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}},
     "sliding_attention rope_theta"),
    ("llama3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
    ("mixtral", {"sliding_window": 4096}, "sliding_window"),
    ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("deepseek_v3", {"topk_method": "group_limited_greedy"}, "topk_method"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"rope_parameters": {**DEEPSEEK_YARN, "mscale": 0.707}}, "mscale"),
    ("deepseek_v3", {"rope_parameters": {**DEEPSEEK_YARN, "beta_fast": 16}}, "beta_fast"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_type"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias"),
])
def test_unusual_option_is_an_error_naming_it(name: str, change: dict, option: str, tmp_path: Path) -> None:
    """An option llama.cpp's graph for the family cannot run is refused up front, not written wrong."""
    import json

    src = make_model(tmp_path / "m", CASES[name], hidden=64, ffn=64)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SlimlmError, match=option):
        quantize_gguf(src, "f32", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("name", CASES)
def test_our_gguf_loads_as_transformers_model(name: str, tmp_path: Path) -> None:
    """Our F32 file back through load_model (and the runtime's reference loader) is the HF model exactly: config
    and tensors are the inverse of the export (transformers' own GGUF loader got llama3 rope, qwen3 head_dim,
    gemma3's query scale and every MoE family wrong)."""
    from slimlm.models import load_model
    from slimlm.runtime import load_quantized

    case = CASES[name]
    src = make_model(tmp_path / "m", case, layers=6 if name == "gemma3" else 2)
    f32 = tmp_path / "m-f32.gguf"
    quantize_gguf(src, "f32", f32)
    ref = hf_logits(src)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        dense = load_model(f32, "fp32", tokenizer=False).model(ids).logits[0].numpy()
    assert float(np.abs(dense - ref).max()) <= 1e-4
    if any(key in case.config for key in MOE_KEYS):  # the runtime has no MoE modules
        with pytest.raises(SlimlmError, match=case.model_type) as err:
            load_quantized(f32, reference=True, dtype=torch.float32)
        assert "\n" not in str(err.value)
        return
    with torch.no_grad():
        runtime = load_quantized(f32, reference=True, dtype=torch.float32)(ids).logits[0].numpy()
    assert float(np.abs(runtime - ref).max()) <= 1e-4


def test_gguf_of_unknown_architecture_is_one_line_listing_the_supported(tmp_path: Path) -> None:
    import gguf

    from slimlm.models import load_config, load_model

    path = tmp_path / "phi3.gguf"
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for load in (load_config, lambda p: load_model(p, tokenizer=False)):
        with pytest.raises(SlimlmError) as err:
            load(path)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("unsupported GGUF architecture 'phi3'; slimlm loads: ")
        for arch in ("llama (LlamaForCausalLM)", "qwen3 (Qwen3ForCausalLM)", "gemma3 (Gemma3ForCausalLM)",
                     "llama with experts (MixtralForCausalLM)", "qwen2moe with experts (Qwen2MoeForCausalLM)"):
            assert arch in msg
