"""Q2_K / Q4_K / Q5_K codecs: decoders equal gguf-py's, encoders write llama.cpp's bytes (with and without
an importance matrix), and the public quantize/dequantize API behaves on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from slimlm.errors import SlimlmError
from slimlm.formats import ggml
from slimlm.formats.ggml import common as kc

KTYPES = [T.Q2_K, T.Q4_K, T.Q5_K]
# byte offsets of the fp16 super-block scales (d, dmin) inside one block
FP16_OFFSETS = {T.Q2_K: (80, 82), T.Q4_K: (0, 2), T.Q5_K: (0, 2)}


def _distributions(rows: int = 24, n: int = 1024, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = {
        "normal": rng.standard_normal((rows, n)),
        "uniform": rng.uniform(-1, 1, (rows, n)),
        "outliers": rng.standard_normal((rows, n)) * np.where(rng.random((rows, n)) < 0.01, 60.0, 1.0),
        "all_zero": np.zeros((rows, n)),
        "tiny": rng.standard_normal((rows, n)) * 1e-6,
        "positive": rng.random((rows, n)) + 0.5,
        "weights_like": rng.laplace(0, 0.02, (rows, n)),
    }
    d["mixed_rows"] = np.concatenate([d["normal"][:8], d["all_zero"][:8], d["tiny"][:8]])
    d["cauchy"] = rng.standard_cauchy((rows, n))
    d["negative"] = -rng.random((rows, n)) - 0.1
    d["huge"] = rng.standard_normal((rows, n)) * 1e4
    d["grid_ties"] = rng.integers(0, 31, (rows, n)) * 0.5 - 3.0  # values exactly on quantization grids
    # sub-blocks of 16 whose magnitudes differ by up to 1e6 inside one super-block
    d["sub_scales"] = rng.standard_normal((rows, n)) * np.repeat(10.0 ** rng.uniform(-4, 2, (rows, n // 16)), 16, 1)
    return {k: v.astype(np.float32) for k, v in d.items()}


def _block_match(a: np.ndarray, b: np.ndarray, qt: T) -> float:
    bs = GGML_QUANT_SIZES[qt][1]
    return float((a.reshape(-1, bs) == b.reshape(-1, bs)).all(axis=1).mean())


def _random_blocks(qt: T, nblocks: int, seed: int) -> np.ndarray:
    """Arbitrary block bytes with finite, varied fp16 super-scales (what a decoder may be handed)."""
    rng = np.random.default_rng(seed)
    bs = GGML_QUANT_SIZES[qt][1]
    raw = rng.integers(0, 256, (nblocks, bs), dtype=np.uint8)
    for off in FP16_OFFSETS[qt]:
        vals = (rng.standard_normal(nblocks) * 10.0 ** rng.integers(-6, 2, nblocks)).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(nblocks, 2)
    return raw


@pytest.mark.parametrize("qt", KTYPES)
def test_decode_equals_gguf_py(qt: T) -> None:
    raw = _random_blocks(qt, 600, seed=int(qt))
    ours = ggml.dequantize(raw, qt, (600, 256))
    ref = gguf_dequantize(raw, qt).reshape(600, 256)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qt", KTYPES)
def test_row_bytes_and_shapes(qt: T) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 512)).astype(np.float32)
    q = ggml.quantize(x, qt)
    assert q.dtype == np.uint8
    assert q.shape == (2, 3, 2 * GGML_QUANT_SIZES[qt][1])
    assert ggml.dequantize(q, qt, x.shape).shape == x.shape


@pytest.mark.parametrize("qt", KTYPES)
def test_all_zero_rows_encode_to_zero_bytes(qt: T) -> None:
    q = ggml.quantize(np.zeros((3, 256), np.float32), qt)
    assert not q.any()
    assert not ggml.dequantize(q, qt, (3, 256)).any()


@pytest.mark.parametrize("qt,max_rel_rmse", [(T.Q2_K, 0.40), (T.Q4_K, 0.11), (T.Q5_K, 0.055)])
def test_round_trip_error_is_what_the_bit_width_gives(qt: T, max_rel_rmse: float) -> None:
    x = np.random.default_rng(2).standard_normal((64, 1024)).astype(np.float32)
    y = ggml.dequantize(ggml.quantize(x, qt), qt, x.shape)
    rel = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2))
    assert rel < max_rel_rmse


@pytest.mark.parametrize("qt", KTYPES)
def test_imatrix_lowers_weighted_error(qt: T) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    imp = (rng.gamma(0.3, 1.0, 1024) + 1e-3).astype(np.float32)
    err = {}
    for name, im in (("plain", None), ("imatrix", imp)):
        y = ggml.dequantize(ggml.quantize(x, qt, im), qt, x.shape)
        err[name] = float(np.sum(imp * (y - x) ** 2))
    assert err["imatrix"] < 0.9 * err["plain"]


def test_bad_input_errors() -> None:
    with pytest.raises(SlimlmError, match="multiple of 256"):
        ggml.quantize(np.zeros((2, 300), np.float32), T.Q4_K)
    with pytest.raises(SlimlmError, match="importance matrix"):
        ggml.quantize(np.zeros((2, 512), np.float32), T.Q2_K, np.ones(256, np.float32))
    with pytest.raises(SlimlmError, match="bytes"):
        ggml.dequantize(np.zeros(100, np.uint8), T.Q5_K, (1, 256))


def test_scale_min_packing_round_trips() -> None:
    rng = np.random.default_rng(4)
    ls, lm = rng.integers(0, 64, (50, 8)), rng.integers(0, 64, (50, 8))
    packed = kc.pack_scale_min_k4(ls, lm)
    assert packed.shape == (50, 12) and packed.dtype == np.uint8
    sc, m = kc.unpack_scale_min_k4(packed)
    np.testing.assert_array_equal(sc, ls)
    np.testing.assert_array_equal(m, lm)


def test_seq_sum_is_left_to_right() -> None:
    rng = np.random.default_rng(8)
    a = (rng.standard_normal((32, 999)) * 10.0 ** rng.integers(-4, 4, (32, 999))).astype(np.float32)
    expected = np.zeros(999, np.float32)
    for row in a:
        expected = expected + row
    np.testing.assert_array_equal(kc.seq_sum(a), expected)
    np.testing.assert_array_equal(kc.seq_sum(np.asfortranarray(a)), expected)


def test_nearest_int_rounds_half_to_even() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 3.7, -3.7, 0.0], np.float32)
    np.testing.assert_array_equal(kc.nearest_int(v), [0, 2, 2, 0, -2, 2, 4, -4, 0])


# ---------------------------------------------------------------- llama.cpp as the oracle

@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("llama_cpp")
    import ggml_oracle
    return ggml_oracle


@pytest.mark.parametrize("qt", KTYPES)
def test_encoder_bytes_match_llama_cpp(oracle, qt: T) -> None:
    dists = _distributions()
    refs = oracle.llama_quantize_rows(list(dists.values()), qt)
    for (name, x), ref in zip(dists.items(), refs):
        ours = ggml.quantize(x, qt)
        assert ours.shape == ref.shape
        match = _block_match(ours, ref, qt)
        assert match >= 0.999, f"{qt.name} {name}: only {match:.4%} of blocks identical"


@pytest.mark.parametrize("qt", KTYPES)
def test_encoder_bytes_match_llama_cpp_with_imatrix(oracle, qt: T) -> None:
    dists = _distributions(seed=5)
    rng = np.random.default_rng(6)
    ims = [(rng.gamma(0.5, 2.0, 1024)).astype(np.float32) for _ in dists]
    ims[0][::7] = 0.0  # columns never activated
    refs = oracle.llama_quantize_rows(list(dists.values()), qt, ims)
    plain = oracle.llama_quantize_rows([dists["normal"]], qt)[0]
    assert not np.array_equal(refs[0], plain)  # llama.cpp did take the imatrix path
    for (name, x), im, ref in zip(dists.items(), ims, refs):
        match = _block_match(ggml.quantize(x, qt, im), ref, qt)
        assert match >= 0.999, f"{qt.name} {name} (imatrix): only {match:.4%} of blocks identical"


@pytest.fixture(scope="module")
def smollm2_ffn_down(oracle, smollm2_gguf) -> list[np.ndarray]:
    return oracle.smollm2_ffn_down(smollm2_gguf, layers=(0, 29))


@pytest.mark.slow
@pytest.mark.parametrize("qt", KTYPES)
def test_encoder_bytes_match_llama_cpp_on_smollm2_ffn_down(oracle, smollm2_ffn_down, qt: T) -> None:
    mats = smollm2_ffn_down
    imp = np.random.default_rng(7).gamma(0.5, 2.0, mats[0].shape[1]).astype(np.float32)
    refs = oracle.llama_quantize_rows(mats + mats[:1], qt, [None, None, imp])
    for x, im, ref in zip(mats + mats[:1], [None, None, imp], refs):
        match = _block_match(ggml.quantize(x, qt, im), ref, qt)
        assert match >= 0.999, f"{qt.name} SmolLM2 ffn_down: only {match:.4%} of blocks identical"


@pytest.mark.parametrize("qt", KTYPES)
def test_degenerate_spans_match_llama_cpp(oracle, qt: T) -> None:
    """Subnormal sub-blocks (their spans give inf inverse scales) and 1e-38..1e30 ranges (anchored grids far
    outside rint's exact range): llama.cpp's nearest_int bit trick decides these bytes, and so does ours."""
    rng = np.random.default_rng(11)
    rows = [rng.standard_normal(512) * 1e-41, rng.standard_normal(512) * 1e-39]
    rows += [rng.standard_normal(512) * 10.0 ** rng.uniform(-38, 30) for _ in range(6)]
    x = np.stack(rows).astype(np.float32)
    imp = (rng.random(512) * (rng.random(512) > 0.2)).astype(np.float32)
    for im in (None, imp):
        ref = oracle.ggml_quantize_chunk(x, qt, im)
        np.testing.assert_array_equal(ggml.quantize(x, qt, im), ref)
