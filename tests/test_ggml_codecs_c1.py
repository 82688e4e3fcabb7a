"""GGML codecs F32/F16/BF16, Q8_0, Q4_0/1, Q5_0/1, IQ4_NL, Q6_K, Q3_K: bytes equal llama.cpp's, decoders
equal gguf-py's, round trips stay within each type's error, bad input gives one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from slimlm.errors import SlimlmError
from slimlm.formats import ggml

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q6_K", "Q3_K"]
QUANTS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q6_K", "Q3_K"]
WEIGHTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q6_K", "Q3_K"]  # llama.cpp uses the imatrix for these


def _distributions(rng: np.random.Generator, rows: int, n: int) -> dict[str, np.ndarray]:
    outliers = rng.standard_normal((rows, n)) * 0.02
    outliers[rng.random((rows, n)) < 0.01] *= 300
    sparse = rng.standard_normal((rows, n))
    sparse[rng.random((rows, n)) < 0.7] = 0
    signed_zeros = np.where(rng.random((rows, n)) < 0.5, -0.0, 0.0)  # -0.0 vs +0.0 reaches the fp16 fields
    positive = np.abs(rng.standard_normal((rows // 2, n)))
    signed_zeros[::2] = np.where(rng.random((rows // 2, n)) < 0.8, signed_zeros[::2], positive)
    d = {
        "signed_zeros": signed_zeros,
        "normal": rng.standard_normal((rows, n)) * 0.02,
        "uniform": rng.uniform(-1, 1, (rows, n)),
        "positive": rng.uniform(0, 1, (rows, n)),
        "zeros": np.zeros((rows, n)),
        "tiny": rng.standard_normal((rows, n)) * 1e-16,  # around GGML's 1e-15 "all zero" threshold
        "subnormal": rng.standard_normal((rows, n)) * 1e-40,  # inverse scales overflow to inf in C too
        "large": rng.standard_normal((rows, n)) * 1e10,
        "student_t": rng.standard_t(2, (rows, n)),
        "outliers": outliers,
        "integers": rng.integers(-8, 8, (rows, n)).astype(float),  # exact rounding ties
        "constant_blocks": np.repeat(rng.standard_normal((rows, n // 32)), 32, axis=1),
        "sparse": sparse,
    }
    return {k: v.astype(np.float32) for k, v in d.items()}


def _identical_share(ours: np.ndarray, ref: np.ndarray, qtype: T) -> float:
    ts = GGML_QUANT_SIZES[qtype][1]
    return float((ours.reshape(-1, ts) == ref.reshape(-1, ts)).all(axis=1).mean())


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("llama_cpp")
    from slimlm.formats.ggml import reference

    if not reference.available():
        pytest.skip("llama.cpp's libggml-base is not loadable")
    return reference.llamacpp_quantize


# ---- registry / API ---------------------------------------------------------------------------------

def test_registry_has_every_type_with_ggml_sizes():
    for name in TYPES:
        qt = T[name]
        assert qt in ggml.REGISTRY
        bs, ts = GGML_QUANT_SIZES[qt]
        x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
        data = ggml.quantize(x, qt)
        assert data.dtype == np.uint8 and data.shape == (3, 512 // bs * ts) == (3, ggml.row_bytes(qt, 512))
        assert ggml.dequantize(data, qt, x.shape).shape == x.shape


def test_names_and_numbers_are_accepted():
    x = np.ones((2, 256), dtype=np.float32)
    assert np.array_equal(ggml.quantize(x, "q6_k"), ggml.quantize(x, T.Q6_K))
    assert np.array_equal(ggml.quantize(x, int(T.Q6_K)), ggml.quantize(x, T.Q6_K))


# ---- bytes equal llama.cpp ---------------------------------------------------------------------------

@pytest.mark.llamacpp
@pytest.mark.parametrize("name", TYPES)
def test_bytes_match_llamacpp_on_random_data(name, oracle):
    qt = T[name]
    for dist, x in _distributions(np.random.default_rng(1), 16, 1024).items():
        share = _identical_share(ggml.quantize(x, qt), oracle(x, qt), qt)
        assert share >= 0.999, f"{name} on {dist}: only {share:.4%} of blocks identical"


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", WEIGHTED)
def test_imatrix_bytes_match_llamacpp(name, oracle):
    qt = T[name]
    rng = np.random.default_rng(2)
    imats = {"random": rng.random(1024).astype(np.float32) ** 3 * 100,
             "some_zero": np.where(rng.random(1024) < 0.3, 0, rng.random(1024)).astype(np.float32)}
    for dist, x in _distributions(rng, 8, 1024).items():
        for iname, imat in imats.items():
            share = _identical_share(ggml.quantize(x, qt, imat), oracle(x, qt, imat), qt)
            assert share >= 0.999, f"{name} on {dist} with {iname} imatrix: only {share:.4%} identical"


@pytest.mark.llamacpp
def test_q8_0_and_floats_ignore_the_imatrix_like_llamacpp(oracle):
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    imat = np.random.default_rng(4).random(256).astype(np.float32)
    for name in ["F16", "BF16", "Q8_0"]:
        assert np.array_equal(ggml.quantize(x, T[name], imat), oracle(x, T[name], imat))


@pytest.mark.llamacpp
def test_special_float_values_match_llamacpp(oracle):
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-45, 65504.0, 65520.0, 1e6,
                         3.3895314e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8], dtype=np.float32)
    x = np.resize(specials, (2, 64)).astype(np.float32)
    for name in ["F16", "BF16"]:
        assert np.array_equal(ggml.quantize(x, T[name]), oracle(x, T[name]))


@pytest.mark.llamacpp
@pytest.mark.slow
def test_bytes_match_llamacpp_on_smollm2_ffn_down(smollm2_gguf, oracle):
    sys.path.insert(0, str(Path(__file__).parent))
    from ggml_oracle import smollm2_ffn_down

    (w,) = smollm2_ffn_down(smollm2_gguf, layers=(7,))  # 576 rows of 1536 = 6 x 256
    imat = (np.random.default_rng(5).random(w.shape[1]) ** 2 * 10).astype(np.float32)
    for name in TYPES:
        qt = T[name]
        share = _identical_share(ggml.quantize(w, qt), oracle(w, qt), qt)
        assert share >= 0.999, f"{name}: {share:.4%}"
        if name in WEIGHTED:
            share = _identical_share(ggml.quantize(w, qt, imat), oracle(w, qt, imat), qt)
            assert share >= 0.999, f"{name} with imatrix: {share:.4%}"


@pytest.mark.llamacpp
@pytest.mark.slow
def test_ctypes_oracle_is_what_llama_model_quantize_writes(smollm2_gguf, oracle):
    """The chunk quantizer we compare against is the one llama_model_quantize runs (with an imatrix too)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ggml_oracle import llama_quantize, smollm2_ffn_down

    (w,) = smollm2_ffn_down(smollm2_gguf, layers=(0,))
    w = w[:64]
    imat = (np.random.default_rng(6).random(w.shape[1]) * 4).astype(np.float32)
    for name, im in [("Q3_K", None), ("Q3_K", imat), ("IQ4_NL", imat), ("Q5_1", imat)]:
        written = llama_quantize(w, T[name], im)
        assert np.array_equal(written, oracle(w, T[name], im))
        assert np.array_equal(written, ggml.quantize(w, T[name], im))


