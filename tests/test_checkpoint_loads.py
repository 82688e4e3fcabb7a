"""The one reader's tensor loads and names: per-tensor loads equal the formats' own readers (safetensors'
safe_open, gguf's GGUFReader and dequantizer), torch loads are private copies in the stored dtype, a
big-endian GGUF reads (and re-quantizes) as its little-endian twin, and the HF<->GGUF name map."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from slimlm.checkpoint import open_checkpoint, read_state_dict
from slimlm.checkpoint.names import TensorNames, gguf_arch, permute_for_rope
from slimlm.errors import SlimlmError
from test_checkpoint_readers import TINY_CONFIG, write_safetensors_dir, write_tiny_gguf


def test_sharded_dir_torch_loads_equal_safe_open(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = write_safetensors_dir(tmp_path / "m", shards=2)
    extra = {"bf": torch.randn(3, 5).to(torch.bfloat16), "i8": torch.arange(-4, 4, dtype=torch.int8),
             "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    for ckpt in (open_checkpoint(model), open_checkpoint(tmp_path / "extra.safetensors")):
        for info in ckpt.tensors:
            with safe_open(info.file, framework="pt") as f:
                ref = f.get_tensor(info.name)
            got = ckpt.load_torch(info.name)
            assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref)
            if got.dtype.is_floating_point and got.numel():
                assert np.array_equal(ckpt.load_array(info), ref.float().numpy())
    state = read_state_dict(model)
    before = state["model.norm.weight"].clone()
    state["model.norm.weight"].add_(1)  # a private copy: writable, and the file is untouched
    assert torch.equal(read_state_dict(model)["model.norm.weight"], before)


def test_gguf_loads_equal_gguf_reader(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "t.gguf", quant="Q4_1")
    ckpt = open_checkpoint(path)
    for ref in gguf.GGUFReader(path).tensors:
        assert ckpt.load_raw(ref.name).tobytes() == np.asarray(ref.data).tobytes()
        want = gguf.quants.dequantize(np.asarray(ref.data), ref.tensor_type)
        assert np.array_equal(ckpt.load_array(ref.name), want.reshape(ckpt.tensor(ref.name).shape))
    assert ckpt.load_torch("output_norm.weight").dtype == torch.float32
    with pytest.raises(SlimlmError, match="stored as Q4_1, which has no torch dtype"):
        ckpt.load_torch("token_embd.weight")
    with pytest.raises(SlimlmError, match="tensor nope is missing"):
        ckpt.load_array("nope")


def _big_endian_copy(src: Path, out: Path) -> Path:
    """The same model written by gguf's writer for a big-endian host."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, "llama", endianess=gguf.GGUFEndian.BIG)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        writer.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY
                             else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_big_endian_gguf_reads_and_requantizes_as_its_twin(tmp_path: Path) -> None:
    from slimlm.quantize.gguf import quantize_gguf

    little = write_tiny_gguf(tmp_path / "le.gguf")
    big = _big_endian_copy(little, tmp_path / "be.gguf")
    a, b = open_checkpoint(little), open_checkpoint(big)
    assert b.gguf_header.big_endian and not a.gguf_header.big_endian
    assert b.gguf_metadata == a.gguf_metadata and b.config == a.config
    assert [(t.name, t.shape, t.dtype) for t in b.tensors] == [(t.name, t.shape, t.dtype) for t in a.tensors]
    for t in a.tensors:
        assert np.array_equal(a.load_array(t.name), b.load_array(t.name))
    assert torch.equal(a.load_torch("output_norm.weight"), b.load_torch("output_norm.weight"))
    quantize_gguf(little, "Q4_0", tmp_path / "le-q4.gguf")
    quantize_gguf(big, "Q4_0", tmp_path / "be-q4.gguf")
    assert (tmp_path / "le-q4.gguf").read_bytes() == (tmp_path / "be-q4.gguf").read_bytes()


def test_name_map_and_rope_layout() -> None:
    names = TensorNames(gguf_arch("llama"), TINY_CONFIG["num_hidden_layers"])
    assert names.tensor("model.layers.1.self_attn.q_proj.weight") == "blk.1.attn_q.weight"
    assert names.tensor("model.layers.1.self_attn.q_proj.bias") == "blk.1.attn_q.bias"
    assert names.module("model.embed_tokens") == "token_embd" and names.module("lm_head") == "output"
    assert names.tensor("model.layers.0.rotary_emb.inv_freq") is None and names.tensor("weight") is None
    with pytest.raises(SlimlmError, match="not known to gguf-py"):
        gguf_arch("no-such-arch")
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of 4 rows: halves [0,1],[2,3] interleave
    assert permute_for_rope(w, 2)[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]


def test_truncated_dir_is_refused_for_loading(tmp_path: Path) -> None:
    model = write_safetensors_dir(tmp_path / "m")
    file = model / "model.safetensors"
    with file.open("r+b") as f:
        f.truncate(file.stat().st_size - 100)
    assert open_checkpoint(model).missing_bytes == 100  # inspecting is fine
    with pytest.raises(SlimlmError, match="truncated"):
        read_state_dict(model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(SlimlmError, match="holds no .safetensors"):
        read_state_dict(tmp_path / "empty")
