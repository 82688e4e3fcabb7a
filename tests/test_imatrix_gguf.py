"""Importance matrices: llama.cpp's definition, both file forms, quantizing with one (byte-identical to
llama.cpp given the same imatrix), and the errors for an imatrix from another model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf_tiny import CORPUS, make_tiny_model
from test_quantize_gguf import tensor_bytes

from slimlm.errors import SlimlmError
from slimlm.quantize.imatrix import Imatrix, ImatrixEntry, collect_imatrix, read_imatrix, write_imatrix
from slimlm.quantize.gguf import quantize_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("im")
    src = make_tiny_model(base / "hf", layers=3, ffn=512)
    calib = base / "calib.txt"
    calib.write_text(" ".join(CORPUS * 3))
    return src, calib


def test_collect_matches_definition(tiny: tuple[Path, Path]) -> None:
    """Per input column: sum over all calibration tokens of x_j^2; count = tokens; q/k/v share one input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, calib = tiny
    im = collect_imatrix(src, calib, ctx=64, chunks=3)
    assert im.chunk_count == 3 and im.chunk_size == 64
    assert len(im.entries) == 3 * 7
    e = im.entries["blk.1.attn_q.weight"]
    assert e.counts.tolist() == [192.0] and e.sums.shape == (1, 256)
    np.testing.assert_array_equal(e.sums, im.entries["blk.1.attn_v.weight"].sums)
    np.testing.assert_array_equal(im.entries["blk.2.ffn_gate.weight"].sums, im.entries["blk.2.ffn_up.weight"].sums)
    assert im.entries["blk.0.ffn_down.weight"].sums.shape == (1, 512)
    # Recompute blk.0's attention input by hand: the first RMSNorm of the token embeddings.
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = tok.encode(calib.read_text(), add_special_tokens=False)[: 3 * 64]
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(ids)))
    np.testing.assert_allclose(im.entries["blk.0.attn_k.weight"].sums[0], (x.double() ** 2).sum(0).numpy(), rtol=1e-5)


def test_file_round_trips(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    src, calib = tiny
    im = collect_imatrix(src, calib, ctx=64, chunks=2)
    write_imatrix(im, tmp_path / "a.gguf")
    back = read_imatrix(tmp_path / "a.gguf")
    assert back.chunk_count == 2 and back.chunk_size == 64 and back.datasets == ["calib.txt"]
    assert back.entries.keys() == im.entries.keys()
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    # llama.cpp's GGUF layout: <name>.in_sum2 [n_mat, n] and <name>.counts [n_mat, 1], no architecture key
    r = gguf.GGUFReader(tmp_path / "a.gguf")
    shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in r.tensors}
    assert shapes["blk.0.attn_q.weight.in_sum2"] == (1, 256) and shapes["blk.0.attn_q.weight.counts"] == (1, 1)
    assert "general.architecture" not in r.fields and r.fields["general.type"].contents() == "imatrix"
    # Legacy .dat keeps the mean (times ncall), which is all llama-quantize uses.
    write_imatrix(im, tmp_path / "a.dat")
    legacy = read_imatrix(tmp_path / "a.dat")
    assert legacy.chunk_count == 2 and legacy.datasets == ["calib.txt"]
    for name, e in im.entries.items():
        np.testing.assert_allclose(legacy.importance(name), e.importance(), rtol=1e-6)
    assert legacy.entries["blk.0.attn_q.weight"].counts.tolist() == [2.0]  # ncall = tokens / chunk size


def test_quantize_with_imatrix_same_bytes_as_llama_cpp(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from test_gguf_mix_llamacpp import llama_quantize
    src, calib = tiny
    im = collect_imatrix(src, calib, ctx=64, chunks=3)
    write_imatrix(im, tmp_path / "im.dat")
    quantize_gguf(src, "f32", tmp_path / "f32.gguf")
    for mix in ("Q4_K_M", "Q2_K"):
        ours = quantize_gguf(src, mix, tmp_path / f"{mix}.gguf", imatrix=tmp_path / "im.dat")
        assert ours.imatrix_entries == 21
        theirs = tmp_path / f"{mix}-lcpp.gguf"
        llama_quantize(tmp_path / "f32.gguf", theirs, mix, imatrix=tmp_path / "im.dat")
        assert tensor_bytes(tmp_path / f"{mix}.gguf") == tensor_bytes(theirs)
        quantize_gguf(src, mix, tmp_path / f"{mix}-plain.gguf")
        plain = tensor_bytes(tmp_path / f"{mix}-plain.gguf")
        assert plain["blk.0.ffn_down.weight"] != tensor_bytes(theirs)["blk.0.ffn_down.weight"]  # the imatrix mattered
        meta = gguf.GGUFReader(tmp_path / f"{mix}.gguf").fields
        assert meta["quantize.imatrix.entries_count"].contents() == 21


def test_imatrix_from_another_model_is_refused(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = tiny
    wrong = Imatrix(entries={"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 128), np.float32),
                                                                  np.ones(1, np.float32))}, chunk_size=512)
    write_imatrix(wrong, tmp_path / "w.gguf")
    with pytest.raises(SlimlmError, match=r"blk\.0\.attn_q\.weight has rows of 256 values but the imatrix has 128"):
        quantize_gguf(src, "Q4_K_M", tmp_path / "o.gguf", imatrix=tmp_path / "w.gguf")
    unrelated = Imatrix(entries={"layers.0.wq": ImatrixEntry(np.ones((1, 256), np.float32), np.ones(1, np.float32))})
    write_imatrix(unrelated, tmp_path / "u.dat")
    with pytest.raises(SlimlmError, match="no entry for any tensor of this model"):
        quantize_gguf(src, "Q4_K_M", tmp_path / "o.gguf", imatrix=tmp_path / "u.dat")
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00garbage")
    with pytest.raises(SlimlmError, match="not a valid llama.cpp imatrix file"):
        read_imatrix(tmp_path / "junk.dat")
    assert not (tmp_path / "o.gguf").exists()


def test_imatrix_cli(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from slimlm.cli import app

    src, calib = tiny
    out = tmp_path / "x.gguf"
    res = CliRunner().invoke(app, ["imatrix", str(src), "--calib", str(calib), "-o", str(out), "--ctx", "64",
                                   "--chunks", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["entries"] == 21 and data["tokens"] == 128 and read_imatrix(out).chunk_count == 2
    res = CliRunner().invoke(app, ["imatrix", str(src), "--calib", str(calib), "-o", str(out)])
    assert res.exit_code != 0 and "already exists" in str(res.exception)
