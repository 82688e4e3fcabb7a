"""W4A16 algorithms: GPTQ and AWQ beat round-to-nearest on the error they minimise; folding is exact."""

import copy
from pathlib import Path

import pytest
import torch

from slimlm.algorithms.awq import awq_layer, search_clip, search_scale
from slimlm.algorithms.gptq import gptq_quantize
from slimlm.algorithms.mappings import smoothing_pairs
from slimlm.algorithms.stats import StatsCollector
from slimlm.errors import SlimlmError
from slimlm.formats.groupint import QuantSpec, quantize_weight

from conftest import make_tiny_llama


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 20  # a few outlier channels, as in real LLM activations
    return x


def _err(w_hat: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w_hat - w).T) ** 2).mean())


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(4, 64, True), QuantSpec(4, None, False),
                                  QuantSpec(8, None, True)])
def test_gptq_beats_rtn_on_output_error(spec):
    torch.manual_seed(1)
    x = _correlated_inputs(2048, 128)
    w = torch.randn(96, 128)
    h = x.T @ x / x.shape[0]
    q_rtn = quantize_weight(w, spec).dequantize()
    qw = gptq_quantize(w, h, spec, block_size=64)
    q_gptq = qw.dequantize()
    q_act = gptq_quantize(w, h, spec, actorder=True).dequantize()
    assert _err(q_act, w, x) < 0.8 * _err(q_rtn, w, x)
    lo, hi = (-8, 7) if spec.bits == 4 else (-128, 127)
    assert qw.q.dtype == torch.int8 and int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    assert qw.scale.shape == (96, spec.groups(128))
    assert _err(q_gptq, w, x) < 0.8 * _err(q_rtn, w, x)


@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_with_uncorrelated_inputs_is_rtn(actorder):
    """With a diagonal Hessian no error propagates, so GPTQ must round exactly like RTN (also after its
    activation-order permutation is undone)."""
    torch.manual_seed(2)
    w = torch.randn(40, 128)
    h = torch.diag(torch.rand(128) + 0.5)
    spec = QuantSpec(4, 32, False)
    qw, rtn = gptq_quantize(w, h, spec, actorder=actorder), quantize_weight(w, spec)
    assert torch.equal(qw.q, rtn.q) and torch.equal(qw.zero, rtn.zero)
    torch.testing.assert_close(qw.scale, rtn.scale)


def test_gptq_stacked_rows_equal_separate_runs():
    """Rows are independent given H, which is why q/k/v (and gate/up) are quantized as one matrix."""
    x = _correlated_inputs(512, 64)
    h = x.T @ x / 512
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    spec = QuantSpec(4, 32, False)
    both = gptq_quantize(torch.cat([a, b]), h, spec)
    assert torch.equal(both.q[:32], gptq_quantize(a, h, spec).q)
    assert torch.equal(both.q[32:], gptq_quantize(b, h, spec).q)


def test_awq_scale_and_clip_search_never_lose_to_rtn():
    x = _correlated_inputs(1024, 128, seed=3)
    h = x.T @ x / 1024
    w = torch.randn(64, 128)
    spec = QuantSpec(4, 32, False)
    s, err, err_unscaled = search_scale([w], [spec], x.abs().mean(0), h)
    assert err <= err_unscaled and s.shape == (128,) and bool((s > 0).all())
    w_scaled = w * s
    clip = search_clip(w_scaled, spec, h / (s[:, None] * s[None, :]))
    assert clip.shape == (64, 4) and float(clip.min()) >= 0.5 and float(clip.max()) <= 1.0
    awq_hat = quantize_weight(w_scaled, spec, clip=clip).dequantize() / s
    assert _err(awq_hat, w, x) < _err(quantize_weight(w, spec).dequantize(), w, x)


