"""Seeded random checkpoints at real models' exact shapes, written tensor by tensor (never the model in memory).

Benchmark and test fixtures: random weights say nothing about quality, but they measure time, memory and the
plumbing at real width. The files are what the hub ships: ``config.json``, safetensors shards of at most
``max_shard_bytes`` named ``model-00001-of-00004.safetensors`` and ``model.safetensors.index.json``
(``metadata.total_size`` + ``weight_map``). A DeepSeek-V3 config with its ``quantization_config`` (fp8, e4m3,
``weight_block_size`` [128, 128]) gets DeepSeek's FP8 block format: every Linear weight of the decoder layers as
``F8_E4M3`` with an ``F32`` ``<name>_scale_inv`` of ceil(rows/128) x ceil(cols/128) that multiplies each
128x128 block back; embeddings, norms, the router and ``lm_head`` stay BF16 (the router bias F32), as in
DeepSeek's files. Each tensor's values come from its own generator seeded by (seed, position), so the same call
writes the same bytes, and memory holds one chunk of rows at a time.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from slimlm.writers.atomic import check_output, publish, temp_dir

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest float8_e4m3fn value: each block's largest |weight| maps to it
_CHUNK_VALUES = 1 << 24  # values generated at once (64 MB of float32)
_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}


def qwen2_config(*, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                 rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6, max_positions: int = 131072,
                 tie: bool = False, name: str | None = None) -> dict[str, Any]:
    """A Qwen2 config.json as DeepSeek-R1-Distill-Qwen ships it (q/k/v biases, untied lm_head, bf16)."""
    config = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
              "bos_token_id": min(151643, vocab - 1), "eos_token_id": min(151643, vocab - 1), "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
              "intermediate_size": ffn, "max_position_embeddings": max_positions, "max_window_layers": layers,
              "model_type": "qwen2", "num_attention_heads": heads, "num_hidden_layers": layers,
              "num_key_value_heads": kv_heads, "rms_norm_eps": rms_norm_eps, "rope_theta": rope_theta,
              "sliding_window": 4096, "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
              "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": vocab}
    if name:
        config["_name_or_path"] = name
    return config


def deepseek_v3_config(*, hidden: int = 7168, layers: int = 2, dense_layers: int = 1, ffn: int = 18432,
                       moe_ffn: int = 2048, experts: int = 256, experts_per_tok: int = 8, heads: int = 128,
                       q_lora_rank: int = 1536, kv_lora_rank: int = 512, nope: int = 128, rope: int = 64,
                       v_head: int = 128, vocab: int = 129280, n_group: int = 8, topk_group: int = 4,
                       name: str | None = None) -> dict[str, Any]:
    """DeepSeek-V3's config.json (defaults: its real widths) cut to ``layers`` layers, the first ``dense_layers``
    dense, no MTP module, FP8 block quantization as shipped."""
    config = {"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": dense_layers,
              "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": ffn,
              "kv_lora_rank": kv_lora_rank, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
              "moe_intermediate_size": moe_ffn, "moe_layer_freq": 1, "n_group": n_group, "n_routed_experts": experts,
              "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": heads,
              "num_experts_per_tok": experts_per_tok, "num_hidden_layers": layers, "num_key_value_heads": heads,
              "num_nextn_predict_layers": 0, "q_lora_rank": q_lora_rank, "qk_nope_head_dim": nope,
              "qk_rope_head_dim": rope,
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [FP8_BLOCK, FP8_BLOCK]},
              "rms_norm_eps": 1e-6,
              "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "original_max_position_embeddings": 4096, "type": "yarn"},
              "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
              "tie_word_embeddings": False, "topk_group": topk_group, "topk_method": "noaux_tc",
              "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": v_head, "vocab_size": vocab}
    if name:
        config["_name_or_path"] = name
    return config


# The real models' shapes (their hub config.json files' sizes).
PRESETS: dict[str, dict[str, Any]] = {
    "r1-distill-qwen-7b": qwen2_config(hidden=3584, layers=28, ffn=18944, heads=28, kv_heads=4, vocab=152064,
                                       name="synthetic/DeepSeek-R1-Distill-Qwen-7B-shaped"),
    "r1-distill-qwen-14b": qwen2_config(hidden=5120, layers=48, ffn=13824, heads=40, kv_heads=8, vocab=152064,
                                        rope_theta=1000000.0, rms_norm_eps=1e-5,
                                        name="synthetic/DeepSeek-R1-Distill-Qwen-14B-shaped"),
    "qwen2.5-0.5b": qwen2_config(hidden=896, layers=24, ffn=4864, heads=14, kv_heads=2, vocab=151936,
                                 rope_theta=1000000.0, max_positions=32768, tie=True, name="synthetic/Qwen2.5-0.5B-shaped"),
    "deepseek-v3-slice": deepseek_v3_config(name="synthetic/DeepSeek-V3-slice-2-layers"),
}


def tensor_plan(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor the config's checkpoint holds, in the order they are written."""
    if config["model_type"] == "qwen2":
        return _qwen2_tensors(config)
    if config["model_type"] == "deepseek_v3":
        return _deepseek_v3_tensors(config)
    raise ValueError(f"no synthetic layout for model_type {config['model_type']!r}")


