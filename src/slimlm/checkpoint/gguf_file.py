"""Read a GGUF file's header (metadata and tensor table), never its tensor data: slimlm's one GGUF parser.

A raw scan over a read-only mmap, not gguf's GGUFReader (which builds a numpy view for every part of every
field: seconds on a ~150k-token vocabulary); metadata values stay encoded bytes, decoded when asked, so
re-quantizing copies them byte for byte. Every read is bounds-checked against the file size (a corrupt length is
a "truncated GGUF header", never a loop over empty reads) and tensor data is never touched, so a partial download
opens. Both byte orders are read, as GGUFReader does (a big-endian version reads as a multiple of 2^16).
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from slimlm.checkpoint.tensor_data import packing_problem
from slimlm.checkpoint.types import TensorInfo
from slimlm.errors import SlimlmError

V = GGUFValueType
# struct codes of the fixed-size value types (without byte order)
_CODES = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
          V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
_SIZES = {vtype: struct.calcsize("<" + code) for vtype, code in _CODES.items()}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays: llama.cpp reads none; deeper is a hostile file, not a model
_MAX_ELEMENTS = 1 << 48  # elements of one tensor (256 T): past any real model, well inside int64 byte counts
# The fewest bytes a metadata entry (key length, type, 1-byte value) and a tensor entry (name length, n_dims,
# type, offset) take: the counts a header declares are checked against the file before any loop runs.
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8
# Metadata arrays longer than this (tokenizer vocabularies, merges) are summarised, not decoded.
_MAX_ARRAY_ITEMS = 64


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class GGUFField:
    """One metadata key-value as stored: ``raw`` is the encoded value (what follows the value type)."""

    key: str
    type: GGUFValueType
    sub_type: GGUFValueType | None  # item type of an array
    raw: bytes
    byte_order: str = "<"  # struct's "<" or ">"

    def value(self) -> Any:
        """The value as plain Python; nested arrays are flattened, as GGUFReader.contents() does."""
        return _decode(self.raw, 0, self.type, self.byte_order)[0]

    def summary(self) -> Any:
        """The value, or "<array of N item>" for arrays longer than 64 items (left undecoded)."""
        if self.type != V.ARRAY:
            return self.value()
        count, leaf, _ = _leaves(self.raw, 0, self.byte_order)
        if count > _MAX_ARRAY_ITEMS:
            return f"<array of {count} {leaf.name.lower()}>"
        return self.value()


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's header: fields in file order, tensors (absolute data offsets), where the data starts."""

    path: Path
    version: int
    big_endian: bool
    fields: list[GGUFField]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int

    def field(self, key: str) -> GGUFField | None:
        return next((f for f in self.fields if f.key == key), None)

    def metadata(self) -> dict[str, Any]:
        """Every key as plain Python, long arrays summarised (GGUFReader's GGUF.* header keys included)."""
        meta: dict[str, Any] = {"GGUF.version": self.version, "GGUF.tensor_count": len(self.tensors),
                                "GGUF.kv_count": len(self.fields)}
        try:
            meta.update((f.key, f.summary()) for f in self.fields)
        except ValueError as exc:  # a string that is not UTF-8
            raise _corrupt(self.path, exc) from None
        return meta

    @property
    def data_end(self) -> int:
        """The file size the tensor table describes (the actual size is ``file_size``)."""
        return max((t.offset + t.nbytes for t in self.tensors), default=self.file_size)  # type: ignore[operator]


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse the header of a GGUF file; anything malformed is a one-line SlimlmError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise SlimlmError(f"{path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise SlimlmError(f"{path}: not a GGUF file (bad magic bytes)")
            return _scan(path, buf)
    except OSError as exc:
        raise SlimlmError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except _Truncated as exc:
        raise SlimlmError(f"{path}: truncated GGUF header ({exc})") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, RecursionError) as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: Exception) -> SlimlmError:
    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return SlimlmError(f"{path}: corrupt GGUF header ({reason})")


def read_gguf(path: Path) -> tuple[list[TensorInfo], dict[str, Any], int, int]:
    """(tensors, metadata, expected file size, actual file size) of a GGUF file."""
    header = read_gguf_header(path)
    return header.tensors, header.metadata(), header.data_end, header.file_size


