"""Inspect a model without loading its weights: parameter counts, roles, dtypes, GGUF quant mix.

Counts are exact from a checkpoint's tensor table, or computed from a config or catalog entry's ModelSpec;
both agree exactly on real checkpoints.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.checkpoint import Checkpoint, open_checkpoint
from slimlm.errors import SlimlmError
from slimlm.inspect import catalog
from slimlm.inspect.params import ParamCount, count_spec, count_tensors, size_label, tensor_role
from slimlm.spec import ModelSpec

__all__ = ["InspectReport", "inspect", "size_label"]


@dataclass
class InspectReport:
    """What `slimlm inspect` prints; ``to_dict()`` is its --json form."""

    source: str
    format: str  # 'hf-dir' | 'safetensors' | 'gguf' | 'config' | 'catalog'
    counted_from: str  # 'tensors' | 'config'
    params: ParamCount
    name: str | None = None
    spec: ModelSpec | None = None
    dtypes: dict[str, dict[str, int]] = field(default_factory=dict)
    tensor_bytes: int | None = None
    file_bytes: int | None = None
    gguf: dict[str, Any] | None = None
    config_total_params: int | None = None
    catalog: dict[str, Any] | None = None
    missing_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return self.params.total

    @property
    def label(self) -> str:
        return size_label(self.params.total)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"source": self.source, "name": self.name, "format": self.format,
                                "counted_from": self.counted_from}
        data.update(self.params.to_dict())
        if self.catalog:
            data["catalog"] = self.catalog
        data["model_type"] = self.spec.model_type if self.spec else None
        if self.dtypes:
            data["dtypes"] = self.dtypes
        for key in ("tensor_bytes", "file_bytes", "gguf", "config_total_params"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        data["missing_bytes"] = self.missing_bytes
        data["warnings"] = list(self.warnings)
        data["spec"] = self.spec.to_dict() if self.spec else None
        return data


def inspect(target: str | Path) -> InspectReport:
    """Inspect a checkpoint path or a catalog name; bad input raises a one-line SlimlmError."""
    text = str(target)
    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text):
        return _inspect_checkpoint(open_checkpoint(path))
    return _inspect_catalog(catalog.lookup(text))


def _looks_like_path(text: str) -> bool:
    return ("/" in text and ":" not in text.split("/")[0] and text.count("/") != 1) or text.startswith((".", "~")) \
        or text.lower().endswith((".gguf", ".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt"))


def _inspect_checkpoint(ckpt: Checkpoint) -> InspectReport:
    warnings = list(ckpt.warnings)
    if ckpt.format == "config":
        spec = ModelSpec.from_config(ckpt.config or {})
        return InspectReport(source=str(ckpt.path), format="config", counted_from="config",
                             params=count_spec(spec), name=_config_name(ckpt.config), spec=spec,
                             warnings=warnings)
    if not ckpt.tensors:
        raise SlimlmError(f"{ckpt.path}: the checkpoint holds no tensors")
    spec = None
    if ckpt.config is not None:
        try:
            spec = ModelSpec.from_config(ckpt.config)
        except SlimlmError as exc:
            warnings.append(f"config not understood ({exc}); counts come from the tensor table only")
    params = count_tensors(ckpt.tensors, spec)
    report = InspectReport(source=str(ckpt.path), format=ckpt.format, counted_from="tensors", params=params,
                           name=_checkpoint_name(ckpt), spec=spec, file_bytes=ckpt.file_bytes,
                           missing_bytes=ckpt.missing_bytes, warnings=warnings)
    # per dtype: parameters, and apart from them the elements of quantization scales (FP8 blocks' scale_inv)
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "scales": 0, "bytes": 0})
    for t in ckpt.tensors:
        row = dtypes[t.dtype]
        row["tensors"] += 1
        row["scales" if tensor_role(t.name)[0] == "quant_meta" else "params"] += t.numel
        row["bytes"] += t.nbytes
    report.dtypes = dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["bytes"]))
    report.tensor_bytes = sum(t.nbytes for t in ckpt.tensors)
    if ckpt.format == "gguf":
        report.gguf = _gguf_summary(ckpt, report)
    if spec is not None:
        report.config_total_params = count_spec(spec).total
        if report.config_total_params != params.total:
            warnings.append(f"the config describes {report.config_total_params:,} parameters but the tensors hold "
                            f"{params.total:,}")
    return report


def _gguf_summary(ckpt: Checkpoint, report: InspectReport) -> dict[str, Any]:
    stored = sum(t.numel for t in ckpt.tensors)
    mix = [{"type": dtype, "tensors": row["tensors"], "params": row["params"], "bytes": row["bytes"],
            "share_of_params": round(row["params"] / stored, 4) if stored else 0.0,
            "bits_per_weight": round(row["bytes"] * 8 / row["params"], 4) if row["params"] else 0.0}
           for dtype, row in report.dtypes.items()]
    meta = ckpt.gguf_metadata or {}
    return {"architecture": meta.get("general.architecture"), "file_type": meta.get("general.file_type"),
            "size_label": meta.get("general.size_label"), "quant_mix": mix,
            "budget": meta.get("slimlm.quantize.budget"), "per_tensor_kind": _per_tensor_kind(ckpt.tensors),
            "bits_per_weight": round(report.tensor_bytes * 8 / stored, 4) if stored else None,
            "file_bits_per_weight": round(ckpt.file_bytes * 8 / stored, 4) if stored else None}


def _per_tensor_kind(tensors) -> dict[str, dict[str, str]]:
    """Which type each kind of tensor has in which layers: {'attn_v.weight': {'Q6_K': '0-3,6', 'Q4_K': '4-5'}}
    (non-block tensors under their own name, layer '-'): the per-tensor mix of a file at a glance."""
    import re

    layers: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for t in tensors:
        m = re.match(r"blk\.(\d+)\.(.+)$", t.name)
        kind, layer = (m.group(2), int(m.group(1))) if m else (t.name, -1)
        layers[kind][t.dtype].append(layer)
    return {kind: {dtype: _ranges(sorted(ls)) for dtype, ls in by_type.items()} for kind, by_type in layers.items()}


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'; [-1] (a tensor outside the blocks) -> '-'."""
    if values == [-1]:
        return "-"
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def _config_name(config: dict[str, Any] | None) -> str | None:
    name = (config or {}).get("_name_or_path")
    return str(name) if name else None


def _checkpoint_name(ckpt: Checkpoint) -> str | None:
    if ckpt.format == "gguf":
        name = (ckpt.gguf_metadata or {}).get("general.name")
        return str(name) if name else ckpt.path.stem
    return _config_name(ckpt.config) or ckpt.path.name


def _inspect_catalog(entry: catalog.CatalogEntry) -> InspectReport:
    spec = ModelSpec.from_config(entry.config)
    params = count_spec(spec)
    info = {"name": entry.name, "repo": entry.repo, "vendor_label": entry.label, "family": entry.family,
            "architecture": entry.architecture, "description": entry.description, "published": entry.published}
    if entry.student_base:
        info.update(student_base=entry.student_base, teacher=entry.teacher)
    warnings = []
    if size_label(params.total) != entry.label:
        warnings.append(f"{entry.name} is labelled {entry.label} but has {params.total:,} parameters "
                        f"({size_label(params.total)})")
    return InspectReport(source=entry.key, format="catalog", counted_from="config", params=params,
                         name=entry.name, spec=spec, catalog=info, warnings=warnings)
