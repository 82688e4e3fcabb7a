"""W8A8: SmoothQuant folding, per-token activation quantization as compressed-tensors does it, method rules."""

from pathlib import Path

import pytest
import torch

from slimlm.algorithms.mappings import smoothing_pairs
from slimlm.algorithms.smoothquant import smooth_layer, smoothing_scales
from slimlm.algorithms.stats import StatsCollector
from slimlm.errors import SlimlmError
from slimlm.writers.compressed_tensors import fake_quant_activation
from slimlm.quantize.schemes import check_method, get_scheme

from conftest import make_tiny_llama


def test_per_token_activation_quant_matches_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(0)
    x = torch.randn(2, 7, 64) * torch.linspace(0.1, 30, 64)
    x[0, 3] = 0  # an all-zero token must not divide by zero
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    theirs = fake_quantize(x, scale, zp, args)
    ours = fake_quant_activation(x, 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # one scale per token: every non-zero token uses the full int8 range
    codes = torch.round(ours / (x.abs().amax(-1, keepdim=True) / 127.5)).abs().amax(-1)
    assert set(codes[x.abs().amax(-1) > 0].tolist()) <= {127.0, 128.0} and torch.equal(ours[0, 3], x[0, 3])


def test_smoothing_scales_follow_the_formula():
    act = torch.tensor([1.0, 16.0, 0.0])
    w = torch.tensor([[1.0, 1.0, 2.0], [-4.0, 0.5, 1.0]])
    s = smoothing_scales(act, [w], 0.5)
    expected = torch.tensor([1.0 / 4.0**0.5, 16.0**0.5 / 1.0, 1e-5**0.5 / 2.0**0.5])
    torch.testing.assert_close(s, expected)


def test_smoothquant_folding_is_exact_and_flattens_outliers(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "m", layers=1), dtype=torch.float32)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight[:3] = 40.0  # outlier channels in the attention input
    seen = {}
    h = layer.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0], kw=k), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 32)))
    h.remove()
    x, kw = seen["x"], seen["kw"]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        before = layer(x, **kw)
        with StatsCollector(linears, need_gram=False) as col:
            layer(x, **kw)
        amax_before = col.stats["self_attn.q_proj"].abs_max.clone()
        applied = smooth_layer(layer, col.stats, smoothing_pairs("llama", layer, "smoothquant"), 0.8)
        torch.testing.assert_close(layer(x, **kw), before, rtol=1e-4, atol=1e-5)
        with StatsCollector(linears, need_gram=False) as col2:
            layer(x, **kw)
    assert set(applied) == {"input_layernorm", "post_attention_layernorm"}
    after = col2.stats["self_attn.q_proj"].abs_max
    torch.testing.assert_close(after, col.stats["self_attn.q_proj"].abs_max, rtol=1e-4, atol=1e-6)
    assert float(after.max() / after.median()) < float(amax_before.max() / amax_before.median()) / 4


def test_methods_fit_schemes():
    w4, w8a8 = get_scheme("w4a16"), get_scheme("w8a8")
    assert check_method(w4, None) == "awq" and check_method(w8a8, None) == "smoothquant"
    assert check_method(w8a8, "smoothquant+gptq") == "smoothquant+gptq"
    with pytest.raises(SlimlmError, match="does not apply to w4a16"):
        check_method(w4, "smoothquant")
    with pytest.raises(SlimlmError, match="awq is a weight-only method"):
        check_method(w8a8, "awq")
    with pytest.raises(SlimlmError, match="unknown method 'spqr'"):
        check_method(w4, "spqr")
    assert w4.symmetric is False and w4.group_size == 128 and w4.is_ignored("lm_head")
    assert w8a8.act_bits == 8 and w8a8.act_dynamic and w8a8.group_size is None and w8a8.symmetric


def test_smoothquant_gptq_beats_plain_rtn_on_a_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from slimlm.writers.compressed_tensors import load_reference_model
    from slimlm.quantize.layers import quantize_model

    src = make_tiny_llama(tmp_path / "m", hidden=128, ffn=256)
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():  # give the model activation outliers, the case SmoothQuant exists for
        for layer in fp.model.layers:
            layer.input_layernorm.weight[:4] = 30.0
            layer.post_attention_layernorm.weight[:4] = 30.0
    fp.save_pretrained(src)
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.log_softmax(fp(held_out).logits, -1)

    def kld(method):
        out = tmp_path / method.replace("+", "-")
        quantize_model(src, out, scheme="w8a8", method=method, calib=calib)
        with torch.no_grad():
            lp = torch.log_softmax(load_reference_model(out)(held_out).logits, -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    rtn, sq, sq_gptq = kld("rtn"), kld("smoothquant"), kld("smoothquant+gptq")
    assert sq < rtn and sq_gptq < rtn