def _scan(path: Path, buf: Any) -> GGUFHeader:
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written for the other byte order
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = struct.unpack_from(order + "QQ", buf, 8)
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > len(buf) - 24:
        raise _Truncated(f"the header declares {n_kv} metadata entries and {n_tensors} tensors, more than "
                         f"{len(buf)} bytes can hold")
    fields, pos = _scan_fields(buf, 24, n_kv, order)
    table, pos = _scan_tensor_table(buf, pos, n_tensors, order)
    alignment = GGUF_DEFAULT_ALIGNMENT
    align_field = next((f for f in fields if f.key == "general.alignment"), None)
    if align_field is not None:
        if align_field.type != V.UINT32:
            raise ValueError("general.alignment is not a UINT32")
        alignment = align_field.value()
        if alignment == 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment} is not a power of two")
    data_offset = (pos + alignment - 1) // alignment * alignment
    tensors = [_tensor_info(path, name, raw_type, dims, data_offset + offset)
               for name, raw_type, dims, offset in table]
    _check_layout(path, tensors, alignment, data_offset)
    end = max((t.offset + t.nbytes for t in tensors), default=data_offset)  # type: ignore[operator]
    if len(buf) >= end + alignment:
        raise SlimlmError(f"{path}: corrupt GGUF header ({len(buf) - end:,} bytes after the last tensor's data "
                          "belong to no tensor)")
    return GGUFHeader(path, version, order == ">", fields, tensors, data_offset, len(buf))


def _check_layout(path: Path, tensors: list[TensorInfo], alignment: int, data_offset: int) -> None:
    """Tensor data aligned as llama.cpp requires and packed as every GGUF writer packs it (llama.cpp's and gguf's:
    back to back, each padded to the alignment)."""
    for t in tensors:
        if (t.offset - data_offset) % alignment:  # type: ignore[operator]
            raise SlimlmError(f"{path}: corrupt GGUF header (tensor {t.name[:80]!r}: data offset "
                              f"{t.offset - data_offset} is not a multiple of the alignment {alignment})")  # type: ignore[operator]
    problem = packing_problem(tensors, data_offset, alignment)
    if problem:
        raise SlimlmError(f"{path}: corrupt GGUF header ({problem})")


def _need(buf: Any, end: int) -> None:
    if end > len(buf):
        raise _Truncated(f"header needs byte {end} but the file has {len(buf)}")


def _read_str(buf: Any, pos: int, order: str) -> tuple[bytes, int]:
    """A string's bytes (decoded by the caller once the whole entry is read, as GGUFReader orders its errors)."""
    end = _read_len(buf, pos, order)
    return bytes(buf[pos + 8:end]), end


def _scan_fields(buf: Any, pos: int, count: int, order: str) -> tuple[list[GGUFField], int]:
    fields = []
    seen = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # GGUFReader's own keys
    for _ in range(count):
        raw_key, pos = _read_str(buf, pos, order)
        _need(buf, pos + 4)
        vtype = V(struct.unpack_from(order + "I", buf, pos)[0])
        start = pos + 4
        end = _skip(buf, start, vtype, order)
        sub = V(struct.unpack_from(order + "I", buf, start)[0]) if vtype == V.ARRAY else None
        key = raw_key.decode("utf-8")
        if key in seen:
            raise KeyError(f"duplicate key {key!r}")
        seen.add(key)
        fields.append(GGUFField(key, vtype, sub, bytes(buf[start:end]), order))
        pos = end
    return fields, pos


