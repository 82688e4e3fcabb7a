"""The one scheme vocabulary (w4a16, w8a16, w8a8): a frozen config per scheme, shared by the compressed-tensors
pipeline, the in-memory runtime (:func:`slimlm.runtime.swap.quantize_`), ``recommend`` and the CLI.

Defaults follow llm-compressor's presets: W4A16 int4 groups of 128, but asymmetric (as the issue asks; ``--sym``
gives the preset's symmetric); W8A16 int8 per-channel symmetric; W8A8 that plus dynamic per-token symmetric int8
activations. Where a file and the runtime need different things, the config says so once:

- ``ignore=None`` is the target's default (:data:`DEFAULT_IGNORE`): a file keeps ``lm_head`` in full precision
  (the compressed-tensors/vLLM convention; all outside the decoder layers is written as stored), the runtime
  quantizes every Linear, ``lm_head`` included (a small model's largest). An explicit tuple serves both.
- Group sizes that do not divide a width: files halve down to 16, then one scale per row (a padded group cannot
  be stored); the int4 kernel halves down to 32, its smallest, then pads (:meth:`QuantConfig.kernel_group_size`).
- ``dtype`` is the runtime's dtype around the kernels (norms, attention, residual); files ignore it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.algorithms.methods import SCHEME_METHODS
from slimlm.errors import SlimlmError
from slimlm.formats.groupint import GROUP_SIZES, QuantSpec, choose_group_size

SCHEMES = ("w4a16", "w8a16", "w8a8")
DEFAULT_IGNORE = {"file": ("lm_head",), "runtime": ()}  # what ``ignore=None`` means for each target


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """A scheme: weight bits, group size (None = per channel), symmetry, activation quantization, ignores."""

    name: str
    weight_bits: int
    group_size: int | None = None
    symmetric: bool = True
    act_bits: int | None = None  # None: activations stay in 16/32 bits
    act_dynamic: bool = True  # per-token dynamic (True) or static per-tensor (False)
    ignore: tuple[str, ...] | None = None  # module names or "re:" regexes never quantized; None: the target's default
    default_method: str = "rtn"
    dtype: torch.dtype = torch.bfloat16  # runtime only: dtype of everything that is not a quantized Linear

    @property
    def format(self) -> str:
        """The compressed-tensors format that stores this scheme."""
        return "int-quantized" if self.act_bits else "pack-quantized"  # W8A16 packs 4 codes per int32

    def weight_spec(self, in_features: int) -> tuple[QuantSpec, str]:
        """The file spec for one tensor, with the group size adapted to its width, and a note on the choice."""
        gs, why = choose_group_size(in_features, self.group_size)
        return QuantSpec(self.weight_bits, gs, self.symmetric), why

    def kernel_group_size(self, in_features: int) -> int:
        """The int4 kernel's group size for a width: the largest power of two ≥ 32 ≤ the request that
        divides it, else the request itself (the layer is padded; see W4A16Linear)."""
        if self.group_size is None:
            raise SlimlmError(f"{self.name}: the int4 kernel needs a group size (got per channel)")
        return choose_group_size(in_features, self.group_size, smallest=32)[0] or self.group_size

    def plan_group_sizes(self, widths: set[int], uniform: bool = True) -> dict[int, tuple[int | None, str]]:
        """Group size per input width. When the request does not divide every width and ``uniform``, prefer
        the largest group size dividing all widths: one config group, which transformers' decompression
        (one scheme for all dense layers) needs; per-tensor choice otherwise."""
        plan = {w: choose_group_size(w, self.group_size) for w in widths}
        if not uniform or self.group_size is None or all(gs == self.group_size for gs, _ in plan.values()):
            return plan
        size = self.group_size // 2
        while size >= 16:
            if all(w % size == 0 for w in widths):
                why = (f"{self.group_size} does not divide every width ({', '.join(map(str, sorted(widths)))}); "
                       f"{size} divides all, so one group size for the whole model")
                return {w: (size, why) for w in widths}
            size //= 2
        return plan

    def is_ignored(self, module_name: str, target: str = "file") -> bool:
        """Whether ``target`` ("file" or "runtime") keeps this module in full precision."""
        for pattern in DEFAULT_IGNORE[target] if self.ignore is None else self.ignore:
            if pattern.startswith("re:"):
                if re.search(pattern[3:], module_name):
                    return True
            elif module_name == pattern or module_name.endswith("." + pattern):
                return True
        return False


@dataclass(frozen=True, kw_only=True)
class W4A16Config(QuantConfig):
    """int4 group-wise weights (asymmetric by default, as tinygemm computes), 16-bit activations: latency."""

    name: str = field(default="w4a16", init=False)
    weight_bits: int = field(default=4, init=False)
    group_size: int | None = 128
    symmetric: bool = False
    default_method: str = field(default="awq", init=False)


@dataclass(frozen=True, kw_only=True)
class W8A16Config(QuantConfig):
    """int8 per-channel symmetric weights, 16-bit activations."""

    name: str = field(default="w8a16", init=False)
    weight_bits: int = field(default=8, init=False)


@dataclass(frozen=True, kw_only=True)
class W8A8Config(QuantConfig):
    """int8 per-channel symmetric weights, per-token dynamic int8 activations (throughput scheme). At runtime the
    rest runs in ``dtype``, bf16 by default (as fast as the bf16 model), so fp32 work does not eat the int8 gain."""

    name: str = field(default="w8a8", init=False)
    weight_bits: int = field(default=8, init=False)
    group_size: int | None = field(default=None, init=False)  # int-quantized stores per-channel scales
    act_bits: int | None = field(default=8, init=False)
    default_method: str = field(default="smoothquant", init=False)


CONFIGS: dict[str, type[QuantConfig]] = {"w4a16": W4A16Config, "w8a16": W8A16Config, "w8a8": W8A8Config}


def get_scheme(name: str, *, group_size: int | None | str = "default", symmetric: bool | None = None,
               ignore: list[str] | None = None, act_dynamic: bool = True) -> QuantConfig:
    """Build a scheme from what the user typed; ``group_size`` may be an int, "channel" or "default".
    ``ignore`` patterns are added to the file default (``lm_head``), as the CLI's ``--ignore`` documents."""
    key = name.lower()
    if key not in SCHEMES:
        raise SlimlmError(f"unknown scheme '{name}'; choose one of {', '.join(SCHEMES)}")
    kw: dict = {} if key != "w8a8" else {"act_dynamic": act_dynamic}
    if group_size != "default":
        if group_size in (None, "channel", "-1", -1):
            gs = None
        else:
            try:
                gs = int(group_size)
            except (TypeError, ValueError):
                raise SlimlmError(f"group size must be an integer or 'channel', got '{group_size}'") from None
            if gs <= 0:
                raise SlimlmError(f"group size must be positive, got {gs}")
        if key == "w8a8" and gs is not None:
            raise SlimlmError("w8a8 uses per-channel weight scales (int-quantized); drop --group-size")
        elif key != "w8a8":
            kw["group_size"] = gs
    if symmetric is not None:
        kw["symmetric"] = symmetric
    if ignore:
        for pattern in ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise SlimlmError(f"--ignore {pattern!r} is not a valid regex: {exc}") from None
        kw["ignore"] = tuple(dict.fromkeys([*DEFAULT_IGNORE["file"], *ignore]))
    return CONFIGS[key](**kw)


