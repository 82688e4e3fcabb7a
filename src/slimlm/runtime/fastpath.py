"""A lean forward for Llama-style decoders (gpt-fast style), used by the runtime for every dtype and scheme.

Why: at SmolLM2-135M's size a decode step's GEMMs take a few milliseconds, and transformers' generic
forward (mask building, cache objects, per-module hooks, dtype round trips, a KV cache grown by ``cat``
every step) costs as much again or more. This module walks the same modules' weights with a flat loop:

- a static KV cache (preallocated, written in place; attention reads the filled prefix as a view);
- one RoPE table per model (computed by the model's own rotary module, so its scaling rules hold);
- sibling projections that share a GEMM (W8A8 ``FusedInt8Group``, ``FusedW4A16``) run it once;
- ``F.rms_norm`` and SDPA with grouped KV heads (no repeated K/V copies).

The Linear layers themselves are the model's modules (nn.Linear, or slimlm's quantized ones), so the kernels
are exactly those ``kernel_report`` lists. Models this does not cover (other architectures, sliding windows,
dynamic RoPE) return ``None`` from ``lean_model`` and run through transformers' forward as before.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.runtime import kernels
from slimlm.runtime.linear import FusedInt8Group, W8A8Linear

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # tables that depend on position only


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the lean path (None when it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not a Llama-style decoder"
    if getattr(config, "hidden_act", "silu") != "silu":
        return "activation is not SiLU"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if _rope_type(config) not in STATIC_ROPE:
        return f"RoPE type {_rope_type(config)!r} changes with sequence length"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / rotary_emb"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "a layer without q/k/v/o projections"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without a gated MLP"
    return None


class StaticCache:
    """Preallocated K/V per layer, ``(B, kv_heads, max_len, head_dim)``; ``length`` positions are filled."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:  # outgrown (callers that cannot know the length up front): double, copy once
            self._grow(max(end, 2 * self.max_len))
        self.k[i][:, :, start:end].copy_(k)
        self.v[i][:, :, start:end].copy_(v)
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def _grow(self, max_len: int) -> None:
        for store in (self.k, self.v):
            for j, t in enumerate(store):
                bigger = t.new_empty(*t.shape[:2], max_len, t.shape[3])
                bigger[:, :, : t.shape[2]].copy_(t)
                store[j] = bigger
        self.max_len = max_len


def _fused_group(modules: list[nn.Module]) -> FusedInt8Group | None:
    first = modules[0]
    if isinstance(first, W8A8Linear) and first.group is not None and first.group_index == 0:
        group = first.group
        if all(isinstance(m, W8A8Linear) and m.group is group and m.group_index == i for i, m in enumerate(modules)):
            return group
    return None


class _Projections:
    """Sibling projections reading one input: one shared GEMM when they have one, else one call each."""

    def __init__(self, modules: list[nn.Module]):
        from slimlm.runtime.linear import FusedW4A16

        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self.int8 = _fused_group(modules)
        self.int4 = FusedW4A16.shared_by(modules)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The siblings' outputs side by side ``(tokens, sum of N)`` where one GEMM made them, else a list."""
        if self.int8 is not None:
            return self.int8.run(x.reshape(-1, x.shape[-1]))
        if self.int4 is not None:
            return self.int4(x.reshape(-1, x.shape[-1]))
        return [m(x).reshape(-1, n) for m, n in zip(self.modules, self.sizes)]

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self(x)
        return list(out.split(self.sizes, dim=-1)) if isinstance(out, torch.Tensor) else out


