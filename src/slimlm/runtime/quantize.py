"""``quantize_(model, Config())``: swap a transformers model's ``nn.Linear`` layers for low-bit modules.

One verb plus one config object per scheme, as in torchao. The configs round weights to nearest (RTN) with
min/max parameters here, so a model runs quantized with no file in between; ``load_quantized`` builds the
same modules from files written by slimlm's quantizers (compressed-tensors dirs) or llama.cpp (GGUF).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.runtime.linear import DequantLinear, QuantLinear, W4A16Linear, W8A8Linear, W8A16Linear


@dataclass
class W8A8Config:
    """int8 per-channel symmetric weights, dynamic per-token int8 activations (throughput scheme).

    The rest of the model (norms, attention, activations between layers) runs in ``dtype``: bf16 by
    default, as fast as the bf16 model there, so the int8 GEMMs' gain is not eaten by fp32 elementwise work.
    """

    dtype: torch.dtype = torch.bfloat16  # dtype of everything that is not a quantized Linear
    include_lm_head: bool = True
    scheme: str = field(default="w8a8", init=False)


@dataclass
class W8A16Config:
    """int8 per-channel symmetric weights, bf16 activations."""

    dtype: torch.dtype = torch.bfloat16
    include_lm_head: bool = True
    scheme: str = field(default="w8a16", init=False)


@dataclass
class W4A16Config:
    """int4 group-wise weights (asymmetric by default, as tinygemm computes), bf16 activations (latency scheme).

    When ``group_size`` does not divide a layer's inputs, the largest power of two ≥ 32 below it that does is
    used (SmolLM2's 576 takes 64 when 128 is asked); failing that the layer is padded (see W4A16Linear).
    """

    group_size: int = 128
    symmetric: bool = False
    dtype: torch.dtype = torch.bfloat16
    include_lm_head: bool = True
    scheme: str = field(default="w4a16", init=False)


QuantConfig = W8A8Config | W8A16Config | W4A16Config

CONFIGS: dict[str, Callable[[], QuantConfig]] = {"w8a8": W8A8Config, "w8a16": W8A16Config, "w4a16": W4A16Config}


def config_for(scheme: str) -> QuantConfig:
    try:
        return CONFIGS[scheme.lower()]()
    except KeyError:
        raise SlimlmError(f"unknown runtime scheme {scheme!r}; choose one of {', '.join(CONFIGS)}") from None


def rtn_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: codes in -127..127 and fp32 scales ``(N,)``."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_(min=1e-10) / 127.0
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def effective_group_size(k: int, requested: int) -> int:
    size = requested
    while size >= 32 and k % size:
        size //= 2
    return size if size >= 32 and k % size == 0 else requested


def rtn_int4_groups(w: torch.Tensor, group_size: int, symmetric: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Signed int4 codes (-8..7), scales ``(N, G)`` and integer zero points (None when symmetric).

    compressed-tensors' min/max rule (``w ≈ (q - zero) * scale``), so RTN here equals an RTN export.
    """
    w = w.detach().float()
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / 7.5
        zero = None
    else:
        scale = (hi - lo) / 15.0
    scale = torch.where(scale == 0, torch.full_like(scale, 1e-10), scale)
    x = g / scale[..., None]
    if not symmetric:
        zero = torch.round(-8 - lo / scale).clamp(-8, 7)
        x = x + zero[..., None]
    q = torch.round(x).clamp_(-8, 7).to(torch.int8).reshape(n, k)
    return q, scale, zero


def quantize_linear(linear: nn.Linear, config: QuantConfig, reference: bool = False) -> QuantLinear:
    """One ``nn.Linear`` → its quantized module (or that module's fp32 reference)."""
    w, bias = linear.weight, linear.bias
    if config.scheme in ("w8a8", "w8a16"):
        q, s = rtn_int8_per_channel(w)
        module = (W8A8Linear if config.scheme == "w8a8" else W8A16Linear)(q, s, bias)
    else:
        gs = effective_group_size(w.shape[1], config.group_size)
        if w.shape[1] % gs:
            k_pad = -(-w.shape[1] // gs) * gs
            w = torch.nn.functional.pad(w.detach().float(), (0, k_pad - w.shape[1]))
        q, s, z = rtn_int4_groups(w, gs, config.symmetric)
        module = W4A16Linear.from_signed(q[:, : linear.in_features], s, z, gs, bias)
    return module.to_reference() if reference else module


def linear_names(model: nn.Module, include_lm_head: bool = True) -> list[str]:
    """Names of the ``nn.Linear`` modules to quantize, in model order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not include_lm_head:
        names = [n for n in names if not n.endswith("lm_head")]
    return names


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def untie_lm_head(model: nn.Module) -> None:
    """Keep the input embedding a plain tensor once lm_head becomes a quantized module."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None


def quantize_(model: nn.Module, config: QuantConfig, *, reference: bool = False,
              progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Quantize ``model`` in place; returns ``{module name: kernel it uses}``.

    ``reference=True`` installs each module's plain fp32 reference (same integer weights, dequantized) —
    what tests and perplexity comparisons measure the fast path against.
    """
    names = linear_names(model, config.include_lm_head)
    if not names:
        raise SlimlmError("the model has no nn.Linear layers to quantize")
    model.to(torch.float32 if reference else config.dtype)
    if any(n.endswith("lm_head") for n in names):
        untie_lm_head(model)
    kernels: dict[str, str] = {}
    for name in names:
        module = quantize_linear(model.get_submodule(name), config, reference)
        set_module(model, name, module)
        kernels[name] = module.kernel
        if progress:
            progress(name)
    fuse_siblings(model)
    model.slimlm_scheme = ("reference-" if reference else "") + config.scheme
    return {name: model.get_submodule(name).kernel for name in kernels}


SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # layers reading one input


def fuse_siblings(model: nn.Module) -> int:
    """Give W8A8 layers that read the same input one shared GEMM (oneDNN) or, failing that, one shared
    activation quantization, and W4A16 siblings one shared packed int4 weight (the lean forward runs it as
    one GEMM); returns the number of groups fused."""
    from slimlm.runtime.linear import FusedInt8Group, FusedW4A16

    fused = 0
    for parent_name, parent in model.named_modules():
        for names in SIBLING_GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if FusedW4A16.fusable(members) and not any(getattr(m, "fused", None) for m in members):
                group4 = FusedW4A16(members)
                for m in members:
                    m.fused = group4
                fused += 1
                continue
            if not all(isinstance(m, W8A8Linear) and m.group is None for m in members):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            if all(m.backend == "onednn" and m.bias is None for m in members):
                group = FusedInt8Group(members)
                group.names = list(names)
                for i, m in enumerate(members):
                    m.join(group, i)
                fused += 1
            else:
                for m in members[1:]:
                    m.reuse_input = True
    return fused


def kernel_report(model: nn.Module) -> dict[str, str]:
    """``{module name: kernel}`` for every quantized or dequantized Linear in ``model``."""
    return {n: m.kernel for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights and buffers (quantized modules: their low-bit data; tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.weight_bytes()
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def to_reference_(model: nn.Module) -> nn.Module:
    """Replace every quantized module by its fp32 reference, in place (model cast to fp32)."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        set_module(model, name, module.to_reference())
    return model.to(torch.float32)


__all__ = ["W8A8Config", "W8A16Config", "W4A16Config", "quantize_", "kernel_report", "model_weight_bytes",
           "to_reference_",
           "config_for", "DequantLinear"]
