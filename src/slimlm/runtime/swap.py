"""``quantize_(model, config)``: THE quantize verb for an in-memory transformers model (torchao's verb).

One verb, one config per scheme (:mod:`slimlm.quantize.schemes`, the same objects the file pipeline takes), one RTN
rule (:mod:`slimlm.algorithms.rtn`). By default each ``nn.Linear`` becomes a low-bit kernel module, so a
model runs quantized with no file in between; ``load_quantized`` builds the same modules from files written
by slimlm's quantizers (compressed-tensors dirs) or llama.cpp (GGUF). Calibrated methods go through
:mod:`slimlm.quantize.layers`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from slimlm.algorithms.rtn import rtn_int4_groups, rtn_int8_per_channel, rtn_quantize
from slimlm.errors import SlimlmError
from slimlm.runtime.linear import DequantLinear, QuantLinear, W4A16Linear, W8A8Linear, W8A16Linear
from slimlm.quantize.schemes import QuantConfig

REFERENCE_MODES = (False, True, "kernel", "file")  # True is "kernel"


def check_kernel_config(config: QuantConfig) -> None:
    """Refuse a scheme no runtime kernel runs: int8 per-channel symmetric (W8A16; W8A8 with per-token dynamic
    activations) and int4 groups (W4A16)."""
    int8 = (config.weight_bits == 8 and config.group_size is None and config.symmetric
            and (config.act_bits is None or (config.act_bits == 8 and config.act_dynamic)))
    int4 = config.weight_bits == 4 and config.act_bits is None and config.group_size is not None
    if not (int8 or int4):
        raise SlimlmError(f"no runtime kernel runs {config}: they take int8 per-channel symmetric weights "
                          f"(dynamic per-token int8 activations) and int4 groups")


def quantize_linear(linear: nn.Linear, config: QuantConfig, reference: bool = False) -> QuantLinear:
    """One ``nn.Linear`` → its quantized module (or that module's fp32 reference)."""
    w, bias = linear.weight, linear.bias
    if config.weight_bits == 8:
        q, s = rtn_int8_per_channel(w)
        module = (W8A8Linear if config.act_bits else W8A16Linear)(q, s, bias)
    else:
        gs = config.kernel_group_size(w.shape[1])
        if w.shape[1] % gs:
            k_pad = -(-w.shape[1] // gs) * gs
            w = torch.nn.functional.pad(w.detach().float(), (0, k_pad - w.shape[1]))
        q, s, z = rtn_int4_groups(w, gs, config.symmetric)
        module = W4A16Linear.from_signed(q[:, : linear.in_features], s, z, gs, bias)
    return module.to_reference() if reference else module


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def untie_lm_head(model: nn.Module) -> None:
    """Keep the input embedding a plain tensor once lm_head becomes a quantized module."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None


def quantize_(model: nn.Module, config: QuantConfig, *, reference: bool | str = False,
              progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Quantize ``model``'s Linears in place with round-to-nearest; returns ``{module name: what runs it}``.

    ``reference`` picks what "quantized" means, as each comparison needs:

    - ``False`` (default): low-bit kernel modules (W8A8Linear, W8A16Linear, W4A16Linear), the model cast to
      ``config.dtype``; runtime defaults (every Linear incl. ``lm_head`` unless ``config.ignore`` says
      otherwise; int4 groups ≥ 32, padded where none divides; int8 codes ±127).
    - ``True`` / ``"kernel"``: the same integer codes as fp32 ``DequantLinear`` modules, the model in fp32:
      what the kernels' tests and perplexity comparisons measure the fast path against.
    - ``"file"``: fake quantization: every Linear stays an ``nn.Linear`` in its dtype whose weight is the RTN
      value a compressed-tensors export of ``config`` stores (file defaults: ``lm_head`` kept, group sizes
      down to 16 then per channel, int8 codes -128..127): what an RTN file is checked against.
      Activation quantization is not simulated.

    Two references because kernels and files round differently (int8 ±127 vs -128..127; int4 groups ≥ 32
    padded vs ≥ 16 then per channel; ``lm_head``): each fast path is held to its own integers.
    """
    if reference not in REFERENCE_MODES:
        raise SlimlmError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
    if reference == "file":
        return fake_quantize_(model, config, progress)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not config.is_ignored(n, "runtime")]
    if not names:
        raise SlimlmError("the model has no nn.Linear layers to quantize")
    check_kernel_config(config)
    model.to(torch.float32 if reference else config.dtype)
    if any(n.endswith("lm_head") for n in names):
        untie_lm_head(model)
    for name in names:
        set_module(model, name, quantize_linear(model.get_submodule(name), config, bool(reference)))
        if progress:
            progress(name)
    fuse_siblings(model)
    model.slimlm_scheme = ("reference-" if reference else "") + config.name
    return {name: model.get_submodule(name).kernel for name in names}


def fake_quantize_(model: nn.Module, config: QuantConfig, progress: Callable[[str], None] | None = None
                   ) -> dict[str, str]:
    """``quantize_(..., reference="file")``: each Linear's weight, in place, by its file RTN value."""
    done: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not config.is_ignored(name, "file"):
            spec, _ = config.weight_spec(module.in_features)
            with torch.no_grad():
                module.weight.copy_(rtn_quantize(module.weight, spec).dequantize(module.weight.dtype))
            groups = f"group {spec.group_size}" if spec.group_size else "per channel"
            done[name] = f"nn.Linear, RTN fake-quant int{spec.bits} {groups}"
            if progress:
                progress(name)
    return done


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
            if not all(isinstance(m, W8A8Linear) and m.group is None and m.input_scale is None for m in members):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            if all(m.bias is None for m in members):
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


__all__ = ["quantize_", "kernel_report", "model_weight_bytes", "to_reference_", "DequantLinear"]
