"""NaN and Inf cannot pass quietly: in a weight (a broken fp16 export) or in calibration activations (an overflow),
quantize refuses with one line naming the tensor or the layer, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_byte_tokenizer, make_tiny_llama
from slimlm.cli import run


@pytest.fixture
def model(tmp_path) -> Path:
    path = make_tiny_llama(tmp_path / "tiny", hidden=32, ffn=64, heads=4, kv_heads=2, vocab=258)
    return make_byte_tokenizer(path)


def _poke(model: Path, name: str, value: float, where: tuple = (0, 0)) -> None:
    file = model / "model.safetensors"
    state = load_file(str(file))
    state[name][where] = value
    save_file(state, str(file), metadata={"format": "pt"})


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("target", [["--to", "Q8_0"], ["--scheme", "w8a16"]])
def test_non_finite_weight_is_refused_per_tensor(model, tmp_path, capsys, value, target):
    name = "model.layers.1.mlp.up_proj.weight"
    _poke(model, name, value)
    out = tmp_path / ("out.gguf" if target[0] == "--to" else "out-ct")
    assert run(["quantize", str(model), *target, "-o", str(out)]) == 2
    line = _one_error(capsys)
    assert name in line and ("1 NaN" in line or "1 Inf" in line), line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]


def test_overflowing_activations_are_refused(model, tmp_path, capsys):
    """Finite weights whose products overflow float32 inside layer 0: the calibration pass reports the layer."""
    state = load_file(str(model / "model.safetensors"))
    for name, value in (("up_proj", 1e4), ("gate_proj", 1e4), ("down_proj", 3e38)):
        state[f"model.layers.0.mlp.{name}.weight"] = torch.full_like(state[f"model.layers.0.mlp.{name}.weight"], value)
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out-ct"
    code = run(["quantize", str(model), "--scheme", "w4a16", "--method", "awq", "--calib", str(text),
                "--samples", "2", "--seq-len", "16", "-o", str(out)])
    assert code == 2
    line = _one_error(capsys)
    assert "calibration activations" in line and "leaving layer 0" in line, line
    assert not out.exists()


def test_recommend_flags_absurd_kld_and_never_chooses_it():
    from slimlm.recommend import choose

    rows = [{"name": "ok", "kld_mean": 0.05, "prefill_tok_s": 10.0, "itl_p50_ms": 5.0, "memory_bytes": 100},
            {"name": "broken", "kld_mean": 7.5, "prefill_tok_s": 99.0, "itl_p50_ms": 1.0, "memory_bytes": 10},
            {"name": "nan", "kld_mean": float("nan"), "prefill_tok_s": 99.0, "itl_p50_ms": 1.0, "memory_bytes": 1}]
    for goal in ("throughput", "latency", "size", "quality"):
        assert choose(rows, goal, max_kld=100.0)[0]["name"] == "ok"
    assert choose(rows[1:], "quality", max_kld=100.0)[0] is None
