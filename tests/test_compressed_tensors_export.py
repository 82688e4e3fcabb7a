"""compressed-tensors export: codec against compressed-tensors itself, file layout, transformers loading."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimlm.errors import SlimlmError
from slimlm.writers.compressed_tensors import load_reference_model
from slimlm.formats import groupint as gi
from slimlm.quantize.layers import quantize_model
from slimlm.quantize.schemes import W4A16Config, get_scheme

from conftest import make_tiny_llama


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, None), (8, None), (8, 64)])
def test_params_and_codes_match_compressed_tensors(symmetric, bits, group):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.linspace(0.1, 3, 128)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel" if group is None else "group", group_size=group)
    gs = 128 if group is None else group
    g = w.reshape(48, -1, gs)
    ct_scale, ct_zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    scale, zero = gi.minmax_params(w, bits, group, symmetric)
    torch.testing.assert_close(scale, ct_scale, rtol=0, atol=0)
    if not symmetric:
        assert torch.equal(zero.to(torch.int8), ct_zero.to(torch.int8))
    q = gi.quantize(w, scale, zero, bits, group).to(torch.int8)
    ct_q = quantize(w, ct_scale, None if symmetric else ct_zero, args, dtype=torch.int8)
    assert torch.equal(q, ct_q)
    lo, hi = gi.qrange(bits)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    ours = gi.dequantize(q, scale, zero, group)
    theirs = dequantize(ct_q, ct_scale, None if symmetric else ct_zero, args)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_int4_packing_layout_and_round_trip():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32)
    packed = gi.pack_codes(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (3, 4)
    # code + 8, element i at bits 4*(i % 8) of word i // 8: first word holds 0..7 -> 0x76543210
    assert int(packed[0, 0]) == 0x76543210
    assert int(packed[0, 1]) & 0xFFFFFFFF == 0xFEDCBA98
    assert torch.equal(gi.unpack_codes(packed, (3, 32), 4), q)
    zp = torch.randint(-8, 8, (24, 5), dtype=torch.int8)
    assert torch.equal(gi.unpack_zero_points(gi.pack_zero_points(zp), (24, 5)), zp)
    assert gi.pack_zero_points(zp).shape == (3, 5)


def test_group_size_choice_never_crashes():
    assert gi.choose_group_size(1536, 128) == (128, "as requested")
    gs, why = gi.choose_group_size(576, 128)
    assert gs == 64 and "128 does not divide 576" in why
    assert gi.choose_group_size(100, 128)[0] is None  # nothing >= 16 divides 100: one scale per row
    plan = W4A16Config(group_size=128).plan_group_sizes({576, 1536})
    assert plan[576][0] == plan[1536][0] == 64  # one group size for the whole model (one config group)
    assert W4A16Config(group_size=128).plan_group_sizes({576, 1536}, uniform=False)[1536][0] == 128


def test_w4a16_files_are_what_compressed_tensors_stores(tmp_path):
    src = make_tiny_llama(tmp_path / "m", hidden=96, ffn=192)
    out = tmp_path / "q"
    res = quantize_model(src, out, scheme="w4a16", method="rtn", group_size=64)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == \
        {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    assert {g.note for g in res.group_choices} >= {"64 does not divide every width (96, 192); 32 divides all, "
                                                   "so one group size for the whole model"}
    t = _tensors(out)
    p = "model.layers.1.mlp.down_proj"
    assert t[f"{p}.weight_packed"].dtype == torch.int32 and t[f"{p}.weight_packed"].shape == (96, 24)
    assert t[f"{p}.weight_scale"].shape == (96, 6) and t[f"{p}.weight_scale"].dtype == torch.float32
    assert t[f"{p}.weight_zero_point"].dtype == torch.int32 and t[f"{p}.weight_zero_point"].shape == (12, 6)
    assert t[f"{p}.weight_shape"].tolist() == [96, 192]
    assert f"{p}.weight" not in t and "model.layers.1.post_attention_layernorm.weight" in t
    assert "lm_head.weight" not in t  # tied to the embeddings, kept in full precision
    assert not [k for k in t if k.endswith(".weight_packed") and "lm_head" in k]


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_loads_w4a16_identically(tmp_path, sym):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    src = make_tiny_llama(tmp_path / "m", hidden=128, ffn=256)
    out = tmp_path / "q"
    quantize_model(src, out, scheme="w4a16", method="rtn", group_size=64, symmetric=sym)
    ids = torch.randint(0, 256, (2, 40))
    ours = load_reference_model(out)
    # transformers' default (compressed) path cannot load asymmetric pack-quantized checkpoints in this
    # transformers/compressed-tensors pair (llm-compressor issue #1618); decompressing at load time can.
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        assert not torch.allclose(fp(ids).logits, ours(ids).logits, atol=1e-3)  # really quantized


def test_w8a8_int_quantized_layout_and_activation_quant(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "m")
    out = tmp_path / "q"
    quantize_model(src, out, scheme="w8a8", method="smoothquant", calib=torch.randint(0, 256, (4, 32)))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"] is True
    assert {k: group["input_activations"][k] for k in ("num_bits", "strategy", "dynamic", "symmetric")} == \
        {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}
    t = _tensors(out)
    p = "model.layers.0.self_attn.q_proj"
    assert t[f"{p}.weight"].dtype == torch.int8 and t[f"{p}.weight_scale"].shape == (64, 1)
    assert f"{p}.input_scale" not in t and f"{p}.weight_zero_point" not in t
    ids = torch.randint(0, 256, (2, 24))
    ours = load_reference_model(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # fake-quantizes activations too
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_w8a8_static_activations_store_input_scale(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "m")
    out = tmp_path / "q"
    quantize_model(src, out, scheme="w8a8", method="rtn", act_dynamic=False, calib=torch.randint(0, 256, (4, 32)))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["input_activations"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    t = _tensors(out)
    assert t["model.layers.1.mlp.down_proj.input_scale"].shape == (1,)
    assert float(t["model.layers.1.mlp.down_proj.input_scale"]) > 0
    ids = torch.randint(0, 256, (2, 24))
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(load_reference_model(out)(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_interrupted_run_leaves_no_output(tmp_path):
    src = make_tiny_llama(tmp_path / "m")
    out = tmp_path / "q"

    def stop(done, total, item):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(src, out, scheme="w4a16", method="rtn", progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    quantize_model(src, out, scheme="w4a16", method="rtn")
    with pytest.raises(SlimlmError, match="exists; pass --overwrite"):
        quantize_model(src, out, scheme="w4a16", method="rtn")


def test_scheme_errors_are_one_line():
    with pytest.raises(SlimlmError, match="unknown scheme 'w3a16'"):
        get_scheme("w3a16")
    with pytest.raises(SlimlmError, match="not a valid regex"):
        get_scheme("w4a16", ignore=["re:("])
    with pytest.raises(SlimlmError, match="w8a8 uses per-channel"):
        get_scheme("w8a8", group_size=128)


def test_w8a16_bf16_model_keeps_its_dtype_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "m")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(src)
    out = tmp_path / "q"
    quantize_model(src, out, scheme="w8a16", method="gptq", calib=torch.randint(0, 256, (4, 32)))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == "pack-quantized" and group["weights"]["num_bits"] == 8
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"] is True
    t = _tensors(out)
    p = "model.layers.0.mlp.up_proj"
    assert t[f"{p}.weight_packed"].shape == (128, 16)  # 4 int8 codes per int32 word
    assert t[f"{p}.weight_scale"].dtype == torch.bfloat16 and t[f"{p}.weight_scale"].shape == (128, 1)
    assert t["model.norm.weight"].dtype == torch.bfloat16
    ids = torch.randint(0, 256, (2, 24))
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(load_reference_model(out)(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dynamic", [True, False])
def test_eval_loader_keeps_w8a8_activation_quant(tmp_path, dynamic):
    """`slimlm eval` loads compressed-tensors decompressed; a W8A8 file must still quantize its activations
    (per token, or with its stored input_scale) or eval would score it as W8A16."""
    from transformers import AutoModelForCausalLM

    from slimlm.models import load_model

    src = make_tiny_llama(tmp_path / "m")
    out = tmp_path / "q"
    quantize_model(src, out, scheme="w8a8", method="rtn", act_dynamic=dynamic, calib=torch.randint(0, 256, (4, 32)))
    ids = torch.randint(0, 256, (2, 24))
    ours = load_model(out, "fp32").model
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # compressed path: activations quantized
    with torch.no_grad():
        got, want = ours(ids).logits, theirs(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for h in [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]:
            h._forward_pre_hooks.clear()
        assert not torch.allclose(ours(ids).logits, want, rtol=1e-4, atol=1e-4)  # weights alone differ


def test_shard_writer_streams_every_dtype_into_bounded_shards(tmp_path):
    """The streaming safetensors writer: every dtype a checkpoint holds (empty and 0-d tensors too) read back
    exactly by safetensors, shards no larger than the bound unless one tensor alone exceeds it, and an index."""
    from safetensors.torch import load_file

    from slimlm.writers.compressed_tensors import ShardWriter

    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 7, generator=gen), "b": torch.randn(3, generator=gen).bfloat16(),
               "c": torch.randint(-5, 5, (300,), dtype=torch.int8, generator=gen), "e": torch.zeros(0, 4),
               "f": torch.tensor([True, False]), "g": torch.randn(5, generator=gen).to(torch.float8_e4m3fn),
               "h": torch.arange(400, dtype=torch.int64), "i": torch.tensor(3.0).half(),
               "j": torch.randint(0, 2**31 - 1, (9,), dtype=torch.int32, generator=gen)}
    writer = ShardWriter(tmp_path / "out", max_bytes=1000)
    writer.add(dict(list(tensors.items())[:4]))
    writer.add(dict(list(tensors.items())[4:]))
    out = writer.finish({"model_type": "llama"}, None, overwrite=False)
    shards = sorted(out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"]) == set(tensors)
    got = {}
    for shard in shards:
        part = load_file(shard)
        data = sum(t.numel() * t.element_size() for t in part.values())
        assert data <= 1000 or len(part) == 1, (shard.name, data)
        got.update(part)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not list(out.glob("*.data"))