_edge_floats = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.5, -3.0, 7.0, -8.0, 1e-20, 1e-39]),
    st.floats(min_value=-1e6, max_value=1e6, width=32, allow_subnormal=True))


@pytest.mark.llamacpp
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(TYPES), x=hnp.arrays(np.float32, (2, 256), elements=_edge_floats),
       imat=st.one_of(st.none(), hnp.arrays(np.float32, (256,), elements=st.one_of(
           st.just(0.0), st.floats(min_value=0, max_value=1e4, width=32)))))
def test_bytes_match_llamacpp_for_any_input(oracle, name, x, imat):
    """Ties, signed zeros, subnormals, outliers with zero importance: every byte as llama.cpp writes it."""
    assert np.array_equal(ggml.quantize(x, T[name], imat), oracle(x, T[name], imat))


# ---- decoders ----------------------------------------------------------------------------------------

def _random_blocks(qtype: T, nblocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes whose fp16 scale fields hold finite, moderate values."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (nblocks, ts), dtype=np.uint8)
    halves = rng.uniform(-2, 2, (nblocks, 2)).astype(np.float16).view(np.uint8)
    fields = {T.Q8_0: [0], T.Q4_0: [0], T.Q5_0: [0], T.IQ4_NL: [0], T.Q4_1: [0, 2], T.Q5_1: [0, 2],
              T.Q6_K: [208], T.Q3_K: [108]}[qtype]
    for k, off in enumerate(fields):
        raw[:, off:off + 2] = halves[:, 2 * k:2 * k + 2]
    return raw


@pytest.mark.parametrize("name", QUANTS)
def test_decode_equals_gguf_dequantize(name):
    qt = T[name]
    bs, ts = GGML_QUANT_SIZES[qt]
    raw = _random_blocks(qt, 4096, np.random.default_rng(7))
    ours = ggml.dequantize(raw, qt, (4096 // (256 // bs), 256))
    ref = gguf_dequantize(raw.reshape(4096 // (256 // bs), -1), qt)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_decode_equals_gguf_dequantize(name):
    qt = T[name]
    x = np.random.default_rng(8).standard_normal((8, 64)).astype(np.float32) * 100
    data = ggml.quantize(x, qt)
    assert np.array_equal(ggml.dequantize(data, qt, x.shape), gguf_dequantize(data, qt))


# ---- round trips ---------------------------------------------------------------------------------------

# relative RMS error bound per type on N(0,1) data (about 1.2x the measured values)
ERROR_BOUND = {"F32": 0.0, "F16": 3e-4, "BF16": 2e-3, "Q8_0": 6.5e-3, "Q6_K": 2.1e-2, "Q5_0": 5e-2, "Q5_1": 4.5e-2,
               "Q4_0": 0.1, "Q4_1": 0.092, "IQ4_NL": 0.09, "Q3_K": 0.18}


@pytest.mark.parametrize("name", TYPES)
def test_round_trip_error_is_bounded(name):
    qt = T[name]
    x = np.random.default_rng(9).standard_normal((64, 1536)).astype(np.float32)
    y = ggml.dequantize(ggml.quantize(x, qt), qt, x.shape)
    rel = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)))
    assert rel <= ERROR_BOUND[name], rel
    if name in ("Q8_0", "Q4_0", "Q5_0"):  # per-value error: half a step (a full one where Q4_0/Q5_0 clip the
        # side opposite to the block's max at +7/+15), plus the fp16 rounding of the scale
        levels, steps = {"Q8_0": (127, 0.5), "Q4_0": (8, 1.0), "Q5_0": (16, 1.0)}[name]
        step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / levels
        assert np.all(np.abs((y - x).reshape(-1, 32)) <= step * (steps + levels * 2.0**-11) + 1e-7)


@pytest.mark.parametrize("name", WEIGHTED)
def test_imatrix_lowers_the_weighted_error(name):
    """What the importance matrix is for: less error where it says the activations are large."""
    qt = T[name]
    rng = np.random.default_rng(10)
    x = rng.standard_normal((64, 1536)).astype(np.float32)
    imat = np.exp(rng.standard_normal(1536) * 2).astype(np.float32)
    plain = ggml.dequantize(ggml.quantize(x, qt), qt, x.shape)
    weighted = ggml.dequantize(ggml.quantize(x, qt, imat), qt, x.shape)
    err_plain = float(np.sum(imat * (plain - x) ** 2))
    err_weighted = float(np.sum(imat * (weighted - x) ** 2))
    assert err_weighted < 0.97 * err_plain, (err_weighted, err_plain)


def test_zero_rows_round_trip_to_zero():
    x = np.zeros((2, 512), dtype=np.float32)
    for name in TYPES:
        assert not np.any(ggml.dequantize(ggml.quantize(x, T[name]), T[name], x.shape))
        if name in WEIGHTED:
            im = np.ones(512, dtype=np.float32)
            assert not np.any(ggml.dequantize(ggml.quantize(x, T[name], im), T[name], x.shape))


def test_leading_dims_and_per_expert_imatrix():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 5, 256)).astype(np.float32)
    imat = rng.random((3, 1, 256)).astype(np.float32)
    data = ggml.quantize(x, T.Q6_K, imat)
    assert data.shape == (3, 5, 210)
    for e in range(3):
        assert np.array_equal(data[e], ggml.quantize(x[e], T.Q6_K, imat[e, 0]))
    assert ggml.dequantize(data, T.Q6_K, x.shape).shape == x.shape