class _Layer:
    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Projections([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = attn.o_proj
        self.gate_up = _Projections([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj
        self.norm1, self.eps1 = layer.input_layernorm.weight, _eps(layer.input_layernorm)
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, _eps(layer.post_attention_layernorm)
        # all-int8 layer: both sibling groups share int8 GEMMs and o/down are plain W8A8 layers
        self.int8 = (self.qkv.int8 is not None and self.gate_up.int8 is not None
                     and all(isinstance(m, W8A8Linear) and m.group is None and m.bias is None
                             for m in (self.o, self.down)))
        self.inter = mlp.down_proj.in_features


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (``x·cos + rotate_half(x)·sin``), with rotate_half's sign folded
    into ``signed_sin`` once per forward so the rotation is one ``roll``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class LeanModel:
    """The lean forward over one model's modules (built per model; cheap: references only, plus a RoPE table)."""

    def __init__(self, model: nn.Module):
        config = model.config
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.norm, self.norm_eps = inner.norm.weight, _eps(inner.norm)
        self.lm_head = model.lm_head
        self.rotary = inner.rotary_emb
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.dtype = self.embed.weight.dtype
        self._cos = self._sin = None
        self.int8 = all(layer.int8 for layer in self.layers) and self.dtype in (torch.float32, torch.bfloat16)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``(B, 1, T, D)`` for ``positions`` ``(B, T)``, from a table grown in powers of two."""
        need = int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < need:
            size = max(1024, 1 << (need - 1).bit_length())
            pos = torch.arange(size)[None]
            probe = torch.empty(1, dtype=self.dtype)
            cos, sin = self.rotary(probe, pos)
            self._cos, self._sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def new_cache(self, batch: int, max_len: int) -> StaticCache:
        return StaticCache(len(self.layers), batch, self.kv_heads, self.head_dim, max_len, self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: StaticCache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``(B, T or logits_to_keep, V)`` for ``input_ids`` ``(B, T)`` appended to ``cache``.

        ``attention_mask`` ``(B, past + T)`` marks real tokens (left padding is 0); None means all real.
        """
        batch, length = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + length)[None].expand(batch, length)
        cos, sin = self.rope(position_ids)
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keys = attention_mask[:, None, None, : start + length].bool()  # (B, 1, 1, S)
            if length > 1:
                causal = torch.ones(length, start + length, dtype=torch.bool).tril_(start)
                keys = keys & causal
            # a query that sees no real key (a pad position) attends to itself: finite, and never read
            eye = torch.zeros(length, start + length, dtype=torch.bool)
            eye[:, start:].fill_diagonal_(True)
            mask = keys | eye
        causal = mask is None and length > 1
        h = self.embed(input_ids)
        hidden = h.shape[-1]
        q_shape = (batch, length, self.heads, self.head_dim)
        kv_shape = (batch, length, self.kv_heads, self.head_dim)

        nq, nk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qk_shape = (batch, length, self.heads + self.kv_heads, self.head_dim)

        def attend(i: int, qkv: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
            if isinstance(qkv, torch.Tensor):  # one GEMM's output: q and k side by side, rotated in one go
                qk = _rotate(qkv[:, : nq + nk].reshape(qk_shape).transpose(1, 2), cos, sin)
                q, k = qk[:, : self.heads], qk[:, self.heads:]
                v = qkv[:, nq + nk:].reshape(kv_shape).transpose(1, 2)
            else:
                q = _rotate(qkv[0].reshape(q_shape).transpose(1, 2), cos, sin)
                k = _rotate(qkv[1].reshape(kv_shape).transpose(1, 2), cos, sin)
                v = qkv[2].reshape(kv_shape).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(i, k, v, start)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                               enable_gqa=self.kv_heads != self.heads)
            return a.transpose(1, 2).reshape(batch * length, -1)

        if self.int8:
            h = self._int8_layers(h.reshape(batch * length, hidden), attend).reshape(batch, length, hidden)
        else:
            for i, layer in enumerate(self.layers):
                x = F.rms_norm(h, (hidden,), layer.norm1, layer.eps1)
                a = attend(i, layer.qkv(x)).reshape(batch, length, -1)
                h = h + layer.o(a).reshape(batch, length, hidden)
                x = F.rms_norm(h, (hidden,), layer.norm2, layer.eps2)
                gate, up = layer.gate_up.parts(x)
                h = h + layer.down((F.silu(gate) * up).reshape(batch, length, -1)).reshape(batch, length, hidden)
        if cache is not None:
            cache.length = start + length
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(F.rms_norm(h, (hidden,), self.norm, self.norm_eps))

    def _int8_layers(self, h: torch.Tensor, attend) -> torch.Tensor:
        """All-W8A8 layers on 2-D ``(tokens, hidden)`` activations: int8 GEMMs with fused epilogues.

        Each GEMM's input is quantized in the same pass that makes it (residual add + RMSNorm, SiLU·up, or
        the attention output), and each output's per-token scale is applied inside the next pass, so the
        only full passes left besides the GEMMs are RoPE, attention and the q/k/v rescale.
        """
        dtype = h.dtype
        first = self.layers[0]
        xq, xs = kernels.norm_quant_f(h, first.norm1, first.eps1)
        for i, layer in enumerate(self.layers):
            qkv = kernels.scale_rows_(layer.qkv.int8.gemm(xq, dtype), xs)
            aq, a_s = kernels.quant_rows_f(attend(i, qkv))
            y = layer.o.gemm(aq, dtype)
            h, xq, xs = kernels.residual_norm_quant_f(h, y, a_s, layer.norm2, layer.eps2)
            gq, g_s = kernels.silu_mul_quant_f(layer.gate_up.int8.gemm(xq, dtype), xs, layer.inter)
            y = layer.down.gemm(gq, dtype)
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1]
                h, xq, xs = kernels.residual_norm_quant_f(h, y, g_s, nxt.norm1, nxt.eps1)
            else:
                h = kernels.residual_add_f(h, y, g_s)
        return h


def lean_model(model: nn.Module) -> LeanModel | None:
    """The model's lean forward (built once and kept on the model), or None where it does not apply.

    Rebuilt when the model's Linear modules were swapped since (``quantize_`` after a first use) or it was cast.
    A model that is its own lean forward (``is_lean``: runtime.ggml_replica) is returned as it is.
    """
    if getattr(model, "is_lean", False):
        return model
    if unsupported_reason(model) is not None:
        return None
    from slimlm.runtime.linear import QuantLinear

    key = (model.model.embed_tokens.weight.dtype,  # a cast model gets new RoPE tables / cache dtype
           *(id(m) for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))))
    lean = getattr(model, "_slimlm_lean", None)
    if lean is None or lean[0] != key:
        lean = (key, LeanModel(model))
        object.__setattr__(model, "_slimlm_lean", lean)
    return lean[1]


class LeanModule(nn.Module):
    """``model`` behind an nn.Module whose forward is the lean one (cache-free, full logits), for code that
    calls ``module(input_ids=...).logits`` — perplexity through the runtime's own path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model
        self.lean = lean_model(model)
        if self.lean is None:
            raise ValueError(f"no lean forward for this model: {unsupported_reason(model)}")
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=self.lean.forward(input_ids))