def test_awq_blocked_metric_is_the_exact_one_without_cross_group_terms():
    """Above EXACT_MAX_MACS the scale search scores with H's group blocks: equal to the exact error when H is
    block-diagonal, and on correlated inputs a search that still beats unscaled rounding."""
    from slimlm.algorithms.awq import _block_output_error, _diagonal_blocks, _output_error

    g = torch.Generator().manual_seed(4)
    delta = torch.randn(3, 16, 128, generator=g)
    blocks = [(a := torch.randn(32, 32, generator=g)) @ a.T for _ in range(4)]
    h = torch.block_diag(*blocks)
    torch.testing.assert_close(_block_output_error(delta, _diagonal_blocks(h, 32)), _output_error(delta, h))
    x = _correlated_inputs(1024, 128, seed=5)
    h = x.T @ x / 1024
    w = torch.randn(64, 128, generator=g)
    spec = QuantSpec(4, 32, False)
    s, err, err_unscaled = search_scale([w], [spec], x.abs().mean(0), h, exact_max_macs=0)
    assert err <= err_unscaled
    exact = search_scale([w], [spec], x.abs().mean(0), h)[0]
    def scored(sc: torch.Tensor) -> float:  # exact output error of rounding with scale sc
        return float(_output_error((quantize_weight(w * sc, spec).dequantize() / sc - w)[None], h))

    # the blocked search's choice, scored exactly, is no worse than unscaled rounding
    assert scored(s) <= scored(torch.ones(128)) and scored(exact) <= scored(torch.ones(128))


def test_awq_gathers_only_the_blocks_it_reads_and_rescales_them_like_the_whole_gram():
    """A blocked input keeps only H's diagonal blocks: equal to the whole Gram's blocks, before and after
    smoothing's rescale, and the scale search scores them as it scores the blocks cut from the whole H."""
    from slimlm.algorithms.awq import _diagonal_blocks
    from slimlm.algorithms.stats import InputStats

    x = _correlated_inputs(512, 128, seed=6)
    whole, blocks = InputStats.empty(128), InputStats.empty(128, block=32)
    for part in x.split(200):
        whole.add(part)
        blocks.add(part)
    assert blocks.gram.shape == (4, 32, 32)
    torch.testing.assert_close(blocks.hessian, _diagonal_blocks(whole.hessian, 32))
    s = torch.rand(128, generator=torch.Generator().manual_seed(7)) + 0.5
    whole.rescale(s)
    blocks.rescale(s)
    torch.testing.assert_close(blocks.hessian, _diagonal_blocks(whole.hessian, 32))
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(8))
    spec = QuantSpec(4, 32, False)
    a = search_scale([w], [spec], whole.abs_mean, whole.hessian, exact_max_macs=0)
    b = search_scale([w], [spec], blocks.abs_mean, blocks.hessian)
    assert torch.equal(a[0], b[0]) and a[1] == pytest.approx(b[1], rel=1e-5)
    with pytest.raises(ValueError, match="blocks of 32"):
        search_clip(w, QuantSpec(4, 64, False), blocks.hessian)


def test_awq_row_sample_estimates_the_whole_error_and_chunks_change_nothing(monkeypatch):
    """Above SEARCH_ELEMENTS the grid is scored on a seeded sample of rows: its scaled-up error is close to the
    whole one and its choice still beats unscaled rounding; rounding in chunks of rows gives the same clips."""
    from slimlm.algorithms import awq

    x = _correlated_inputs(1024, 128, seed=9)
    h = x.T @ x / 1024
    g = torch.Generator().manual_seed(10)
    ws = [torch.randn(512, 128, generator=g), torch.randn(256, 128, generator=g)]
    specs = [QuantSpec(4, 32, False)] * 2
    s_all, err_all, rtn_all = search_scale(ws, specs, x.abs().mean(0), h)
    s_few, err_few, rtn_few = search_scale(ws, specs, x.abs().mean(0), h, search_elements=96 * 128)
    assert rtn_few == pytest.approx(rtn_all, rel=0.15) and err_few < rtn_few
    assert not torch.equal(s_few, s_all) or err_few != err_all  # the sample really was smaller

    def exact(sc: torch.Tensor) -> float:
        return sum(float(awq._output_error((quantize_weight(w * sc, sp).dequantize() / sc - w)[None], h))
                   for w, sp in zip(ws, specs))

    assert exact(s_few) < exact(torch.ones(128))
    whole = search_clip(ws[0], specs[0], h)
    monkeypatch.setattr(awq, "CHUNK_ELEMENTS", 7 * 128)  # chunks of 7 rows, the last one short
    assert torch.equal(search_clip(ws[0], specs[0], h), whole)
    assert torch.equal(search_scale(ws, specs, x.abs().mean(0), h)[0], s_all)


def _layer_and_inputs(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "m", layers=1), dtype=torch.float32)
    layer = model.model.layers[0]
    captured = {}

    def grab(_m, args, kwargs):
        captured["x"], captured["kw"] = args[0], kwargs

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 32)))
    h.remove()
    return layer, captured["x"], captured["kw"]


