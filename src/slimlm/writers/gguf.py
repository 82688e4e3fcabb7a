"""Streaming GGUF writer: header and tensor table first, then each tensor's bytes as soon as they exist.

gguf's GGUFWriter keeps every tensor in memory until the end unless the table is written first; we always
use its streaming mode, so peak memory is one tensor (plus its encoded bytes). The file is written under a
temporary name beside the target and renamed at the end, so a crash never leaves a half-written .gguf.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np

from slimlm.errors import SlimlmError
from slimlm.writers.atomic import atomic_path, check_output  # noqa: F401 (the GGUF writers' names)

T = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


@dataclass(frozen=True)
class RawValue:
    """A metadata value already in GGUF's little-endian encoding (what follows the value type), copied
    byte for byte from another GGUF."""

    payload: bytes


# little-endian numpy dtypes of gguf's scalar types (the same bytes as its struct formats)
_ARRAY_DTYPES = {V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
                 V.FLOAT32: "<f4", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8", V.BOOL: "?"}
# Python types gguf.GGUFValueType.get_type maps to each inferred array item type
_INFERRED = {V.STRING: (str, bytes, bytearray), V.FLOAT32: (float,), V.INT32: (int,), V.BOOL: (bool,)}


class FastGGUFWriter(gguf.GGUFWriter):
    """gguf's GGUFWriter with bulk packing of long metadata arrays (a vocabulary holds ~10^5 strings, which
    gguf packs one struct call at a time) and pass-through of :class:`RawValue`; the bytes are the same."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if isinstance(val, RawValue):
            return (struct.pack("<I", vtype) if add_vtype else b"") + val.payload
        if (vtype == V.ARRAY and isinstance(val, (list, tuple)) and len(val) > 64
                and self.endianess == gguf.GGUFEndian.LITTLE):
            packed = _pack_array_items(val, sub_type)
            if packed is not None:
                ltype, body = packed
                head = struct.pack("<I", vtype) if add_vtype else b""
                return head + struct.pack("<IQ", ltype, len(val)) + body
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _pack_array_items(val: list | tuple, sub_type: gguf.GGUFValueType | None) -> tuple[int, bytes] | None:
    """(item type, packed items) as gguf would write them, or None to leave the array to gguf."""
    types = set(map(type, val))
    if sub_type is not None:
        ltype = sub_type
    else:  # gguf infers the type from the first item and requires every item to infer the same
        ltype = gguf.GGUFValueType.get_type(val[0])
        allowed = _INFERRED.get(ltype)
        if allowed is None or not all(issubclass(t, allowed) for t in types):
            return None
        if ltype == V.INT32 and any(issubclass(t, (bool, float)) for t in types):
            return None
        if ltype == V.FLOAT32 and any(issubclass(t, (str, bytes, bytearray)) for t in types):
            return None
    if ltype == V.STRING:
        if not all(issubclass(t, (str, bytes, bytearray)) for t in types):
            return None
        enc = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
        parts: list[bytes] = [b""] * (2 * len(enc))  # length, bytes, length, bytes, ...
        parts[0::2] = map(struct.Struct("<Q").pack, map(len, enc))
        parts[1::2] = enc
        return ltype, b"".join(parts)
    dtype = _ARRAY_DTYPES.get(ltype)
    if dtype is None or not all(issubclass(t, (int, float, np.number, np.bool_)) for t in types):
        return None
    try:
        if ltype in (V.FLOAT32, V.FLOAT64):
            arr = np.array(val, dtype=np.float64)
            out = arr.astype(dtype)
            if not np.array_equal(np.isfinite(out), np.isfinite(arr)):
                return None  # struct refuses floats beyond float32's range; let gguf raise
        else:
            out = np.array(val, dtype=dtype)
    except (OverflowError, ValueError, TypeError):
        return None
    return ltype, out.tobytes()


def tensor_nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if shape and shape[-1] % block:
        raise SlimlmError(f"rows of {shape[-1]} values do not fit {qtype.name} blocks of {block}")
    return n // block * size


def data_layout(tensors: Iterable[tuple[str, tuple[int, ...], T]], alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT
                ) -> tuple[list[int], int]:
    """Each tensor's offset within the data section, and the section's size (every tensor padded to
    ``alignment``), as GGUFWriter lays them out."""
    offsets, pos = [], 0
    for _, shape, qtype in tensors:
        offsets.append(pos)
        pos += gguf.GGUFWriter.ggml_pad(tensor_nbytes(shape, qtype), alignment)
    return offsets, pos


def _write_header(writer: gguf.GGUFWriter, path: Path, write_metadata: Callable[[gguf.GGUFWriter], Any],
                  tensors: Iterable[tuple[str, tuple[int, ...], T]]) -> Any:
    """Metadata, tensor table and header into ``writer``'s file; returns what ``write_metadata`` returned."""
    meta = write_metadata(writer)
    for name, shape, qtype in tensors:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), tensor_nbytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return meta


def write_gguf_header(path: Path, arch: str, write_metadata: Callable[[gguf.GGUFWriter], Any],
                      tensors: Iterable[tuple[str, tuple[int, ...], T]]) -> tuple[Any, int]:
    """Write header, metadata and tensor table to ``path`` (truncating it); returns what ``write_metadata``
    returned and the file offset where the data section starts (tensor i at that plus ``data_layout``'s
    offset i). Whoever writes the tensors there must also size the file (zero padding after the last)."""
    writer = FastGGUFWriter(path, arch)
    try:
        meta = _write_header(writer, path, write_metadata, tensors)
        writer.flush()
        end = writer.fout[0].tell()
    finally:
        writer.close()
    if writer.data_alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        raise RuntimeError("write_gguf_header assumes gguf's default data alignment")
    return meta, gguf.GGUFWriter.ggml_pad(end, writer.data_alignment)


def write_gguf(out: Path, arch: str, write_metadata: Callable[[gguf.GGUFWriter], Any],
               tensors: Iterable[tuple[str, tuple[int, ...], T]], produce: Callable[[int], np.ndarray],
               overwrite: bool = True) -> Any:
    """Write a GGUF to ``out`` atomically; returns what ``write_metadata`` returned. ``tensors``: (name,
    PyTorch-order shape, type) in file order; ``produce(i)``: tensor i's encoded data, called once each, in order.
    """
    infos = list(tensors)
    with atomic_path(out, overwrite) as tmp:
        writer = FastGGUFWriter(tmp, arch)
        try:
            meta = _write_header(writer, tmp, write_metadata, infos)
            for i, (name, shape, qtype) in enumerate(infos):
                data = produce(i)
                expected = tensor_nbytes(shape, qtype)
                if data.nbytes != expected:
                    raise RuntimeError(f"{name}: encoder returned {data.nbytes} bytes, {qtype.name} needs {expected}")
                writer.write_tensor_data(np.ascontiguousarray(data))
            writer.flush()
        finally:
            writer.close()
    return meta