def _skip(buf: Any, pos: int, vtype: GGUFValueType, order: str, depth: int = 0) -> int:
    """Position just past a value of type ``vtype`` starting at ``pos`` (bounds-checked)."""
    if depth > _MAX_NESTING:
        raise ValueError(f"metadata arrays nested over {_MAX_NESTING} deep")
    size = _SIZES.get(vtype)
    if size is not None:
        _need(buf, pos + size)
        return pos + size
    if vtype == V.STRING:
        return _read_len(buf, pos, order)
    # an array: item type, count, items
    _need(buf, pos + 12)
    raw_itype, count = struct.unpack_from(order + "IQ", buf, pos)
    itype = V(raw_itype)
    pos += 12
    size = _SIZES.get(itype)
    if size is not None:
        _need(buf, pos + size * count)
        return pos + size * count
    if count * (8 if itype == V.STRING else 12) > len(buf) - pos:
        raise _Truncated(f"an array of {count} items runs past the end of the file ({len(buf)} bytes)")
    if itype == V.STRING:  # the hot loop: ~10^5 tokens in a vocabulary
        unpack = struct.Struct(order + "Q").unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):  # a length that points past the end
            raise _Truncated(f"a string array runs past the end of the file ({len(buf)} bytes)") from None
        _need(buf, pos)
        return pos
    for _ in range(count):
        pos = _skip(buf, pos, itype, order, depth + 1)
    return pos


def _read_len(buf: Any, pos: int, order: str) -> int:
    """Position just past the length-prefixed string at ``pos``."""
    _need(buf, pos + 8)
    end = pos + 8 + struct.unpack_from(order + "Q", buf, pos)[0]
    _need(buf, end)
    return end


