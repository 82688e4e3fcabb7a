"""Synthetic real-layout checkpoints (writers.synthetic) and DeepSeek's FP8 block format read directly
(checkpoint.fp8): exact against a dequantize-by-hand, counted apart in inspect, and into the GGUF and
compressed-tensors paths with the same output as from the bf16 copy DeepSeek's own script would write."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimlm.checkpoint import open_checkpoint
from slimlm.errors import SlimlmError
from slimlm.inspect import inspect
from slimlm.quantize.gguf import quantize_gguf
from slimlm.quantize.layers import quantize_model
from slimlm.writers import synthetic

# Widths chosen so blocks are partial: kv_a is 64 + 32 = 96 rows, experts 192 = 128 + 64 wide, hidden 256.
TINY_V3 = dict(hidden=256, layers=2, ffn=320, moe_ffn=192, experts=4, experts_per_tok=2, heads=2, q_lora_rank=192,
               kv_lora_rank=64, nope=32, rope=32, v_head=32, vocab=300, n_group=2, topk_group=1)


def _tiny_v3_config() -> dict:
    return synthetic.deepseek_v3_config(**TINY_V3)  # with DeepSeek's own yarn rope_scaling, as shipped


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DeepSeek-V3 in FP8 blocks, and its bf16 copy (every weight dequantized, config without
    quantization_config), both dirs named ``model`` so the GGUFs' general.name agree."""
    root = tmp_path_factory.mktemp("fp8")
    src = synthetic.write_checkpoint(root / "fp8" / "model", _tiny_v3_config(), seed=3, max_shard_bytes=400_000)
    ckpt = open_checkpoint(src)
    copy = root / "bf16" / "model"
    copy.mkdir(parents=True)
    save_file({t.name: ckpt.load_torch(t) for t in ckpt.weight_tensors}, str(copy / "model.safetensors"),
              metadata={"format": "pt"})
    config = dict(ckpt.config)
    config.pop("quantization_config")
    (copy / "config.json").write_text(json.dumps(config))
    return src, copy


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_synthetic_qwen2_is_sharded_like_the_hub_and_seeded(tmp_path: Path) -> None:
    config = synthetic.qwen2_config(hidden=64, layers=2, ffn=128, heads=4, kv_heads=2, vocab=256)
    a = synthetic.write_checkpoint(tmp_path / "a", config, seed=0, max_shard_bytes=60_000)
    b = synthetic.write_checkpoint(tmp_path / "b", config, seed=0, max_shard_bytes=60_000)
    c = synthetic.write_checkpoint(tmp_path / "c", config, seed=1, max_shard_bytes=60_000)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    plan = synthetic.tensor_plan(config)
    assert set(index["weight_map"]) == {name for name, _, _ in plan}
    assert index["metadata"]["total_size"] == synthetic.total_bytes(config)
    assert _digest(a) == _digest(b) != _digest(c)
    state = {}
    for shard in shards:  # the safetensors library reads what we wrote
        state.update(load_file(str(a / shard)))
    assert {k: tuple(v.shape) for k, v in state.items()} == {name: shape for name, shape, _ in plan}
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert inspect(a).total_params == sum(math.prod(shape) for _, shape, _ in plan)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a)  # and transformers loads it as the Qwen2 it describes
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_fp8_weights_dequantize_as_by_hand(fp8_dirs: tuple[Path, Path]) -> None:
    """Every FP8 weight equals fp8 * its 128x128 block's scale_inv, rounded to bf16, partial blocks included."""
    ckpt = open_checkpoint(fp8_dirs[0])
    assert ckpt.fp8_block == (128, 128)
    assert len(ckpt.fp8_scales) == 2 * 5 + 3 + 3 * 4 + 3  # attention x2, dense MLP, experts, shared expert
    shapes = set()
    for name, scale in ckpt.fp8_scales.items():
        info = ckpt.tensor(name)
        with safe_open(info.file, "pt") as f:
            w, s = f.get_tensor(name), f.get_tensor(scale.name)
        assert w.dtype == torch.float8_e4m3fn
        full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:w.shape[0], :w.shape[1]]
        want = (w.float() * full).to(torch.bfloat16)
        assert torch.equal(ckpt.load_torch(name), want), name
        assert np.array_equal(ckpt.load_array(name), want.float().numpy()), name
        shapes.add(info.shape)
    assert (96, 256) in shapes and (256, 192) in shapes  # partial blocks in rows and in columns


