"""Loading quantized files onto the runtime's kernels: compressed-tensors dirs and GGUF block mappings."""

from pathlib import Path

import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.runtime import int4pack, kernel_report, load_quantized
from slimlm.runtime.gguf_blocks import split_q4_0, split_q4_1, split_q4_k
from slimlm.runtime.linear import DequantLinear, W4A16Linear, W8A8Linear, W8A16Linear
from slimlm.models.quantized import _gguf_module


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    monkeypatch.setenv("SLIMLM_AUTOTUNE", "0")


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    from conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny", hidden=96, heads=4, kv_heads=2, ffn=192,
                           vocab=320)


@pytest.mark.parametrize("scheme,cls", [("w4a16", W4A16Linear), ("w8a8", W8A8Linear), ("w8a16", W8A16Linear)])
def test_compressed_tensors_dir_runs_on_kernels_and_matches_transformers(tmp_path, tiny_src, scheme, cls):
    """transformers (via compressed-tensors) decompresses the same file: our dequantized weights must agree."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from slimlm.quantize.layers import quantize_model

    out = tmp_path / scheme
    quantize_model(tiny_src, out, scheme=scheme, method="rtn")
    fast = load_quantized(out)
    kinds = kernel_report(fast)
    assert len(kinds) == 14  # 2 layers x 7; the export leaves lm_head unquantized
    assert all(isinstance(fast.get_submodule(n), cls) for n in kinds)
    ref = load_quantized(out, reference=True)
    # decompress on load: transformers' compressed path cannot take asymmetric pack-quantized files here
    peer = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    peer_state = peer.state_dict()
    for name in kinds:
        w_peer = peer_state[f"{name}.weight"].float()
        w_ref = ref.get_submodule(name).weight
        # W4A16/W8A16 keep scales (and zeros) in bf16, the kernels' dtype; W8A8 keeps fp32 scales: exact
        tol = 2**-8 * float(w_peer.abs().max()) if scheme != "w8a8" else 0.0
        assert (w_ref - w_peer).abs().max() <= tol, name
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y_fast, y_ref = fast(ids).logits.float(), ref(ids).logits
    assert rel_err(y_fast, y_ref) < 0.02


def test_static_w8a8_runs_with_its_input_scales_like_transformers(tmp_path, tiny_src):
    """A W8A8 file with static activations runs with the file's calibrated per-tensor scales (what vLLM and
    transformers run), not per-token ones: its logits are transformers', not the dynamic reading's."""
    from transformers import AutoModelForCausalLM

    from slimlm.quantize.layers import quantize_model

    out = tmp_path / "static"
    quantize_model(tiny_src, out, scheme="w8a8", method="rtn", act_dynamic=False,
                   calib=torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1)))
    fast, ref = load_quantized(out), load_quantized(out, reference=True)
    assert all("static per-tensor" in k for k in kernel_report(fast).values())
    peer = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # fake-quantizes with input_scale
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0)) * 3 % 320
    ids[:, 0] = 7
    with torch.inference_mode():
        y_fast, y_ref, y_peer = fast(ids).logits.float(), ref(ids).logits, peer(ids).logits
        for m in ref.modules():  # the same reading with per-token scales: what the runtime ran before
            if isinstance(m, DequantLinear):
                m.input_scale = None
        y_dyn = ref(ids).logits
    assert rel_err(y_ref, y_peer) < 1e-4
    assert rel_err(y_fast, y_ref) < 0.02
    assert rel_err(y_dyn, y_peer) > 10 * rel_err(y_ref, y_peer)


def test_load_quantized_refuses_plain_and_missing(tmp_path, tiny_src):
    with pytest.raises(SlimlmError, match="no quantization_config"):
        load_quantized(tiny_src)
    with pytest.raises(SlimlmError, match="does not exist"):
        load_quantized(tmp_path / "nope")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(SlimlmError, match="not a GGUF"):
        load_quantized(bad)


def _weights(rows=48, cols=256, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.05).astype(np.float32)


@pytest.mark.parametrize("qtype,split", [("Q4_0", split_q4_0), ("Q4_1", split_q4_1)])
def test_gguf_int4_blocks_split_exactly(qtype, split):
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(_weights(), t)
    u, scale, zero = split(raw)
    assert u.dtype == torch.uint8 and int(u.max()) <= 15
    assert np.array_equal(int4pack.dequantize(u, scale, zero, 32).numpy(), gguf.quants.dequantize(raw, t))


def test_gguf_q4_k_split_matches_gguf_py_decoder():
    import gguf

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (16, 2 * 144), dtype=np.uint8)  # any bytes are a valid Q4_K block ...
    heads = raw.reshape(16, 2, 144)
    for lo in (0, 2):  # ... once d and dmin are finite fp16 numbers
        heads[..., lo:lo + 2] = (rng.random((16, 2, 1)) * 0.01).astype(np.float16).view(np.uint8)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)
    u, scale, zero = split_q4_k(raw)
    got = int4pack.dequantize(u, scale, zero, 32).numpy()
    # exact up to fp32 rounding of 8*scale - min (one ulp of the larger term)
    assert np.abs(got - want).max() <= 4 * np.finfo(np.float32).eps * np.abs(want).max()


def test_gguf_q8_0_runs_dequantized_not_per_token_int8():
    """Q8_0 keeps the file's values (bf16-rounded), with no per-token activation rounding: llama.cpp rounds
    activations per 32 values, and per-token int8 wrecked Qwen2's outlier channels (logits off by up to 8.9)."""
    import gguf

    w = _weights(64, 512, seed=2)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    exact = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    module = _gguf_module(raw, "Q8_0", None, False, lambda: exact)
    assert isinstance(module, DequantLinear) and module.act_bits is None
    assert torch.equal(module.dense_weight(), torch.from_numpy(exact).bfloat16())
    reference = _gguf_module(raw, "Q8_0", None, True, lambda: exact)
    assert np.array_equal(reference.weight.numpy(), exact)


