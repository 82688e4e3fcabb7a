"""A GGUF in llama.cpp's layout as transformers' model of the Hugging Face checkpoint it was written from.

The config and the tensor mapping are the inverse of slimlm's GGUF export, read from ``archs``' table, rather than
transformers' GGUF loader: that one drops head_dim (Qwen3), the experts (Mixtral loads as Llama; Qwen MoE widths),
Gemma 3's query scale and llama3's ``rope_freqs``. transformers still gives the config classes and the model.
Tensors are dequantized by gguf-py, as transformers' loader does, so files it loaded right load bit-identically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from torch import nn

from slimlm.archs import ArchSpec, from_gguf, read_hparams, spec_for_gguf
from slimlm.checkpoint import mla, open_checkpoint
from slimlm.checkpoint.gguf_file import GGUF_CONFIG_ARCHS
from slimlm.checkpoint.names import TensorNames
from slimlm.checkpoint.types import Checkpoint, TensorInfo
from slimlm.errors import SlimlmError

# transformers keeps a MoE layer's experts as two 3-D parameters (gate and up concatenated along the rows);
# llama.cpp as three ffn_*_exps tensors of the same (n_expert, rows, cols) layout
_FUSED_EXPERTS = {"gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "down_proj": ("ffn_down_exps",)}
_FUSED = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<param>gate_up_proj|down_proj)$")
_TOKEN_IDS = ("bos", "eos", "pad")
ROPE_FREQS = "rope_freqs.weight"


@dataclass
class GGUFModelFile:
    """An opened GGUF with the HF architecture it loads as and that architecture's config fields."""

    path: Path
    ckpt: Checkpoint
    arch: str  # general.architecture
    hf_arch: str
    spec: ArchSpec
    config: dict[str, Any]

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.ckpt.tensors}

    def hf_config(self) -> Any:
        """transformers' config object of this file."""
        from transformers import AutoConfig

        config = dict(self.config)
        return AutoConfig.for_model(config.pop("model_type"), **config)

    def dequantize(self, name: str) -> np.ndarray:
        """A tensor as float32, by gguf-py's decoder (what transformers' GGUF loader uses)."""
        info = self.tensors[name]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        raw = np.asarray(self.ckpt.load_raw(info).reshape(rows, -1))
        qtype = gguf.GGMLQuantizationType[info.ggml_type]
        return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(info.shape)

    def to_hf(self, hf_name: str) -> Callable[[np.ndarray], np.ndarray]:
        """The inverse of the export's layout change for ``hf_name`` (Q/K rope rows, Gemma norms)."""
        n_head = int(self.config["num_attention_heads"])
        return from_gguf(hf_name, self.spec, n_head, int(self.config["num_key_value_heads"]))

    def sources(self, hf_name: str) -> tuple[str, ...] | None:
        """The GGUF tensors HF tensor ``hf_name`` is made of (several for fused experts); None for none."""
        if m := _FUSED.match(hf_name):
            return tuple(f"blk.{m['layer']}.{part}.weight" for part in _FUSED_EXPERTS[m["param"]])
        if self.spec.mla and (m := mla.KV_B.match(hf_name)):  # attn_k_b and attn_v_b, joined by combine()
            return tuple(str(self.names.tensor(f"{m['prefix']}.{part}.weight")) for part in ("k_b_proj", "v_b_proj"))
        name = self.names.tensor(hf_name)
        return None if name is None else (name,)

    @cached_property
    def names(self) -> TensorNames:
        return TensorNames(self.spec.gguf_arch, int(self.config["num_hidden_layers"]))

    def combine(self, hf_name: str, parts: list[np.ndarray]) -> np.ndarray:
        """HF tensor ``hf_name`` from its GGUF ``sources`` (in HF's layout): fused experts concatenate their rows."""
        if len(parts) == 1:
            return parts[0]
        if self.spec.mla and mla.KV_B.match(hf_name):
            return mla.join_kv_b(*parts)
        return np.concatenate(parts, axis=1)

    def rope_factors(self) -> torch.Tensor | None:
        """llama3 rope's per-frequency divisors, which llama.cpp applies to each rope frequency."""
        return torch.from_numpy(self.dequantize(ROPE_FREQS).copy()) if ROPE_FREQS in self.tensors else None


