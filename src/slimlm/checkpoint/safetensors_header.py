"""Read a safetensors file's header (names, dtypes, shapes, offsets) without touching tensor data.

By hand on purpose (the header is an 8-byte little-endian length, then that much JSON): it never maps tensor
data, inspects partial downloads (the safetensors library refuses those) and turns every malformation into a
one-line SlimlmError. Validation follows the format's rules: bounded header, known dtypes, non-negative integer
shapes, ``end - begin == numel * bits / 8``, and non-overlapping data ranges.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from slimlm.checkpoint.tensor_data import packing_problem
from slimlm.checkpoint.types import TensorInfo
from slimlm.errors import SlimlmError

# The safetensors library refuses headers above 100 MB; a real header with a million tensors is ~100 MB.
MAX_HEADER_BYTES = 100_000_000

MAX_DIMS = 16  # real tensors have at most 5; torch refuses over 64
MAX_TENSOR_BYTES = 1 << 50  # 1 PiB: past any real tensor, well inside int64 offsets

# Bits per element of each safetensors dtype (sub-byte float formats pack elements across bytes).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


def read_safetensors_header(path: Path) -> tuple[list[TensorInfo], dict[str, str], int, int]:
    """Return (tensors, __metadata__, expected file size, actual file size) of a safetensors file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SlimlmError(f"{path}: not a safetensors file (only {size} bytes, no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise SlimlmError(f"{path}: corrupt safetensors header (declared length {header_len} bytes exceeds the "
                                  f"{MAX_HEADER_BYTES} byte limit)")
            if header_len < 2:
                raise SlimlmError(f"{path}: corrupt safetensors header (declared length {header_len} bytes)")
            if 8 + header_len > size:
                raise SlimlmError(f"{path}: truncated safetensors header ({size} bytes on disk, the header alone needs "
                                  f"{8 + header_len})")
            raw = f.read(header_len)
    except OSError as exc:
        raise SlimlmError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise SlimlmError(f"{path}: corrupt safetensors header (the name {str(exc)[:80]!r} appears twice)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120]
        raise SlimlmError(f"{path}: corrupt safetensors header (not valid JSON: {reason})") from None
    except RecursionError:
        raise SlimlmError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise SlimlmError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SlimlmError(f"{path}: corrupt safetensors header (__metadata__ is not an object of strings)")
    tensors = [_tensor_info(path, name, entry, data_start) for name, entry in header.items()]
    _check_layout(path, tensors, data_start)
    data_end = max((t.offset + t.nbytes for t in tensors if t.offset is not None), default=data_start)
    if size > data_end:
        raise SlimlmError(f"{path}: corrupt safetensors header ({size - data_end:,} bytes after the last tensor's "
                          "data: a header length or offsets that lie)")
    return tensors, metadata, data_end, size


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict, refusing a name given twice (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _tensor_info(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    def bad(why: str) -> SlimlmError:
        return SlimlmError(f"{path}: corrupt safetensors header (tensor {name[:80]!r}: {why})")

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise bad(f"unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad("shape is not a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise bad(f"shape has {len(shape)} dimensions (at most {MAX_DIMS})")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]):
        raise bad("data_offsets is not [begin, end] with 0 <= begin <= end")
    numel = math.prod(shape)
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise bad(f"{numel} elements of {dtype} do not fill whole bytes")
    nbytes = bits // 8
    if nbytes > MAX_TENSOR_BYTES:
        raise bad(f"shape {shape[:MAX_DIMS]} of {dtype} is {nbytes:,} bytes (over the {MAX_TENSOR_BYTES:,} byte limit)")
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"data_offsets span {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} needs {nbytes}")
    return TensorInfo(name=name, shape=tuple(shape), dtype=dtype, nbytes=nbytes, file=str(path),
                      offset=data_start + offsets[0])


def _check_layout(path: Path, tensors: list[TensorInfo], data_start: int) -> None:
    """Data ranges back to back from the end of the header, as the format requires (the safetensors library
    refuses anything else): an overlap, or a gap where a tensor's entry was removed or moved, is a lie."""
    problem = packing_problem(tensors, data_start, slack=1)
    if problem:
        raise SlimlmError(f"{path}: corrupt safetensors header ({problem})")
