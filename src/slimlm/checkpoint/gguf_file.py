"""Read a GGUF file's metadata and tensor table with the `gguf` package, never its tensor data.

``gguf.GGUFReader`` memory-maps the file and parses the header. Two additions make it safe on files from
the wild: every header read is bounds-checked against the file size (a corrupt array length would otherwise
send the reader through as many iterations over empty slices as the length says), and the tensor table is recorded
without building data views, so a file whose data is cut short (a partial download) still opens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from slimlm.checkpoint.types import TensorInfo
from slimlm.errors import SlimlmError

# Metadata arrays longer than this (tokenizer vocabularies, merges) are summarised, not copied.
_MAX_ARRAY_ITEMS = 64


class _HeaderTruncated(Exception):
    pass


class _HeaderOnlyReader(GGUFReader):
    """GGUFReader that refuses reads past the end of the file and records tensors without data views."""

    # GGUFReader stores np.memmap(path) in ``self.data``; keeping a plain ndarray view of the same mapping
    # instead skips numpy's memmap bookkeeping on each of the ~10^5 small header reads (3x faster).
    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):  # type: ignore[override]
        count = int(count)
        end = int(offset) + np.dtype(dtype).itemsize * count
        if offset < 0 or count < 0 or end > len(self.data):
            raise _HeaderTruncated(f"header needs byte {end} but the file has {len(self.data)}")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):  # type: ignore[override]
        infos: list[tuple[str, int, list[int], int]] = []
        seen: set[str] = set()
        for fld in fields:
            _len, name_data, _ndims, dims, raw_type, offset = fld.parts
            name = bytes(name_data).decode("utf-8")
            if name in seen:
                raise ValueError(f"duplicate tensor {name!r}")
            seen.add(name)
            infos.append((name, int(raw_type[0]), [int(d) for d in dims], int(start_offs + offset[0])))
        self.tensor_infos = infos
        self.tensors = []


def read_gguf(path: Path) -> tuple[list[TensorInfo], dict[str, Any], int, int]:
    """Return (tensors, metadata, expected file size, actual file size) of a GGUF file."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SlimlmError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size < 24:
        raise SlimlmError(f"{path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise SlimlmError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        reader = _HeaderOnlyReader(path, "r")
        tensors = [_tensor_info(path, *info) for info in reader.tensor_infos]
        metadata = {name: _field_value(fld) for name, fld in reader.fields.items()}
    except SlimlmError:
        raise
    except _HeaderTruncated as exc:
        raise SlimlmError(f"{path}: truncated GGUF header ({exc})") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SlimlmError(f"{path}: corrupt GGUF header ({reason})") from None
    data_end = max((t.offset + t.nbytes for t in tensors), default=size)  # type: ignore[operator]
    return tensors, metadata, data_end, size


def _tensor_info(path: Path, name: str, raw_type: int, dims: list[int], offset: int) -> TensorInfo:
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise SlimlmError(f"{path}: corrupt GGUF header (tensor {name[:80]!r} has unknown type {raw_type})") from None
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    numel = 1
    for dim in dims:
        numel *= dim
    if dims and dims[0] % block:
        raise SlimlmError(
            f"{path}: corrupt GGUF header (tensor {name[:80]!r}: row of {dims[0]} is not a multiple of "
            f"the {ggml_type.name} block of {block})"
        )
    return TensorInfo(name=name, shape=tuple(reversed(dims)), dtype=ggml_type.name,
                      nbytes=numel // block * type_size, ggml_type=ggml_type.name, file=str(path),
                      offset=offset)


def _field_value(fld: Any) -> Any:
    """A metadata value as plain Python; long arrays become a short description."""
    if not fld.types:
        return None
    if fld.types[0] == GGUFValueType.ARRAY:
        if len(fld.data) > _MAX_ARRAY_ITEMS:
            item = fld.types[-1].name.lower() if len(fld.types) > 1 else "item"
            return f"<array of {len(fld.data)} {item}>"
        return fld.contents()
    value = fld.contents()
    return value


# ------------------------------------------------------------------------ HF-style config from metadata

_ARCH_TO_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "qwen2moe": "qwen2_moe",
    "deepseek2": "deepseek_v2",
}


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
        config.update(
            model_type="deepseek_v3" if has_probs_bias else "deepseek_v2",
            q_lora_rank=key("attention.q_lora_rank") or None,
            kv_lora_rank=key("attention.kv_lora_rank"),
            qk_rope_head_dim=rope,
            qk_nope_head_dim=(qk - rope) if qk and rope else None,
            v_head_dim=v,
            n_routed_experts=n_experts or None,
            num_experts_per_tok=key("expert_used_count"),
            n_shared_experts=key("expert_shared_count", 0),
            moe_intermediate_size=key("expert_feed_forward_length", 0),
            first_k_dense_replace=key("leading_dense_block_count", 0),
            num_nextn_predict_layers=nextn,
            topk_method="noaux_tc" if has_probs_bias else None,
        )
    return {k: v for k, v in config.items() if v is not None}
