"""Quantization methods by name, for both drivers: at most one smoothing step (scales folded in before rounding:
AWQ's search or SmoothQuant's formula), then a rounding (nearest, or GPTQ's error compensation). The layer stream
(``--scheme``) runs :meth:`Method.smooth` and :meth:`Method.round` per decoder layer; the GGUF tensor stream
(``--to``) reads the same flags and runs the GGML forms (equalization, ``gptq_encode``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.algorithms.awq import awq_layer, gram_blocks
from slimlm.algorithms.gptq import gptq_linears
from slimlm.algorithms.mappings import SmoothPair
from slimlm.algorithms.rtn import rtn_quantize
from slimlm.algorithms.smoothquant import smooth_layer
from slimlm.algorithms.stats import LayerStats
from slimlm.errors import SlimlmError
from slimlm.formats.groupint import QuantizedWeight, QuantSpec, quantize_weight


@dataclass(frozen=True)
class Method:
    """``smoothing``: "awq", "smoothquant" or None; ``gptq``: GPTQ rounding (else nearest); ``drivers``:
    "layers" (``--scheme``) and/or "gguf" (``--to``)."""

    name: str
    smoothing: str | None
    gptq: bool
    drivers: tuple[str, ...]

    @property
    def calibration(self) -> bool:
        return self.smoothing is not None or self.gptq

    @property
    def gram(self) -> bool:
        """GPTQ's Hessian, AWQ's error metric; SmoothQuant needs only max |x|."""
        return self.gptq or self.smoothing == "awq"

    def gram_blocks(self, pairs: list[SmoothPair], linears: dict[str, torch.nn.Linear],
                    specs: dict[str, QuantSpec]) -> dict[str, int]:
        """Linears whose Gram this method reads only as diagonal blocks (AWQ at real width; GPTQ needs it whole)."""
        return gram_blocks(pairs, linears, specs) if self.smoothing == "awq" and not self.gptq else {}

    def smooth(self, layer: torch.nn.Module, stats: LayerStats, pairs: list[SmoothPair],
               specs: dict[str, QuantSpec], strength: float) -> tuple[dict[str, torch.Tensor] | None, dict]:
        """Fold this method's scales into ``layer`` (in place); returns (clip ratios or None, report entries)."""
        if self.smoothing == "awq":
            # GPTQ rounds with its own error feedback and ignores clip ratios: no clip search then.
            clips, report = awq_layer(layer, stats, pairs, specs, clip=not self.gptq)
            return (None if self.gptq else clips), {"awq": report}
        if self.smoothing == "smoothquant":
            smooth_layer(layer, stats, pairs, strength)
        return None, {}

    def round(self, linears: dict[str, torch.nn.Linear], names: list[str], stats: LayerStats | None,
              specs: dict[str, QuantSpec], actorder: bool,
              clips: dict[str, torch.Tensor] | None) -> dict[str, QuantizedWeight]:
        """Quantize the Linears ``names`` of one layer."""
        if self.gptq:
            return gptq_linears(linears, names, stats, specs, actorder)
        if clips is not None:
            return {n: quantize_weight(linears[n].weight, specs[n], clip=clips[n]) for n in names}
        return {n: rtn_quantize(linears[n].weight, specs[n]) for n in names}


# Rows in the order each driver lists its methods.
_TABLE = (
    Method("rtn", None, False, ("layers",)),
    Method("llama.cpp", None, False, ("gguf",)),
    Method("awq", "awq", False, ("layers", "gguf")),
    Method("gptq", None, True, ("layers", "gguf")),
    Method("awq+gptq", "awq", True, ("layers", "gguf")),
    Method("smoothquant", "smoothquant", False, ("layers",)),
    Method("smoothquant+gptq", "smoothquant", True, ("layers",)),
)
SCHEME_METHODS = tuple(m.name for m in _TABLE if "layers" in m.drivers)
GGUF_METHODS = tuple(m.name for m in _TABLE if "gguf" in m.drivers)


def get_method(name: str, driver: str = "layers") -> Method:
    """The method ``name`` of ``driver`` ("layers" or "gguf"); a clear error listing the others."""
    found = [m for m in _TABLE if m.name == name and driver in m.drivers]
    if not found:
        kind, names = ("GGUF method", GGUF_METHODS) if driver == "gguf" else ("method", SCHEME_METHODS)
        raise SlimlmError(f"unknown {kind} {name!r}; choose one of: {', '.join(names)}")
    return found[0]
