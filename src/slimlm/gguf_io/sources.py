"""Lazy tensor sources for GGUF writing: a Hugging Face dir (safetensors, mmap) or an existing GGUF file.

Each source lists its tensors under their GGUF names with shapes, and loads one tensor at a time as float32
with llama.cpp's layout already applied (Q/K rope permutation, Gemma's norm + 1), so a writer can stream.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import gguf
import numpy as np

from slimlm.errors import SlimlmError
from slimlm.gguf_io.architectures import ArchSpec, arch_spec, llama3_rope_factors, rope_parameters
from slimlm.gguf_io.writer import FastGGUFWriter, RawValue, tensor_nbytes

log = logging.getLogger(__name__)


@dataclass
class SourceTensor:
    """One tensor as it will be written: GGUF name, PyTorch-order shape, and a loader of float32 values."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    source_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
    hf_name: str | None = None


@dataclass
class ModelSource:
    """Everything a GGUF writer needs, with tensors loaded on demand."""

    arch: str  # GGUF general.architecture
    tensors: list[SourceTensor]
    config: dict[str, Any]
    write_metadata: Callable[[gguf.GGUFWriter], dict[str, Any]]
    kind: str  # "hf" or "gguf"
    path: Path
    quantized_source: bool = False
    facts: dict[str, int] = field(default_factory=dict)  # n_layers, n_head, n_head_kv


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: HF keeps the two rope halves apart, GGUF interleaves them per head."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SlimlmError(f"{model_dir} holds no .safetensors weights (pickled .bin checkpoints are not loaded)")
    return files


_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _tensor_loader(path: Path, offset: int, dtype: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    """Read one tensor through a read-only shared mapping of just its bytes.

    Not safetensors' own loader: that maps the whole file copy-on-write, which counts as private memory
    for the whole file, while a read-only shared map of one tensor is page cache the kernel can drop.
    """
    def load() -> np.ndarray:
        raw = np.memmap(path, dtype=_NUMPY_DTYPES[dtype], mode="r", offset=offset, shape=shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw) if dtype == "F32" else raw.astype(np.float32)
    return load


HFTensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]  # HF name, shape, float32 loader


def _safetensors_tensors(model_dir: Path) -> Iterator[HFTensor]:
    from slimlm.checkpoint.safetensors_header import read_safetensors_header

    for path in _safetensors_files(model_dir):
        infos, _, expected, actual = read_safetensors_header(path)
        if actual < expected:
            raise SlimlmError(f"{path} is truncated ({actual:,} of {expected:,} bytes): an incomplete download?")
        for info in infos:
            if info.dtype not in _NUMPY_DTYPES:
                raise SlimlmError(f"{info.name} is stored as {info.dtype}; GGUF export reads F32, F16 and BF16 "
                                  "weights")
            shape = tuple(int(d) for d in info.shape)
            yield info.name, shape, _tensor_loader(path, int(info.offset), info.dtype, shape)


def _layer_key(name: str) -> tuple[int, int, str]:
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith("token_embd") or name == "rope_freqs.weight" else 2, 0, name)


def open_hf_dir(model_dir: Path, tensors: Iterable[HFTensor] | None = None) -> ModelSource:
    """A lazy source over a Hugging Face model dir of a supported architecture.

    ``tensors`` replaces the dir's safetensors with (HF name, shape, float32 loader) triples, for a caller
    that makes the values itself (the GGUF equivalent of a compressed-tensors dir); config, tokenizer, GGUF
    names and llama.cpp's layout still come from the dir."""
    from slimlm.gguf_io.architectures import write_hparams
    from slimlm.gguf_io.tokenizer import write_tokenizer

    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise SlimlmError(f"{model_dir} has no config.json; expected a Hugging Face model dir or a .gguf file")
    config = json.loads(cfg_path.read_text())
    if "text_config" in config and "num_hidden_layers" not in config:
        config = {**config, **config["text_config"]}
    hf_arch, spec = arch_spec(config)
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, n_layers)
    tie = bool(config.get("tie_word_embeddings", spec.drop_lm_head))

    listed = _safetensors_tensors(model_dir) if tensors is None else tensors
    out: list[SourceTensor] = []
    for hf_name, shape, load in listed:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and (tie or spec.drop_lm_head):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SlimlmError(f"{hf_name} in {model_dir} has no GGUF name for {hf_arch}")
        transform = _transform(hf_name, spec, n_head, n_head_kv)
        out.append(SourceTensor(name, shape, lambda load=load, transform=transform: transform(load()),
                                hf_name=hf_name))
    tensors = out
    rope = rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        factors = llama3_rope_factors(config, rope)
        tensors.append(SourceTensor("rope_freqs.weight", factors.shape, lambda: factors))
    tensors.sort(key=lambda t: _layer_key(t.name))
    gguf_arch = gguf.MODEL_ARCH_NAMES[spec.gguf_arch]

    def write_metadata(writer: gguf.GGUFWriter) -> dict[str, Any]:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(str(config.get("_name_or_path") or model_dir.name).split("/")[-1] or model_dir.name)
        write_hparams(writer, config, spec)
        return write_tokenizer(writer, model_dir, int(config["vocab_size"]))

    return ModelSource(gguf_arch, tensors, config, write_metadata, "hf", model_dir,
                       facts={"n_layers": n_layers, "n_head": n_head, "n_head_kv": n_head_kv})


