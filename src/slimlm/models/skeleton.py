"""Model skeletons from a config: transformers' config of any source, the modules on the meta device (to plan
with, or to fill tensor by tensor), a fresh random model. Both torch loaders (dense and low-bit) build on these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.errors import SlimlmError


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def load_config(source: str | Path) -> Any:
    """transformers' config of an HF dir, a config file or a GGUF file (a GGUF's from ``models.from_gguf``: the
    inverse of our export, which transformers' GGUF config conversion gets wrong for several families)."""
    from transformers import AutoConfig

    path = Path(source)
    if is_gguf_file(path):
        from slimlm.models.from_gguf import gguf_config

        return gguf_config(path)
    from slimlm.checkpoint import open_checkpoint

    open_checkpoint(path).validate()  # validated once (types, bounds, heads, against the tensors) before transformers
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SlimlmError(f"{path}: transformers cannot read this config ({str(exc).strip()[:200]})") from None


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model's modules with parameters on the meta device (buffers real): shapes to plan with, or to fill
    with ``load_state_dict(..., assign=True)``, at no memory cost."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A freshly initialised model of ``config`` (distill's student built from a config)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=dtype)

