"""`slimlm fit`: which variants of a model fit a memory budget, and the best one that does.

A variant fits when weights + KV cache + the stated runtime overhead (memory.RUNTIME_OVERHEAD_DOC) is at most
the budget. "Nothing fits" is an answer (CLI exit 0) saying what the smallest variant needs; bad input raises
SlimlmError (CLI exit 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from slimlm.errors import SlimlmError
from slimlm.formats.gguf_mix import PlanTensor, budget_bytes_range
from slimlm.inspect.memory import (RUNTIME_OVERHEAD_DOC, VARIANTS, estimate_memory, gguf_tensors_from_checkpoint,
                                   gguf_tensors_from_spec, kv_cache, metadata_bytes_of, normalize_variant,
                                   runtime_overhead)
from slimlm.spec import ModelSpec

_UNITS = {"": None, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """'8GiB' -> 8 * 2**30, '16GB' -> 16e9, '512MiB', '1.5T'. Bare K/M/G/T are binary (like docker, llama.cpp)."""
    m = _MEMORY.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise SlimlmError(f"cannot read memory size {text!r}; write it like 8GiB, 16GB or 512MiB")
    if _UNITS[unit] is None:
        raise SlimlmError(f"memory size {text!r} has no unit; write it like 8GiB, 16GB or 512MiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise SlimlmError(f"memory size {text!r} must be positive")
    return value


def format_bytes(n: float) -> str:
    """Binary units, as memory is sold and reported by OSes: 4.36 GiB."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} TiB"


@dataclass
class ModelFacts:
    """What sizing needs about a model, from a catalog name or a checkpoint path."""

    name: str
    spec: ModelSpec
    tensors: list[PlanTensor]
    metadata_bytes: int | None = None
    source_dtype: str | None = None  # "bfloat16", "float16", "float32" when known
    stored_bytes: int | None = None  # tensor bytes of the checkpoint as it is on disk
    stored_format: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.source_dtype == "float32" else 2


def _config_dtype(config: dict[str, Any] | None) -> str | None:
    value = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    return value if value in ("bfloat16", "float16", "float32") else None


def load_model_facts(model: str | Path) -> ModelFacts:
    """A checkpoint path (HF dir, safetensors, GGUF, config.json) or a built-in catalog name."""
    path = Path(str(model)).expanduser()
    if path.exists():
        from slimlm.checkpoint import open_checkpoint

        ckpt = open_checkpoint(path)
        if not ckpt.config:
            raise SlimlmError(f"{path}: no model config found, so its architecture is unknown")
        spec = ModelSpec.from_config(ckpt.config)
        if ckpt.format == "config":
            return ModelFacts(path.name, spec, gguf_tensors_from_spec(spec), source_dtype=_config_dtype(ckpt.config))
        tensors = gguf_tensors_from_checkpoint(ckpt)
        facts = ModelFacts(path.name, spec, tensors, source_dtype=_config_dtype(ckpt.config),
                           stored_bytes=sum(t.nbytes for t in ckpt.tensors), stored_format=ckpt.format)
        if ckpt.format == "gguf":
            facts.metadata_bytes = metadata_bytes_of(ckpt.tensors)
            facts.source_dtype = None
        return facts
    from slimlm.inspect import catalog

    entry = catalog.lookup(str(model))
    spec = ModelSpec.from_config(entry.config)
    return ModelFacts(entry.name, spec, gguf_tensors_from_spec(spec), source_dtype=_config_dtype(entry.config))


def weights_allowance(spec: ModelSpec, memory: int, context: int, batch: int = 1, cache_type: str = "f16") -> int:
    """The bytes left for the weights once the KV cache and the runtime overhead of ``context`` x ``batch`` are
    counted: what a budget mix (``quantize --fit``) may spend, and what `fit` offers one."""
    return memory - kv_cache(spec, context, batch, cache_type).bytes - runtime_overhead(spec, context, batch)


def quality_rank(variant: str, source_dtype: str | None) -> int:
    """Lower is better. Converting up to F32 gains nothing over a 16-bit original, so it ties with it."""
    order = list(VARIANTS)
    if source_dtype == "float16":
        order = ["F32", "F16", "BF16", *[v for v in order if v not in ("F32", "F16", "BF16")]]
    rank = order.index(variant)
    if source_dtype in ("bfloat16", "float16") and variant == "F32":
        rank = order.index("F16" if source_dtype == "float16" else "BF16")
    return rank


def fit_row(variant: str, bits_per_weight: float, weights: int, kv: int, overhead: int, file_bytes: int | None,
             rank: int | None, budget: int) -> dict[str, Any]:
    """One row of fit's table: the memory to run a variant, and whether it fits ``budget``."""
    total = weights + kv + overhead
    return {"variant": variant, "bits_per_weight": bits_per_weight, "weights_bytes": weights, "kv_cache_bytes": kv,
            "overhead_bytes": overhead, "total_bytes": total, "file_bytes": file_bytes,
            "headroom_bytes": budget - total, "fits": total <= budget, "quality_rank": rank}