def check_method(cfg: QuantConfig, method: str | None) -> str:
    """The method to run (the scheme's default when None); refuses combinations that make no sense."""
    method = (method or cfg.default_method).lower()
    if method not in SCHEME_METHODS:
        raise SlimlmError(f"unknown method '{method}'; choose one of {', '.join(SCHEME_METHODS)}")
    if method.startswith("smoothquant") and not cfg.act_bits:
        raise SlimlmError(f"smoothquant smooths activations for 8-bit activation quantization; "
                          f"it does not apply to {cfg.name} (use awq or gptq)")
    if method.startswith("awq") and cfg.act_bits:
        raise SlimlmError("awq is a weight-only method; for w8a8 use smoothquant or smoothquant+gptq")
    return method


# ---------------------------------------------------------------- lint: what a model can take, before any work
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "fc2", "w2", "c_proj")
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128  # vLLM's GPTQ-Marlin kernel: per-shard output % 64, input % 128
TP_DEGREES = (2, 4, 8)


def _tp_verdict(in_f: int, out_f: int, row: bool, tp: int, group_size: int | None) -> str:
    """'ok' or why vLLM cannot shard this Linear ``tp`` ways with the given weight group size."""
    if row:
        if in_f % tp:
            return f"in {in_f} not divisible by {tp}"
        shard = in_f // tp
        if group_size is not None and shard % group_size:
            return f"shard in {shard} not divisible by group {group_size}"
    elif out_f % tp:
        return f"out {out_f} not divisible by {tp}"
    return "ok"


def vllm_cpu_w4a16_verdict(in_f: int, out_f: int, group_size: int | None) -> str:
    """'ok' or vLLM's own refusal (vllm 0.32 kernels/linear/mixed_precision/cpu.py, CPUWNA16LinearKernel, the only
    W4A16 kernel of its CPU build for compressed-tensors on x86 without zentorch) for one unsharded Linear."""
    if group_size is not None and group_size % 2:
        return (f"Group size ({group_size}) not supported by CPUWNA16, supported group sizes are multiples of 2")
    if in_f % 32:
        return f"Input size ({in_f}) not supported by CPUWNA16, supported sizes are multiples of 32"
    if out_f % 32:
        return f"Output size ({out_f}) not supported by CPUWNA16, supported sizes are multiples of 32"
    return "ok"