def _scan_tensor_table(buf: Any, pos: int, count: int, order: str
                       ) -> tuple[list[tuple[str, int, tuple[int, ...], int]], int]:
    table = []
    for _ in range(count):
        raw_name, pos = _read_str(buf, pos, order)
        _need(buf, pos + 4)
        (n_dims,) = struct.unpack_from(order + "I", buf, pos)
        if n_dims > _MAX_DIMS:
            raise ValueError(f"a tensor has {n_dims} dimensions (at most {_MAX_DIMS})")
        _need(buf, pos + 4 + 8 * n_dims + 12)
        dims = struct.unpack_from(f"{order}{n_dims}Q", buf, pos + 4)
        raw_type, offset = struct.unpack_from(order + "IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        table.append((raw_name.decode("utf-8"), raw_type, dims, offset))
    for name, count in Counter(name for name, *_ in table).items():  # after the table, as GGUFReader checks
        if count > 1:
            raise ValueError(f"duplicate tensor {name[:80]!r}")
    return table, pos


def _tensor_info(path: Path, name: str, raw_type: int, dims: tuple[int, ...], offset: int) -> TensorInfo:
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise SlimlmError(f"{path}: corrupt GGUF header (tensor {name[:80]!r} has unknown type {raw_type})") from None
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if 0 in dims:
        raise SlimlmError(f"{path}: corrupt GGUF header (tensor {name[:80]!r} has a zero-sized dimension: {list(dims)})")
    if math.prod(dims) > _MAX_ELEMENTS:
        raise SlimlmError(f"{path}: corrupt GGUF header (tensor {name[:80]!r} of shape {list(dims)} has over "
                          f"{_MAX_ELEMENTS:,} elements)")
    if dims and dims[0] % block:
        raise SlimlmError(f"{path}: corrupt GGUF header (tensor {name[:80]!r}: row of {dims[0]} is not a multiple of "
                          f"the {ggml_type.name} block of {block})")
    return TensorInfo(name=name, shape=tuple(reversed(dims)), dtype=ggml_type.name,
                      nbytes=math.prod(dims) // block * type_size, ggml_type=ggml_type.name, file=str(path),
                      offset=offset)


def _decode(raw: bytes, pos: int, vtype: GGUFValueType, order: str) -> tuple[Any, int]:
    """(value, end) of the encoded value at ``pos``; arrays decode to flat lists of their leaves."""
    code = _CODES.get(vtype)
    if code is not None:
        return struct.unpack_from(order + code, raw, pos)[0], pos + _SIZES[vtype]
    if vtype == V.STRING:
        end = pos + 8 + struct.unpack_from(order + "Q", raw, pos)[0]
        return bytes(raw[pos + 8:end]).decode("utf-8"), end
    itype_raw, count = struct.unpack_from(order + "IQ", raw, pos)
    itype, pos = V(itype_raw), pos + 12
    if itype in _CODES:
        dtype = np.dtype(order + _CODES[itype]) if itype != V.BOOL else np.dtype(np.bool_)
        return np.frombuffer(raw, dtype, count, pos).tolist(), pos + _SIZES[itype] * count
    items: list[Any] = []
    for _ in range(count):
        value, pos = _decode(raw, pos, itype, order)
        if itype == V.ARRAY:
            items.extend(value)
        else:
            items.append(value)
    return items, pos


def _leaves(raw: bytes, pos: int, order: str) -> tuple[int, GGUFValueType, int]:
    """(leaf count, leaf type, end) of the array at ``pos``, as GGUFReader counts and types an array's data:
    nested arrays flattened, the type of the first item's innermost value (ARRAY when an array is empty)."""
    itype_raw, count = struct.unpack_from(order + "IQ", raw, pos)
    itype = V(itype_raw)
    if itype != V.ARRAY:
        return count, itype if count else V.ARRAY, _skip(raw, pos, V.ARRAY, order)
    total, leaf, pos = 0, V.ARRAY, pos + 12
    for i in range(count):
        n, inner, pos = _leaves(raw, pos, order)
        total += n
        leaf = inner if i == 0 else leaf
    return total, leaf, pos


# ------------------------------------------------------------------------ HF-style config from metadata

_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                       "gemma2": "gemma2", "gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "deepseek2": "deepseek_v2"}
GGUF_CONFIG_ARCHS = frozenset(_ARCH_TO_MODEL_TYPE)  # the architectures whose metadata make a config


def config_from_gguf(metadata: dict[str, Any], tensors: list[TensorInfo]) -> dict[str, Any] | None:
    """An HF-style config dict built from GGUF metadata keys (llama.cpp's names), or None for other archs."""
    arch = metadata.get("general.architecture")
    if arch not in _ARCH_TO_MODEL_TYPE:
        return None

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if isinstance(value, list):  # per-layer values (e.g. head counts): the largest is the model's
            value = max(value) if value else default
        return value

    names = {t.name for t in tensors}
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    model_type = _ARCH_TO_MODEL_TYPE[arch]
    n_experts = key("expert_count", 0) or 0
    nextn = key("nextn_predict_layers", 0) or 0
    config: dict[str, Any] = {
        "model_type": model_type,
        "num_hidden_layers": (key("block_count", 0) or 0) - nextn,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length", 0),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv") or key("attention.head_count"),
        "vocab_size": key("vocab_size") or (embd.shape[0] if embd else None),
        "max_position_embeddings": key("context_length"),
        "rope_theta": key("rope.freq_base"),
        "tie_word_embeddings": "output.weight" not in names,
        "sliding_window": key("attention.sliding_window"),
    }
    if model_type != "deepseek_v2" and key("attention.key_length"):
        config["head_dim"] = key("attention.key_length")
    if model_type == "llama" and n_experts:
        config.update(model_type="mixtral", num_local_experts=n_experts,
                      num_experts_per_tok=key("expert_used_count"))
    elif model_type == "qwen2_moe":
        config.update(num_experts=n_experts, num_experts_per_tok=key("expert_used_count"),
                      moe_intermediate_size=key("expert_feed_forward_length"),
                      shared_expert_intermediate_size=key("expert_shared_feed_forward_length", 0))
    elif model_type == "deepseek_v2":
        rope = key("rope.dimension_count")
        qk = key("attention.key_length_mla") or key("attention.key_length")
        v = key("attention.value_length_mla") or key("attention.value_length")
        has_probs_bias = any(name.endswith("exp_probs_b.bias") for name in names)
        config.update(model_type="deepseek_v3" if has_probs_bias else "deepseek_v2",
                      q_lora_rank=key("attention.q_lora_rank") or None, kv_lora_rank=key("attention.kv_lora_rank"),
                      qk_rope_head_dim=rope, qk_nope_head_dim=(qk - rope) if qk and rope else None, v_head_dim=v,
                      n_routed_experts=n_experts or None, num_experts_per_tok=key("expert_used_count"),
                      n_shared_experts=key("expert_shared_count", 0),
                      moe_intermediate_size=key("expert_feed_forward_length", 0),
                      first_k_dense_replace=key("leading_dense_block_count", 0), num_nextn_predict_layers=nextn,
                      topk_method="noaux_tc" if has_probs_bias else None)
    return {k: v for k, v in config.items() if v is not None}