def _budget_mix(facts: ModelFacts, model: str | Path, memory: int, memory_text: str | None, context: int, batch: int,
                cache_type: str) -> dict[str, Any]:
    """What a budget mix made for this memory would spend (quantize --fit): every byte left after the KV cache and
    overhead, at a type per tensor chosen by measured error. ``possible``: the allowance lies between this model's
    smallest and largest mix (budget_bytes_range; above the largest, no choice is left to make)."""
    allowance = weights_allowance(facts.spec, memory, context, batch, cache_type)
    n_params = sum(t.n_elements for t in facts.tensors) or 1
    bpw = max(allowance, 0) * 8 / n_params
    smallest, largest = budget_bytes_range(facts.tensors)
    flags = (f"--fit {memory_text or format_bytes(memory).replace(' ', '')} --context {context}"
             + (f" --batch {batch}" if batch != 1 else "")
             + (f" --cache-type {cache_type}" if cache_type != "f16" else ""))
    return {"weights_bytes": allowance, "bits_per_weight": round(bpw, 2),
            "possible": smallest <= allowance < largest, "smallest_bytes": smallest,
            "smallest_bits_per_weight": round(smallest * 8 / n_params, 2),
            "command": f"slimlm quantize {model} {flags} --calib TEXT -o OUT.gguf"}


def fit(model: str | Path, memory: str | int, *, context: int = 4096, batch: int = 1, cache_type: str = "f16",
        variants: Sequence[str] | None = None) -> dict[str, Any]:
    """Size every variant of ``model`` against ``memory`` and name the highest-quality one that fits."""
    budget = parse_memory(memory) if isinstance(memory, str) else int(memory)
    if budget <= 0:
        raise SlimlmError("memory must be positive")
    if context <= 0 or batch <= 0:
        raise SlimlmError("--context and --batch must be positive integers")
    facts = load_model_facts(model)
    names = [normalize_variant(v) for v in (variants or VARIANTS)]
    rows = []
    for v in names:
        est = estimate_memory(facts.spec, v, context=context, batch=batch, cache_type=cache_type,
                              tensors=facts.tensors, metadata_bytes=facts.metadata_bytes,
                              dtype_bytes=facts.dtype_bytes)
        rows.append(fit_row(v, round(est.weights.bits_per_weight, 2), est.weights.bytes, est.kv.bytes,
                             est.overhead, est.file_bytes, quality_rank(v, facts.source_dtype), budget))
    kv_info = kv_cache(facts.spec, context, batch, cache_type)
    if facts.stored_bytes is not None:
        params = sum(t.n_elements for t in facts.tensors) or 1
        rows.append(fit_row(f"as stored ({facts.stored_format})", round(facts.stored_bytes * 8 / params, 2),
                             facts.stored_bytes, kv_info.bytes, runtime_overhead(facts.spec, context, batch), None,
                             None, budget))
    ranked = sorted((r for r in rows if r["fits"] and r["quality_rank"] is not None),
                    key=lambda r: (r["quality_rank"], r["total_bytes"]))
    best = ranked[0]["variant"] if ranked else None
    result_budget = _budget_mix(facts, model, budget, memory if isinstance(memory, str) else None,
                                context, batch, cache_type)
    result: dict[str, Any] = {
        "model": facts.name, "memory_bytes": budget, "context": context, "batch": batch, "cache_type": cache_type,
        "kv_cache": kv_info.to_dict(), "variants": rows, "best": best,
        "fits_any": best is not None, "overhead_rule": RUNTIME_OVERHEAD_DOC,
        "quality_order": [v for v in VARIANTS if v in names], "budget_mix": result_budget,
    }
    if best is not None:
        row = next(r for r in rows if r["variant"] == best)
        result["message"] = (f"{best} is the highest-quality variant that fits {format_bytes(budget)}: it needs "
                             f"{format_bytes(row['total_bytes'])} at context {context} x batch {batch}, leaving "
                             f"{format_bytes(row['headroom_bytes'])}")
    else:
        smallest = min((r for r in rows if r["quality_rank"] is not None), key=lambda r: r["total_bytes"])
        result["smallest"] = {"variant": smallest["variant"], "total_bytes": smallest["total_bytes"],
                              "weights_bytes": smallest["weights_bytes"]}
        short = smallest["total_bytes"] - budget
        if smallest["weights_bytes"] > budget:
            hint = f"its weights alone need {format_bytes(smallest['weights_bytes'])}"
        elif smallest["kv_cache_bytes"] + smallest["overhead_bytes"] > short:
            hint = "a shorter --context, a smaller --batch or --cache-type q8_0 could make it fit"
        else:
            hint = "more memory is needed"
        result["message"] = (f"nothing fits {format_bytes(budget)}: the smallest variant, {smallest['variant']}, "
                             f"needs {format_bytes(smallest['total_bytes'])} at context {context} x batch {batch} "
                             f"({format_bytes(short)} more); {hint}")
    return result