def _qwen2_tensors(c: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h), "BF16")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "BF16"),
                (p + "self_attn.q_proj.weight", (q, h), "BF16"), (p + "self_attn.q_proj.bias", (q,), "BF16"),
                (p + "self_attn.k_proj.weight", (kv, h), "BF16"), (p + "self_attn.k_proj.bias", (kv,), "BF16"),
                (p + "self_attn.v_proj.weight", (kv, h), "BF16"), (p + "self_attn.v_proj.bias", (kv,), "BF16"),
                (p + "self_attn.o_proj.weight", (h, q), "BF16"),
                (p + "post_attention_layernorm.weight", (h,), "BF16"),
                (p + "mlp.gate_proj.weight", (f, h), "BF16"), (p + "mlp.up_proj.weight", (f, h), "BF16"),
                (p + "mlp.down_proj.weight", (h, f), "BF16")]
    out.append(("model.norm.weight", (h,), "BF16"))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h), "BF16"))
    return out


def _fp8(name: str, rows: int, cols: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name, (rows, cols), "F8_E4M3"),
            (name + "_scale_inv", (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)), "F32")]


def _deepseek_v3_tensors(c: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    h, v, n = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
    qr, kvr, nope, rope, vd = c["q_lora_rank"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], \
        c["v_head_dim"]
    out = [("model.embed_tokens.weight", (v, h), "BF16")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "BF16"), (p + "post_attention_layernorm.weight", (h,), "BF16")]
        a = p + "self_attn."
        out += _fp8(a + "q_a_proj.weight", qr, h) + [(a + "q_a_layernorm.weight", (qr,), "BF16")]
        out += _fp8(a + "q_b_proj.weight", n * (nope + rope), qr)
        out += _fp8(a + "kv_a_proj_with_mqa.weight", kvr + rope, h) + [(a + "kv_a_layernorm.weight", (kvr,), "BF16")]
        out += _fp8(a + "kv_b_proj.weight", n * (nope + vd), kvr) + _fp8(a + "o_proj.weight", h, n * vd)
        if i < c["first_k_dense_replace"]:
            f = c["intermediate_size"]
            out += _fp8(p + "mlp.gate_proj.weight", f, h) + _fp8(p + "mlp.up_proj.weight", f, h)
            out += _fp8(p + "mlp.down_proj.weight", h, f)
            continue
        f, e = c["moe_intermediate_size"], c["n_routed_experts"]
        out += [(p + "mlp.gate.weight", (e, h), "BF16"), (p + "mlp.gate.e_score_correction_bias", (e,), "F32")]
        for x in range(e):
            ex = f"{p}mlp.experts.{x}."
            out += _fp8(ex + "gate_proj.weight", f, h) + _fp8(ex + "up_proj.weight", f, h)
            out += _fp8(ex + "down_proj.weight", h, f)
        sf = f * c["n_shared_experts"]
        s = p + "mlp.shared_experts."
        out += _fp8(s + "gate_proj.weight", sf, h) + _fp8(s + "up_proj.weight", sf, h) + _fp8(s + "down_proj.weight", h, sf)
    out += [("model.norm.weight", (h,), "BF16"), ("lm_head.weight", (v, h), "BF16")]
    return out


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _BYTES[dtype]


