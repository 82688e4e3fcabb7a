"""llama.cpp's per-tensor type choice for a GGUF "file type" mix (Q4_K_M, Q3_K_S, ...).

A GGUF file called Q4_K_M is not Q4_K everywhere: llama.cpp gives some tensors more bits (the output
matrix, half of the attn_v / ffn_down layers, ...) and falls back to 32-wide block types when a row length
is not a multiple of 256. Sizing a file, or making the one llama.cpp would make, needs the same plan, so
this re-states ``llama_tensor_get_type`` (src/llama-quant.cpp) as a pure function over a tensor list,
checked tensor by tensor against llama-cpp-python's llama.cpp (tests/test_gguf_mix_llamacpp.py).

Rules followed: llama.cpp commit 007dbbf3fd17eefe9b47fee45f48f7ba5e62b714, which agrees with llama-cpp-python
0.3.36 (ggml 0c1e570) on every SmolLM2 tensor for every ftype tested. In this version Q2_K/Q3_K fall back to
Q4_0 (older releases used IQ4_NL), Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and IQ types to IQ4_NL.
Shapes are in PyTorch order, so llama.cpp's row length ``ne[0]`` is ``shape[-1]`` (3-D: n_expert, rows, row).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from slimlm.errors import SlimlmError

LLAMA_CPP_RULES_COMMIT = "007dbbf3fd17eefe9b47fee45f48f7ba5e62b714"

# ftype name (as llama-quantize spells it) -> the default tensor type of that mix.
FTYPE_DEFAULT: dict[str, T] = {
    "F32": T.F32, "F16": T.F16, "BF16": T.BF16,
    "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q8_0": T.Q8_0,
    "Q2_K": T.Q2_K, "Q2_K_S": T.Q2_K,
    "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K,
    "Q4_K_S": T.Q4_K, "Q4_K_M": T.Q4_K,
    "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K,
    "Q6_K": T.Q6_K,
    "IQ1_S": T.IQ1_S, "IQ1_M": T.IQ1_M,
    "IQ2_XXS": T.IQ2_XXS, "IQ2_XS": T.IQ2_XS, "IQ2_S": T.IQ2_XS, "IQ2_M": T.IQ2_S,
    "IQ3_XXS": T.IQ3_XXS, "IQ3_XS": T.IQ3_S, "IQ3_S": T.IQ3_S, "IQ3_M": T.IQ3_S,
    "IQ4_NL": T.IQ4_NL, "IQ4_XS": T.IQ4_XS,
    "TQ1_0": T.TQ1_0, "TQ2_0": T.TQ2_0,
}
FTYPES: tuple[str, ...] = tuple(FTYPE_DEFAULT)

_FLOAT_TYPES = {T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64}
_IQ_LOW = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}

# Where a type whose block does not divide the row length is replaced (tensor_type_fallback).
_FALLBACK: dict[T, T] = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}

# Substrings of names llama.cpp never quantizes, though they are 2-D and end in "weight".
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")

# Every type llama.cpp's CPU backend runs that a budget mix may pick (IQ1_* and the ternary types are left out:
# their error is far off the curve of the others on dense models).
BUDGET_CANDIDATES: tuple[T, ...] = (
    T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.Q2_K, T.IQ3_XXS, T.IQ3_S, T.Q3_K, T.IQ4_XS, T.IQ4_NL, T.Q4_0, T.Q4_K, T.Q4_1,
    T.Q5_0, T.Q5_K, T.Q5_1, T.Q6_K, T.Q8_0, T.F16,
)


def type_bpw(q: T) -> float:
    """Bits per weight of a GGML type (block bytes x 8 / block values)."""
    block, size = GGML_QUANT_SIZES[q]
    return size * 8 / block


@dataclass(frozen=True)
class PlanTensor:
    """One tensor of a GGUF model: llama.cpp name, PyTorch-order shape, and its type before quantizing."""

    name: str
    shape: tuple[int, ...]
    type: T = T.F32

    @property
    def row_length(self) -> int:
        return int(self.shape[-1]) if self.shape else 1

    @property
    def n_elements(self) -> int:
        return math.prod(int(d) for d in self.shape)

    @property
    def n_dims(self) -> int:
        """ggml_n_dims: dimensions after dropping outer sizes of 1 (a (1, n) tensor is 1-D)."""
        dims = list(self.shape)
        while len(dims) > 1 and dims[0] == 1:
            dims.pop(0)
        return len(dims)


@dataclass(frozen=True)
class ArchFacts:
    """The hyper-parameters llama.cpp's rules look at."""

    n_layers: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    arch: str = "llama"  # GGUF general.architecture

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (a Llama with 80 layers and GQA): its attn_v gets extra bits."""
        return self.arch == "llama" and self.n_layers == 80 and self.n_head != self.n_head_kv


def type_by_name(name: str) -> T:
    """A GGML tensor type from its llama.cpp name (case-insensitive)."""
    try:
        return T[name.strip().upper()]
    except KeyError:
        raise SlimlmError(f"unknown GGML tensor type {name!r}; known: "
                          f"{', '.join(t.name for t in T)}") from None


def normalize_ftype(ftype: str) -> str:
    """'q4_k_m' -> 'Q4_K_M'; unknown mixes raise SlimlmError naming the close ones."""
    key = ftype.strip().upper().replace("-", "_")
    key = {"FP16": "F16", "FP32": "F32"}.get(key, key)
    if key not in FTYPE_DEFAULT:
        import difflib

        close = difflib.get_close_matches(key, FTYPES, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(FTYPES)}"
        raise SlimlmError(f"unknown GGUF type mix {ftype!r}{hint}")
    return key


def parse_overrides(specs: Iterable[str]) -> list[tuple[str, T]]:
    """``--tensor-type REGEX=TYPE`` strings -> [(regex, type)], checked now so bad ones fail early."""
    out = []
    for spec in specs:
        pattern, sep, type_name = spec.rpartition("=")
        if not sep or not pattern:
            raise SlimlmError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. attn_v=q8_0")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SlimlmError(f"--tensor-type {spec!r}: bad regular expression ({exc})") from None
        out.append((pattern, type_by_name(type_name)))
    return out


def _category(name: str) -> str:
    """tensor_get_category: broad roles by substring, in llama.cpp's order of tests."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _is_attn_v_like(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def allows_quantization(tensor: PlanTensor, *, quantize_output: bool = True) -> bool:
    """tensor_allows_quantization: 2-D/3-D weights, except norms, routers and a few tiny special tensors."""
    name = tensor.name
    if tensor.n_dims < 2 or not name.endswith("weight"):
        return False
    if not quantize_output and name == "output.weight":
        return False
    if name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers llama.cpp favours: the first and last eighth, and every third one in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def layer_sort_key(name: str) -> tuple[int, str]:
    """llama.cpp's weight order (weight_name_comparer): non-block tensors first, then by block, then name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


class _State:
    """The counters llama.cpp keeps while it walks the tensors (quantize_state_impl)."""

    def __init__(self, tensors: Sequence[PlanTensor], arch: ArchFacts, has_imatrix: bool) -> None:
        self.n_attention_wv = sum(_is_attn_v_like(_category(t.name)) for t in tensors)
        self.n_ffn = arch.n_layers
        self.seen = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}  # i_attention_wv, i_ffn_down, ...
        self.tied = not any(t.name == "output.weight" for t in tensors)
        self.has_imatrix = has_imatrix

    def take(self, kind: str) -> int:
        """The index of this tensor among those of its kind seen so far (then counts it)."""
        i = self.seen[kind]
        self.seen[kind] = i + 1
        return i


def _layer_of(counter: int, n_layers: int, name: str, arch: ArchFacts) -> int:
    """Which layer an FFN tensor belongs to: the running counter, or (MoE) the number in its name."""
    if max(1, arch.n_expert) > 1:
        m = re.match(r"blk\.(\d+)\.", name)
        if not m:
            raise SlimlmError(f"cannot tell the layer of tensor {name}")
        layer = int(m.group(1))
        if layer >= n_layers:
            raise SlimlmError(f"tensor {name} is in layer {layer} but the model has {n_layers} layers")
        return layer
    return counter


_Rule = Callable[["_Site"], "T | None"]


@dataclass(frozen=True)
class _Site:
    """What a per-mix rule looks at: the tensor's index ``i`` among the ``n`` of its kind, and the model."""

    i: int
    n: int
    arch: ArchFacts
    has_imatrix: bool

    @property
    def gqa4(self) -> bool:
        return self.arch.n_gqa >= 4

    @property
    def falcon(self) -> bool:
        return self.arch.arch == "falcon"

    @property
    def first_eighth(self) -> bool:
        return self.i < self.n // 8

    @property
    def more_bits(self) -> bool:
        return _use_more_bits(self.i, self.n)