def test_gguf_row_permutation_and_fallback():
    import gguf

    w = _weights(32, 64, seed=3)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    module = _gguf_module(raw, "Q4_0", perm, True, None)
    exact = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)
    # reference holds the bf16-rounded scales the kernel uses: equal to the exact weights within that rounding
    assert np.abs(module.weight.numpy() - exact[perm.numpy()]).max() <= 2**-8 * np.abs(exact).max()
    # a type without a fast path (Q5_0) is dequantized on load with gguf-py's decoder
    raw5 = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q5_0)
    exact5 = gguf.quants.dequantize(raw5, gguf.GGMLQuantizationType.Q5_0)
    fallback = _gguf_module(raw5, "Q5_0", None, False, lambda: exact5)
    assert isinstance(fallback, DequantLinear) and fallback.weight.dtype == torch.bfloat16
    assert torch.equal(fallback.dense_weight(), torch.from_numpy(exact5).bfloat16())  # packed for oneDNN


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_0", "F16"])
def test_gguf_with_qkv_biases_runs_on_kernels_like_transformers(tmp_path, mix):
    """Qwen2's q/k/v biases reach the quantized modules (they were once dropped silently: a GGUF bias is a
    separate tensor, and load_state_dict skips a QuantLinear's None bias buffer)."""
    from test_gguf_tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    from slimlm.models import load_model
    from slimlm.quantize.gguf import quantize_gguf

    src = make_tiny_model(tmp_path / "m", "qwen2", tie=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(src)
    out = tmp_path / "m.gguf"
    quantize_gguf(src, mix, out)
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        want = load_model(out, "fp32").model(ids).logits  # transformers on the dequantized file
        ref = load_quantized(out, reference=True, dtype=torch.float32)
        assert ref.model.layers[0].self_attn.k_proj.bias is not None
        # reference modules: the file's values
        assert rel_err(ref(ids).logits, want) < 0.06
        fast = load_quantized(out, dtype=torch.float32)
        got = fast(ids).logits
    assert rel_err(got, want) < 0.06 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