def test_awq_folding_keeps_the_float_layer_exact(tmp_path):
    layer, x, kw = _layer_and_inputs(tmp_path)
    before = layer(x, **kw)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    with StatsCollector(linears) as col, torch.no_grad():
        layer(x, **kw)
    specs = {n: QuantSpec(4, 32, False) for n in linears}
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        clips, report = awq_layer(layer, col.stats, smoothing_pairs("llama", layer, "awq"), specs)
        torch.testing.assert_close(layer(x, **kw), before, rtol=1e-4, atol=1e-5)
    assert set(report) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}  # no v→o under GQA
    assert not torch.equal(ref.input_layernorm.weight, layer.input_layernorm.weight)
    assert bool((clips["self_attn.q_proj"] == 1).all())  # q/k are never clipped (AutoAWQ's rule)
    assert bool((clips["mlp.gate_proj"] == 1).all())  # nor gate (its output error misjudges SiLU·up)
    assert bool((clips["mlp.up_proj"] < 1).any())  # the others are searched
    # the statistics followed the folding: q/k/v share one accumulator, rescaled once
    assert col.stats["self_attn.q_proj"] is col.stats["self_attn.v_proj"]


def test_awq_refuses_architectures_without_a_mapping(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM

    from slimlm.quantize.layers import quantize_model

    cfg = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=256)
    GemmaForCausalLM(cfg).save_pretrained(tmp_path / "gemma")
    with pytest.raises(SlimlmError, match="awq has no smoothing-pair mapping for model_type 'gemma'"):
        quantize_model(tmp_path / "gemma", tmp_path / "out", scheme="w4a16", method="awq",
                       calib=torch.randint(0, 256, (2, 16)))
    assert not (tmp_path / "out").exists()
    # RTN and GPTQ need no mapping
    quantize_model(tmp_path / "gemma", tmp_path / "out", scheme="w4a16", method="gptq",
                   calib=torch.randint(0, 256, (2, 16)), group_size=32)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _tiny_kld(tmp_path: Path):
    """KLD vs float of a tiny 2-layer Llama quantized W4A16 g32 by a method, on held-out tokens."""
    from transformers import AutoModelForCausalLM

    from slimlm.writers.compressed_tensors import load_reference_model
    from slimlm.quantize.layers import quantize_model

    src = make_tiny_llama(tmp_path / "m", hidden=128, ffn=256, layers=2)
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.log_softmax(fp(held_out).logits, -1)

    def kld(method: str) -> float:
        out = tmp_path / method
        quantize_model(src, out, scheme="w4a16", method=method, group_size=32, calib=calib)
        with torch.no_grad():
            lp = torch.log_softmax(load_reference_model(out)(held_out).logits, -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    return kld


def test_calibrated_methods_beat_rtn_on_a_tiny_model(tmp_path):
    kld = _tiny_kld(tmp_path)
    rtn, awq, gptq, both = kld("rtn"), kld("awq"), kld("gptq"), kld("awq+gptq")
    assert awq < rtn and gptq < rtn and both < rtn


def test_awq_at_real_width_settings_gathers_blocks_and_still_beats_rtn(tmp_path, monkeypatch):
    """With every pair over the exact score's budget and sampled (what a 7B gets), the layer stream gathers H
    only as group blocks for AWQ, whole for GPTQ, and AWQ still beats RTN."""
    from slimlm.algorithms import awq, stats

    monkeypatch.setattr(awq, "EXACT_MAX_MACS", 0)
    monkeypatch.setattr(awq, "SEARCH_ELEMENTS", 2 ** 13)
    shapes: list[tuple[int, ...]] = []
    real_empty = stats.InputStats.empty.__func__

    def spy(cls, n, wanted=None, block=None):
        acc = real_empty(cls, n, wanted or stats.Wanted(), block)
        shapes.append(tuple(acc.gram.shape))
        return acc

    monkeypatch.setattr(stats.InputStats, "empty", classmethod(spy))
    kld = _tiny_kld(tmp_path)
    rtn = kld("rtn")
    assert kld("awq") < rtn
    # per layer: q/k/v, gate/up and down inputs in blocks of 32; o_proj has no pair under GQA (whole Gram)
    assert sorted(set(shapes)) == [(4, 32, 32), (8, 32, 32), (128, 128)]
    shapes.clear()
    kld("gptq")
    assert sorted(set(shapes)) == [(128, 128), (256, 256)]