# Per-mix tables of llama_tensor_get_type_impl: mix -> the type for that tensor kind. A rule returning None
# keeps the mix's default type.
_OUTPUT_LOW_BIT = frozenset(("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"))
_TOKEN_EMBD: dict[str, T] = {
    "IQ2_XXS": T.Q2_K, "IQ2_XS": T.Q2_K, "IQ1_S": T.Q2_K, "IQ1_M": T.Q2_K,
    "IQ2_S": T.IQ3_S, "IQ2_M": T.IQ3_S, "IQ3_XXS": T.IQ3_S, "TQ1_0": T.Q4_K, "TQ2_0": T.Q4_K,
}
_ATTN_QK: dict[str, T] = {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}
_ATTN_OUTPUT: dict[str, T] = {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K,
                              "IQ3_M": T.Q4_K}
_ATTN_OUTPUT_MOE8 = frozenset(("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                               "IQ3_S", "IQ3_M", "IQ4_XS"))
_ATTN_V: dict[str, _Rule] = {
    "Q2_K": lambda s: T.Q4_K if s.gqa4 else T.Q3_K,
    "Q2_K_S": lambda s: T.Q4_K if s.gqa4 else None,
    "IQ3_XXS": lambda s: T.Q4_K if s.gqa4 else (T.IQ3_XXS if s.has_imatrix else T.IQ3_S),
    "IQ3_XS": lambda s: T.Q4_K if s.gqa4 else None,
    "IQ3_S": lambda s: T.Q4_K if s.gqa4 else None,
    "IQ3_M": lambda s: T.Q4_K,
    "Q3_K_M": lambda s: T.Q5_K if s.i < 2 else T.Q4_K,
    "Q3_K_L": lambda s: T.Q5_K,
    "IQ4_NL": lambda s: T.Q5_K if s.gqa4 else None,
    "IQ4_XS": lambda s: T.Q5_K if s.gqa4 else None,
    "Q4_K_M": lambda s: T.Q6_K if s.more_bits else None,
    "Q5_K_M": lambda s: T.Q6_K if s.more_bits else None,
    "Q4_K_S": lambda s: T.Q5_K if s.i < 4 else None,
}
_FFN_DOWN: dict[str, _Rule] = {
    "Q2_K": lambda s: T.Q3_K,
    "Q2_K_S": lambda s: T.Q4_K if s.first_eighth else None,
    "IQ3_XXS": lambda s: None if s.has_imatrix else (T.Q4_K if s.first_eighth else T.Q3_K),
    "Q3_K_M": lambda s: (T.Q5_K if s.i < s.n // 16
                         else T.Q4_K if (not s.falcon or s.more_bits) else T.Q3_K),
    "IQ3_M": lambda s: T.Q4_K if s.first_eighth or (s.arch.n_expert == 8 and s.more_bits) else None,
    "Q3_K_L": lambda s: T.Q4_K if s.falcon else T.Q5_K,
    "Q4_K_M": lambda s: ((T.Q6_K if s.i < s.n // 16 else T.Q5_K if s.more_bits else T.Q4_K) if s.falcon
                         else T.Q6_K if s.more_bits else None),
    "IQ4_NL": lambda s: T.Q5_K if s.first_eighth and not s.has_imatrix else None,
    "IQ4_XS": lambda s: T.Q5_K if s.first_eighth and not s.has_imatrix else None,
    "Q5_K_M": lambda s: T.Q6_K if s.more_bits else None,
    "Q4_K_S": lambda s: T.Q5_K if not s.falcon and s.first_eighth else None,
    "Q4_0": lambda s: T.Q4_1 if s.has_imatrix and s.first_eighth else None,
    "Q5_0": lambda s: T.Q5_1 if s.has_imatrix and s.first_eighth else None,
}
_FFN_GATE_UP: dict[str, _Rule] = {"IQ3_XS": lambda s: T.IQ3_XXS if s.n // 8 <= s.i < 7 * s.n // 8 else None}


def _by_mix(table: Mapping[str, _Rule], ftype: str, site: _Site, new: T) -> T:
    """The table's type for this mix and site, else ``new``."""
    rule = table.get(ftype)
    chosen = rule(site) if rule else None
    return new if chosen is None else chosen


def _output_rule(new: T, tensor: PlanTensor, ftype: str, arch: ArchFacts, output_type: T | None) -> T:
    """The output matrix (or the tied token embedding): more bits than the rest."""
    if output_type is not None:
        return output_type
    if arch.arch == "falcon" or tensor.row_length % _block_size(new) != 0:
        return T.Q8_0
    if ftype in _OUTPUT_LOW_BIT:
        return T.Q5_K
    return T.Q6_K if new != T.Q8_0 else new


def _iq_low_rule(st: _State, new: T, ftype: str, cat: str, arch: ArchFacts) -> T:
    """The 1- and 2-bit IQ mixes, which llama.cpp handles in one branch of their own."""
    iq2s, n_exp = ftype in ("IQ2_S", "IQ2_M"), arch.n_expert
    if _is_attn_v_like(cat):
        st.take("attn_v")
        return T.Q4_K if (arch.n_gqa >= 4 or n_exp >= 4) else (T.IQ3_S if iq2s else T.Q2_K)
    if n_exp == 8 and cat == "attn_k":
        return T.Q4_K
    if cat == "ffn_down":
        return (T.IQ3_S if iq2s else T.Q2_K) if st.take("ffn_down") < st.n_ffn // 8 else new
    if cat == "attn_output":
        if n_exp == 8:
            return T.Q5_K
        if ftype in ("IQ1_S", "IQ1_M"):
            return T.IQ2_XXS
        return T.IQ3_S if iq2s else new
    return new


def _attn_v_rule(st: _State, new: T, ftype: str, arch: ArchFacts) -> T:
    """attn_v (and the fused attn_qkv / attn_kv_b): the tensors most sensitive to quantization."""
    new = _by_mix(_ATTN_V, ftype, _Site(st.take("attn_v"), st.n_attention_wv, arch, st.has_imatrix), new)
    if arch.is_70b and new in (T.Q3_K, T.Q4_K):
        new = T.Q5_K
    return T.Q8_0 if arch.n_expert == 8 else new


def _attn_output_rule(new: T, ftype: str, arch: ArchFacts) -> T:
    """attn_output: by mix, except for Falcon and 8-expert models."""
    if arch.arch == "falcon":
        return T.Q4_K if ftype == "Q3_K_L" else new
    if arch.n_expert == 8:
        return T.Q5_K if ftype in _ATTN_OUTPUT_MOE8 else new
    return _ATTN_OUTPUT.get(ftype, new)


def _ffn_rule(st: _State, new: T, name: str, ftype: str, cat: str, arch: ArchFacts) -> T:
    """ffn_down / ffn_gate / ffn_up: by layer (the running count, or the block number of an expert tensor)."""
    i = _layer_of(st.take(cat), st.n_ffn, name, arch)
    table = _FFN_DOWN if cat == "ffn_down" else _FFN_GATE_UP
    return _by_mix(table, ftype, _Site(i, st.n_ffn, arch, st.has_imatrix), new)


def _mix_rule(st: _State, new: T, tensor: PlanTensor, ftype: str, cat: str, arch: ArchFacts,
              output_type: T | None) -> T:
    """llama_tensor_get_type_impl: the per-category adjustments of each mix, in llama.cpp's order."""
    if cat == "output" or (st.tied and cat == "token_embd"):
        return _output_rule(new, tensor, ftype, arch, output_type)
    if cat == "token_embd":
        return _TOKEN_EMBD.get(ftype, new)
    if ftype in _IQ_LOW:
        return _iq_low_rule(st, new, ftype, cat, arch)
    if _is_attn_v_like(cat):
        return _attn_v_rule(st, new, ftype, arch)
    if cat in ("attn_k", "attn_q"):
        return T.Q8_0 if cat == "attn_k" and arch.n_expert == 8 else _ATTN_QK.get(ftype, new)
    if cat == "attn_output":
        return _attn_output_rule(new, ftype, arch)
    if cat in ("ffn_down", "ffn_gate", "ffn_up"):
        return _ffn_rule(st, new, tensor.name, ftype, cat, arch)
    return new


def _fallback(tensor: PlanTensor, target: T) -> T:
    """tensor_type_fallback: a 32-wide block type when the row length does not fit the target's block."""
    if tensor.row_length % _block_size(target) == 0:
        return target
    if target not in _FALLBACK:
        raise SlimlmError(f"tensor {tensor.name} has rows of {tensor.row_length} values, not a multiple of "
                          f"{_block_size(target)} as {target.name} needs, and llama.cpp defines no fallback")
    fallback = _FALLBACK[target]
    return T.F16 if tensor.row_length % _block_size(fallback) != 0 else fallback


def plan_types(tensors: Iterable[PlanTensor], arch: ArchFacts, ftype: str, *,
               overrides: Sequence[tuple[str, T]] | Mapping[str, T] = (), output_type: T | None = None,
               token_embedding_type: T | None = None, has_imatrix: bool = False, pure: bool = False,
               quantize_output: bool = True) -> dict[str, T]:
    """The GGML type llama.cpp's quantizer gives each tensor for the mix ``ftype`` (e.g. 'Q4_K_M').

    ``overrides`` are ``--tensor-type`` rules (regex searched in the name, first match wins); like in
    llama.cpp they replace the mix rule for that tensor and still get the block-size fallback.
    ``output_type`` / ``token_embedding_type`` are llama-quantize's --output-tensor-type /
    --token-embedding-type. Tensors that are never quantized (1-D, norms, routers) keep their type.
    """
    f = normalize_ftype(ftype)
    default = FTYPE_DEFAULT[f]
    ordered = sorted(tensors, key=lambda t: layer_sort_key(t.name))
    rules = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    compiled = [(re.compile(p), t) for p, t in rules]
    st = _State(ordered, arch, has_imatrix)
    plan: dict[str, T] = {}
    for tensor in ordered:
        if not allows_quantization(tensor, quantize_output=quantize_output):
            plan[tensor.name] = tensor.type
            continue
        cat = _category(tensor.name)
        if token_embedding_type is not None and cat == "token_embd":
            plan[tensor.name] = token_embedding_type
            continue
        if output_type is not None and cat == "output":
            plan[tensor.name] = output_type
            continue
        new = default
        if default not in _FLOAT_TYPES:
            manual = False
            for pattern, qtype in compiled:
                if pattern.search(tensor.name):
                    new, manual = qtype, True
                    break
            if not manual and not pure:
                new = _mix_rule(st, new, tensor, f, cat, arch, output_type)
            new = _fallback(tensor, new)
        plan[tensor.name] = new
    return plan


# Types llama.cpp will not write without an importance matrix (tensor_requires_imatrix): the 1-2 bit i-quants,
# IQ3_XXS, and Q2_K inside a Q2_K_S file; the token embedding and the output matrix are exempt.
_NEEDS_IMATRIX = frozenset((T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S, T.IQ1_M))


def requires_imatrix(name: str, qtype: T, ftype: str | None = None) -> bool:
    """Whether llama.cpp refuses to quantize this tensor to ``qtype`` (in mix ``ftype``) without an imatrix."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return qtype in _NEEDS_IMATRIX or (qtype == T.Q2_K and ftype is not None and normalize_ftype(ftype) == "Q2_K_S")


def check_imatrix(plan: Mapping[str, T], ftype: str, importance_for: Collection[str] | None) -> None:
    """Refuse, as llama-quantize does, a plan with a tensor that needs an importance matrix when none is given
    (``importance_for`` None) or the one given has no entry for it."""
    for name, qtype in plan.items():
        if requires_imatrix(name, qtype, ftype) and (importance_for is None or name not in importance_for):
            if importance_for is None:
                raise SlimlmError(f"{normalize_ftype(ftype)} needs an importance matrix ({name} is {qtype.name}, "
                                  "which llama.cpp only writes with one): pass --imatrix FILE or --calib TEXT")
            raise SlimlmError(f"the importance matrix has no entry for {name}, which {qtype.name} needs")


def tensor_bytes(tensor: PlanTensor, qtype: T) -> int:
    """Bytes of the tensor's data stored as ``qtype`` (whole blocks per row; block scales included)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if tensor.row_length % block:
        raise SlimlmError(f"{tensor.name}: rows of {tensor.row_length} do not fit {qtype.name} blocks of {block}")
    return tensor.n_elements // block * size


# The budget's candidates per tensor live here, not in quantize.budget, because sizing (inspect.fit) needs them
# and budget needs sizing. These types' llama.cpp encoders cannot run without importances
# (GGML_ASSERT(quant_weights)), even where llama-quantize would allow them (the token embedding, the output matrix).
_ENCODER_NEEDS_IMPORTANCE = frozenset((T.IQ2_XXS, T.IQ2_XS, T.IQ1_S, T.IQ1_M))


def budget_candidates_for(tensor: PlanTensor, types: Sequence[T] = BUDGET_CANDIDATES,
                          has_importance: bool = True) -> list[T]:
    """The types a budget mix may store this tensor as: those whose block divides its rows and, without an
    importance entry for it, those llama.cpp writes without one."""
    return [q for q in types if tensor.row_length % GGML_QUANT_SIZES[q][0] == 0
            and (has_importance or (q not in _ENCODER_NEEDS_IMPORTANCE and not requires_imatrix(tensor.name, q)))]


def budget_bytes_range(tensors: Iterable[PlanTensor], types: Sequence[T] = BUDGET_CANDIDATES,
                       has_importance: Callable[[str], bool] = lambda _name: True) -> tuple[int, int]:
    """(smallest, largest) tensor-data bytes of a budget mix of these tensors. Row lengths decide it, not the
    smallest type alone: on a model 576 or 896 wide most matrices take only 32-blocks (Q4_0 and up), so its
    smallest mix is about 4 bits/weight, not IQ2_XXS's 2.06. Tensors llama.cpp never quantizes keep their type."""
    small = large = 0
    for t in tensors:
        options = budget_candidates_for(t, types, has_importance(t.name)) if allows_quantization(t) else [t.type]
        sizes = [tensor_bytes(t, q) for q in options]
        small, large = small + min(sizes), large + max(sizes)
    return small, large
