"""Which op feeds which Linears inside a decoder layer: the pairs AWQ and SmoothQuant may rescale.

A per-input-channel scale ``s`` can move from a Linear's input to its weight (``W·diag(s)``) only if the op
producing that input absorbs ``1/s`` exactly: a norm's weight, or the output rows of a previous Linear feeding
nothing else. These are AutoAWQ's and llm-compressor's Llama pairs (norm → q/k/v, v → o when shapes match,
norm → gate/up, up → down), Gemma 3's the same with its pre-feed-forward norm; GGUF tensor names get the Llama pairs
less v → o, which the tensor stream skips."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from slimlm.archs import family
from slimlm.errors import SlimlmError

# model_type values whose decoder layers follow the Llama naming and math (RMSNorm weight multiplies).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3", "olmo2", "granite")


@dataclass(frozen=True)
class SmoothPair:
    """``prev`` (a norm or Linear, module path inside the layer) feeds the Linears ``linears``."""

    prev: str
    linears: tuple[str, ...]
    plus_one: bool = False  # ``prev`` is a norm that multiplies by (1 + w) (Gemma): the fold keeps the offset


LLAMA_PAIRS = (
    SmoothPair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothPair("self_attn.v_proj", ("self_attn.o_proj",)),
    SmoothPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothPair("mlp.up_proj", ("mlp.down_proj",)),
)

# SmoothQuant smooths only the norm-fed inputs (llm-compressor's default Llama mappings).
LLAMA_SMOOTHQUANT_PAIRS = (LLAMA_PAIRS[0], LLAMA_PAIRS[2])

# Gemma 3: the MLP reads pre_feedforward_layernorm (post_attention_layernorm normalises the attention output
# before the residual add, so it feeds no Linear); the rest as Llama.
GEMMA3_PAIRS = (
    LLAMA_PAIRS[0],
    LLAMA_PAIRS[1],
    SmoothPair("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    LLAMA_PAIRS[3],
)

# model_type -> (AWQ pairs, SmoothQuant pairs): the families whose smoothing pairs are known
FAMILY_PAIRS: dict[str, tuple[tuple[SmoothPair, ...], tuple[SmoothPair, ...]]] = {
    **{t: (LLAMA_PAIRS, LLAMA_SMOOTHQUANT_PAIRS) for t in LLAMA_LIKE},
    "gemma3_text": (GEMMA3_PAIRS, (GEMMA3_PAIRS[0], GEMMA3_PAIRS[2])),
}

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
    if model_type not in FAMILY_PAIRS:
        raise SlimlmError(f"{method} has no smoothing-pair mapping for model_type '{model_type}' "
                          f"(supported: {', '.join(FAMILY_PAIRS)}); use --method rtn or gptq")
    modules = dict(layer.named_modules())
    pairs = FAMILY_PAIRS[model_type][0 if method == "awq" else 1]
    spec = family({"model_type": model_type})
    if spec is not None and spec.norm_plus_one:
        pairs = tuple(p if p.prev.startswith(("self_attn.", "mlp.")) else replace(p, plus_one=True) for p in pairs)
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
            if pair.plus_one:  # (1 + w) / s = 1 + w' with w' = (1 + w) / s - 1
                weight.copy_((1.0 + weight) / s.to(weight.dtype) - 1.0)
            else:
                weight.div_(s.to(weight.dtype))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.div_(s.to(bias.dtype))
        for name in pair.linears:
            lin = modules[name]
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
