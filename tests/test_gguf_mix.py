"""llama.cpp's per-tensor type rules, checked on hand-made tensor lists (no llama.cpp needed)."""

import pytest
from gguf import GGMLQuantizationType as T

from slimlm.errors import SlimlmError
from slimlm.formats.gguf_mix import (
    ArchFacts,
    PlanTensor,
    normalize_ftype,
    parse_overrides,
    plan_types,
    tensor_bytes,
)


def llama_tensors(n_layers=16, hidden=512, heads=8, kv=2, ffn=1024, vocab=1000, tied=False):
    hd = hidden // heads
    out = [PlanTensor("token_embd.weight", (vocab, hidden)), PlanTensor("output_norm.weight", (hidden,))]
    if not tied:
        out.append(PlanTensor("output.weight", (vocab, hidden)))
    for i in range(n_layers):
        b = f"blk.{i}."
        out += [PlanTensor(b + "attn_norm.weight", (hidden,)), PlanTensor(b + "ffn_norm.weight", (hidden,)),
                PlanTensor(b + "attn_q.weight", (heads * hd, hidden)), PlanTensor(b + "attn_k.weight", (kv * hd, hidden)),
                PlanTensor(b + "attn_v.weight", (kv * hd, hidden)),
                PlanTensor(b + "attn_output.weight", (hidden, heads * hd)),
                PlanTensor(b + "ffn_gate.weight", (ffn, hidden)), PlanTensor(b + "ffn_up.weight", (ffn, hidden)),
                PlanTensor(b + "ffn_down.weight", (hidden, ffn))]
    return out


ARCH = ArchFacts(n_layers=16, n_head=8, n_head_kv=2)


def test_q4_k_m_gives_more_bits_to_the_same_layers_as_llama_cpp():
    plan = plan_types(llama_tensors(), ARCH, "Q4_K_M")
    # use_more_bits(i, 16): i < 2, i >= 14, or (i - 2) % 3 == 2 -> layers 0,1,4,7,10,13,14,15
    more = {0, 1, 4, 7, 10, 13, 14, 15}
    for i in range(16):
        want = T.Q6_K if i in more else T.Q4_K
        assert plan[f"blk.{i}.attn_v.weight"] == want
        assert plan[f"blk.{i}.ffn_down.weight"] == want
        assert plan[f"blk.{i}.attn_q.weight"] == T.Q4_K
    assert plan["output.weight"] == T.Q6_K
    assert plan["token_embd.weight"] == T.Q4_K  # untied: the embedding keeps the mix's type
    assert plan["output_norm.weight"] == T.F32 and plan["blk.3.attn_norm.weight"] == T.F32


def test_tied_embedding_is_quantized_like_the_output():
    plan = plan_types(llama_tensors(tied=True), ARCH, "Q4_K_M")
    assert plan["token_embd.weight"] == T.Q6_K


def test_row_length_not_multiple_of_256_falls_back_to_32_wide_blocks():
    tensors = llama_tensors(hidden=576, heads=9, kv=3, ffn=1536, tied=True)  # SmolLM2's widths
    arch = ArchFacts(16, 9, 3)
    q4km = plan_types(tensors, arch, "Q4_K_M")
    assert q4km["blk.5.attn_q.weight"] == T.Q5_0        # Q4_K -> Q5_0
    assert q4km["blk.0.attn_v.weight"] == T.Q8_0        # Q6_K -> Q8_0
    assert q4km["blk.0.ffn_down.weight"] == T.Q6_K      # rows of 1536 = 6 x 256: no fallback
    assert q4km["token_embd.weight"] == T.Q8_0          # output-like with odd rows -> Q8_0
    assert plan_types(tensors, arch, "Q5_K_S")["blk.5.attn_q.weight"] == T.Q5_1
    assert plan_types(tensors, arch, "Q2_K")["blk.5.attn_q.weight"] == T.Q4_0
    assert plan_types(tensors, arch, "Q3_K_S")["blk.5.attn_q.weight"] == T.Q4_0


def test_gqa_and_70b_rules():
    gqa8 = ArchFacts(n_layers=16, n_head=8, n_head_kv=1)
    plan = plan_types(llama_tensors(kv=1), gqa8, "Q2_K")
    assert plan["blk.3.attn_v.weight"] == T.Q4_K                    # n_gqa >= 4
    assert plan_types(llama_tensors(), ArchFacts(16, 8, 4), "Q2_K")["blk.3.attn_v.weight"] == T.Q3_K
    big = ArchFacts(n_layers=80, n_head=64, n_head_kv=8)
    plan = plan_types(llama_tensors(n_layers=80, hidden=256, heads=8, kv=1, ffn=256), big, "Q4_K_M")
    assert big.is_70b and plan["blk.11.attn_v.weight"] == T.Q5_K     # Q4_K bumped for 70B
    assert plan["blk.12.attn_v.weight"] == T.Q6_K                    # use_more_bits(12, 80)


def test_overrides_replace_the_rule_and_still_fall_back():
    tensors = llama_tensors(hidden=576, heads=9, kv=3, ffn=1536, tied=True)
    arch = ArchFacts(16, 9, 3)
    rules = parse_overrides([r"ffn_down=q8_0", r"attn_q=Q4_K"])
    plan = plan_types(tensors, arch, "Q4_K_M", overrides=rules)
    assert all(plan[f"blk.{i}.ffn_down.weight"] == T.Q8_0 for i in range(16))
    assert plan["blk.1.attn_q.weight"] == T.Q5_0  # overridden to Q4_K, rows of 576 -> Q5_0


def test_float_mixes_keep_every_matrix_at_that_type():
    for ftype, t in (("F16", T.F16), ("bf16", T.BF16), ("f32", T.F32)):
        plan = plan_types(llama_tensors(), ARCH, ftype)
        assert plan["blk.0.attn_v.weight"] == t and plan["output.weight"] == t
        assert plan["blk.0.attn_norm.weight"] == T.F32


def test_tensor_bytes_use_block_sizes():
    t = PlanTensor("x.weight", (10, 512))
    assert tensor_bytes(t, T.Q4_K) == 10 * 2 * 144
    assert tensor_bytes(t, T.Q8_0) == 10 * 16 * 34
    assert tensor_bytes(t, T.F16) == 10 * 512 * 2


def test_bad_names_are_clear_errors():
    with pytest.raises(SlimlmError, match="did you mean Q4_K_M"):
        normalize_ftype("Q4_KM")
    with pytest.raises(SlimlmError, match="REGEX=TYPE"):
        parse_overrides(["attn_v"])
    with pytest.raises(SlimlmError, match="unknown GGML tensor type"):
        parse_overrides(["attn_v=q9_9"])
    with pytest.raises(SlimlmError, match="regular expression"):
        parse_overrides(["attn_v(=q8_0"])
