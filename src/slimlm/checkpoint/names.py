"""The one map between Hugging Face and GGUF (llama.cpp) tensor names, and the one layout rule between them.

Names come from gguf-py's own tables (``get_tensor_name_map``), the ones llama.cpp's converter uses, so a
name slimlm writes or looks up is the name llama.cpp expects. The layout rule: llama.cpp's llama graph uses
interleaved rope, so the converter permutes Q/K rows (``permute_for_rope``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gguf
import numpy as np

from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    import torch


_SCORE_BIAS = ".e_score_correction_bias"


class TensorNames:
    """HF module / tensor name -> GGUF name for one architecture and layer count."""

    def __init__(self, arch: gguf.MODEL_ARCH, n_layers: int):
        self.arch = arch
        self._table = gguf.get_tensor_name_map(arch, n_layers)

    def module(self, hf_module: str) -> str | None:
        """``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q`` (None when llama.cpp has no such tensor)."""
        return self._table.get_name(hf_module)

    def tensor(self, hf_tensor: str) -> str | None:
        """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight`` (parameter name kept).
        DeepSeek's router bias ``mlp.gate.e_score_correction_bias`` is gguf-py's ``e_score_correction`` + ``.bias``."""
        if hf_tensor.endswith(_SCORE_BIAS):
            hf_tensor = hf_tensor[: -len("_bias")] + ".bias"
        base, _, suffix = hf_tensor.rpartition(".")
        name = self._table.get_name(base) if base else None
        return None if name is None else f"{name}.{suffix}"

    def linears(self, model: torch.nn.Module) -> dict[str, str | None]:
        """Every ``nn.Linear`` of ``model`` (HF module name) with its GGUF tensor name, None when unmapped."""
        import torch

        return {name: self.module(name) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def gguf_arch(name: str) -> gguf.MODEL_ARCH:
    """The gguf-py architecture whose GGUF name (``general.architecture``, e.g. ``llama``) is ``name``."""
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise SlimlmError(f"GGUF architecture {name!r} is not known to gguf-py")


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: HF keeps the two rope halves apart, GGUF interleaves them per head."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_for_rope`: a GGUF Q/K tensor back in HF's row order."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
