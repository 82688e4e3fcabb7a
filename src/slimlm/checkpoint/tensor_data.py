"""Load one tensor's data from where its header says it lies: as float32, as raw GGML blocks, or as torch.

Every load maps just that tensor's bytes, read-only and shared. Not safetensors' own loader: that maps the
whole file copy-on-write, which counts as private memory for the whole file, while a read-only shared map of
one tensor is page cache the kernel can drop; so a writer streaming a 700 GB checkpoint holds one tensor.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    import torch

    from slimlm.checkpoint.types import TensorInfo

# numpy storage of the plain float types both formats share (bfloat16: its bits, widened by a shift)
_FLOATS = {"F32": "f4", "F16": "f2", "BF16": "u2", "F64": "f8"}
# torch dtype (by name) of each storage dtype a torch load can return, in both formats' words
_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
          "U32": "uint32", "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2"}


def packing_problem(tensors: list[TensorInfo], start: int, slack: int) -> str | None:
    """Why the tensors' data ranges are not packed as the format's writers pack them (from ``start``, back to back,
    gaps under ``slack`` bytes of padding), or None: a dimension, type or offset that lies makes an overlap or a
    gap. Data past the end of the file is a partial download, which the caller reports."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)  # type: ignore[operator]
    if spans and spans[0][0] != start:
        return f"{spans[0][0] - start:,} bytes before the first tensor {spans[0][2][:80]!r} belong to no tensor"
    for (_, end, name), (begin, _, nxt) in zip(spans, spans[1:]):
        if begin < end:
            return f"tensors {name[:80]!r} and {nxt[:80]!r} overlap"
        if begin >= end + slack:
            return f"{begin - end:,} bytes between tensors {name[:80]!r} and {nxt[:80]!r} belong to no tensor"
    return None


def raw_bytes(info: TensorInfo) -> np.ndarray:
    """The tensor's stored bytes (uint8, read-only, mapped from the file; no copy)."""
    if info.file is None or info.offset is None:
        raise SlimlmError(f"tensor {info.name} has no location in a file")
    if info.nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    size = os.path.getsize(info.file)
    if info.offset + info.nbytes > size:
        raise SlimlmError(f"{info.file}: truncated: tensor {info.name} needs bytes {info.offset:,} to "
                          f"{info.offset + info.nbytes:,} but the file has {size:,} (an incomplete download?)")
    return np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))


def load_array(info: TensorInfo, big_endian: bool = False) -> np.ndarray:
    """Float32 values in PyTorch-order ``shape``; GGML blocks dequantized. F32 data comes back as a
    read-only view of the mapping (no copy); every other type is converted into a new array."""
    storage = _FLOATS.get(info.dtype)
    if storage is not None:
        dtype = np.dtype((">" if big_endian else "<") + storage)
        raw = raw_bytes(info).view(dtype).reshape(info.shape)
        if info.dtype == "BF16":  # bfloat16 is the top half of a float32; shifted in place: one float32 copy
            wide = raw.astype(np.uint32)
            wide <<= 16
            return wide.view(np.float32)
        if info.dtype == "F32" and not big_endian:
            return np.asarray(raw)
        return raw.astype(np.float32)
    if info.ggml_type is None:
        raise SlimlmError(f"{info.name} is stored as {info.dtype}; float loads read F32, F16, BF16 and F64")
    import gguf

    from slimlm.formats import ggml

    qtype = gguf.GGMLQuantizationType[info.ggml_type]
    if qtype in ggml.REGISTRY:
        return ggml.dequantize(raw_bytes(info), qtype, info.shape)
    return gguf.quants.dequantize(np.asarray(raw_bytes(info)), qtype).reshape(info.shape).astype(np.float32)


def torch_dtype(info: TensorInfo) -> torch.dtype:
    """The torch dtype a tensor is stored in; GGML block types have none."""
    import torch

    name = _TORCH.get(info.dtype)
    if name is None:
        raise SlimlmError(f"{info.name} is stored as {info.dtype}, which has no torch dtype")
    return getattr(torch, name)


def load_torch(info: TensorInfo, big_endian: bool = False) -> torch.Tensor:
    """The tensor in its stored dtype, as a private copy: callers change weights in place (AWQ folds
    scales into norms), and a tensor backed by a read-only mapping would fault on that."""
    import torch

    dtype = torch_dtype(info)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    data = np.array(raw_bytes(info))
    width = dtype.itemsize
    if big_endian and width > 1:
        data = data.view(f">u{width}").astype(f"<u{width}").view(np.uint8)
    return torch.from_numpy(data).view(dtype).reshape(info.shape)


_CHECK_SLICE = 1 << 22  # elements checked at a time


def check_finite(values: np.ndarray | torch.Tensor, what: str) -> None:
    """Refuse NaN and Inf (a real failure of fp16 checkpoints and of activations that overflow fp16): quantizing
    them would write garbage scales that no later step notices. ``what`` names the tensor in the message."""
    import torch

    lib = torch if isinstance(values, torch.Tensor) else np
    floating = values.is_floating_point() if lib is torch else values.dtype.kind == "f"
    flat = values.reshape(-1)
    # in slices: isfinite builds |x| and two masks, 1.6x the tensor (+3 GB for a 14B's lm_head at once)
    if not floating or all(bool(lib.isfinite(flat[i:i + _CHECK_SLICE]).all())
                           for i in range(0, flat.shape[0], _CHECK_SLICE)):
        return
    nan, inf = int(lib.isnan(values).sum()), int(lib.isinf(values).sum())
    raise SlimlmError(f"{what} holds {nan:,} NaN and {inf:,} Inf values; refusing to quantize it (a broken fp16 "
                      "export or an overflow?)")