def shard_plan(plan: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int
               ) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Tensors in order, cut into shards of at most ``max_shard_bytes`` (a bigger tensor alone in its shard);
    a weight and its ``_scale_inv`` always share a shard (the scale is written from the weight's pass)."""
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        nbytes = _nbytes(entry[1], entry[2])
        follows = entry[0].endswith("_scale_inv")
        if shards[-1] and size + nbytes > max_shard_bytes and not follows:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _header(entries: list[tuple[str, tuple[int, ...], str]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the safetensors library pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _row_chunks(rows: int, cols: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    step = max(multiple, (_CHUNK_VALUES // max(cols, 1)) // multiple * multiple)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _values(gen: torch.Generator, name: str, rows: int, cols: int) -> torch.Tensor:
    """Random float32 values that look like a trained tensor's: norms near 1, biases and weights small."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(rows, cols, generator=gen)
    std = 0.02 if cols > 1 else 0.05
    return std * torch.randn(rows, cols, generator=gen)


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv per 128x128 block) with each block's largest |w| at FP8_MAX,
    the way DeepSeek's FP8 checkpoints store a float weight; ``w`` rows a multiple of 128 or the last chunk."""
    rows, cols = w.shape
    rb, cb = math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)
    padded = torch.zeros(rb * FP8_BLOCK, cb * FP8_BLOCK)
    padded[:rows, :cols] = w
    blocks = padded.view(rb, FP8_BLOCK, cb, FP8_BLOCK)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).view(rb * FP8_BLOCK, cb * FP8_BLOCK)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def _write_tensor(f, gen: torch.Generator, name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor | None:
    """Write one tensor's data chunk by chunk; an FP8 weight returns its block scales (written next)."""
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
    scales = []
    for r0, r1 in _row_chunks(rows, cols, FP8_BLOCK if dtype == "F8_E4M3" else 1):
        x = _values(gen, name, r1 - r0, cols)
        if dtype == "F8_E4M3":
            x, scale = fp8_blocks(x)
            scales.append(scale)
        elif dtype == "BF16":
            x = x.to(torch.bfloat16)
        f.write(x.contiguous().view(torch.uint8).numpy().tobytes())
    return torch.cat(scales) if scales else None


def write_checkpoint(out: str | Path, config: dict[str, Any], *, seed: int = 0, max_shard_bytes: int = 5 * 10**9,
                     overwrite: bool = False, progress=None) -> Path:
    """Write the checkpoint ``config`` describes into the dir ``out`` (atomically: a temp dir published at the end).
    ``progress(done_bytes, total_bytes, name)`` is called after each tensor."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output(out, overwrite)
    plan = tensor_plan(config)
    shards = shard_plan(plan, max_shard_bytes)
    total = sum(_nbytes(s, d) for _, s, d in plan)
    tmp = temp_dir(out)
    done = 0
    weight_map: dict[str, str] = {}
    try:
        position = 0
        for k, entries in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            with (tmp / file).open("wb") as f:
                f.write(_header(entries))
                pending: torch.Tensor | None = None
                for name, shape, dtype in entries:
                    weight_map[name] = file
                    if name.endswith("_scale_inv") and pending is not None:
                        assert tuple(pending.shape) == tuple(shape), name
                        f.write(pending.contiguous().numpy().tobytes())
                        pending = None
                    else:
                        gen = torch.Generator().manual_seed(seed * 1_000_003 + position)
                        pending = _write_tensor(f, gen, name, shape, dtype)
                    position += 1
                    done += _nbytes(shape, dtype)
                    if progress is not None:
                        progress(done, total, name)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        publish(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def total_bytes(config: dict[str, Any]) -> int:
    """The tensor bytes ``write_checkpoint`` writes for ``config`` (to check free disk first)."""
    return sum(_nbytes(s, d) for _, s, d in tensor_plan(config))


def expected_counts(config: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per dtype: tensors, elements and bytes the plan holds (what ``inspect`` must report)."""
    rows: dict[str, dict[str, int]] = {}
    for _, shape, dtype in tensor_plan(config):
        row = rows.setdefault(dtype, {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += math.prod(shape)
        row["bytes"] += _nbytes(shape, dtype)
    return rows
