"""The GGUF closest to a compressed-tensors checkpoint: its integer codes carried over block by block.

Where a llama.cpp block type has the same shape of grid, the codes are kept and only the scales change
precision (llama.cpp stores them as fp16):
- W4A16 asymmetric, group 32 → Q4_1: ``d = scale``, ``m = -(zero + 8)·scale``, ``q' = q + 8`` (0..15).
- W4A16 symmetric, group 32 → Q4_0: ``d = scale``, ``q' = q + 8``; llama.cpp computes ``d·(q' − 8)``.
- W8 per channel (W8A16/W8A8 weights) → Q8_0: the row's scale repeated in each 32-block, codes unchanged.
Not exact: fp16 rounding of d (and m), relative error ≤ 2⁻¹¹; W8A8's per-token int8 activations (llama.cpp
quantizes activations to Q8_0/Q8_1 blocks of 32). Other group sizes are refused (Q4_K's 6-bit sub-block scales
cannot hold arbitrary scales). The GGUF plan is made as for any Hugging Face dir; each Linear the plan gives the
chosen type is packed from its codes (rows in rope order), every other tensor encoded from its values.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch

from slimlm.checkpoint import read_config, read_state_dict
from slimlm.checkpoint.names import permute_for_rope
from slimlm.errors import SlimlmError
from slimlm.writers.compressed_tensors import args_for, read_codes
from slimlm.formats import ggml
from slimlm.formats.groupint import dequantize
from slimlm.archs import arch_spec, rope_heads
from slimlm.quantize.gguf import quantize_gguf
from slimlm.quantize.sources import ModelSource, open_hf_dir


class BlockGrid(NamedTuple):
    """One Linear's grid in a GGML block type's terms: the codes as the block stores them and one scale
    ``d`` (and for Q4_1 one min ``m``) per 32-value block, all with the tensor's rows."""

    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray | None

    def rows_permuted(self, heads: int) -> BlockGrid:
        return BlockGrid(*(None if a is None else permute_for_rope(a, heads) for a in self))


def block_grid(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, target: str) -> BlockGrid:
    """compressed-tensors codes, scales (one per group or per row) and zeros in ``target``'s block terms."""
    reps = q.shape[1] // 32 // scale.shape[1]  # per-row or per-group scales repeat in every 32-block
    d = scale.float().repeat_interleave(reps, 1).numpy()
    if target == "Q8_0":
        return BlockGrid(q.numpy(), d, None)
    codes = (q.numpy().astype(np.int16) + 8).astype(np.uint8)
    m = None if zero is None else -(zero.float().repeat_interleave(reps, 1).numpy() + 8) * d
    return BlockGrid(codes, d, m)


def gguf_equivalent_type(qcfg: dict) -> str:
    """The GGUF type whose blocks can carry this checkpoint's codes, or a clear error."""
    types = set()
    for group in qcfg["config_groups"].values():
        w = group["weights"]
        if w["num_bits"] == 8 and w["strategy"] == "channel" and w["symmetric"]:
            types.add("Q8_0")
        elif w["num_bits"] == 4 and w["strategy"] == "group" and w["group_size"] == 32:
            types.add("Q4_0" if w["symmetric"] else "Q4_1")
        else:
            raise SlimlmError(f"no GGUF type holds {w['num_bits']}-bit {w['strategy']} weights with group size "
                              f"{w['group_size']} exactly (Q4_0/Q4_1 need group 32; Q8_0 needs 8-bit symmetric)")
    if len(types) != 1:
        raise SlimlmError(f"mixed weight schemes {sorted(types)}: no single GGUF type")
    return types.pop()


def _open_ct_source(ct_dir: Path, qcfg: dict, target: str) -> tuple[ModelSource, dict[str, BlockGrid], int]:
    """A GGUF source over the dir (quantized Linears as dequantized values) and, by GGUF tensor name, the
    block grid of each quantized Linear in llama.cpp's row order; plus the number of quantized Linears."""
    raw = read_state_dict(ct_dir)
    modules = {k.rsplit(".", 1)[0] for k in raw if k.endswith(".weight_scale")}
    tensors = [(k, tuple(t.shape), lambda t=t: t.float().numpy())
               for k, t in raw.items() if k.rsplit(".", 1)[0] not in modules]
    grids: dict[str, BlockGrid] = {}
    for mod in sorted(modules):
        w = args_for(qcfg, mod)["weights"]
        q, scale, zero = read_codes(raw, mod, int(w["num_bits"]))
        gs = w["group_size"] if w["strategy"] == "group" else None
        tensors.append((f"{mod}.weight", tuple(q.shape),
                        lambda q=q, scale=scale, zero=zero, gs=gs: dequantize(q, scale, zero, gs).numpy()))
        grids[f"{mod}.weight"] = block_grid(q, scale, zero, target)
    source = open_hf_dir(ct_dir, tensors)
    spec = arch_spec(source.config)[1]
    by_name = {}
    for t in source.tensors:
        if t.hf_name in grids:
            heads = rope_heads(t.hf_name, spec, source.facts["n_head"], source.facts["n_head_kv"])
            by_name[t.name] = grids[t.hf_name] if heads is None else grids[t.hf_name].rows_permuted(heads)
    return source, by_name, len(modules)


def export_gguf_equivalent(ct_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the GGUF equivalent of a compressed-tensors dir; returns what was carried over exactly."""
    ct_dir = Path(ct_dir)
    config = read_config(ct_dir / "config.json")
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors":
        raise SlimlmError(f"{ct_dir} is not a compressed-tensors checkpoint")
    target = gguf_equivalent_type(qcfg)
    source, grids, n_linears = _open_ct_source(ct_dir, qcfg, target)
    carried: list[str] = []

    def encoder(values: np.ndarray, qtype: gguf.GGMLQuantizationType, importance: np.ndarray | None,
                name: str) -> np.ndarray:
        if name in grids and qtype.name == target:
            carried.append(name)
            return ggml.pack_blocks(qtype, *grids[name])
        return ggml.quantize(values, qtype, importance)  # the bytes of quantize_gguf's own path

    result = quantize_gguf(source, target, Path(out), overwrite=overwrite, encoder=encoder)
    return {"out": str(out), "type": target, "exact_codes": sorted(carried), "linears": n_linears,
            "result": result}
