"""Lazy checkpoint readers: HF dirs (single and sharded), .safetensors, .gguf, config.json alone.

Oracles: the safetensors library's own header view (safe_open) and the gguf package's writer/reader;
files are written by the formats' own writers (safetensors.numpy.save_file, transformers save_pretrained,
gguf.GGUFWriter). The builders here are reused by the fuzz and CLI tests.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from slimlm.checkpoint import open_checkpoint
from slimlm.errors import SlimlmError
from slimlm.inspect import inspect

TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True}


def tiny_llama_tensors(config: dict = TINY_CONFIG, dtype=np.float16) -> dict[str, np.ndarray]:
    """The tensor table of a Llama described by ``config`` (HF names), small random values."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    rng = np.random.default_rng(0)
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    if not config.get("tie_word_embeddings"):
        out["lm_head.weight"] = (v, h)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in out.items()}


TINY_TOTAL = sum(t.size for t in tiny_llama_tensors().values())


def write_safetensors_dir(path: Path, config: dict = TINY_CONFIG, shards: int = 1) -> Path:
    """An HF dir written with the safetensors library: one file, or ``shards`` files plus index.json."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = tiny_llama_tensors(config)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(path / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def write_tiny_gguf(path: Path, *, tied: bool = True, quant: str = "Q8_0") -> Path:
    """A tiny Llama GGUF written by gguf.GGUFWriter, with tokenizer arrays and one quantized tensor type."""
    import gguf

    h, f, v, layers = 64, 128, 256, 2
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(f)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(v)])
    writer.add_token_types([1] * v)
    qtype = gguf.GGMLQuantizationType[quant]

    def add(name: str, shape: tuple[int, ...], q: bool) -> None:
        data = rng.standard_normal(shape).astype(np.float32)
        if q:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)

    add("token_embd.weight", (v, h), True)
    for i in range(layers):
        for name, shape in (("attn_q", (h, h)), ("attn_k", (32, h)), ("attn_v", (32, h)), ("attn_output", (h, h)),
                            ("ffn_gate", (f, h)), ("ffn_up", (f, h)), ("ffn_down", (h, f))):
            add(f"blk.{i}.{name}.weight", shape, True)
        add(f"blk.{i}.attn_norm.weight", (h,), False)
        add(f"blk.{i}.ffn_norm.weight", (h,), False)
    add("output_norm.weight", (h,), False)
    if not tied:
        add("output.weight", (v, h), True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------------------------- tests

def test_safetensors_header_matches_the_library(tmp_path):
    from safetensors import safe_open

    model = write_safetensors_dir(tmp_path / "m")
    ckpt = open_checkpoint(model)
    assert ckpt.format == "hf-dir" and ckpt.missing_bytes == 0 and ckpt.warnings == []
    with safe_open(str(model / "model.safetensors"), "np") as f:
        expected = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert {t.name: (t.shape, t.dtype) for t in ckpt.tensors} == expected
    assert all(t.nbytes == 2 * t.numel for t in ckpt.tensors)
    report = inspect(model)
    assert report.total_params == TINY_TOTAL == report.config_total_params
    assert report.params.tied_embeddings and report.params.roles["lm_head"] == 0
    assert report.dtypes == {"F16": {"tensors": len(expected), "params": TINY_TOTAL, "scales": 0,
                                        "bytes": 2 * TINY_TOTAL}}


def test_sharded_dir_equals_single_file(tmp_path):
    single = inspect(write_safetensors_dir(tmp_path / "one"))
    sharded_dir = write_safetensors_dir(tmp_path / "three", shards=3)
    ckpt = open_checkpoint(sharded_dir)
    assert len({t.file for t in ckpt.tensors}) == 3
    sharded = inspect(sharded_dir)
    assert sharded.total_params == single.total_params and sharded.params.roles == single.params.roles


def test_transformers_export_counts_exactly(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    report = inspect(tiny_llama_dir)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.params.tied_embeddings and report.warnings == []


def test_untied_lm_head_is_counted(tmp_path):
    config = {**TINY_CONFIG, "tie_word_embeddings": False}
    report = inspect(write_safetensors_dir(tmp_path / "m", config))
    assert report.params.roles["lm_head"] == 256 * 64 and not report.params.tied_embeddings
    assert report.total_params == TINY_TOTAL + 256 * 64


def test_single_file_and_config_alone(tmp_path):
    model = write_safetensors_dir(tmp_path / "m")
    one_file = inspect(model / "model.safetensors")
    assert one_file.format == "safetensors" and one_file.total_params == TINY_TOTAL
    config_only = inspect(model / "config.json")
    assert config_only.format == "config" and config_only.counted_from == "config"
    assert config_only.total_params == TINY_TOTAL and config_only.params.roles == one_file.params.roles
    (tmp_path / "c").mkdir()
    shutil.copy(model / "config.json", tmp_path / "c" / "config.json")
    assert inspect(tmp_path / "c").format == "config"


def test_partial_download_is_inspected_with_a_warning(tmp_path):
    model = write_safetensors_dir(tmp_path / "m")
    file = model / "model.safetensors"
    full = file.stat().st_size
    with file.open("r+b") as f:
        f.truncate(full - 1000)
    report = inspect(model)
    assert report.total_params == TINY_TOTAL and report.missing_bytes == 1000
    assert len(report.warnings) == 1 and "1,000 bytes short" in report.warnings[0]

    gguf_file = write_tiny_gguf(tmp_path / "t.gguf")
    size = gguf_file.stat().st_size
    with gguf_file.open("r+b") as f:
        f.truncate(size - 4096)
    g = inspect(gguf_file)
    assert g.missing_bytes == 4096 and "4,096 bytes short" in g.warnings[0]
    assert g.total_params == TINY_TOTAL


def test_tiny_gguf_tensors_types_and_config(tmp_path):
    import gguf

    path = write_tiny_gguf(tmp_path / "t.gguf")
    ckpt = open_checkpoint(path)
    reference = gguf.GGUFReader(path)
    assert [(t.name, t.ggml_type, t.nbytes) for t in ckpt.tensors] == \
        [(r.name, r.tensor_type.name, int(r.n_bytes)) for r in reference.tensors]
    assert [t.shape for t in ckpt.tensors] == [tuple(reversed(r.shape.tolist())) for r in reference.tensors]
    assert [t.offset for t in ckpt.tensors] == [r.data_offset for r in reference.tensors]
    assert ckpt.config["num_hidden_layers"] == 2 and ckpt.config["tie_word_embeddings"] is True
    assert ckpt.gguf_metadata["tokenizer.ggml.tokens"] == "<array of 256 string>"
    report = inspect(path)
    assert report.total_params == TINY_TOTAL == report.config_total_params
    mix = {row["type"]: row for row in report.gguf["quant_mix"]}
    assert mix["Q8_0"]["bits_per_weight"] == 8.5 and mix["F32"]["bits_per_weight"] == 32.0
    untied = inspect(write_tiny_gguf(tmp_path / "u.gguf", tied=False))
    assert untied.params.roles["lm_head"] == 256 * 64 and not untied.params.tied_embeddings


@pytest.mark.slow
def test_smollm2_gguf_and_hf_export_count_134515008(smollm2_gguf, smollm2_hf_dir):
    from_gguf = inspect(smollm2_gguf)
    from_hf = inspect(smollm2_hf_dir)
    for report in (from_gguf, from_hf):
        assert report.total_params == 134_515_008 and report.label == "135M"
        assert report.params.tied_embeddings and report.warnings == []
    assert from_gguf.params.roles == from_hf.params.roles
    assert from_gguf.params.roles["embeddings"] == 49152 * 576
    mix = {row["type"]: row["tensors"] for row in from_gguf.gguf["quant_mix"]}
    assert mix == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert from_gguf.gguf["file_bits_per_weight"] == round(smollm2_gguf.stat().st_size * 8 / 134_515_008, 4)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_files_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04\x95 not loaded")
    with pytest.raises(SlimlmError, match="pickle weights .* refused"):
        open_checkpoint(tmp_path / name)
    (tmp_path / "config.json").unlink(missing_ok=True)
    with pytest.raises(SlimlmError, match="only pickle weights"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    model = write_safetensors_dir(tmp_path / "m", shards=2)
    next(model.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(SlimlmError, match="lists shard model-00002-of-00002.safetensors which is not in the folder"):
        open_checkpoint(model)


def test_moe_gguf_roles_and_derived_config_match_the_hf_count(tmp_path):
    """A Qwen2-MoE GGUF with llama.cpp's tensor names (stacked *_exps experts, *_shexp shared expert,
    ffn_gate_inp router, q/k/v biases): the config derived from its metadata and its tensor table agree
    with the count computed for the equivalent HF config."""
    import gguf

    from slimlm.inspect.params import count_spec
    from slimlm.spec import ModelSpec

    h, layers, heads, kv_heads, vocab, n_exp, k, moe_ff, shared_ff = 64, 2, 4, 2, 128, 4, 2, 32, 96
    hd = h // heads
    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "qwen2moe")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_feed_forward_length(moe_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(k)
    w.add_expert_feed_forward_length(moe_ff)
    w.add_expert_shared_feed_forward_length(shared_ff)
    zeros = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", zeros(vocab, h))
    w.add_tensor("output.weight", zeros(vocab, h))
    w.add_tensor("output_norm.weight", zeros(h))
    for i in range(layers):
        p = f"blk.{i}."
        for name, shape in (("attn_q.weight", (heads * hd, h)), ("attn_k.weight", (kv_heads * hd, h)),
                            ("attn_v.weight", (kv_heads * hd, h)), ("attn_output.weight", (h, heads * hd)),
                            ("attn_q.bias", (heads * hd,)), ("attn_k.bias", (kv_heads * hd,)),
                            ("attn_v.bias", (kv_heads * hd,)), ("attn_norm.weight", (h,)), ("ffn_norm.weight", (h,)),
                            ("ffn_gate_inp.weight", (n_exp, h)), ("ffn_gate_exps.weight", (n_exp, moe_ff, h)),
                            ("ffn_up_exps.weight", (n_exp, moe_ff, h)), ("ffn_down_exps.weight", (n_exp, h, moe_ff)),
                            ("ffn_gate_inp_shexp.weight", (1, h)), ("ffn_gate_shexp.weight", (shared_ff, h)),
                            ("ffn_up_shexp.weight", (shared_ff, h)), ("ffn_down_shexp.weight", (h, shared_ff))):
            w.add_tensor(p + name, zeros(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    report = inspect(tmp_path / "moe.gguf")
    hf_config = {"model_type": "qwen2_moe", "hidden_size": h, "intermediate_size": moe_ff, "num_hidden_layers": layers,
                 "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
                 "num_experts": n_exp, "num_experts_per_tok": k, "moe_intermediate_size": moe_ff,
                 "shared_expert_intermediate_size": shared_ff}
    expected = count_spec(ModelSpec.from_config(hf_config))
    spec = report.spec
    assert (spec.model_type, spec.n_experts, spec.n_experts_per_tok, spec.moe_layers, spec.shared_expert_gate) == \
        ("qwen2_moe", n_exp, k, (0, 1), True)
    assert report.total_params == expected.total == report.config_total_params
    assert report.params.roles == expected.roles
    assert report.params.active == expected.active and report.params.router == layers * n_exp * h
    assert report.warnings == []
