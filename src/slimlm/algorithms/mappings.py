"""Which op feeds which Linears inside a decoder layer: the pairs AWQ and SmoothQuant may rescale.

A per-input-channel scale ``s`` can move from a Linear's input to its weight (``W·diag(s)``) only if the op
producing that input absorbs ``1/s`` exactly: a norm's weight, or the output rows of a previous Linear feeding
nothing else. These are AutoAWQ's and llm-compressor's Llama pairs (norm → q/k/v, v → o when shapes match,
norm → gate/up, up → down); GGUF tensor names get the same pairs less v → o, which the tensor stream skips."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError

# model_type values whose decoder layers follow the Llama naming and math (RMSNorm weight multiplies).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3", "olmo2", "granite")


@dataclass(frozen=True)
class SmoothPair:
    """``prev`` (a norm or Linear, module path inside the layer) feeds the Linears ``linears``."""

    prev: str
    linears: tuple[str, ...]


LLAMA_PAIRS = (
    SmoothPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothPair("self_attn.v_proj", ("self_attn.o_proj",)),
    SmoothPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothPair("mlp.up_proj", ("mlp.down_proj",)),
)

# SmoothQuant smooths only the norm-fed inputs (llm-compressor's default Llama mappings).
LLAMA_SMOOTHQUANT_PAIRS = (LLAMA_PAIRS[0], LLAMA_PAIRS[2])

# The same pairs in GGUF tensor names (without the ``blk.N.`` prefix and ``.weight`` suffix).
GGUF_PAIRS = (
    SmoothPair("attn_norm", ("attn_q", "attn_k", "attn_v")),
    SmoothPair("ffn_norm", ("ffn_gate", "ffn_up")),
    SmoothPair("ffn_up", ("ffn_down",)),
)


def gguf_pairs(n_layers: int) -> list[SmoothPair]:
    """:data:`GGUF_PAIRS` of every layer, with full GGUF tensor names, layer by layer."""
    return [SmoothPair(f"blk.{i}.{p.prev}.weight", tuple(f"blk.{i}.{m}.weight" for m in p.linears))
            for i in range(n_layers) for p in GGUF_PAIRS]


def smoothing_pairs(model_type: str, layer: torch.nn.Module, method: str) -> list[SmoothPair]:
    """The pairs valid for this layer; a clear error naming what is missing when the model has none."""
    if model_type not in LLAMA_LIKE:
        raise SlimlmError(f"{method} has no smoothing-pair mapping for model_type '{model_type}' "
                          f"(supported: {', '.join(LLAMA_LIKE)}); use --method rtn or gptq")
    modules = dict(layer.named_modules())
    pairs = LLAMA_PAIRS if method == "awq" else LLAMA_SMOOTHQUANT_PAIRS
    chosen = []
    for pair in pairs:
        missing = [n for n in (pair.prev, *pair.linears) if n not in modules]
        if missing:
            raise SlimlmError(f"{method}: model_type '{model_type}' layer lacks {', '.join(missing)} needed for the "
                              f"smoothing pair {pair.prev} → {', '.join(pair.linears)}")
        prev = modules[pair.prev]
        # v → o only when o reads v's output channels one to one (no grouped-query repetition).
        if isinstance(prev, torch.nn.Linear) and any(modules[n].in_features != prev.out_features for n in pair.linears):
            continue
        chosen.append(pair)
    return chosen


def fold_scale(layer: torch.nn.Module, pair: SmoothPair, s: torch.Tensor) -> None:
    """Apply ``x → x / s`` at ``pair.prev`` and ``W → W·diag(s)`` in its Linears (exact in real arithmetic)."""
    modules = dict(layer.named_modules())
    prev = modules[pair.prev]
    with torch.no_grad():
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        else:
            weight = getattr(prev, "weight", None)
            if weight is None:
                raise SlimlmError(f"cannot fold a scale into {pair.prev} ({type(prev).__name__}): it has no weight")
            weight.div_(s.to(weight.dtype))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.div_(s.to(bias.dtype))
        for name in pair.linears:
            lin = modules[name]
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
