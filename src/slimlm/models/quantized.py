"""``load_quantized(path)``: a transformers model whose Linear layers run on our low-bit kernels (reached through
``load_model(path, kernels=True)``), read from the files directly (no fp32 round trip of the quantized weights):
- compressed-tensors dirs (config.json ``quantization_config``, safetensors), as slimlm, llm-compressor and
  vLLM write them: ``pack-quantized`` int4 → W4A16Linear; ``int-quantized`` int8 with dynamic int8
  activations → W8A8Linear; 8-bit weights without activation quantization → W8A16Linear.
- GGUF files: Q4_0, Q4_1, Q4_K → W4A16Linear at group 32 (codes exact; scale and zero rounded to bf16, the
  kernel's dtype); every other type, Q8_0 included, is dequantized on load to a bf16 DequantLinear (fp32 in
  the reference: the file's values). Q8_0 once ran as W8A8 (one scale per row, per-token int8 activations):
  llama.cpp rounds activations per 32 values, and on Qwen2's outlier channels per-token rounding moved logits
  by up to 8.9 (bf16: 1.2) and broke greedy agreement with llama.cpp (BENCHMARKS.md, Q8_0 greedy, qwen2).
Non-Linear tensors (norms, embeddings) are loaded in the model dtype. ``reference=True`` builds each
module's fp32 reference instead (same integer weights), for accuracy comparisons.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from slimlm.checkpoint import read_state_dict
from slimlm.archs import rope_heads
from slimlm.checkpoint.names import unpermute_for_rope
from slimlm.errors import SlimlmError
from slimlm.models.from_gguf import GGUFModelFile, apply_rope_factors, open_gguf_model
from slimlm.models.skeleton import empty_model, is_gguf_file, load_config
from slimlm.runtime import gguf_blocks
from slimlm.runtime.linear import DequantLinear, QuantLinear, W4A16Linear, W8A8Linear, W8A16Linear
from slimlm.runtime.swap import fuse_siblings, set_module, untie_lm_head
from slimlm.writers.compressed_tensors import args_for, read_codes

# How each GGUF type runs, and what the mapping loses (stated in reports and tested).
MAPPINGS = {
    "Q4_0": "W4A16 g32: codes exact, scale rounded to bf16 (≤ 2^-9 relative)",
    "Q4_1": "W4A16 g32: codes exact, scale and zero (8d+m) rounded to bf16",
    "Q4_K": "W4A16 g32: codes exact, scale d·sc and zero 8·d·sc−dmin·m rounded to bf16",
}


def _finish(model: nn.Module, plain: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """Load the non-quantized tensors and check nothing is missing (buffers: empty_model keeps them real)."""
    fuse_siblings(model)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in plain]
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" in missing and "model.embed_tokens.weight" in plain:
        missing.remove("lm_head.weight")
    if missing:
        raise SlimlmError(f"the file lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
    model.load_state_dict({k: v.to(dtype) for k, v in plain.items()}, strict=False, assign=True)
    if tied and isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf is not None and buf.device.type == "meta":
            raise SlimlmError(f"buffer {name} was not initialised")
    return model.eval()


# ---------------------------------------------------------------- compressed-tensors
def _static_input_scale(name: str, state: dict[str, torch.Tensor], act: dict) -> torch.Tensor | None:
    """The calibrated per-tensor activation scale of a static-activation Linear (None when dynamic): running
    such a file with per-token scales instead would measure another model than vLLM and transformers run."""
    if act.get("dynamic", True) is not False:
        return None
    if f"{name}.input_scale" not in state:
        raise SlimlmError(f"{name}: static activations in the config but no {name}.input_scale in the file")
    return state[f"{name}.input_scale"]


def _ct_module(name: str, state: dict[str, torch.Tensor], group: dict, bias: torch.Tensor | None,
               reference: bool) -> QuantLinear:
    wargs = group["weights"]
    bits, gsize = wargs["num_bits"], wargs.get("group_size")
    q, scale, zero = read_codes(state, name, bits)
    n, k = q.shape
    act = group.get("input_activations")
    if bits == 8 and zero is None and scale.shape[1] == 1:
        if act is not None and act.get("num_bits") == 8:
            module: QuantLinear = W8A8Linear(q, scale[:, 0], bias, _static_input_scale(name, state, act))
        else:
            module = W8A16Linear(q, scale[:, 0], bias)
    elif bits == 4:
        if gsize is None:  # channel strategy: the row's scale repeated over kernel-sized groups (exact)
            gsize = next((g for g in (128, 64, 32) if k % g == 0), 32)
            reps = -(-k // gsize)
            scale = scale.reshape(n, 1).expand(n, reps).contiguous()
            zero = None if zero is None else zero.reshape(n, 1).expand(n, reps).contiguous()
        module = W4A16Linear.from_signed(q, scale, zero, gsize, bias)
    else:  # other bit widths, grouped or asymmetric int8: correct but without a fast kernel
        g = q.float().reshape(n, scale.shape[1], -1)
        if zero is not None:
            g = g - zero.float().reshape(n, -1, 1)
        module = DequantLinear((g * scale.reshape(n, -1, 1)).reshape(n, k), bias, torch.bfloat16).pack_()
    return module.to_reference() if reference else module


def load_compressed_tensors(model_dir: Path, reference: bool = False, progress: Callable[[str], None] | None = None,
                            dtype: torch.dtype | None = None) -> nn.Module:
    config = load_config(model_dir)
    qcfg = getattr(config, "quantization_config", None)
    qcfg = qcfg if isinstance(qcfg, dict) else (qcfg.to_dict() if qcfg is not None else None)
    if not qcfg or qcfg.get("quant_method") != "compressed-tensors":
        raise SlimlmError(f"{model_dir} is not a compressed-tensors model (no quantization_config)")
    del config.quantization_config
    state = read_state_dict(model_dir)
    dtype = dtype or _default_dtype(reference)
    model = empty_model(config, dtype)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plain = {k: v for k, v in state.items()
             if not k.rsplit(".", 1)[-1].startswith(("weight_packed", "weight_scale", "weight_zero_point",
                                                     "weight_shape", "input_scale"))}
    for name in linears:
        group = args_for(qcfg, name)
        if group is None or f"{name}.weight_scale" not in state:
            continue
        bias = state.get(f"{name}.bias")
        if name.endswith("lm_head"):
            untie_lm_head(model)
        set_module(model, name, _ct_module(name, state, group, bias, reference))
        plain.pop(f"{name}.weight", None)
        plain.pop(f"{name}.bias", None)
        if progress:
            progress(name)
    return _finish(model, plain, dtype)


# ---------------------------------------------------------------- GGUF
def _gguf_module(raw: np.ndarray, qtype: str, perm: torch.Tensor | None, reference: bool,
                 dequant: Callable[[], np.ndarray]) -> QuantLinear:
    if qtype in gguf_blocks.INT4_SPLITTERS:
        u, scale, zero = gguf_blocks.INT4_SPLITTERS[qtype](raw)
        if perm is not None:
            u, scale, zero = u[perm], scale[perm], zero[perm]
        module: QuantLinear = W4A16Linear(u, scale, zero, 32)
    else:
        w = torch.from_numpy(np.array(dequant(), dtype=np.float32))
        if perm is not None:
            w = w[perm]
        if reference:  # the file's values exactly (an F32/F16 file's reference is the model it holds)
            return DequantLinear(w, None, torch.float32)
        module = DequantLinear(w, None, torch.bfloat16).pack_()
    return module.to_reference() if reference else module


def _row_permutation(gm: GGUFModelFile, hf_name: str, rows: int) -> torch.Tensor | None:
    """llama.cpp stores Q/K rows permuted for its rope: the inverse as a row permutation of the codes."""
    heads = rope_heads(hf_name, gm.spec, int(gm.config["num_attention_heads"]), int(gm.config["num_key_value_heads"]))
    if heads is None:
        return None
    return torch.from_numpy(unpermute_for_rope(np.arange(rows), heads).copy())


def load_gguf(path: Path, reference: bool = False, progress: Callable[[str], None] | None = None,
              dtype: torch.dtype | None = None) -> nn.Module:
    gm = open_gguf_model(path)
    if gm.spec.experts:
        raise SlimlmError(f"{path}: the low-bit runtime does not run {gm.spec.model_type} (mixture of experts) yet; "
                          "load_model(path) without kernels loads it dequantized")
    dtype = dtype or _default_dtype(reference)
    model = empty_model(gm.hf_config(), dtype)
    name_map = {g[0]: hf_name for hf_name in model.state_dict() if (g := gm.sources(hf_name)) is not None}
    gm.ckpt.check_complete()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plain: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}  # set on the quantized modules (load_state_dict skips their None buffer)
    embedding_raw = None
    for info in gm.ckpt.tensors:
        hf_name = name_map.get(info.name)
        if hf_name is None:
            continue
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        raw = gm.ckpt.load_raw(info).reshape(rows, -1)

        def dequant(name=info.name):
            return gm.dequantize(name)

        perm = _row_permutation(gm, hf_name, info.shape[0])
        module_name = hf_name.removesuffix(".weight")
        if module_name in linears and hf_name.endswith(".weight"):
            set_module(model, module_name, _gguf_module(np.asarray(raw), info.ggml_type, perm, reference, dequant))
            if progress:
                progress(module_name)
        else:
            w = torch.from_numpy(np.array(gm.to_hf(hf_name)(dequant()), dtype=np.float32))
            if hf_name.endswith(".bias") and hf_name.removesuffix(".bias") in linears:
                biases[hf_name.removesuffix(".bias")] = w
            else:
                plain[hf_name] = w
            if hf_name == "model.embed_tokens.weight":
                embedding_raw = (np.asarray(raw), info.ggml_type, dequant)
    # Tied output: llama.cpp files without output.weight reuse token_embd for lm_head.
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.weight.device.type == "meta" and embedding_raw is not None:
        untie_lm_head(model)
        set_module(model, "lm_head", _gguf_module(embedding_raw[0], embedding_raw[1], None, reference,
                                                  embedding_raw[2]))
    for module_name, bias in biases.items():
        model.get_submodule(module_name).bias = bias
    model = _finish(model, plain, dtype)
    apply_rope_factors(model, gm.rope_factors())
    return model


def _default_dtype(reference: bool) -> torch.dtype:
    """bf16 around the low-bit kernels (what they take and give); fp32 around the reference modules."""
    return torch.float32 if reference else torch.bfloat16


def load_quantized(path: str | Path, reference: bool = False, progress: Callable[[str], None] | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Model of a compressed-tensors dir or a GGUF file: Linear layers on low-bit kernels, the rest in ``dtype``."""
    path = Path(path)
    if not path.exists():
        raise SlimlmError(f"{path} does not exist")
    if path.is_file():
        if not is_gguf_file(path):
            raise SlimlmError(f"{path} is not a GGUF file (bad magic)")
        model = load_gguf(path, reference, progress, dtype)
    else:
        config_path = path / "config.json"
        if not config_path.is_file():
            raise SlimlmError(f"{path} has no config.json")
        if "quantization_config" not in json.loads(config_path.read_text()):
            raise SlimlmError(f"{path} holds no quantized weights (config.json has no quantization_config); "
                              "use quantize_(model, config) to quantize an fp model")
        model = load_compressed_tensors(path, reference, progress, dtype)
    model.slimlm_scheme = ("reference-" if reference else "") + "file"
    return model
