"""The GGUF closest to a compressed-tensors checkpoint: its integer codes carried over block by block.

Where a llama.cpp block type has the same shape of grid, the codes are kept and only the scales change
precision (llama.cpp stores them as fp16):
- W4A16 asymmetric, group 32 → Q4_1: ``d = scale``, ``m = -(zero + 8)·scale``, ``q' = q + 8`` (0..15).
- W4A16 symmetric, group 32 → Q4_0: ``d = scale``, ``q' = q + 8``; llama.cpp computes ``d·(q' − 8)``.
- W8 per channel (W8A16/W8A8 weights) → Q8_0: the row's scale repeated in each 32-block, codes unchanged.
Not exact: fp16 rounding of d (and m), relative error ≤ 2⁻¹¹; W8A8's per-token int8 activations are not
what llama.cpp does (it quantizes activations to Q8_0/Q8_1 blocks of 32 for its dot products); other group
sizes have no GGUF counterpart (Q4_K's 6-bit sub-block scales cannot hold arbitrary scales), so their
tensors are re-encoded by llama.cpp's rules from the dequantized values. Tensors outside the decoder's
Linears (embeddings, output) follow llama.cpp's mix rules for the chosen type.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from slimlm.checkpoint import read_state_dict
from slimlm.errors import SlimlmError
from slimlm.export.compressed_tensors import AUX_FILES, _args_for
from slimlm.formats.groupint import unpack_codes, unpack_zero_points


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


def _blocks(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, target: str) -> np.ndarray:
    """GGML blocks (rows, row_bytes) from codes (rows, n) and per-32-block scale/zero (rows, n/32)."""
    rows, n = q.shape
    nb = n // 32
    d = scale.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
    if target == "Q8_0":
        qs = q.astype(np.int8).reshape(rows, nb, 32).view(np.uint8)
        return np.concatenate([d.reshape(rows, nb, 2), qs], -1).reshape(rows, -1)
    u = (q.astype(np.int16) + 8).astype(np.uint8).reshape(rows, nb, 32)
    qs = u[:, :, :16] | (u[:, :, 16:] << 4)  # element j in the low nibble, j + 16 in the high nibble
    parts = [d.reshape(rows, nb, 2)]
    if target == "Q4_1":
        m = (-(zero.astype(np.float32) + 8) * scale).astype(np.float16).reshape(rows, nb, 1).view(np.uint8)
        parts.append(m.reshape(rows, nb, 2))
    parts.append(qs)
    return np.concatenate(parts, -1).reshape(rows, -1)


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


def export_gguf_equivalent(ct_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the GGUF equivalent of a compressed-tensors dir; returns what was carried over exactly."""
    from slimlm.gguf_io.quantize import _plain_encode, quantize_gguf

    ct_dir = Path(ct_dir)
    config = json.loads((ct_dir / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors":
        raise SlimlmError(f"{ct_dir} is not a compressed-tensors checkpoint")
    target = gguf_equivalent_type(qcfg)
    raw = read_state_dict(ct_dir)
    dense: dict[str, torch.Tensor] = {}
    lookup: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    modules = {k.rsplit(".", 1)[0] for k in raw if k.endswith(".weight_scale")}
    for key, t in raw.items():
        if key.rsplit(".", 1)[0] not in modules:
            dense[key] = t.float() if t.is_floating_point() else t
    for mod in modules:
        w = _args_for(qcfg, mod)["weights"]
        scale = raw[f"{mod}.weight_scale"].float()
        if f"{mod}.weight_packed" in raw:
            shape = tuple(int(v) for v in raw[f"{mod}.weight_shape"])
            q = unpack_codes(raw[f"{mod}.weight_packed"], shape, int(w["num_bits"]))
            zero = (unpack_zero_points(raw[f"{mod}.weight_zero_point"], (shape[0], scale.shape[1]),
                                       int(w["num_bits"])) if f"{mod}.weight_zero_point" in raw else None)
        else:
            q, zero = raw[f"{mod}.weight"], raw.get(f"{mod}.weight_zero_point")
        reps = q.shape[1] // 32 // scale.shape[1]  # channel scales repeat in every 32-block
        s_blocks = scale.repeat_interleave(reps, 1).numpy()
        z_blocks = None if zero is None else zero.float().repeat_interleave(reps, 1).numpy()
        deq = (q.float() - (0 if zero is None else zero.float().repeat_interleave(q.shape[1] // zero.shape[1], 1)))
        deq = deq * scale.repeat_interleave(q.shape[1] // scale.shape[1], 1)
        dense[f"{mod}.weight"] = deq
        qn = q.numpy()
        for r, row in enumerate(deq.numpy()):
            lookup[_row_key(row)] = (qn[r], s_blocks[r], None if z_blocks is None else z_blocks[r])
    carried: list[str] = []

    def encoder(values: np.ndarray, qtype, importance, name: str) -> np.ndarray:
        if getattr(qtype, "name", str(qtype)) == target and values.ndim == 2:
            hits = [lookup.get(_row_key(row)) for row in values]
            if all(h is not None for h in hits):
                carried.append(name)
                q = np.stack([h[0] for h in hits])
                s = np.stack([h[1] for h in hits])
                z = None if hits[0][2] is None else np.stack([h[2] for h in hits])
                return _blocks(q, s, z, target)
        return _plain_encode(values, qtype, importance, name)

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    with tempfile.TemporaryDirectory(prefix="slimlm-gguf-eq-") as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in dense.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**cfg, "dtype": "float32"}))
        for aux in AUX_FILES:
            if (ct_dir / aux).is_file():
                shutil.copy2(ct_dir / aux, tmp / aux)
        result = quantize_gguf(tmp, target, Path(out), overwrite=overwrite, encoder=encoder)
    return {"out": str(out), "type": target, "exact_codes": sorted(carried),
            "linears": len(modules), "result": result}