def vllm_cpu_static_acts_verdict(shapes: list[tuple[int, int]]) -> str:
    """'ok' or why vLLM's CPU build would not run a W8A8 file's static activation scales, for the quantized
    Linears' (in, out) shapes. vLLM 0.32's CPUInt8ScaledMMLinearKernel (kernels/linear/scaled_mm/cpu.py) sends
    symmetric int8 layers with K % 32 == 0 and N % 16 == 0 (check_cpu_sgl_kernel) on x86 CPUs with AMX to its
    SGL kernel ``int8_scaled_mm_with_quant``, which quantizes activations per token and never reads
    ``input_scale``; only its oneDNN path (no AMX, or other shapes) applies the calibrated static scale."""
    sgl = sum(1 for k, n in shapes if k % 32 == 0 and n % 16 == 0)
    if not sgl:
        return "ok"
    return (f"{sgl} of {len(shapes)} Linears fit vLLM's CPU SGL int8 kernel, which on CPUs with AMX (Sapphire Rapids "
            f"and newer) quantizes activations per token and ignores input_scale: a static-activation file runs "
            f"there as a dynamic one (CPUInt8ScaledMMLinearKernel, vLLM 0.32); without AMX its oneDNN path uses "
            f"the static scales")


def check_model(model: str, *, group_size: int | None = 128, tp_degrees: tuple[int, ...] = TP_DEGREES) -> dict:
    """Per Linear shape of a model (from config.json only): which group sizes divide, which TP degrees work.
    Attention-head rules are vLLM's: heads % tp == 0; KV heads divisible by tp, or tp a multiple of them
    (replicated). ``marlin`` says whether the one-GPU shape fits vLLM's Marlin W4A16 kernel."""
    from slimlm.models.skeleton import empty_model, load_config

    path = Path(model)
    if not (path / "config.json").is_file():
        raise SlimlmError(f"{model} is not a Hugging Face model dir (no config.json)")
    config = load_config(path)
    skeleton = empty_model(config)
    rows: dict[tuple, dict] = {}
    linears = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    cfg = W4A16Config(group_size=group_size)
    plan = cfg.plan_group_sizes({m.in_features for n, m in linears if not cfg.is_ignored(n)})
    for name, mod in linears:
        parts = name.split(".")
        suffix = ".".join(parts[parts.index("layers") + 2:]) if "layers" in parts else name
        key = (suffix, mod.in_features, mod.out_features)
        if key in rows:
            rows[key]["count"] += 1
            continue
        row_parallel = suffix.endswith(ROW_PARALLEL)
        gs, note = plan.get(mod.in_features) or choose_group_size(mod.in_features, group_size)
        rows[key] = {
            "linear": suffix, "count": 1, "in": mod.in_features, "out": mod.out_features,
            "parallel": "row" if row_parallel else "column",
            "group_sizes_dividing": [g for g in GROUP_SIZES if mod.in_features % g == 0],
            "group_size_used": gs, "group_note": note,
            "marlin": mod.out_features % MARLIN_MIN_N == 0 and mod.in_features % MARLIN_MIN_K == 0,
            "tp": {str(t): _tp_verdict(mod.in_features, mod.out_features, row_parallel, t, gs)
                   for t in tp_degrees},
            "ignored_by_default": suffix == "lm_head",
            "vllm_cpu_w4a16": vllm_cpu_w4a16_verdict(mod.in_features, mod.out_features, gs),
        }
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    model_tp = {}
    for t in tp_degrees:
        reasons = []
        if heads and heads % t:
            reasons.append(f"{heads} attention heads not divisible by {t}")
        if kv and kv % t and t % kv:
            reasons.append(f"{kv} KV heads neither divisible by {t} nor dividing it")
        reasons += [f"{r['linear']}: {r['tp'][str(t)]}" for r in rows.values()
                    if r["tp"][str(t)] != "ok" and not r["ignored_by_default"]]
        model_tp[str(t)] = "ok" if not reasons else "; ".join(reasons)
    vllm_cpu = [f"{r['linear']}: {r['vllm_cpu_w4a16']}" for r in rows.values()
                if r["vllm_cpu_w4a16"] != "ok" and not r["ignored_by_default"]]
    return {"model": str(path), "model_type": getattr(config, "model_type", None), "attention_heads": heads,
            "kv_heads": kv, "group_size_requested": group_size, "linears": list(rows.values()),
            "tensor_parallel": model_tp, "vllm_cpu_w4a16": "ok" if not vllm_cpu else "; ".join(vllm_cpu),
            "vllm_cpu_static_acts": vllm_cpu_static_acts_verdict(
                [(r["in"], r["out"]) for r in rows.values() if not r["ignored_by_default"] for _ in range(r["count"])])}

