"""--act-quant llama.cpp: Q8_K / Q8_0 activation rounding as ggml's reference quantizers, hooked per GGUF type."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.evaluate import evaluate
from slimlm.evaluate.act_quant import emulate_llama_cpp_activations, fake_q8_0, fake_q8_K
from slimlm.models import load_model


def _ref_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_0_ref then dequantize, written out with numpy."""
    out = np.empty_like(x)
    for b in range(0, x.size, 32):
        blk = x[b:b + 32]
        d = np.float32(np.abs(blk).max() / np.float32(127))
        inv = np.float32(1 / d) if d else np.float32(0)
        out[b:b + 32] = np.round(blk * inv) * np.float32(np.float16(d))
    return out


def _ref_q8_K(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for b in range(0, x.size, 256):
        blk = x[b:b + 256]
        signed_max = blk[np.argmax(np.abs(blk))]
        if signed_max == 0:
            out[b:b + 256] = 0
            continue
        iscale = np.float32(-127) / signed_max
        q = np.minimum(np.round(iscale * blk), 127)
        out[b:b + 256] = q * (np.float32(1) / iscale)
    return out


def test_roundings_match_ggml_reference_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 512, generator=g) * torch.linspace(0.01, 5, 512)
    x[1, :256] = 0  # an all-zero block
    for fake, ref in ((fake_q8_0, _ref_q8_0), (fake_q8_K, _ref_q8_K)):
        ours = fake(x)
        theirs = np.stack([ref(row) for row in x.numpy()])
        assert ours.shape == x.shape and ours.dtype == x.dtype
        assert np.allclose(ours.numpy(), theirs, rtol=0, atol=1e-6)
    blocks = fake_q8_K(x).reshape(-1, 256)
    assert all(len(torch.unique(b)) <= 255 for b in blocks)
    # the largest-magnitude value of a Q8_K block survives exactly (it maps to -127 * d)
    big = x.reshape(-1, 256).abs().argmax(-1)
    assert torch.allclose(blocks.gather(1, big[:, None]), x.reshape(-1, 256).gather(1, big[:, None]), rtol=1e-6)


def test_hooks_follow_the_gguf_tensor_types(tmp_path: Path) -> None:
    from test_gguf_tiny import make_tiny_model

    from slimlm.quantize.gguf import quantize_gguf

    hf_dir = make_tiny_model(tmp_path / "tiny")
    f32, q8 = tmp_path / "f32.gguf", tmp_path / "q8.gguf"
    quantize_gguf(hf_dir, "F32", f32)
    quantize_gguf(hf_dir, "Q8_0", q8)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in load_model(hf_dir).model.modules())
    lm = load_model(q8)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = lm.model(ids).logits
        counts, handles = emulate_llama_cpp_activations(lm.model, q8)
        rounded = lm.model(ids).logits
        for h in handles:
            h.remove()
        again = lm.model(ids).logits
    assert sum(counts.values()) == n_linear and set(counts) <= {"Q8_0", "F32", "none", "F16"}
    assert counts.get("Q8_0", 0) >= n_linear - 1  # every decoder matmul; the output may keep another type
    assert not torch.equal(plain, rounded) and (plain - rounded).abs().mean() < 0.05
    assert torch.equal(plain, again)
    if importlib.util.find_spec("llama_cpp") is not None:
        # the rounded model is closer to what llama.cpp computes from the same file than the plain one
        from slimlm.evaluate.llamacpp import open_llama

        llm = open_llama(q8, n_ctx=64, logits_all=True)
        llm.eval(ids[0].tolist())
        cpp = torch.from_numpy(np.array(llm.scores[:40]))
        err_plain, err_rounded = (plain[0] - cpp).abs().mean(), (rounded[0] - cpp).abs().mean()
        assert err_rounded < 0.8 * err_plain, (err_plain, err_rounded)
    f32_counts, _ = emulate_llama_cpp_activations(load_model(f32).model, f32)
    assert f32_counts == {"none": n_linear}


def test_act_quant_needs_a_gguf(tiny_lm_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("abc " * 40)
    with pytest.raises(SlimlmError, match="applies to GGUF models"):
        evaluate(tiny_lm_dir, text, ctx=32, act_quant="llama.cpp")
    with pytest.raises(SlimlmError, match="--act-quant must be none or llama.cpp"):
        evaluate(tiny_lm_dir, text, ctx=32, act_quant="int8")
