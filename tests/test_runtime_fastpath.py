"""The lean forward (runtime.fastpath) against transformers' forward on tiny Llamas: fp32 to rounding,
static KV cache, left padding, quantized schemes (fused sibling GEMMs, W8A8's fused epilogues, eager and
compiled), and the fallback for models it does not cover."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.runtime import W4A16Config, W8A8Config, generate_ids, kernels, quantize_
from slimlm.runtime.fastpath import lean_model, unsupported_reason
from slimlm.runtime.linear import FusedW4A16, W4A16Linear


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    monkeypatch.setenv("SLIMLM_AUTOTUNE", "0")


def _tiny(path, **kw):
    from conftest import make_tiny_llama

    # N of k/v (2 heads x 32) and of every projection a multiple of 64: W4A16 siblings can share one GEMM
    sizes = dict(hidden=128, heads=4, kv_heads=2, ffn=256, vocab=320) | kw
    return AutoModelForCausalLM.from_pretrained(make_tiny_llama(path, **sizes), dtype=torch.float32).eval()


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _padded_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 320, (2, 20), generator=gen)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_lean_forward_equals_transformers_in_fp32(tmp_path):
    model = _tiny(tmp_path)
    lean = lean_model(model)
    assert lean is not None and unsupported_reason(model) is None
    ids, mask, pos = _padded_batch()
    with torch.inference_mode():
        want = model(ids).logits
        assert rel_err(lean.forward(ids), want) < 1e-5
        cache = lean.new_cache(2, 32)  # prompt of 12, then 8 single steps through the static cache
        steps = [lean.forward(ids[:, :12], cache=cache)] + [lean.forward(ids[:, t:t + 1], cache=cache)
                                                           for t in range(12, 20)]
        assert cache.length == 20
        assert rel_err(torch.cat(steps, 1), want) < 1e-5
        padded = model(ids, attention_mask=mask, position_ids=pos).logits
        got = lean.forward(ids, position_ids=pos, attention_mask=mask)
    assert torch.isfinite(got).all()
    assert rel_err(got[0], padded[0]) < 1e-5 and rel_err(got[1, 7:], padded[1, 7:]) < 1e-5


def test_generate_lean_equals_transformers_loop(tmp_path):
    model = _tiny(tmp_path)
    ids, mask, _ = _padded_batch()
    fast = generate_ids(model, ids, mask, max_new_tokens=10)
    slow = generate_ids(model, ids, mask, max_new_tokens=10, lean=False)
    assert fast.new_ids == slow.new_ids


@pytest.mark.parametrize("rows", [5, 40])  # eager epilogues (decode-sized) and compiled ones (prefill-sized)
def test_w8a8_lean_int8_layers_track_module_forward(tmp_path, rows):
    model = _tiny(tmp_path)
    quantize_(model, W8A8Config(dtype=torch.float32))
    lean = lean_model(model)
    assert lean.int8  # every layer on int8 GEMMs with fused epilogues
    ids = torch.randint(1, 320, (1, rows), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(ids).logits
        got = lean.forward(ids)
    # same int8 GEMMs; only the rounding of the epilogues (fp32 inside, no intermediate casts) differs
    assert rel_err(got, want) < 1e-3


def test_w8a8_epilogues_compiled_equal_eager():
    gen = torch.Generator().manual_seed(3)
    h, y = torch.randn(64, 96, generator=gen).bfloat16(), torch.randn(64, 96, generator=gen).bfloat16()
    s, w = torch.rand(64, 1, generator=gen) + 0.5, torch.rand(96, generator=gen).bfloat16()
    eager = kernels.residual_norm_quant(h, y, s, w, 1e-5)
    fused = kernels.residual_norm_quant_f(h, y, s, w, 1e-5)
    assert rel_err(eager[0], fused[0]) < 1e-2  # bf16 residual: an ulp where fp32 sums round apart
    assert (eager[1].int() - fused[1].int()).abs().max() <= 1  # a rounding tie may land either way
    assert torch.allclose(eager[2], fused[2], rtol=2e-3)  # vectorized rsqrt: below bf16 rounding
    gu = torch.randn(64, 192, generator=gen).bfloat16()
    a, b = kernels.silu_mul_quant(gu, s, 96), kernels.silu_mul_quant_f(gu, s, 96)
    assert (a[0].int() - b[0].int()).abs().max() <= 1 and torch.allclose(a[1], b[1], rtol=2e-3)  # vectorized rsqrt: below bf16 rounding


def test_w4a16_siblings_share_one_packed_weight(tmp_path):
    model = _tiny(tmp_path)
    ids = torch.randint(1, 320, (1, 60), generator=torch.Generator().manual_seed(4))
    quantize_(model, W4A16Config(group_size=64))
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.fused
    assert isinstance(group, FusedW4A16) and attn.k_proj.fused is group and attn.v_proj.fused is group
    assert attn.k_proj.packed.data_ptr() == group.packed[128:].data_ptr()  # a view, not a second copy
    assert "one GEMM with siblings" in attn.q_proj.kernel
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    for rows in (3, 60):  # int4 kernel, and dequantize + bf16 GEMM
        xr = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        separate = torch.cat([attn.q_proj(xr), attn.k_proj(xr), attn.v_proj(xr)], dim=-1)
        assert torch.equal(group(xr).float(), separate.float())
    assert isinstance(attn.q_proj, W4A16Linear) and x.shape == (3, 128)
    with torch.inference_mode():
        assert rel_err(lean_model(model).forward(ids), model(ids).logits) < 0.02


def test_unsupported_models_fall_back(tmp_path):
    model = _tiny(tmp_path)
    model.config.model_type = "gpt2"
    assert lean_model(model) is None and "gpt2" in unsupported_reason(model)
    ids = torch.randint(1, 320, (1, 6), generator=torch.Generator().manual_seed(6))
    assert len(generate_ids(model, ids, max_new_tokens=3).new_ids[0]) == 3


def test_static_cache_grows_past_its_first_size(tmp_path):
    model = _tiny(tmp_path)
    lean = lean_model(model)
    ids = torch.randint(1, 320, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        want = model(ids).logits
        cache = lean.new_cache(1, 4)
        steps = [lean.forward(ids[:, :3], cache=cache)] + [lean.forward(ids[:, t:t + 1], cache=cache)
                                                          for t in range(3, 12)]
    assert cache.max_len >= 12 and rel_err(torch.cat(steps, 1), want) < 1e-5


def test_runtime_bench_backend_decodes_on_the_lean_path(tmp_path):
    import numpy as np

    from conftest import make_tiny_llama

    from slimlm.runtime.bench_backends import W8A8Backend

    src = make_tiny_llama(tmp_path / "m", hidden=128, heads=4, kv_heads=2, ffn=256, vocab=320)
    backend = W8A8Backend()
    backend.load(src, threads=1)
    prompt = np.random.default_rng(0).integers(1, 320, (2, 9))
    first = backend.prefill(prompt)
    assert backend._lean is not None and first.shape == (2,)
    for _ in range(3):
        first = backend.decode(first)
    assert backend._static.length == 12
    backend.close()


def test_lean_model_follows_a_cast(tmp_path):
    model = _tiny(tmp_path)
    ids = torch.randint(1, 320, (1, 8), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        lean_model(model).forward(ids)
        model.to(torch.bfloat16)
        got = lean_model(model).forward(ids)
        want = model(ids).logits
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 0.05
