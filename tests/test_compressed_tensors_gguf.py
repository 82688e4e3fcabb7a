"""The GGUF equivalent of a compressed-tensors dir keeps the integer codes; only scales round to fp16."""

import numpy as np
import pytest

from slimlm.errors import SlimlmError
from slimlm.writers.compressed_tensors import dequantized_state_dict
from slimlm.writers.gguf_equivalent import export_gguf_equivalent
from slimlm.quantize.layers import quantize_model

from conftest import make_tiny_llama


@pytest.mark.parametrize("scheme,kw,expected", [
    ("w4a16", {"group_size": 32}, "Q4_1"),
    ("w4a16", {"group_size": 32, "symmetric": True}, "Q4_0"),
    ("w8a16", {}, "Q8_0"),
])
def test_codes_carry_over_exactly(tmp_path, scheme, kw, expected):
    import gguf

    src = make_tiny_llama(tmp_path / "m")
    ct = tmp_path / "ct"
    quantize_model(src, ct, scheme=scheme, method="rtn", **kw)
    res = export_gguf_equivalent(ct, tmp_path / "eq.gguf")
    assert res["type"] == expected and res["linears"] == 14 and len(res["exact_codes"]) == 14
    state, _ = dequantized_state_dict(ct)
    ours = state["model.layers.1.mlp.down_proj.weight"].numpy()
    reader = gguf.GGUFReader(tmp_path / "eq.gguf")
    (t,) = [t for t in reader.tensors if t.name == "blk.1.ffn_down.weight"]
    assert t.tensor_type.name == expected
    blocks = np.asarray(t.data).reshape(64, 4, -1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if expected == "Q8_0":
        codes = blocks[..., 2:].view(np.int8).reshape(64, 128)
    else:
        qs = blocks[..., -16:]
        codes = (np.concatenate([qs & 0xF, qs >> 4], -1).astype(np.int16) - 8).reshape(64, 128)
    from safetensors import safe_open

    from slimlm.formats.groupint import unpack_codes

    with safe_open(str(ct / "model.safetensors"), "pt") as f:
        scale = f.get_tensor("model.layers.1.mlp.down_proj.weight_scale").float()
        q = f.get_tensor("model.layers.1.mlp.down_proj.weight_packed")
    assert np.array_equal(codes, unpack_codes(q, (64, 128), 8 if expected == "Q8_0" else 4).numpy())
    back = gguf.quants.dequantize(t.data, t.tensor_type)
    max_code = 128 if expected == "Q8_0" else 16
    np.testing.assert_allclose(back, ours, rtol=0, atol=float(scale.max()) * max_code * 2**-11)
    assert not np.array_equal(back, ours)  # ... but not bit-exact: llama.cpp keeps scales in fp16
    # d is the scale rounded to fp16: the only change
    reps = 4 // scale.shape[1]
    np.testing.assert_array_equal(d, scale.repeat_interleave(reps, 1).numpy().astype(np.float16).astype(np.float32))


def test_no_equivalent_for_group_64(tmp_path):
    src = make_tiny_llama(tmp_path / "m")
    quantize_model(src, tmp_path / "ct", scheme="w4a16", method="rtn", group_size=64)
    with pytest.raises(SlimlmError, match="Q4_0/Q4_1 need group 32"):
        export_gguf_equivalent(tmp_path / "ct", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
