"""--method gptq: same GGUF types and sizes as llama.cpp's rounding, lower output error on calibration inputs."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from test_gguf_tiny import CORPUS, make_tiny_model

from slimlm.evaluate.llamacpp import open_llama

from slimlm.algorithms.gptq import gptq_encode
from slimlm.errors import SlimlmError
from slimlm.formats import ggml
from slimlm.quantize.imatrix import collect_imatrix
from slimlm.quantize.gguf import quantize_gguf


def _output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    d = (w - q).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL"])
def test_gptq_lowers_output_error(qtype: str) -> None:
    """On correlated inputs, compensating each block's error beats rounding blocks independently."""
    rng = np.random.default_rng(0)
    n, rows = 512, 64
    mix = rng.normal(size=(n, n)) / np.sqrt(n) + np.eye(n)
    x = rng.normal(size=(2048, n)) @ mix * rng.uniform(0.2, 3.0, size=n)  # correlated, uneven channels
    h = x.T @ x / len(x)
    w = rng.normal(scale=0.05, size=(rows, n)).astype(np.float32)
    imp = np.diag(h).astype(np.float32)
    plain = ggml.dequantize(ggml.quantize(w, qtype, imp), qtype, w.shape)
    data = gptq_encode(w, qtype, h, imp)
    assert data.shape == (rows, ggml.row_bytes(qtype, n)) and data.dtype == np.uint8
    ours = ggml.dequantize(data, qtype, w.shape)
    assert _output_error(w, ours, h) < 0.9 * _output_error(w, plain, h)


def test_gptq_file_same_layout_loads_in_llama_cpp(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    src = make_tiny_model(tmp_path / "m", layers=2, hidden=256, ffn=512)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS * 3))
    plain = quantize_gguf(src, "Q4_K_M", tmp_path / "plain.gguf", calib=calib, calib_chunks=2)
    gptq = quantize_gguf(src, "Q4_K_M", tmp_path / "gptq.gguf", calib=calib, calib_chunks=2, method="gptq")
    assert [(t.name, t.type, t.bytes) for t in gptq.tensors] == [(t.name, t.type, t.bytes) for t in plain.tensors]
    assert gptq.tensor_bytes == plain.tensor_bytes  # the file differs only by the slimlm.quantize.method key
    assert 0 < (tmp_path / "gptq.gguf").stat().st_size - (tmp_path / "plain.gguf").stat().st_size <= 64
    llm = open_llama(tmp_path / "gptq.gguf", n_ctx=64)
    assert llm.create_completion("The quick", max_tokens=4, temperature=0)["choices"][0]["finish_reason"]
    # the 512-wide ffn_down has two Q4_K blocks per row: the second absorbs the first one's error
    hessians: dict[str, np.ndarray] = {}
    collect_imatrix(src, calib, chunks=2, hessians=hessians)
    from safetensors.numpy import load_file

    w = load_file(src / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    h = hessians["blk.1.ffn_down.weight"]
    read = {t.name: t for t in gguf.GGUFReader(tmp_path / "gptq.gguf").tensors}
    read_plain = {t.name: t for t in gguf.GGUFReader(tmp_path / "plain.gguf").tensors}

    def deq(t):
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)

    name = "blk.1.ffn_down.weight"
    assert _output_error(w, deq(read[name]), h) < _output_error(w, deq(read_plain[name]), h)


def test_gptq_needs_calibration(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SlimlmError, match="--method gptq needs calibration text"):
        quantize_gguf(tiny_llama_dir, "Q4_K_M", tmp_path / "x.gguf", method="gptq")
    with pytest.raises(SlimlmError, match="--method awq needs calibration"):
        quantize_gguf(tiny_llama_dir, "Q4_K_M", tmp_path / "x.gguf", method="awq")
    with pytest.raises(SlimlmError, match="unknown GGUF method 'smoothquant'"):
        quantize_gguf(tiny_llama_dir, "Q4_K_M", tmp_path / "x.gguf", method="smoothquant")


def test_equalization_is_exact_in_float(tmp_path: Path) -> None:
    """Scales folded into norms (and ffn_up rows) leave the float model's function unchanged."""
    from slimlm.algorithms.awq import apply_equalization, equalization_plan
    from slimlm.quantize.sources import open_source

    src = make_tiny_model(tmp_path / "m", layers=1, hidden=256, ffn=512)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS * 3))
    hessians: dict[str, np.ndarray] = {}
    im = collect_imatrix(src, calib, chunks=2, hessians=hessians)
    source = open_source(src)
    by = {t.name: t.load() for t in source.tensors}
    plan = {n: gguf.GGMLQuantizationType.Q2_K for n in by}
    scales = equalization_plan(lambda n: by[n], set(by), plan, 1, im.importance, hessians)
    assert scales, "Q2_K on random weights should find some scaling worth it"
    fns = apply_equalization(scales, 1)
    new = {n: fns[n](v) if n in fns else v for n, v in by.items()}
    x = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)
    xn = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)

    def silu(v):
        return v / (1 + np.exp(-v))

    for w in (by, new):
        w["_q"] = (xn * w["blk.0.attn_norm.weight"]) @ w["blk.0.attn_q.weight"].T
        h = xn * w["blk.0.ffn_norm.weight"]
        w["_mlp"] = (silu(h @ w["blk.0.ffn_gate.weight"].T) * (h @ w["blk.0.ffn_up.weight"].T)) @ w["blk.0.ffn_down.weight"].T
    np.testing.assert_allclose(new["_q"], by["_q"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["_mlp"], by["_mlp"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_methods_write_same_layout(method: str, tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "m", layers=2, hidden=256, ffn=512)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(CORPUS * 3))
    plain = quantize_gguf(src, "Q3_K_M", tmp_path / "plain.gguf", calib=calib, calib_chunks=2)
    ours = quantize_gguf(src, "Q3_K_M", tmp_path / "x.gguf", calib=calib, calib_chunks=2, method=method)
    assert [(t.name, t.type, t.bytes) for t in ours.tensors] == [(t.name, t.type, t.bytes) for t in plain.tensors]
    meta = gguf.GGUFReader(tmp_path / "x.gguf").fields
    assert meta["slimlm.quantize.method"].contents() == method
