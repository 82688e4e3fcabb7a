"""The data every checkpoint reader returns: tensor descriptions and the opened checkpoint."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slimlm.checkpoint import fp8, tensor_data
from slimlm.errors import SlimlmError
from slimlm.spec import ModelSpec, check_bounds, is_supported

if TYPE_CHECKING:
    import numpy as np
    import torch

    from slimlm.checkpoint.gguf_file import GGUFHeader

_LAYER = re.compile(r"(?:^|\.)(?:layers|blk|h)\.(\d+)\.")
_OTHER_TOWER = re.compile(r"vision|visual|audio|multi_modal|mm_|^v\.|^a\.")  # multimodal checkpoints' other parts
CheckpointFormat = Literal["hf-dir", "safetensors", "gguf", "config"]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it. ``shape`` is in PyTorch order for every format (GGUF's reversed
    ``ne`` undone); ``dtype`` is the storage type in the format's words (``BF16``, ``Q4_K``); ``ggml_type`` is
    set for GGUF only; ``offset`` is absolute in ``file`` (which is how a partial download is measured)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    ggml_type: str | None = None
    file: str | None = None
    offset: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """A model file or folder opened lazily; tensor data is loaded on demand, one tensor at a time. ``config`` is
    the HF config (for GGUF: derived from its metadata); ``missing_bytes`` > 0 for a partial download;
    ``gguf_header`` keeps a GGUF's fields as stored (raw bytes), for copying them into a new file."""

    path: Path
    format: CheckpointFormat
    tensors: list[TensorInfo] = field(default_factory=list)
    config: dict[str, Any] | None = None
    gguf_metadata: dict[str, Any] | None = None
    missing_bytes: int = 0
    file_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    gguf_header: GGUFHeader | None = None
    fp8_block: tuple[int, int] | None = None  # DeepSeek's FP8 block format: weights read dequantized (checkpoint.fp8)
    fp8_scales: dict[str, TensorInfo] = field(default_factory=dict)  # FP8 weight name -> its scale_inv tensor

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def tensor(self, name: str) -> TensorInfo:
        """A tensor's description by name; a missing one is a user error."""
        info = self._by_name.get(name)
        if info is None:
            raise SlimlmError(f"{self.path}: tensor {name} is missing")
        return info

    def check_complete(self) -> None:
        """Refuse to load from a partial download (opening and inspecting one is fine)."""
        if self.missing_bytes:
            raise SlimlmError(f"{self.path} is truncated ({self.missing_bytes:,} bytes of tensor data missing): "
                              "an incomplete download?")

    @property
    def _big_endian(self) -> bool:
        return self.gguf_header is not None and self.gguf_header.big_endian

    @cached_property
    def weight_tensors(self) -> list[TensorInfo]:
        """The model's tensors without FP8 block scales (which loading a weight applies): what quantizers walk."""
        scales = {s.name for s in self.fp8_scales.values()}
        return [t for t in self.tensors if t.name not in scales]

    def torch_dtype(self, name: str | TensorInfo) -> torch.dtype:
        """The dtype ``load_torch`` returns: the stored one, bfloat16 for an FP8 block weight."""
        info = self._info(name)
        if info.name in self.fp8_scales:
            import torch

            return torch.bfloat16
        return tensor_data.torch_dtype(info)

    def load_array(self, name: str | TensorInfo) -> np.ndarray:
        """Float32 values (GGML blocks and FP8 blocks dequantized); F32 data is a read-only view of the file.
        NaN or Inf is a SlimlmError naming the tensor."""
        info = self._info(name)
        scale = self.fp8_scales.get(info.name)
        if scale is not None and self.fp8_block is not None:
            raw = tensor_data.raw_bytes(info).reshape(info.shape)
            values = fp8.dequantize(raw, tensor_data.load_array(scale), self.fp8_block)
        else:
            values = tensor_data.load_array(info, self._big_endian)
        tensor_data.check_finite(values, f"{info.file}: tensor {info.name}")
        return values

    def load_raw(self, name: str | TensorInfo) -> np.ndarray:
        """The stored bytes (e.g. GGML blocks) as a read-only uint8 view of the file."""
        return tensor_data.raw_bytes(self._info(name))

    def load_torch(self, name: str | TensorInfo) -> torch.Tensor:
        """A private copy in the stored dtype (safe to change in place); an FP8 block weight comes dequantized,
        in bfloat16 (``torch_dtype``)."""
        info = self._info(name)
        if info.name in self.fp8_scales:
            import torch

            return torch.from_numpy(self.load_array(info)).to(torch.bfloat16)
        values = tensor_data.load_torch(info, self._big_endian)
        tensor_data.check_finite(values, f"{info.file}: tensor {info.name}")
        return values

    def spec(self) -> ModelSpec:
        """The config validated once into a ModelSpec (types, positivity, head divisibility, bounded sizes) and
        checked against the tensor table: the embedding's shape and the number of layers must be the config's, so
        no command plans from, allocates for or silently random-initialises what a lying config describes."""
        where = self._config_file
        if self.config is None:
            raise SlimlmError(f"{where}: no model config (a GGUF without the metadata of a supported architecture?)")
        try:
            spec = ModelSpec.from_config(self.config)
        except SlimlmError as exc:
            raise SlimlmError(f"{where}: {exc}") from None
        if self.format != "config" and not self.tensors:
            raise SlimlmError(f"{self.path}: holds no tensors")
        if self.tensors and not self.config.get("quantization_config"):
            self._check_tensors(spec, where)
        return spec

    @property
    def _config_file(self) -> Path:
        return self.path / "config.json" if self.path.is_dir() else self.path

    def validate(self) -> ModelSpec | None:
        """``spec()`` for the families ModelSpec reads; for others (transformers builds them) the config's sizes
        bounded, and None."""
        if self.config is not None and not is_supported(self.config):
            try:
                check_bounds(self.config)
            except SlimlmError as exc:
                raise SlimlmError(f"{self._config_file}: {exc}") from None
            return None
        return self.spec()

    def _check_tensors(self, spec: ModelSpec, where: Path) -> None:
        tensors = [t for t in self.tensors if not _OTHER_TOWER.search(t.name)]  # the language model's own
        embed = next((t for t in tensors if t.name.endswith(("embed_tokens.weight", "token_embd.weight"))), None)
        if embed is not None and embed.shape != (spec.vocab_size, spec.hidden_size):  # llama.cpp checks it too
            raise SlimlmError(f"{where}: the config says vocab_size {spec.vocab_size} x hidden_size "
                              f"{spec.hidden_size} but tensor {embed.name} is {list(embed.shape)}")
        # layer 0's MLP (when dense) and query projection: tensor name suffix -> (config words, size, axis)
        widths: dict[str, tuple[str, int, int]] = {}
        if 0 not in spec.moe_layers:
            for suffix in ("layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"):
                widths[suffix] = ("intermediate_size", spec.intermediate_size, -1)
        if not spec.is_mla:
            for suffix in ("layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"):
                widths[suffix] = ("num_attention_heads x head_dim", spec.n_heads * spec.head_dim, 0)
        for t in tensors:
            for suffix, (what, size, axis) in widths.items():
                if t.name.endswith(suffix) and len(t.shape) == 2 and t.shape[axis] != size:
                    raise SlimlmError(f"{where}: the config says {what} = {size} but tensor {t.name} is "
                                      f"{list(t.shape)}")
        layers = {int(m.group(1)) for t in tensors if (m := _LAYER.search(t.name))}
        if layers and max(layers) + 1 not in (spec.n_layers, spec.n_layers + spec.mtp_layers):
            raise SlimlmError(f"{where}: the config says num_hidden_layers {spec.n_layers} but the tensors hold "
                              f"{max(layers) + 1} layers")

    def _info(self, name: str | TensorInfo) -> TensorInfo:
        return name if isinstance(name, TensorInfo) else self.tensor(name)