def test_inspect_counts_scales_apart_from_parameters(fp8_dirs: tuple[Path, Path]) -> None:
    report = inspect(fp8_dirs[0]).to_dict()
    plan = synthetic.tensor_plan(_tiny_v3_config())
    params = sum(math.prod(s) for name, s, _ in plan if not name.endswith("_scale_inv"))
    scales = sum(math.prod(s) for name, s, _ in plan if name.endswith("_scale_inv"))
    assert report["total_params"] == params
    expected = synthetic.expected_counts(_tiny_v3_config())
    for dtype, row in report["dtypes"].items():
        assert row["tensors"] == expected[dtype]["tensors"]
        assert row["bytes"] == expected[dtype]["bytes"]
        assert row["params"] + row["scales"] == expected[dtype]["elements"]
    assert report["dtypes"]["F32"]["scales"] == scales
    assert report["dtypes"]["F8_E4M3"]["scales"] == 0


def test_fp8_to_gguf_equals_the_bf16_copy(fp8_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    files = []
    for i, src in enumerate(fp8_dirs):
        quantize_gguf(src, "Q8_0", tmp_path / f"{i}.gguf")
        files.append(tmp_path / f"{i}.gguf")
    assert files[0].read_bytes() == files[1].read_bytes()
    from slimlm.quantize.sources import open_source

    assert next(t for t in open_source(fp8_dirs[0]).tensors if t.name == "blk.1.ffn_down_exps.weight").parts
    # the stacked experts went out expert by expert; a whole-tensor encode (the threaded path) gives the same bytes
    from slimlm.quantize.gguf import _plain_encode

    quantize_gguf(fp8_dirs[0], "Q8_0", tmp_path / "whole.gguf", encoder=_plain_encode)
    assert (tmp_path / "whole.gguf").read_bytes() == files[0].read_bytes()
    names = [t.name for t in gguf.GGUFReader(files[0]).tensors]
    assert "blk.1.ffn_down_exps.weight" in names and not any("scale" in n for n in names)


def test_fp8_to_w4a16_rtn_equals_the_bf16_copy(fp8_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    outs = []
    for i, src in enumerate(fp8_dirs):
        result = quantize_model(src, tmp_path / str(i), scheme="w4a16", method="rtn", symmetric=True)
        assert result.quantized_linears == 2 * 5 + 3 + 3 * 4 + 3
        outs.append(load_file(str(tmp_path / str(i) / "model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not any(k.endswith("_scale_inv") for k in outs[0])
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in outs[0]


def test_fp8_weight_without_its_scale_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    save_file({"w.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                          "weight_block_size": [128, 128]}}))
    with pytest.raises(SlimlmError, match="w.weight has no w.weight_scale_inv"):
        open_checkpoint(src)


def test_embedding_and_output_encoded_in_row_bands_give_the_same_gguf(tmp_path: Path, monkeypatch) -> None:
    """The GGUF writer's processes encode the largest matrices band by band; the bytes are the whole matrix's."""
    from slimlm.quantize import sources
    from slimlm.quantize.gguf import _plain_encode

    config = synthetic.qwen2_config(hidden=256, layers=2, ffn=512, heads=4, kv_heads=2, vocab=1000)
    src = synthetic.write_checkpoint(tmp_path / "m", config, seed=5)
    monkeypatch.setattr(sources, "ROW_CHUNK", 256 * 100)  # bands of 100 rows: the last one partial
    banded = open_source_tensor(src, "output.weight")
    assert banded.parts is not None and len(banded.parts) == 10
    for mix in ("Q4_K_M", "F16"):
        quantize_gguf(src, mix, tmp_path / f"bands-{mix}.gguf")
        quantize_gguf(src, mix, tmp_path / f"whole-{mix}.gguf", encoder=_plain_encode)
        assert (tmp_path / f"bands-{mix}.gguf").read_bytes() == (tmp_path / f"whole-{mix}.gguf").read_bytes()


def open_source_tensor(src: Path, name: str):
    from slimlm.quantize.sources import open_source

    return next(t for t in open_source(src).tensors if t.name == name)


def test_skeleton_of_a_model_larger_than_memory_allocates_nothing() -> None:
    """transformers 5 allocates fused experts with torch.empty before accelerate moves them to meta: a DeepSeek
    config whose experts need 137 GB in float32 still gives an empty skeleton (real buffers, meta parameters)."""
    import resource

    from transformers import AutoConfig

    from slimlm.models.skeleton import empty_model

    config = synthetic.deepseek_v3_config(**{**TINY_V3, "experts": 2**20, "experts_per_tok": 2, "n_group": 1,
                                             "topk_group": 1})
    config.pop("model_type")
    model = empty_model(AutoConfig.for_model("deepseek_v3", **config))
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 8 * 2**20  # KiB: far below the experts' 137 GB
