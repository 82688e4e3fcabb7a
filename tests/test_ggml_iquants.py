"""The i-quants (IQ4_XS, IQ3_S, IQ3_XXS, ...): decoders equal gguf-py's, encoders write llama.cpp's bytes exactly
(with and without an importance matrix), and ``slimlm quantize --to IQ*`` writes llama.cpp's whole file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from slimlm.errors import SlimlmError
from slimlm.formats import ggml
from slimlm.formats.gguf_mix import requires_imatrix

IQ_TYPES = [T.IQ4_XS, T.IQ3_S, T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S]
ONLY_WITH_IMATRIX = {T.IQ2_XS, T.IQ2_XXS, T.IQ1_S}  # ggml asserts one for these (the others can run without)
N = 1024


def _distributions(seed: int = 0, rows: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = {
        "normal": rng.standard_normal((rows, N)),
        "outliers": rng.standard_normal((rows, N)) * np.where(rng.random((rows, N)) < 0.01, 60.0, 1.0),
        "weights_like": rng.laplace(0, 0.02, (rows, N)),
        "grid_ties": rng.integers(0, 31, (rows, N)) * 0.5 - 3.0,
        "tiny": rng.standard_normal((rows, N)) * 1e-6,
        "all_zero": np.zeros((2, N)),
        "signed_zeros": np.where(rng.random((rows, N)) < 0.3, -0.0, rng.standard_normal((rows, N))),
        # all-zero 32-blocks inside live super-blocks (IQ3_S then shifts its qs/signs writes)
        "holes": rng.standard_normal((rows, N)) * np.repeat(rng.random((rows, N // 32)) < 0.6, 32, 1),
        "sub_scales": rng.standard_normal((rows, N)) * np.repeat(10.0 ** rng.uniform(-4, 2, (rows, N // 16)), 16, 1),
    }
    return {k: v.astype(np.float32) for k, v in d.items()}


def _importance(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = rng.gamma(0.5, 2.0, N).astype(np.float32)
    im[::7] = 0.0  # columns never activated
    return im


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("llama_cpp")
    import ggml_oracle
    return ggml_oracle


@pytest.mark.parametrize("qt", IQ_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_encoder_bytes_equal_llama_cpp(oracle, qt: T, with_imatrix: bool) -> None:
    im = _importance(int(qt)) if with_imatrix else None
    if im is None and qt in ONLY_WITH_IMATRIX:
        with pytest.raises(SlimlmError, match="needs an importance matrix"):
            ggml.quantize(_distributions()["normal"], qt)
        return
    for name, x in _distributions(seed=int(qt)).items():
        ref = oracle.ggml_quantize_chunk(x, qt, im)
        ours = ggml.quantize(x, qt, im)
        assert ours.shape == ref.shape
        bad = np.flatnonzero(~(ours.reshape(-1, GGML_QUANT_SIZES[qt][1]) == ref.reshape(-1, GGML_QUANT_SIZES[qt][1]))
                             .all(axis=1))
        assert bad.size == 0, f"{qt.name} {name} imatrix={with_imatrix}: {bad.size} blocks differ, first {bad[:5]}"


@pytest.mark.parametrize("qt", IQ_TYPES)
def test_encoder_bytes_equal_llama_model_quantize(oracle, qt: T) -> None:
    """Through llama_model_quantize itself (pure mix, one importance vector per tensor), not just the chunk call."""
    d = _distributions(seed=50 + int(qt), rows=4)
    mats = [d["normal"], d["weights_like"]]
    # llama_model_quantize refuses IQ3_XXS without an importance matrix
    ims = [_importance(4) if requires_imatrix("blk.0.ffn_down.weight", qt) else None, _importance(3)]
    refs = oracle.llama_quantize_rows(mats, qt, ims)
    for x, im, ref in zip(mats, ims, refs):
        np.testing.assert_array_equal(ggml.quantize(x, qt, im), ref)


@pytest.mark.parametrize("qt", IQ_TYPES)
def test_decode_equals_gguf_py(qt: T) -> None:
    x = _distributions(seed=9)["normal"]
    q = ggml.quantize(x, qt, _importance(1))
    ours = ggml.dequantize(q, qt, x.shape)
    np.testing.assert_array_equal(ours, gguf_dequantize(q, qt).reshape(x.shape))
    # arbitrary bytes too (any index, sign and scale field), with finite fp16 super-scales
    rng = np.random.default_rng(int(qt))
    bs = GGML_QUANT_SIZES[qt][1]
    raw = rng.integers(0, 256, (64, bs), dtype=np.uint8)
    raw[:, 0:2] = (rng.standard_normal(64) * 0.01).astype(np.float16).view(np.uint8).reshape(64, 2)
    np.testing.assert_array_equal(ggml.dequantize(raw, qt, (64, 256)), gguf_dequantize(raw, qt).reshape(64, 256))


@pytest.mark.parametrize("qt,max_rel_rmse", [(T.IQ4_XS, 0.11), (T.IQ3_S, 0.22), (T.IQ3_XXS, 0.26), (T.IQ2_S, 0.36),
                                             (T.IQ2_XS, 0.40), (T.IQ2_XXS, 0.45), (T.IQ1_M, 0.60),
                                             (T.IQ1_S, 0.65)])
def test_round_trip_error_and_imatrix_benefit(qt: T, max_rel_rmse: float) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, N)).astype(np.float32)
    y = ggml.dequantize(ggml.quantize(x, qt, np.ones(N, np.float32)), qt, x.shape)
    assert np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)) < max_rel_rmse
    imp = (rng.gamma(0.3, 1.0, N) + 1e-3).astype(np.float32)
    err = {}
    for name, im in (("plain", np.ones(N, np.float32)), ("imatrix", imp)):
        y = ggml.dequantize(ggml.quantize(x, qt, im), qt, x.shape)
        err[name] = float(np.sum(imp * (y - x) ** 2))
    assert err["imatrix"] < 0.9 * err["plain"]


def test_rows_must_fill_super_blocks() -> None:
    for qt in IQ_TYPES:
        with pytest.raises(SlimlmError, match="multiple of 256"):
            ggml.quantize(np.zeros((2, 288), np.float32), qt)


def test_which_tensors_need_an_imatrix() -> None:
    assert requires_imatrix("blk.0.ffn_down.weight", T.IQ3_XXS)
    assert not requires_imatrix("blk.0.ffn_down.weight", T.IQ3_S)
    assert not requires_imatrix("token_embd.weight", T.IQ2_XXS) and not requires_imatrix("output.weight", T.IQ1_S)
    assert requires_imatrix("blk.0.attn_q.weight", T.Q2_K, "Q2_K_S") and not requires_imatrix("blk.0.attn_q.weight",
                                                                                               T.Q2_K, "Q2_K")


# ---------------------------------------------------------------- whole files vs llama_model_quantize

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny llama (rows of 256/512), its F32 GGUF, and an importance matrix from a little text."""
    pytest.importorskip("llama_cpp")
    from test_gguf_tiny import CORPUS, make_tiny_model

    from slimlm.quantize.gguf import quantize_gguf
    from slimlm.quantize.imatrix import collect_imatrix, write_imatrix

    base = tmp_path_factory.mktemp("iq")
    src = make_tiny_model(base / "hf", layers=3, ffn=512)
    quantize_gguf(src, "f32", base / "f32.gguf")
    calib = base / "calib.txt"
    calib.write_text(" ".join(CORPUS * 3))
    write_imatrix(collect_imatrix(src, calib, ctx=64, chunks=2), base / "im.dat")
    return src, base / "f32.gguf", base / "im.dat"


