"""--act-quant llama.cpp: Q8_K / Q8_0 activation rounding as ggml-cpu's x86 quantizers, hooked per GGUF type."""

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
    """ggml-cpu's x86 quantize_row_q8_0 (the one llama.cpp runs) then dequantize, in numpy float32."""
    out = np.empty_like(x)
    for b in range(0, x.size, 32):
        blk = x[b:b + 32]
        amax = np.abs(blk).max()
        d = amax / np.float32(127)
        inv = np.float32(127) / amax if amax else np.float32(0)  # one float division, as in C
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


def _halfway_blocks(block: int, sign: float, n: int = 400) -> tuple[np.ndarray, int]:
    """Blocks whose values land exactly on k + 1/2 after C's ``x * (sign*127 / max)`` (Q8_0: sign +1, Q8_K:
    -1) but not after ``x * (sign*127 * (1/max))``, which is what torch computes for ``scalar / tensor``: there the two
    roundings part. Returns the blocks and how many values the two formulas round differently."""
    rng = np.random.default_rng(0)
    rows, parted = [], 0
    while len(rows) < n:
        top = np.float32(rng.uniform(0.5, 4))
        true, recip = np.float32(sign * 127) / top, np.float32(sign * 127) * (np.float32(1) / top)
        k = rng.integers(1, 120)
        x = np.float32((k + 0.5) / float(true))
        if true == recip or x * true != np.float32(k + 0.5):
            continue
        parted += int(np.round(x * true) != np.round(x * recip))
        row = rng.uniform(-0.4, 0.4, block).astype(np.float32) * top
        row[0], row[1] = top, x  # top is the block's largest magnitude, positive
        rows.append(row)
    return np.stack(rows), parted


def test_roundings_match_ggml_reference_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 512, generator=g) * torch.linspace(0.01, 5, 512)
    x[1, :256] = 0  # an all-zero block
    for fake, ref in ((fake_q8_0, _ref_q8_0), (fake_q8_K, _ref_q8_K)):
        ours = fake(x)
        theirs = np.stack([ref(row) for row in x.numpy()])
        assert ours.shape == x.shape and ours.dtype == x.dtype
        assert np.array_equal(ours.numpy(), theirs)
    blocks = fake_q8_K(x).reshape(-1, 256)
    assert all(len(torch.unique(b)) <= 255 for b in blocks)
    # the largest-magnitude value of a Q8_K block survives exactly (it maps to -127 * d)
    big = x.reshape(-1, 256).abs().argmax(-1)
    assert torch.allclose(blocks.gather(1, big[:, None]), x.reshape(-1, 256).gather(1, big[:, None]), rtol=1e-6)


def test_roundings_break_halfway_ties_as_llama_cpp() -> None:
    """Values exactly halfway after llama.cpp's multiply: a last-bit error in the multiplier (torch's
    ``127 / t`` is reciprocal-then-multiply) rounds them the other way and, through the next layers, turns
    a bit-level difference into a different draw of the rounding noise."""
    for fake, ref, block, sign in ((fake_q8_0, _ref_q8_0, 32, 1.0), (fake_q8_K, _ref_q8_K, 256, -1.0)):
        blocks, parted = _halfway_blocks(block, sign)
        assert parted > 20  # the test has teeth: the reciprocal formula would round these differently
        ours = fake(torch.from_numpy(blocks.reshape(-1))).numpy()
        assert np.array_equal(ours, ref(blocks.reshape(-1)))


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


@pytest.mark.llamacpp
def test_emulated_ops_equal_llama_cpps_on_its_own_inputs(tmp_path: Path) -> None:
    """Op by op against llama.cpp's graph (its intermediate tensors, read through the eval callback): given
    llama.cpp's input, every emulated Linear and the f16 attention give llama.cpp's output to float32
    rounding. Whole-model outputs cannot be compared this tightly: a last-bit difference anywhere turns into
    a whole rounding step at the next 8-bit rounding now and then, and the two runs' noise decorrelates."""
    pytest.importorskip("llama_cpp")
    from test_gguf_tiny import make_tiny_model

    from slimlm.evaluate.act_quant import llama_cpp_attention
    from slimlm.evaluate.llamacpp import capture_tensors
    from slimlm.quantize.gguf import quantize_gguf

    # hidden 288 is not a multiple of 256: llama.cpp falls back to Q5_0/Q8_0 there, as on Qwen2.5-0.5B (896)
    hf_dir = make_tiny_model(tmp_path / "tiny", "qwen2", hidden=288, tie=False)
    path = tmp_path / "q4km.gguf"
    quantize_gguf(hf_dir, "Q4_K_M", path)
    n = 48
    ids = torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    got = capture_tensors(path, ids, logits_all=True, want=lambda name: name.split("-")[0] in {
        "attn_norm", "Qcur", "Kcur", "Vcur", "kqv", "kqv_out", "ffn_norm", "ffn_gate", "ffn_up", "ffn_swiglu",
        "ffn_out", "result_norm", "result_output"})
    lm = load_model(path)
    counts, _ = emulate_llama_cpp_activations(lm.model, path)
    assert {"Q8_K", "Q8_0"} <= set(counts)  # K-quant and legacy matmuls both checked
    m = lm.model
    heads, kv = m.config.num_attention_heads, m.config.num_key_value_heads
    dim = m.config.hidden_size // heads

    def last(name: str) -> torch.Tensor:
        return torch.from_numpy(got[name][-1]).reshape(n, -1)

    def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
        ours, theirs = ours.double().reshape(-1), theirs.double().reshape(-1)
        return float((ours - theirs).norm() / theirs.norm())

    worst: dict[str, float] = {}
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q = torch.from_numpy(got[f"Qcur-{i}"][-1]).reshape(1, n, heads, dim).transpose(1, 2)
            k = torch.from_numpy(got[f"Kcur-{i}"][-1]).reshape(1, n, kv, dim).transpose(1, 2)
            v = torch.from_numpy(got[f"Vcur-{i}"][-1]).reshape(1, n, kv, dim).transpose(1, 2)
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            core, _ = llama_cpp_attention(attn, q, k, v, mask, dim ** -0.5)
            checks = {"v_proj": (attn.v_proj(last(f"attn_norm-{i}")), last(f"Vcur-{i}")),
                      "attention": (core.reshape(n, -1), last(f"kqv_out-{i}")),
                      "gate_proj": (mlp.gate_proj(last(f"ffn_norm-{i}")), last(f"ffn_gate-{i}")),
                      "up_proj": (mlp.up_proj(last(f"ffn_norm-{i}")), last(f"ffn_up-{i}")),
                      "down_proj": (mlp.down_proj(last(f"ffn_swiglu-{i}")), last(f"ffn_out-{i}"))}
            for name, (ours, theirs) in checks.items():  # (o_proj's output has no name in llama.cpp's graph)
                worst[name] = max(worst.get(name, 0.0), rel(ours, theirs))
        worst["lm_head"] = rel(m.lm_head(last("result_norm")), last("result_output"))
    assert set(worst) == {"v_proj", "attention", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert max(worst.values()) < 1e-5, worst