def open_gguf_model(path: str | Path) -> GGUFModelFile:
    """Open a GGUF of an architecture slimlm writes; anything else is a one-line SlimlmError."""
    path = Path(path)
    ckpt = open_checkpoint(path)
    header = ckpt.gguf_header
    if header is None:
        raise SlimlmError(f"{path} is not a GGUF file")
    arch_field = header.field("general.architecture")
    if arch_field is None or arch_field.type != gguf.GGUFValueType.STRING:
        raise SlimlmError(f"{path} has no general.architecture")
    arch = arch_field.value()
    ckpt.check_complete()

    def keys(name: str) -> Any:
        field = header.field(f"{arch}.{name}")
        return None if field is None else field.value()

    tensors = {t.name: t for t in ckpt.tensors}
    has_experts = any(".ffn_gate_exps." in name for name in tensors) or bool(keys("expert_count"))
    hf_arch, spec = spec_for_gguf(arch, has_experts)
    if ckpt.config is not None or arch in GGUF_CONFIG_ARCHS:
        ckpt.spec()  # the hyper-parameters validated and checked against the tensors
    try:
        config = read_hparams(keys, hf_arch, spec)
    except SlimlmError as exc:
        raise SlimlmError(f"{path}: {exc}") from None
    config["tie_word_embeddings"] = spec.drop_lm_head or "output.weight" not in tensors
    if "vocab_size" not in config and "token_embd.weight" in tensors:
        config["vocab_size"] = int(tensors["token_embd.weight"].shape[0])
    for token in _TOKEN_IDS:
        field = header.field(f"tokenizer.ggml.{token}_token_id")
        if field is not None:
            config[f"{token}_token_id"] = int(field.value())
    return GGUFModelFile(path, ckpt, arch, hf_arch, spec, config)


def gguf_config(path: str | Path) -> Any:
    """transformers' config of the model a GGUF holds (``models.load_config`` for GGUF files)."""
    return open_gguf_model(path).hf_config()


def apply_rope_factors(model: nn.Module, factors: torch.Tensor | None) -> None:
    """Divide each rotary embedding's frequencies by llama.cpp's ``rope_freqs``, as llama.cpp does (llama3 rope).
    The buffers are the ones transformers' rotary forward reads; ``.to()`` moves them with the model."""
    if factors is None:
        return
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor):
            continue
        if inv_freq.shape != factors.shape:
            raise SlimlmError(f"rope_freqs has {factors.numel()} factors, the rotary embedding {inv_freq.numel()}")
        scaled = inv_freq.float() / factors.to(inv_freq.device)
        module.register_buffer("inv_freq", scaled, persistent=False)
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.register_buffer("original_inv_freq", scaled.clone(), persistent=False)


def hf_state_dict(gm: GGUFModelFile, model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` (a skeleton) the file holds, in HF's layout and ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    for hf_name, param in model.state_dict().items():
        sources = gm.sources(hf_name)
        if sources is None or (hf_name == "lm_head.weight" and gm.config["tie_word_embeddings"]):
            continue
        missing = [name for name in sources if name not in gm.tensors]
        if missing:
            raise SlimlmError(f"{gm.path}: the GGUF lacks {missing[0]} ({hf_name} of {gm.hf_arch})")
        parts = [gm.to_hf(hf_name)(gm.dequantize(name)) for name in sources]
        value = gm.combine(hf_name, parts)
        if value.size != param.numel():
            raise SlimlmError(f"{gm.path}: {sources[0]} has shape {value.shape}, {hf_name} needs {tuple(param.shape)}")
        state[hf_name] = torch.from_numpy(np.array(value).reshape(param.shape)).to(dtype)
    return state