def _same_file(tiny, tmp_path: Path, mix: str, with_imatrix: bool) -> set[str]:
    from test_gguf_mix_llamacpp import llama_quantize
    from test_quantize_gguf import tensor_bytes

    from slimlm.quantize.gguf import quantize_gguf

    src, f32, im = tiny
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize_gguf(src, mix, ours, imatrix=im if with_imatrix else None)
    llama_quantize(f32, theirs, mix, imatrix=im if with_imatrix else None)
    a, b = tensor_bytes(ours), tensor_bytes(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], f"{mix} {name}: {a[name][0]} vs llama.cpp {b[name][0]}"
        assert a[name][1] == b[name][1], f"{mix} {name} ({a[name][0]}) bytes differ"
    return {t for t, _ in a.values()}


MIX_FILES = {  # mix -> (with an imatrix, a type the file must hold)
    "IQ4_XS": (False, "IQ4_XS"), "IQ4_XS+im": (True, "IQ4_XS"), "IQ3_S": (False, "IQ3_S"), "IQ3_M": (True, "IQ3_S"),
    "IQ3_XS": (True, "IQ3_XXS"), "IQ3_XXS": (True, "IQ2_S"), "IQ2_M": (True, "IQ2_S"), "IQ2_S": (True, "IQ2_XS"),
    "IQ2_XS": (True, "IQ2_XS"), "IQ2_XXS": (True, "IQ2_XXS"), "IQ1_S": (True, "IQ1_S"), "IQ1_M": (True, "IQ1_M"),
}


@pytest.mark.parametrize("case", MIX_FILES)
def test_mix_file_equals_llama_cpp(tiny, tmp_path: Path, case: str) -> None:
    with_imatrix, must_hold = MIX_FILES[case]
    types = _same_file(tiny, tmp_path, case.split("+")[0], with_imatrix)
    assert must_hold in types


def test_low_bit_mix_without_imatrix_is_refused(tiny, tmp_path: Path) -> None:
    from slimlm.quantize.gguf import quantize_gguf

    with pytest.raises(SlimlmError, match="needs an importance matrix"):
        quantize_gguf(tiny[0], "IQ3_XS", tmp_path / "x.gguf")
    assert quantize_gguf(tiny[0], "IQ3_XS", dry_run=True).dry_run  # sizing a plan needs no imatrix
