"""A fast GGUF header scan: metadata keys with their raw value bytes, tensor infos, and the data offset.

gguf's GGUFReader builds a numpy view for every part of every field, which takes seconds on a vocabulary
of ~10^5 tokens; re-quantizing only needs a handful of values decoded and the rest copied as bytes.
Little-endian GGUF v2/v3 only (``None`` otherwise, and the caller falls back to GGUFReader).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

V = gguf.GGUFValueType
_FIXED = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4, V.BOOL: 1,
          V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
_SCALAR_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
               V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


@dataclass
class HeaderField:
    key: str
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None  # item type of an array
    raw: bytes  # the encoded value (what follows the value type in the file)

    def scalar(self) -> Any:
        """The value of a scalar or string field."""
        if self.type == V.STRING:
            return self.raw[8:].decode("utf-8")
        return struct.unpack(_SCALAR_FMT[self.type], self.raw)[0]


@dataclass
class HeaderTensor:
    name: str
    dims: tuple[int, ...]  # GGUF order (fastest-varying first)
    type: gguf.GGMLQuantizationType
    offset: int  # absolute offset of the data in the file


def _skip_value(buf: Any, pos: int, vtype: int) -> int:
    """Position just past a value of type ``vtype`` starting at ``pos``."""
    size = _FIXED.get(vtype)
    if size is not None:
        return pos + size
    if vtype == V.STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == V.ARRAY:
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        size = _FIXED.get(itype)
        if size is not None:
            return pos + size * count
        if itype == V.STRING:
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
            return pos
        for _ in range(count):
            pos = _skip_value(buf, pos, itype)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_header(path: Path) -> tuple[list[HeaderField], list[HeaderTensor]] | None:
    """Fields and tensors of a little-endian GGUF v2/v3, or None for anything else (left to GGUFReader)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if len(buf) < 24 or buf[:4] != b"GGUF":
            return None
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            return None  # v1 (32-bit counts) or a big-endian file
        pos = 24
        fields = []
        for _ in range(n_kv):
            klen = struct.unpack_from("<Q", buf, pos)[0]
            key = bytes(buf[pos + 8:pos + 8 + klen]).decode("utf-8")
            vtype = V(struct.unpack_from("<I", buf, pos + 8 + klen)[0])
            start = pos + 12 + klen
            pos = _skip_value(buf, start, vtype)
            sub = V(struct.unpack_from("<I", buf, start)[0]) if vtype == V.ARRAY else None
            fields.append(HeaderField(key, vtype, sub, bytes(buf[start:pos])))
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for fld in fields:
            if fld.key == "general.alignment" and fld.type == V.UINT32:
                alignment = int(fld.scalar())
        infos = []
        for _ in range(n_tensors):
            nlen = struct.unpack_from("<Q", buf, pos)[0]
            name = bytes(buf[pos + 8:pos + 8 + nlen]).decode("utf-8")
            pos += 8 + nlen
            n_dims = struct.unpack_from("<I", buf, pos)[0]
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            pos += 4 + 8 * n_dims
            raw_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, tuple(int(d) for d in dims), gguf.GGMLQuantizationType(raw_type), int(offset)))
        data_start = (pos + alignment - 1) // alignment * alignment
        if pos > len(buf):
            raise ValueError("truncated GGUF header")
    return fields, [HeaderTensor(n, d, t, data_start + o) for n, d, t, o in infos]
