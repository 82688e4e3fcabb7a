"""slimlm quantize --to TYPE: every mix, byte-compared with llama.cpp's own quantizer; overrides, dry run,
re-quantizing, and llama.cpp loading and generating from each file."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_gguf_tiny import make_tiny_model

from slimlm.evaluate.llamacpp import open_llama

from slimlm.errors import SlimlmError
from slimlm.quantize.gguf import file_type_of, quantize_gguf

MIXES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
         "Q5_K_S", "Q5_K_M", "Q6_K"]


def llama_cpp_quantize(src: Path, dst: Path, ftype: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type_of(ftype))
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama (rows of 256/512, so k-quants apply) and its F32 GGUF written by us."""
    base = tmp_path_factory.mktemp("tiny")
    src = make_tiny_model(base / "hf", layers=4, ffn=768)
    quantize_gguf(src, "f32", base / "f32.gguf")
    return src, base / "f32.gguf"


@pytest.mark.parametrize("mix", MIXES)
def test_same_bytes_as_llama_cpp(mix: str, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Our file from the HF dir and llama.cpp's file from our F32 GGUF: same types, same bytes, tensor by tensor."""
    src, f32 = tiny
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    result = quantize_gguf(src, mix, ours)
    llama_cpp_quantize(f32, theirs, mix)
    a, b = tensor_bytes(ours), tensor_bytes(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], f"{name}: {a[name][0]} vs llama.cpp {b[name][0]}"
        assert a[name][1] == b[name][1], f"{name} ({a[name][0]}) bytes differ"
    assert result.tensor_bytes == sum(len(v[1]) for v in a.values())
    assert gguf.GGUFReader(ours).fields["general.file_type"].contents() == int(file_type_of(mix))


@pytest.mark.parametrize("mix", ["Q8_0", "Q2_K", "Q4_K_M", "Q5_1"])
def test_llama_cpp_loads_and_generates(mix: str, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    out = tmp_path / f"{mix}.gguf"
    quantize_gguf(tiny[0], mix, out)
    llm = open_llama(out, n_ctx=64)
    text = llm.create_completion("The quick brown", max_tokens=8, temperature=0)["choices"][0]
    assert text["finish_reason"] in ("length", "stop") and llm.n_tokens > 3


def test_tensor_type_override_and_dry_run(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    src, f32 = tiny
    out = tmp_path / "x.gguf"
    dry = quantize_gguf(src, "Q4_K_M", out, tensor_types=[r"attn_v=q8_0", r"blk\.0\.ffn_down=f16"], dry_run=True)
    assert not out.exists()
    types = {t.name: t.type for t in dry.tensors}
    assert all(types[f"blk.{i}.attn_v.weight"] == "Q8_0" for i in range(4))
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.1.ffn_down.weight"] in ("Q4_K", "Q6_K")
    real = quantize_gguf(src, "Q4_K_M", out, tensor_types=[r"attn_v=q8_0", r"blk\.0\.ffn_down=f16"])
    assert real.tensor_bytes == dry.tensor_bytes
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert got == types
    with pytest.raises(SlimlmError, match="expected REGEX=TYPE"):
        quantize_gguf(src, "Q4_K_M", tmp_path / "y.gguf", tensor_types=["attn_v"])


def test_requantize_from_gguf_warns_and_matches(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    src, f32 = tiny
    from_f32 = quantize_gguf(f32, "Q4_K_M", tmp_path / "a.gguf")
    from_hf = quantize_gguf(src, "Q4_K_M", tmp_path / "b.gguf")
    assert tensor_bytes(tmp_path / "a.gguf") == tensor_bytes(tmp_path / "b.gguf")
    assert from_f32.warnings and not from_hf.warnings
    again = quantize_gguf(tmp_path / "a.gguf", "Q8_0", tmp_path / "c.gguf")
    assert "already quantized" in again.warnings[0]
    meta = gguf.GGUFReader(tmp_path / "c.gguf").fields
    assert meta["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert meta["tokenizer.ggml.model"].contents() == "gpt2"


def test_cli_dry_run_json(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slimlm.cli import app

    res = CliRunner().invoke(app, ["quantize", str(tiny[0]), "--to", "q3_k_m", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["dry_run"] and data["ftype"] == "Q3_K_M" and data["file_bytes"] is None
    assert sum(t["bytes"] for t in data["tensors"]) == data["tensor_bytes"]
