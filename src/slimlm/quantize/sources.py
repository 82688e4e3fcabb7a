"""Lazy tensor sources for GGUF writing: a Hugging Face dir (safetensors, mmap) or an existing GGUF file. Each
lists its tensors under their GGUF names and loads one at a time as float32 with llama.cpp's layout already applied
(Q/K rope permutation, Gemma's norm + 1), so a writer can stream."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np

from slimlm.checkpoint import Checkpoint, TensorInfo, mla, open_checkpoint
from slimlm.checkpoint.gguf_file import GGUF_CONFIG_ARCHS
from slimlm.checkpoint.gguf_file import GGUFHeader
from slimlm.checkpoint.names import TensorNames
from slimlm.errors import SlimlmError
from slimlm.archs import arch_spec, llama3_rope_factors, rope_parameters, to_gguf


@dataclass
class SourceTensor:
    """One tensor as it will be written: GGUF name, PyTorch-order shape, and a loader of float32 values."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    source_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
    hf_name: str | None = None
    # A stacked expert tensor's slices along its first axis, each loaded alone: a writer encoding rows on their
    # own can stream them (a DeepSeek-V3 layer's ffn_down_exps is 15 GB of float32, one expert 59 MB).
    parts: list[Callable[[], np.ndarray]] | None = None


@dataclass
class ModelSource:
    """Everything a GGUF writer needs, with tensors loaded on demand; the metadata is written from it by
    ``writers.gguf_metadata.write_source_metadata``: for an HF dir from ``config`` (hyper-parameters) and ``path``
    (tokenizer files), for a GGUF from ``header`` (its fields, copied as stored)."""

    arch: str  # GGUF general.architecture
    tensors: list[SourceTensor]
    config: dict[str, Any]
    kind: str  # "hf" or "gguf"
    path: Path
    quantized_source: bool = False
    facts: dict[str, int] = field(default_factory=dict)  # n_layers, n_head, n_head_kv
    header: GGUFHeader | None = None  # a GGUF source's header


HFTensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]  # HF name, shape, float32 loader


def _layer_key(name: str) -> tuple[int, int, str]:
    if m := re.match(r"blk\.(\d+)\.", name):
        return (1, int(m.group(1)), name)
    return (0 if name.startswith("token_embd") or name == "rope_freqs.weight" else 2, 0, name)


_HF_DTYPES = ("F32", "F16", "BF16", "F64")
# Vectors llama.cpp declares 1-D that HF stores as a (1, n) Linear (Qwen2-MoE's shared-expert gate); its quantizer
# writes them 1-D too, so the file's bytes match.
_VECTORS = ("ffn_gate_inp_shexp.weight",)
_NAMED = (".weight", ".bias", ".e_score_correction_bias")  # the HF tensors llama.cpp has a name for


def open_hf_dir(model_dir: Path, tensors: Iterable[HFTensor] | None = None) -> ModelSource:
    """A lazy source over a Hugging Face model dir of a supported architecture. ``tensors`` replaces the dir's
    weights with (HF name, shape, float32 loader) triples from a caller that makes the values itself (the GGUF
    equivalent of a compressed-tensors dir); config, tokenizer, GGUF names and llama.cpp's layout stay the dir's."""
    if not (model_dir / "config.json").is_file():
        raise SlimlmError(f"{model_dir} has no config.json; expected a Hugging Face model dir or a .gguf file")
    ckpt = open_checkpoint(model_dir)
    if not ckpt.tensors:
        raise SlimlmError(f"{model_dir} holds no .safetensors weights (pickled .bin checkpoints are not loaded)")
    ckpt.check_complete()
    config = ckpt.config or {}
    if "text_config" in config and "num_hidden_layers" not in config:
        config = {**config, **config["text_config"]}
    hf_arch, spec = arch_spec(config)
    ckpt.validate()  # the config validated (and checked against the tensors) before anything is planned from it
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = 1 if spec.mla else int(config.get("num_key_value_heads") or n_head)
    names = TensorNames(spec.gguf_arch, n_layers)
    tie = bool(config.get("tie_word_embeddings", spec.drop_lm_head))
    if tensors is None:
        for info in ckpt.weight_tensors:
            if info.dtype not in _HF_DTYPES and info.name not in ckpt.fp8_scales:
                raise SlimlmError(f"{info.name} is stored as {info.dtype}; GGUF export reads F32, F16 and BF16 weights "
                                  "and DeepSeek's FP8 blocks")
        tensors = [(info.name, info.shape, _loader(ckpt, info)) for info in ckpt.weight_tensors]
    n_expert = int(config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0)
    tensors = stack_experts(tensors, n_expert)
    if spec.mla:
        tensors = mla.split_tensors(tensors, config)
    out: list[SourceTensor] = []
    for hf_name, shape, load in tensors:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and (tie or spec.drop_lm_head):
            continue
        name = names.tensor(hf_name) if hf_name.endswith(_NAMED) else None
        if name is None:
            raise SlimlmError(f"{hf_name} in {model_dir} has no GGUF name for {hf_arch}")
        transform = to_gguf(hf_name, spec, n_head, n_head_kv)
        if name.endswith(_VECTORS) and len(shape) == 2 and shape[0] == 1:
            shape, transform = (shape[1],), lambda a, f=transform: f(a).reshape(-1)
        parts = getattr(load, "parts", None)
        if parts is not None:
            parts = [lambda part=part, f=transform: f(part()) for part in parts]
        out.append(SourceTensor(name, tuple(shape), lambda load=load, f=transform: f(load()), hf_name=hf_name,
                                parts=parts))
    rope = rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        factors = llama3_rope_factors(config, rope)
        out.append(SourceTensor("rope_freqs.weight", factors.shape, lambda: factors))
    out.sort(key=lambda t: _layer_key(t.name))
    return ModelSource(gguf.MODEL_ARCH_NAMES[spec.gguf_arch], out, config, "hf", model_dir,
                       facts={"n_layers": n_layers, "n_head": n_head, "n_head_kv": n_head_kv, "n_expert": n_expert})


