"""compressed-tensors export per family (issue 14, item 2): W4A16 and W8A8 files transformers loads.

For each tiny model of test_gguf_archs' ``CASES``: quantize (RTN for every family; AWQ for W4A16 and SmoothQuant for
W8A8 on the dense ones, calibrated on a short text), then transformers loads the dir (compressed-tensors
decompressing; W8A8 also fake-quantizes activations) and its logits equal our own reference loader's to fp
tolerance (1e-4) and stay near the float model's. Routers and gates stay in full precision and in ``ignore``.

Mixtures of experts: transformers 5 holds the routed experts as fused 3-D parameters, not Linears. The file keeps
llm-compressor's per-expert layout (``experts.{e}.{proj}.weight_packed``), which transformers' loader decompresses
and fuses, but only for pack-quantized symmetric experts: so W4A16 MoE is symmetric (asymmetric is refused), W8A8
on MoE is refused (transformers loads neither int8 nor full-precision experts from such a file), and the calibrated
methods are refused (no calibration through fused experts). Gemma 3's AWQ/SmoothQuant fold into (1 + w) norms.

Measured max |logit diff| vs the float model (40 tokens, transformers 5.24, compressed-tensors 0.20.1; W4A16 group
32, W8A8 per-channel + dynamic per-token int8). The bound is 0.9 * max |fp logit| for W4A16 (Mixtral's 8 random
experts re-route under int4 noise) and 0.15 * max |fp logit| for W8A8; vs our reference loader every run is 0.0:

    case        w4a16 rtn   w4a16 awq   w8a8 rtn   w8a8 smoothquant   max |fp logit|
    llama3      1.33        1.40        0.183      0.212              3.51
    mistral     1.56        1.56        0.209      0.231              3.57
    qwen2       1.59        1.38        0.201      0.211              4.14
    qwen3       1.59        1.36        0.248      0.174              3.75
    gemma3      1.47        1.55        0.167      0.199              3.93
    mixtral     3.43        refused     refused    refused            4.32
    qwen2_moe   1.40        refused     refused    refused            3.78
    qwen3_moe   1.14        refused     refused    refused            3.96
    deepseek_v3 2.31        refused     refused    refused            3.90
    ..._noqlora 3.10        refused     refused    refused            3.77
    ..._yarn    2.69        refused     refused    refused            4.26

DeepSeek-V3 keeps only the router (``mlp.gate``, with its ``e_score_correction_bias``) in full precision, as
llm-compressor's DeepSeek examples do (``ignore=["lm_head", "re:.*mlp.gate$"]``); the MLA projections, the dense
first layer, the shared expert and every routed expert are quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_gguf_archs import CASES, IDS, make_model

from slimlm.errors import SlimlmError
from slimlm.quantize.layers import quantize_model
from slimlm.writers.compressed_tensors import load_reference_model

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v3_noqlora", "deepseek_v3_yarn")
ROUTERS = {"mixtral": ("block_sparse_moe.gate",), "qwen2_moe": ("mlp.gate", "mlp.shared_expert_gate"),
           "qwen3_moe": ("mlp.gate",), "deepseek_v3": ("mlp.gate",), "deepseek_v3_noqlora": ("mlp.gate",),
           "deepseek_v3_yarn": ("mlp.gate",)}
RUNS = [(name, scheme, method) for name in CASES for scheme, method in
        [("w4a16", "rtn")] + ([] if name in MOE else [("w8a8", "rtn"), ("w4a16", "awq"), ("w8a8", "smoothquant")])]
BOUND = {"w4a16": 0.9, "w8a8": 0.15}  # max |logit diff| vs fp, relative to max |fp logit|
CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. Small models learn tiny patterns in short texts. "
              "Quantization keeps the weights in four or eight bits and the activations as they come. ") * 8


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    """One tiny model per family, made on first use (:func:`_model`) and shared by that family's runs."""
    return {}


def _model(models: dict[str, Path], name: str, root: Path) -> Path:
    if name not in models:
        models[name] = make_model(root / name, CASES[name])
    return models[name]