def test_large_tensor_is_chunked_identically():
    x = np.random.default_rng(12).standard_normal((600, 1024)).astype(np.float32)  # > one internal chunk
    whole = ggml.quantize(x, T.Q4_0)
    assert np.array_equal(whole[:300], ggml.quantize(x[:300], T.Q4_0))
    assert np.array_equal(whole[300:], ggml.quantize(x[300:], T.Q4_0))


# ---- bad input ----------------------------------------------------------------------------------------

def test_bad_input_raises_one_line_errors():
    x = np.ones((2, 100), dtype=np.float32)
    with pytest.raises(SlimlmError, match="multiple of 32"):
        ggml.quantize(x, T.Q4_0)
    with pytest.raises(SlimlmError, match="multiple of 256"):
        ggml.quantize(np.ones((2, 288), dtype=np.float32), T.Q6_K)
    with pytest.raises(SlimlmError, match="unknown GGML type"):
        ggml.quantize(x, "Q4_Z")
    with pytest.raises(SlimlmError, match="does not fit"):
        ggml.quantize(np.ones((2, 64), dtype=np.float32), T.Q4_0, np.ones(32, dtype=np.float32))
    with pytest.raises(SlimlmError, match="needs 36"):
        ggml.dequantize(np.zeros(35, dtype=np.uint8), T.Q4_0, (2, 32))
    with pytest.raises(SlimlmError, match="no codec"):
        ggml.quantize(np.ones((1, 256), dtype=np.float32), T.TQ1_0)
    bad = np.ones((2, 256), dtype=np.float32)
    bad[1, 7] = np.nan
    with pytest.raises(SlimlmError, match="NaN or infinite"):
        ggml.quantize(bad, T.Q4_0)
    assert np.isnan(ggml.dequantize(ggml.quantize(bad, T.F16), T.F16, bad.shape)[1, 7])  # floats keep NaN


def test_threads_do_not_change_bytes():
    x = np.random.default_rng(13).standard_normal((300, 512)).astype(np.float32)
    for name in ["Q3_K", "IQ4_NL", "Q4_1"]:
        assert np.array_equal(ggml.quantize(x, T[name], threads=1), ggml.quantize(x, T[name], threads=3))