ROW_CHUNK = 1 << 26  # values per slice of an embedding or output matrix (256 MB of float32)


def _loader(ckpt: Checkpoint, info: TensorInfo) -> Callable[[], np.ndarray]:
    """The tensor's float32 loader; the embedding and output matrices (the largest: 3.7 GB of float32 for
    DeepSeek-V3's, two encoded at once by the GGUF writer's processes) also load by row slices (``parts``)."""
    whole = lambda: ckpt.load_array(info)  # noqa: E731
    if (not info.name.endswith(("embed_tokens.weight", "lm_head.weight")) or len(info.shape) != 2
            or info.dtype not in _HF_DTYPES or info.numel <= ROW_CHUNK):
        return whole
    rows, cols = info.shape
    step = max(1, ROW_CHUNK // cols)
    width = info.nbytes // info.numel

    def rows_of(r0: int) -> np.ndarray:
        r1 = min(rows, r0 + step)
        part = dataclasses.replace(info, shape=(r1 - r0, cols), nbytes=(r1 - r0) * cols * width,
                                   offset=info.offset + r0 * cols * width)
        return ckpt.load_array(part)

    return StackedLoad([lambda r0=r0: rows_of(r0) for r0 in range(0, rows, step)], whole)


_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


def stack_experts(tensors: Iterable[HFTensor], n_expert: int) -> list[HFTensor]:
    """Per-expert HF matrices (``...experts.{e}.w1.weight``) as one (n_expert, rows, cols) tensor per projection
    (``...experts.w1.weight``), the layout of llama.cpp's ``ffn_*_exps``; other tensors pass through in order."""
    out: list[HFTensor] = []
    groups: dict[str, dict[int, HFTensor]] = {}
    for item in tensors:
        m = _EXPERT.match(item[0])
        if m is None:
            out.append(item)
            continue
        name = f"{m['prefix']}.{m['proj']}.weight"
        if name not in groups:
            groups[name] = {}
            out.append((name, (), lambda: np.empty(0)))  # placeholder, keeps the first expert's position
        groups[name][int(m["e"])] = item
    for i, (name, _, _) in enumerate(out):
        if name not in groups:
            continue
        experts = groups[name]
        if sorted(experts) != list(range(n_expert)):
            raise SlimlmError(f"{name}: found experts {sorted(experts)}, the config says {n_expert}")
        shapes = {tuple(experts[e][1]) for e in experts}
        if len(shapes) != 1:
            raise SlimlmError(f"{name}: experts of different shapes {sorted(shapes)}")
        out[i] = (name, (n_expert, *shapes.pop()), StackedLoad([experts[e][2] for e in range(n_expert)]))
    return out


class StackedLoad:
    """Loads a tensor whole (the experts' matrices stacked, by default); ``parts`` loads its slices along the
    first axis one by one (one expert, or a band of rows)."""

    def __init__(self, parts: list[Callable[[], np.ndarray]], whole: Callable[[], np.ndarray] | None = None):
        self.parts = parts
        self._whole = whole

    def __call__(self) -> np.ndarray:
        return self._whole() if self._whole is not None else np.stack([f() for f in self.parts])


_FLOAT_TYPES = ("F32", "F16", "BF16")


def open_gguf(path: Path) -> ModelSource:
    """A lazy source over an existing GGUF (for re-quantizing): metadata copied, tensors dequantized on load."""
    ckpt = open_checkpoint(path)
    header = ckpt.gguf_header
    assert header is not None
    arch_field = header.field("general.architecture")
    if arch_field is None or arch_field.type != gguf.GGUFValueType.STRING:
        raise SlimlmError(f"{path} has no general.architecture")
    arch = arch_field.value()
    if ckpt.config is not None or arch in GGUF_CONFIG_ARCHS:
        ckpt.spec()  # the hyper-parameters validated and checked against the tensors

    def field_int(key: str, default: int = 0) -> int:
        f = header.field(f"{arch}.{key}")
        return int(f.value()) if f is not None and f.type != gguf.GGUFValueType.ARRAY else default

    facts = {"n_layers": field_int("block_count"), "n_head": field_int("attention.head_count"),
             "n_head_kv": field_int("attention.head_count_kv", field_int("attention.head_count")),
             "n_expert": field_int("expert_count")}
    tensors = []
    for t in ckpt.tensors:
        if t.offset + t.nbytes > header.file_size:  # type: ignore[operator]
            raise SlimlmError(f"{path} is truncated: {t.name} ends past the end of the file")
        tensors.append(SourceTensor(t.name, t.shape, lambda t=t: ckpt.load_array(t),
                                    source_type=gguf.GGMLQuantizationType[t.dtype]))
    quantized = any(t.dtype not in _FLOAT_TYPES for t in ckpt.tensors)
    return ModelSource(arch, tensors, {}, "gguf", path, quantized_source=quantized, facts=facts, header=header)


def open_source(path: Path) -> ModelSource:
    path = Path(path)
    if not path.exists():
        raise SlimlmError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SlimlmError(f"{path} is a file but not .gguf; pass a Hugging Face model dir or a .gguf")
        return open_gguf(path)
    return open_hf_dir(path)