@pytest.mark.parametrize("name, scheme, method", RUNS)
def test_family_exports_load_in_transformers(name: str, scheme: str, method: str, models, tmp_path_factory) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    src = _model(models, name, tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("q") / f"{name}-{scheme}-{method}"
    calib = None
    if method != "rtn":
        (out.parent / "calib.txt").write_text(CALIB_TEXT)
        calib = out.parent / "calib.txt"
    sym = True if name in MOE and scheme == "w4a16" else None
    res = quantize_model(src, out, scheme=scheme, method=method, group_size=32 if scheme == "w4a16" else "default",
                         symmetric=sym, calib=calib, samples=4, seq_len=32)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    t = _tensors(out)
    n_layers = int(json.loads((src / "config.json").read_text())["num_hidden_layers"])
    quantized = {k.rsplit(".", 1)[0] for k in t if k.endswith(".weight_scale")}
    assert "lm_head" in qc["ignore"] and not [m for m in quantized if "lm_head" in m or "embed" in m]
    dense = int(CASES[name].config.get("first_k_dense_replace", 0))  # DeepSeek's leading layers have no experts
    for i in range(n_layers):
        assert f"model.layers.{i}.self_attn.o_proj" in quantized
        if i < dense:
            assert f"model.layers.{i}.mlp.gate_proj" in quantized
            continue
        for router in ROUTERS.get(name, ()):
            module = f"model.layers.{i}.{router}"
            assert module in qc["ignore"] and module not in quantized  # routers and gates stay float
            assert t[f"{module}.weight"].is_floating_point()
        if name in MOE:
            experts = {m for m in quantized if f"model.layers.{i}." in m and ".experts." in m}
            c = CASES[name].config
            n_experts = c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"]
            assert len(experts) == 3 * n_experts  # every expert projection quantized
    if name not in MOE:
        assert qc["ignore"] == ["lm_head"] and res.quantized_linears == 7 * n_layers

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if scheme == "w4a16" else {}
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
    fp, got, ours = (_logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()),
                     _logits(theirs), _logits(load_reference_model(out)))
    vs_ref, vs_fp, top = float((got - ours).abs().max()), float((got - fp).abs().max()), float(fp.abs().max())
    print(f"{name} {scheme} {method}: max abs logit diff vs fp {vs_fp:.3g} (|fp| <= {top:.2f}), "
          f"vs reference {vs_ref:.2g}")
    torch.testing.assert_close(got, ours, rtol=1e-4, atol=1e-4)
    assert 0 < vs_fp < BOUND[scheme] * top


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("scheme, method, kw, match", [
    ("w4a16", "awq", {"symmetric": True}, "--method awq needs calibration through the fused experts"),
    ("w4a16", "gptq", {"symmetric": True}, "--method gptq needs calibration through the fused experts"),
    ("w8a8", "rtn", {}, "w8a8 is not supported for a mixture of experts"),
    ("w8a8", "smoothquant", {}, "w8a8 is not supported for a mixture of experts"),
    ("w4a16", "rtn", {}, "w4a16 experts must be symmetric"),
])
def test_moe_refusals_are_one_line(name: str, scheme: str, method: str, kw: dict, match: str, models,
                                   tmp_path_factory) -> None:
    src = _model(models, name, tmp_path_factory.getbasetemp())
    with pytest.raises(SlimlmError, match=match) as err:
        quantize_model(src, tmp_path_factory.getbasetemp() / f"refused-{name}", scheme=scheme, method=method,
                       group_size=32 if scheme == "w4a16" else "default", calib=torch.randint(0, 64, (2, 16)), **kw)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{CASES[name].model_type}: ")


def test_gemma_smoothing_folds_into_one_plus_w() -> None:
    """Gemma's norm multiplies by (1 + w): the fold must give (1 + w') = (1 + w) / s, so the layer computes the
    same function; a plain w / s would not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimlm.algorithms.mappings import fold_scale, smoothing_pairs

    config = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=64)
    torch.manual_seed(0)
    layer = AutoModelForCausalLM.from_config(config).model.layers[0]
    with torch.no_grad():
        for n, p in layer.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in n else 0.08)
    pairs = smoothing_pairs("gemma3_text", layer, "awq")
    assert [p.prev for p in pairs] == ["input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"]
    assert [p.plus_one for p in pairs] == [True, True, False]
    x = torch.randn(3, 64)
    norm, mlp = layer.pre_feedforward_layernorm, layer.mlp
    with torch.no_grad():
        before = mlp(norm(x))
        for pair in pairs[1:]:
            fold_scale(layer, pair, torch.rand(128 if pair.prev == "mlp.up_proj" else 64) + 0.5)
        torch.testing.assert_close(mlp(norm(x)), before, rtol=1e-4, atol=1e-5)
