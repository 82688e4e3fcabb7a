"""Optional: evaluate a GGUF model with llama.cpp's CPU activation rounding, to reproduce its numbers.

slimlm evaluates a GGUF file's dequantized weights in fp32: the quality the weights themselves allow.
llama.cpp's CPU matmuls additionally quantize each matmul's input activations to the weight type's
"vec_dot" type: Q8_K blocks of 256 for K-quants and IQ types, Q8_0 / Q8_1 blocks of 32 for legacy
quants, f16 for F16 weights. The integer dot products it then computes equal dequant(W) . dequant(x)
(up to summation order), so rounding the Linear inputs the same way in torch adds the same noise. Op by op,
on llama.cpp's own inputs, each emulated Linear and the f16 attention give llama.cpp's output to float32
rounding (tests/test_eval_act_quant.py reads llama.cpp's intermediate tensors). Whole runs still differ: a
last-bit difference from summation order now and then moves a value across a rounding boundary, that
becomes a whole quantization step, and after a few layers the two runs carry the same amount of rounding
noise but not the same draw (on Qwen2.5-0.5B Q4_K_M they differ by a KLD of ~0.0013 nats; see
BENCHMARKS.md, which compares the two KLDs window by window).

The roundings below follow the quantizers ggml-cpu runs on x86 (quantize_row_q8_K_ref, the AVX2 q8_0 / q8_1);
they are written here because no field library exposes activation fake-quantization in these exact formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from slimlm.errors import SlimlmError

QK_K, QK8_0 = 256, 32


def _over(numerator: float, x: torch.Tensor) -> torch.Tensor:
    """numerator / x rounded once, as C's float division: torch computes ``scalar / tensor`` as
    reciprocal(x) * scalar, which differs in the last bit for about a quarter of inputs and so flips
    halfway roundings that llama.cpp does not flip."""
    return torch.full_like(x, numerator) / x


def q8_K_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``(..., n/256, 256)``, float32 scales ``(..., n/256)``, both as float32) of ``x`` ``(..., n)`` in
    Q8_K blocks of 256, as quantize_row_q8_K_ref: iscale = -127/(signed value of the first largest magnitude),
    values round-half-even(iscale * x) capped at 127, d = 1/iscale (0 for an all-zero block)."""
    xb = x.reshape(*x.shape[:-1], -1, QK_K).float()
    signed_max = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # first largest magnitude, as ggml
    nonzero = signed_max != 0
    iscale = torch.where(nonzero, _over(-127.0, torch.where(nonzero, signed_max, 1.0)), 0.0)
    d = torch.where(nonzero, _over(1.0, torch.where(nonzero, iscale, 1.0)), 0.0)
    return torch.round(iscale * xb).clamp(max=127), d[..., 0]


def fake_q8_K(x: torch.Tensor) -> torch.Tensor:
    """Round to Q8_K and back."""
    q, d = q8_K_blocks(x)
    return (q * d[..., None]).reshape(x.shape).to(x.dtype)


def _q8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, unrounded float32 scale amax/127) of ``x`` in blocks of 32, as x86 quantize_row_q8_0 / _q8_1."""
    xb = x.reshape(*x.shape[:-1], -1, QK8_0).float()
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax != 0, _over(127.0, torch.where(amax != 0, amax, 1.0)), 0.0)
    return torch.round(xb * inv), (amax / 127.0)[..., 0]


def q8_0_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``(..., n/32, 32)``, f16 scales ``(..., n/32)``, both as float32) of ``x`` ``(..., n)`` in Q8_0
    blocks of 32: d = amax/127 stored as f16, values round-half-even(x * 127/amax).

    The multiplier is 127/amax, as in ggml-cpu's x86 quantize_row_q8_0 (which llama.cpp runs), not the
    reference quantizer's 1/d: the two differ in the last bit and so round some halfway values differently."""
    q, d = _q8_blocks(x)
    return q, d.half().float()


def q8_1_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q8_1 blocks of 32 (the vec_dot type of Q4_1 / Q5_1): Q8_0's values and f16 scale, plus the f16 block
    sum ``s = d * sum(values)`` with the unrounded float32 d = amax/127, as x86 quantize_row_q8_1."""
    q, d = _q8_blocks(x)
    return q, d.half().float(), (d * q.sum(-1)).half().float()


def fake_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Round to Q8_0 (= Q8_1's values) and back."""
    q, d = q8_0_blocks(x)
    return (q * d[..., None]).reshape(x.shape).to(x.dtype)


