"""The data every checkpoint reader returns: tensor descriptions and the opened checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CheckpointFormat = Literal["hf-dir", "safetensors", "gguf", "config"]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it; the data itself is never read.

    ``shape`` is in PyTorch order (outermost first) for every format, so GGUF's reversed ``ne`` order is
    undone. ``dtype`` is the storage type in the format's own words (safetensors ``BF16``, ggml ``Q4_K``);
    ``ggml_type`` is set for GGUF tensors only. ``file`` and ``offset`` locate the data (absolute byte
    offset in ``file``), which is how a partial download is measured.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    ggml_type: str | None = None
    file: str | None = None
    offset: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass
class Checkpoint:
    """A model file or folder opened lazily: names, shapes, dtypes, config; no tensor data.

    ``config`` is the HF config dict (for GGUF: one derived from the GGUF metadata, see checkpoint.gguf),
    ``missing_bytes`` > 0 when files are shorter than their headers promise (a partial download).
    """

    path: Path
    format: CheckpointFormat
    tensors: list[TensorInfo] = field(default_factory=list)
    config: dict[str, Any] | None = None
    gguf_metadata: dict[str, Any] | None = None
    missing_bytes: int = 0
    file_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