def rope_heads(hf_name: str, spec: ArchSpec, n_head: int, n_head_kv: int) -> int | None:
    """The head count of llama.cpp's Q/K row permutation (:func:`permute_for_rope`) for this tensor, else None."""
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_head_kv
    return None


def _transform(hf_name: str, spec: ArchSpec, n_head: int, n_head_kv: int) -> Callable[[np.ndarray], np.ndarray]:
    heads = rope_heads(hf_name, spec, n_head, n_head_kv)
    if heads is not None:
        return lambda a: permute_for_rope(a, heads)
    if spec.norm_plus_one and hf_name.endswith("norm.weight"):
        return lambda a: a + np.float32(1.0)
    return lambda a: a


# Keys that describe the file's encoding, not the model: rewritten by whoever writes a new file.
_ENCODING_KEYS = ("general.file_type", "general.quantization_version", "general.architecture")


def open_gguf(path: Path) -> ModelSource:
    """A lazy source over an existing GGUF (for re-quantizing): metadata copied, tensors dequantized on load."""
    from slimlm.gguf_io.gguf_header import read_header

    try:
        header = read_header(path)
    except (ValueError, OSError, struct.error) as exc:
        raise SlimlmError(f"{path} is not a readable GGUF file: {exc}") from exc
    if header is None:  # big-endian or GGUF v1: gguf's reader knows those
        return _open_gguf_reader(path)
    fields, infos = header
    by_key = {f.key: f for f in fields}
    arch_field = by_key.get("general.architecture")
    if arch_field is None or arch_field.type != gguf.GGUFValueType.STRING:
        raise SlimlmError(f"{path} has no general.architecture")
    arch = arch_field.scalar()

    def field_int(key: str, default: int = 0) -> int:
        f = by_key.get(f"{arch}.{key}")
        return int(f.scalar()) if f is not None and f.type != gguf.GGUFValueType.ARRAY else default

    facts = {"n_layers": field_int("block_count"), "n_head": field_int("attention.head_count"),
             "n_head_kv": field_int("attention.head_count_kv", field_int("attention.head_count"))}
    size = path.stat().st_size
    tensors = []
    quantized = False
    for t in infos:
        shape = tuple(reversed(t.dims))
        quantized |= t.type not in _FLOAT_TYPES
        if t.offset + tensor_nbytes(shape, t.type) > size:
            raise SlimlmError(f"{path} is truncated: {t.name} ends past the end of the file")
        tensors.append(SourceTensor(t.name, shape, _gguf_loader(path, t.offset, t.type, shape), source_type=t.type))

    def write_metadata(writer: gguf.GGUFWriter) -> dict[str, Any]:
        if not isinstance(writer, FastGGUFWriter):
            raise TypeError("copying GGUF metadata as bytes needs slimlm.gguf_io.writer.FastGGUFWriter")
        for f in fields:
            if f.key.startswith("GGUF.") or f.key in _ENCODING_KEYS or f.key.startswith("quantize."):
                continue
            writer.add_key_value(f.key, RawValue(f.raw), f.type, f.sub_type)
        return {"model": "copied"}

    return ModelSource(arch, tensors, {}, write_metadata, "gguf", path, quantized_source=quantized, facts=facts)


_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def _gguf_loader(path: Path, offset: int, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]
                 ) -> Callable[[], np.ndarray]:
    """Float32 values of one GGUF tensor, through a read-only map of just its bytes (as for safetensors)."""
    if qtype in _FLOAT_TYPES:
        return _tensor_loader(path, offset, qtype.name, shape)

    def load() -> np.ndarray:
        from slimlm.formats import ggml

        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(tensor_nbytes(shape, qtype),))
        if qtype in ggml.REGISTRY:
            return ggml.dequantize(raw, qtype, shape)
        return gguf.quants.dequantize(np.asarray(raw), qtype).reshape(shape).astype(np.float32)
    return load


def _open_gguf_reader(path: Path) -> ModelSource:
    """open_gguf through gguf's GGUFReader (slow on large vocabularies; for the files read_header leaves)."""
    from slimlm.formats import ggml

    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError) as exc:
        raise SlimlmError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise SlimlmError(f"{path} has no general.architecture")
    arch = arch_field.contents()

    def field_int(key: str, default: int = 0) -> int:
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.contents()) if f is not None else default

    facts = {"n_layers": field_int("block_count"), "n_head": field_int("attention.head_count"),
             "n_head_kv": field_int("attention.head_count_kv", field_int("attention.head_count"))}
    tensors = []
    quantized = False
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        quantized |= qtype not in _FLOAT_TYPES

        def load(t=t, qtype=qtype, shape=shape) -> np.ndarray:
            if qtype in ggml.REGISTRY:
                return ggml.dequantize(np.asarray(t.data), qtype, shape)
            return gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(shape).astype(np.float32)
        tensors.append(SourceTensor(t.name, shape, load, source_type=qtype))

    def write_metadata(writer: gguf.GGUFWriter) -> dict[str, Any]:
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key in _ENCODING_KEYS or key.startswith("quantize."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), vtype, sub)
        return {"model": "copied"}

    return ModelSource(arch, tensors, {}, write_metadata, "gguf", path, quantized_source=quantized, facts=facts)


def open_source(path: Path) -> ModelSource:
    path = Path(path)
    if not path.exists():
        raise SlimlmError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SlimlmError(f"{path} is a file but not .gguf; pass a Hugging Face model dir or a .gguf")
        return open_gguf(path)
    return open_hf_dir(path)


def iter_names(source: ModelSource) -> Iterator[str]:
    return (t.name for t in source.tensors)
