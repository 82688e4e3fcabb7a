"""load_model: HF dirs, GGUF files (dequantized into torch), compressed-tensors dirs, and clear errors."""

from pathlib import Path

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.models import detect_format, load_model


def test_hf_dir_facts(tiny_lm_dir: Path) -> None:
    model, tokenizer, info = load_model(tiny_lm_dir)
    assert info.format == "hf" and info.dtype == "float32" and info.vocab_size == 258
    assert info.n_params == sum(p.numel() for p in model.parameters())
    assert info.add_bos is False and info.bos_token_id == 256 and info.tokenizer == str(tiny_lm_dir)
    assert not model.training
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == tokenizer("a")["input_ids"] + \
        tokenizer("b")["input_ids"]
    bf16 = load_model(tiny_lm_dir, dtype="bf16")
    assert bf16.info.dtype == "bfloat16" and next(bf16.model.parameters()).dtype == torch.bfloat16


def test_gguf_is_dequantized_to_the_same_model(tmp_path: Path) -> None:
    from test_gguf_tiny import make_tiny_model

    from slimlm.quantize.gguf import quantize_gguf

    hf_dir = make_tiny_model(tmp_path / "tiny")
    gguf = tmp_path / "tiny-f32.gguf"
    quantize_gguf(hf_dir, "F32", gguf)
    assert detect_format(gguf) == "gguf"
    from_gguf, from_dir = load_model(gguf), load_model(hf_dir)
    assert from_gguf.info.format == "gguf" and from_gguf.info.n_params == from_dir.info.n_params
    text = "The quick brown fox jumps over the lazy dog, 12345 times."
    ids = from_dir.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert from_gguf.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        a = from_gguf.model(torch.tensor([ids])).logits
        b = from_dir.model(torch.tensor([ids])).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not getattr(from_gguf.model.config, "quantization_config", None)


def test_compressed_tensors_dir_is_decompressed(tiny_lm_dir: Path, tmp_path: Path) -> None:
    from slimlm.writers.compressed_tensors import load_reference_model
    from slimlm.quantize.layers import quantize_model

    out = tmp_path / "w4a16"
    quantize_model(tiny_lm_dir, out, scheme="w4a16", method="rtn", group_size=32)
    loaded = load_model(out)
    assert loaded.info.format == "compressed-tensors" and loaded.tokenizer is not None
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.model(ids).logits
        reference = load_reference_model(out)(ids).logits  # the exporter's own dequantization
        original = load_model(tiny_lm_dir).model(ids).logits
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours, original, atol=1e-3)  # really the 4-bit weights, not the originals


def test_bad_paths_are_one_line_errors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(SlimlmError, match="does not exist"):
        load_model(tmp_path / "missing")
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(SlimlmError, match="pickle files are never loaded"):
        load_model(pickle)
    with pytest.raises(SlimlmError, match="not a model dir"):
        load_model(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SlimlmError, match="not a model slimlm can load"):
        load_model(text)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(SlimlmError, match="no .safetensors weights"):
        load_model(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(SlimlmError, match="only pickle weights"):
        load_model(no_weights)
    with pytest.raises(SlimlmError, match="unknown dtype 'int3'"):
        load_model(tiny_llama_dir, dtype="int3")
    bare = load_model(tiny_llama_dir)
    assert bare.tokenizer is None and bare.info.tokenizer is None
