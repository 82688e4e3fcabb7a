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

    with init_empty_weights(include_buffers=False), _parameters_born_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    meta = [name for name, b in model.named_buffers() if b.is_meta]
    if meta:
        raise SlimlmError(f"{type(model).__name__}: buffer {meta[0]} has no values in an empty skeleton")
    return model


class _parameters_born_on_meta:
    """``torch.empty`` without a device makes meta tensors while a skeleton is built. accelerate moves each
    Parameter to meta only once it is registered, after ``torch.empty`` allocated it: transformers 5's fused
    experts allocate every expert at once (DeepSeek-V3: 30 GB per layer in float32), more than the machine has.
    Buffers come from other constructors (arange, zeros, ...) and stay real; any left on meta is an error above."""

    def __enter__(self) -> None:
        self.real = torch.empty

        def empty(*size, **kwargs):
            if kwargs.get("device") is None and kwargs.get("out") is None:
                kwargs["device"] = "meta"
            return self.real(*size, **kwargs)

        torch.empty = empty

    def __exit__(self, *exc) -> None:
        torch.empty = self.real


def random_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A freshly initialised model of ``config`` (distill's student built from a config)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=dtype)