def _via(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.to(dtype).to(x.dtype)


# ggml weight type -> how ggml-cpu rounds the other operand (its type_traits_cpu vec_dot_type)
_ROUNDING: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "F32": None, "F16": _via(torch.float16), "BF16": _via(torch.bfloat16),
    "Q4_0": fake_q8_0, "Q4_1": fake_q8_0, "Q5_0": fake_q8_0, "Q5_1": fake_q8_0, "Q8_0": fake_q8_0,
    "IQ4_NL": fake_q8_0,
    "Q2_K": fake_q8_K, "Q3_K": fake_q8_K, "Q4_K": fake_q8_K, "Q5_K": fake_q8_K, "Q6_K": fake_q8_K,
    "IQ2_XXS": fake_q8_K, "IQ2_XS": fake_q8_K, "IQ2_S": fake_q8_K, "IQ3_XXS": fake_q8_K, "IQ3_S": fake_q8_K,
    "IQ1_S": fake_q8_K, "IQ1_M": fake_q8_K, "IQ4_XS": fake_q8_K, "TQ1_0": fake_q8_K, "TQ2_0": fake_q8_K,
}


def emulate_llama_cpp_activations(model: torch.nn.Module, gguf_path: str | Path
                                  ) -> tuple[dict[str, int], list[torch.utils.hooks.RemovableHandle]]:
    """Round every Linear's input as llama.cpp's CPU backend does for that tensor's type in ``gguf_path``, and
    attention's operands as its f16 KV cache does (:func:`llama_cpp_attention`).

    Returns the Linear count per rounding ({"Q8_K": 91, ...}) and the handles (remove them to undo).
    """
    from slimlm.checkpoint.gguf_file import read_gguf_header
    from slimlm.checkpoint.names import TensorNames, gguf_arch

    header = read_gguf_header(Path(gguf_path))
    types = {t.name: t.dtype for t in header.tensors}
    field = header.field("general.architecture")
    arch_name = field.value() if field is not None else "llama"
    try:
        arch = gguf_arch(arch_name)
    except SlimlmError:
        raise SlimlmError(f"{gguf_path}: unknown GGUF architecture {arch_name!r}") from None
    names = TensorNames(arch, int(getattr(model.config, "num_hidden_layers", 0)))
    counts: dict[str, int] = {}
    handles = []
    for module_name, gname in names.linears(model).items():
        if gname == "output" and "output.weight" not in types:
            gname = "token_embd"  # tied embeddings: llama.cpp multiplies by token_embd
        qtype = types.get(f"{gname}.weight") if gname else None
        if qtype is None:
            raise SlimlmError(f"{gguf_path}: no GGUF tensor for {module_name}; cannot emulate llama.cpp")
        if qtype not in _ROUNDING:
            raise SlimlmError(f"{gguf_path}: llama.cpp activation rounding for {qtype} is not known to slimlm")
        rounding = _ROUNDING[qtype]
        label = {fake_q8_K: "Q8_K", fake_q8_0: "Q8_0"}.get(rounding, qtype if rounding else "none")
        counts[label] = counts.get(label, 0) + 1
        if rounding is not None:
            module = model.get_submodule(module_name)
            handles.append(module.register_forward_pre_hook(lambda _m, args, r=rounding: (r(args[0]), *args[1:])))
    handles.append(emulate_llama_cpp_attention(model))
    return counts, handles


# ---------------------------------------------------------------- attention: llama.cpp's f16 KV cache
LLAMA_CPP_ATTENTION = "slimlm_llamacpp_f16"


_f16 = _via(torch.float16)


def llama_cpp_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                        **_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as llama.cpp's CPU graph computes it without flash attention: K and V live in an f16 cache,
    and each of its two matmuls rounds the other operand to f16 (Q for K·Q, the softmax weights for V·softmax);
    the softmax itself is float32. Roped Q/K arrive here, as they do at llama.cpp's cache write."""
    groups = query.shape[1] // key.shape[1]
    k = _f16(key).repeat_interleave(groups, dim=1)
    v = _f16(value).repeat_interleave(groups, dim=1)
    scores = (_f16(query) @ k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = _f16(probs) @ v
    return out.transpose(1, 2).contiguous(), probs


class _AttentionSwitch:
    """Undo handle for :func:`emulate_llama_cpp_attention` (``remove()`` like a hook handle)."""

    def __init__(self, model: torch.nn.Module, previous: str):
        self.model, self.previous = model, previous

    def remove(self) -> None:
        self.model.set_attn_implementation(self.previous)


def emulate_llama_cpp_attention(model: torch.nn.Module) -> _AttentionSwitch:
    """Switch a transformers model to :func:`llama_cpp_attention`; returns the handle that switches back."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(LLAMA_CPP_ATTENTION, llama_cpp_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(LLAMA_CPP_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(LLAMA_CPP_ATTENTION)
    return _AttentionSwitch(model, previous)
