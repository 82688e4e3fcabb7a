"""HF dir -> GGUF (F32/F16/BF16): metadata, tokenizer, tensor layout, and llama.cpp agreeing with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf_tiny import make_tiny_model

from slimlm.evaluate.llamacpp import open_llama

from slimlm.errors import SlimlmError
from slimlm.quantize.gguf import quantize_gguf
from slimlm.checkpoint.names import permute_for_rope


def _fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
        tuple(reversed(t.shape.tolist()))) for t in r.tensors}


def _hf_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(model_dir / "model.safetensors")


def test_llama_metadata_and_tensors_f32(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "m", config_extra={"rope_theta": 12345.0, "rms_norm_eps": 3e-6})
    out = tmp_path / "m.gguf"
    result = quantize_gguf(src, "f32", out)
    meta = _fields(out)
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert meta["llama.block_count"] == 2
    assert meta["llama.embedding_length"] == 256
    assert meta["llama.feed_forward_length"] == 512
    assert meta["llama.attention.head_count"] == 4
    assert meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.context_length"] == 1024
    assert meta["llama.rope.dimension_count"] == 64
    assert meta["llama.rope.freq_base"] == pytest.approx(12345.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(3e-6)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == meta["llama.vocab_size"]
    assert len(meta["tokenizer.ggml.merges"]) > 0
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "im_start" in meta["tokenizer.chat_template"]
    # Tensors: GGUF names, Q/K rows in llama.cpp's rope order, everything else bit-identical.
    hf = _hf_state(src)
    got = _tensors(out)
    assert set(got) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    np.testing.assert_array_equal(got["blk.1.attn_q.weight"], permute_for_rope(hf["model.layers.1.self_attn.q_proj.weight"], 4))
    np.testing.assert_array_equal(got["blk.1.attn_k.weight"], permute_for_rope(hf["model.layers.1.self_attn.k_proj.weight"], 2))
    np.testing.assert_array_equal(got["blk.0.ffn_down.weight"], hf["model.layers.0.mlp.down_proj.weight"])
    np.testing.assert_array_equal(got["token_embd.weight"], hf["model.embed_tokens.weight"])
    assert result.file_bytes == out.stat().st_size and result.type_counts == {"F32": 20}


def test_rope_theta_read_from_rope_parameters(tmp_path: Path) -> None:
    """transformers-5 configs keep rope_theta inside rope_parameters; it must not be dropped."""
    src = make_tiny_model(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 54321.0}
    (src / "config.json").write_text(json.dumps(cfg))
    quantize_gguf(src, "f16", tmp_path / "m.gguf")
    assert _fields(tmp_path / "m.gguf")["llama.rope.freq_base"] == pytest.approx(54321.0)


def test_llama3_rope_writes_rope_freqs(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = make_tiny_model(tmp_path / "m", config_extra={"rope_scaling": rope, "rope_theta": 500000.0})
    quantize_gguf(src, "f32", tmp_path / "m.gguf")
    freqs = _tensors(tmp_path / "m.gguf")["rope_freqs.weight"]
    assert freqs.shape == (32,)
    assert freqs[0] == 1.0 and freqs[-1] == 8.0  # highest frequency untouched, lowest scaled by the factor


def test_f16_and_bf16_values(tmp_path: Path) -> None:
    src = make_tiny_model(tmp_path / "m")
    hf = _hf_state(src)
    quantize_gguf(src, "f16", tmp_path / "h.gguf")
    quantize_gguf(src, "bf16", tmp_path / "b.gguf")
    r16 = {t.name: t for t in gguf.GGUFReader(tmp_path / "h.gguf").tensors}
    rbf = {t.name: t for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    w = hf["model.layers.0.mlp.up_proj.weight"]
    assert r16["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(np.asarray(r16["blk.0.ffn_up.weight"].data).reshape(w.shape), w.astype(np.float16))
    assert r16["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # 1-D stays F32
    assert rbf["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    expected = gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16)
    np.testing.assert_array_equal(np.asarray(rbf["blk.0.ffn_up.weight"].data).reshape(expected.shape), expected)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_llama_cpp_logits_match_transformers(arch: str, tmp_path: Path) -> None:
    """The oracle: llama.cpp running our F32 GGUF computes the same logits as transformers on the HF dir."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(tmp_path / "m", arch, tie=arch != "qwen2",
                          config_extra={"rope_theta": 20000.0} if arch != "gemma" else None)
    out = tmp_path / "m.gguf"
    quantize_gguf(src, "f32", out)
    assert _fields(out)["general.architecture"] == arch if arch != "mistral" else "llama"
    ids = list(range(5, 45))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(out, n_ctx=64, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
    with pytest.raises(SlimlmError, match=r"unsupported architecture GPT2LMHeadModel; .*LlamaForCausalLM.*Qwen2ForCausalLM"):
        quantize_gguf(tmp_path / "g", "q8_0", tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


def test_unknown_type_suggests_close_names(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SlimlmError, match="unknown GGUF type mix 'q4_km'; did you mean Q4_K_M"):
        quantize_gguf(tiny_llama_dir, "q4_km", tmp_path / "x.gguf")


def test_existing_output_needs_overwrite(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(SlimlmError, match="already exists; pass --overwrite"):
        quantize_gguf(tiny_llama_dir, "f16", out)
    assert out.read_bytes() == b"keep me"
    quantize_gguf(tiny_llama_dir, "f16", out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_crash_leaves_no_partial_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")
    calls = []

    def failing(values, qtype, importance, name):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return values.astype(np.float16) if qtype == gguf.GGMLQuantizationType.F16 else values

    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_gguf(tiny_llama_dir, "f16", out, overwrite=True, encoder=failing)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama", "x.gguf"]


def test_cli_convert_json_and_errors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slimlm.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--to", "f16", "-o", str(tmp_path / "a.gguf"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["ftype"] == "F16" and data["file_bytes"] == (tmp_path / "a.gguf").stat().st_size
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from slimlm.cli import main; main()", "quantize",
                           str(tiny_llama_dir), "--to", "q9_k", "-o", str(tmp_path / "b.gguf")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown GGUF type mix 'q9_k'" in proc.stderr


def test_add_bos_follows_the_tokenizer(tmp_path: Path) -> None:
    """A tokenizer whose post-processor prepends BOS must say add_bos_token=True, and llama.cpp must do the same."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    src = make_tiny_model(tmp_path / "m", add_bos=True)
    out = tmp_path / "m.gguf"
    quantize_gguf(src, "f16", out)
    meta = _fields(out)
    tok = AutoTokenizer.from_pretrained(src)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    llm = open_llama(out, n_ctx=64)
    assert llm.tokenize(b"sea shells", add_bos=True) == tok.encode("sea shells")
