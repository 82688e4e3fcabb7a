"""How many bytes a model needs: weights per format, GGUF file size, KV cache, runtime overhead.

Weights are sized tensor by tensor with each format's true storage cost (GGML block scales, compressed-tensors
scales and zero points), GGUF mixes with llama.cpp's per-tensor plan (formats.gguf_mix), over a checkpoint's
tensor list or one synthesized from a ModelSpec. Memory to run = weights + KV cache + a stated overhead
(RUNTIME_OVERHEAD_DOC). Estimates, not measurements.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import gguf
from gguf import GGMLQuantizationType as T

from slimlm.errors import SlimlmError
from slimlm.formats.gguf_mix import (ArchFacts, PlanTensor, allows_quantization, normalize_ftype, plan_types,
                                      tensor_bytes)
from slimlm.spec import ModelSpec

CT_VARIANTS = ("W8A8", "W4A16")
# 4-bit formats of AutoAWQ / AutoGPTQ checkpoints (group 128, scales + packed zero points), sized by explain.
INT4_FORMATS = ("AWQ", "GPTQ")
# DeepSeek-V3/R1's published format: FP8 (E4M3) weights with one float32 inverse scale per 128 x 128 block.
FP8_BLOCK = 128
VARIANTS = ("F32", "BF16", "F16", "Q8_0", "W8A8", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "W4A16", "Q4_K_S",
            "Q4_0", "Q3_K_M", "Q2_K")

W4A16_GROUP = 128
GGUF_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT

# KV cache element types (llama.cpp --cache-type-k/v): bytes per element.
CACHE_TYPES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
               "q4_1": 20 / 32, "q4_0": 18 / 32}

RUNTIME_FIXED_BYTES = 256 * 2**20
MICRO_BATCH = 512
RUNTIME_OVERHEAD_DOC = ("runtime overhead = 256 MiB (runtime, scratch buffers) + the logits of one micro-batch: "
                        "min(512, context x batch) tokens x vocab x 4 bytes (flash attention assumed, so no context "
                        "x context score matrix)")

# GGUF key-value metadata when only the vocabulary size is known. It is mostly the tokenizer: per entry the
# token string (8-byte length + text), its type (4 bytes) and a BPE merge or a SentencePiece score. The
# SmolLM2-135M GGUF holds 1,769,483 bytes of metadata for 49,152 entries: 36.0 bytes per entry, all
# other keys (architecture, chat template) included. Used for estimates from a config alone.
METADATA_BYTES_PER_VOCAB_ENTRY = 36


# ------------------------------------------------------------------------------------ tensor lists

_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
              "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe",
              "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}


def arch_facts(spec: ModelSpec) -> ArchFacts:
    """The hyper-parameters llama.cpp's type rules read, from a ModelSpec."""
    return ArchFacts(n_layers=spec.n_layers, n_head=spec.n_heads, n_head_kv=spec.n_kv_heads,
                     n_expert=spec.n_experts, arch=_GGUF_ARCH.get(spec.model_type, spec.model_type))


def gguf_tensors_from_spec(spec: ModelSpec) -> list[PlanTensor]:
    """The tensors llama.cpp's converter writes for this architecture (names, PyTorch-order shapes), all F32.

    DeepSeek's kv_b is split into attn_k_b / attn_v_b as current converters do; MTP modules are left out.
    """
    h, v = spec.hidden_size, spec.vocab_size
    out = [PlanTensor("token_embd.weight", (v, h)), PlanTensor("output_norm.weight", (h,))]
    if not spec.tie_word_embeddings:
        out.append(PlanTensor("output.weight", (v, h)))
    moe = set(spec.moe_layers)
    for i in range(spec.n_layers):
        out += _layer_tensors(spec, i, i in moe)
    return out


def _layer_tensors(s: ModelSpec, i: int, is_moe: bool) -> list[PlanTensor]:
    h = s.hidden_size
    t: dict[str, tuple[int, ...]] = {"attn_norm.weight": (h,), "ffn_norm.weight": (h,)}  # name -> shape
    if s.norms_per_layer >= 4:
        t.update({"post_attention_norm.weight": (h,), "post_ffw_norm.weight": (h,)})
    if s.is_mla:
        rope, nope, kv_rank = s.qk_rope_head_dim or 0, s.qk_nope_head_dim or 0, s.kv_lora_rank or 0
        if s.q_lora_rank:
            t.update({"attn_q_a.weight": (s.q_lora_rank, h), "attn_q_a_norm.weight": (s.q_lora_rank,),
                      "attn_q_b.weight": (s.n_heads * s.head_dim, s.q_lora_rank)})
        else:
            t["attn_q.weight"] = (s.n_heads * s.head_dim, h)
        t.update({"attn_kv_a_mqa.weight": (kv_rank + rope, h), "attn_kv_a_norm.weight": (kv_rank,),
                  "attn_k_b.weight": (s.n_heads, kv_rank, nope), "attn_v_b.weight": (s.n_heads, s.v_head_dim, kv_rank),
                  "attn_output.weight": (h, s.n_heads * s.v_head_dim)})
    else:
        q, kv, v = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.v_head_dim
        t.update({"attn_q.weight": (q, h), "attn_k.weight": (kv, h), "attn_v.weight": (v, h),
                  "attn_output.weight": (h, s.n_heads * s.v_head_dim)})
        if s.attention_bias:
            t.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (v,)})
        if s.attention_out_bias:
            t["attn_output.bias"] = (h,)
        if s.qk_norm:
            t.update({"attn_q_norm.weight": (s.head_dim,), "attn_k_norm.weight": (s.head_dim,)})
    if is_moe:
        e, f = s.n_experts, s.moe_intermediate_size
        t.update({"ffn_gate_inp.weight": (e, h), "ffn_gate_exps.weight": (e, f, h), "ffn_up_exps.weight": (e, f, h),
                  "ffn_down_exps.weight": (e, h, f)})
        if s.router_bias:
            t["exp_probs_b.bias"] = (e,)
        if s.shared_expert_intermediate_size:
            fs = s.shared_expert_intermediate_size
            t.update({"ffn_gate_shexp.weight": (fs, h), "ffn_up_shexp.weight": (fs, h),
                      "ffn_down_shexp.weight": (h, fs)})
            if s.shared_expert_gate:
                t["ffn_gate_inp_shexp.weight"] = (h,)
    else:
        f = s.intermediate_size
        t.update({"ffn_gate.weight": (f, h), "ffn_up.weight": (f, h), "ffn_down.weight": (h, f)})
        if s.mlp_bias:
            t.update({"ffn_gate.bias": (f,), "ffn_up.bias": (f,), "ffn_down.bias": (h,)})
    return [PlanTensor(f"blk.{i}.{name}", shape) for name, shape in t.items()]


def gguf_tensors_from_checkpoint(ckpt: Any) -> list[PlanTensor]:
    """A checkpoint's own tensor list in GGUF terms: a GGUF's tensors as they are, HF names mapped with the
    gguf package's TensorNameMap (per-expert matrices stacked as the converter does)."""
    if ckpt.format == "gguf":
        return [PlanTensor(t.name, tuple(t.shape), T[t.ggml_type] if t.ggml_type else T.F32)
                for t in ckpt.tensors]
    spec = ModelSpec.from_config(ckpt.config or {})
    return hf_to_gguf_tensors([(t.name, tuple(t.shape)) for t in ckpt.tensors], spec)


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def hf_to_gguf_tensors(named_shapes: Iterable[tuple[str, tuple[int, ...]]], spec: ModelSpec) -> list[PlanTensor]:
    """Map HF tensor names to llama.cpp's; tensors with no GGUF counterpart (e.g. MTP layers) are dropped."""
    arch_enum = _gguf_arch_enum(spec)
    name_map = gguf.get_tensor_name_map(arch_enum, spec.n_layers + spec.mtp_layers)
    stacked: dict[str, list[tuple[int, ...]]] = {}
    out: list[PlanTensor] = []
    for name, shape in named_shapes:
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= spec.n_layers:
            continue  # MTP modules are not part of the model llama.cpp runs
        if name.endswith("e_score_correction_bias"):  # the converter's renaming, before the map
            name = name[: -len("_bias")] + ".bias"
        if _EXPERT.search(name):
            stacked.setdefault(_EXPERT.sub(".experts.", name), []).append(shape)
            continue
        if name.endswith("kv_b_proj.weight") and spec.is_mla:
            mapped = name_map.get_name(name, try_suffixes=(".weight",))
            if mapped:
                kv_rank, heads = spec.kv_lora_rank or 0, spec.n_heads
                blk = mapped.rsplit(".", 2)[0]
                out += [PlanTensor(f"{blk}.attn_k_b.weight", (heads, kv_rank, spec.qk_nope_head_dim or 0)),
                        PlanTensor(f"{blk}.attn_v_b.weight", (heads, spec.v_head_dim, kv_rank))]
            continue
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            continue
        out.append(PlanTensor(mapped, shape))
    for name, shapes in stacked.items():
        mapped = name_map.get_name(name, try_suffixes=(".weight",))
        if mapped:
            out.append(PlanTensor(mapped, (len(shapes), *shapes[0])))
    if spec.tie_word_embeddings:
        out = [t for t in out if t.name != "output.weight"]
    return out


def _gguf_arch_enum(spec: ModelSpec) -> "gguf.MODEL_ARCH":
    name = _GGUF_ARCH.get(spec.model_type, spec.model_type)
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise SlimlmError(f"no GGUF architecture for model_type {spec.model_type!r}")


# ----------------------------------------------------------------------------------------- weights

@dataclass
class WeightEstimate:
    """Bytes of a model's weights in one format, with the types used and their share of parameters."""

    variant: str
    bytes: int
    params: int
    type_counts: dict[str, int] = field(default_factory=dict)  # type -> parameters stored that way
    high_precision: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return self.bytes * 8 / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "bytes": self.bytes, "params": self.params,
                "bits_per_weight": round(self.bits_per_weight, 3), "types": dict(self.type_counts),
                "high_precision": list(self.high_precision)}


def normalize_variant(name: str) -> str:
    """'q4_k_m' -> 'Q4_K_M', 'fp16' -> 'F16', 'w4a16' -> 'W4A16'; unknown names raise SlimlmError."""
    key = name.strip().upper().replace("-", "_")
    if key in CT_VARIANTS or key in INT4_FORMATS or key == "FP8":
        return key
    return normalize_ftype(key)


def gguf_weight_estimate(tensors: Sequence[PlanTensor], arch: ArchFacts, ftype: str,
                         **plan_options: Any) -> tuple[WeightEstimate, dict[str, T]]:
    """Tensor-data bytes of the GGUF mix ``ftype`` and the plan that gives them."""
    plan = plan_types(tensors, arch, ftype, **plan_options)
    total = 0
    counts: dict[str, int] = {}
    for t in tensors:
        qtype = plan[t.name]
        total += tensor_bytes(t, qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + t.n_elements
    params = sum(t.n_elements for t in tensors)
    f = normalize_ftype(ftype)
    kept = sorted({plan[t.name].name for t in tensors if not allows_quantization(t)})
    high = [f"1-D tensors (norms, biases) and routers stay {'/'.join(kept) or 'F32'}"]
    high += [f"{t.name} stored as {plan[t.name].name}" for t in tensors
             if t.name in ("output.weight", "token_embd.weight")]
    estimate = WeightEstimate(f, total, params, dict(sorted(counts.items(), key=lambda kv: -kv[1])), high)
    return estimate, plan


def ct_weight_estimate(tensors: Sequence[PlanTensor], variant: str, dtype_bytes: int = 2,
                       symmetric: bool = True) -> WeightEstimate:
    """Bytes of a compressed-tensors (W8A8, W4A16), AWQ/GPTQ or FP8-block checkpoint made from these tensors.

    Only decoder-block Linear weights are quantized; the rest stays at ``dtype_bytes``. W4A16 stores int4
    packed 8 per int32, a scale per 128 inputs per row and a 2-value int64 weight_shape (+ packed zeros if asym).
    """
    v = variant.upper()
    total = 0
    quantized = 0
    params = 0
    for t in tensors:
        params += t.n_elements
        if not (t.name.startswith("blk.") and allows_quantization(t)):
            total += t.n_elements * (4 if t.type == T.F32 and t.n_dims == 1 and dtype_bytes == 4 else dtype_bytes)
            continue
        quantized += t.n_elements
        mats = t.n_elements // (t.shape[-1] * t.shape[-2])
        rows, cols = t.shape[-2], t.shape[-1]
        if v == "W8A8":
            per = rows * cols + rows * dtype_bytes + (0 if symmetric else rows * dtype_bytes)
        elif v == "W4A16":
            groups = math.ceil(cols / W4A16_GROUP)
            per = rows * math.ceil(cols * 4 / 32) * 4 + rows * groups * dtype_bytes + 16
            if not symmetric:
                per += math.ceil(rows * 4 / 32) * groups * 4
        elif v in INT4_FORMATS:
            # qweight: 8 int4 per int32; scales: fp16 per (group, row); qzeros: 8 int4 per int32 per group;
            # GPTQ adds g_idx, one int32 per input column.
            groups = math.ceil(cols / W4A16_GROUP)
            per = rows * cols // 2 + groups * rows * 2 + groups * math.ceil(rows / 8) * 4
            if v == "GPTQ":
                per += cols * 4
        elif v == "FP8":
            per = rows * cols + math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK) * 4
        else:
            raise SlimlmError(f"unknown compressed-tensors scheme {variant!r}; known: {', '.join(CT_VARIANTS)}")
        total += mats * per
    float_name = {2: "BF16", 4: "F32"}.get(dtype_bytes, f"{dtype_bytes * 8}-bit float")
    if v in INT4_FORMATS:
        float_name = "F16"
    qname = {"W8A8": "INT8", "FP8": "FP8"}.get(v, "INT4")
    counts = {qname: quantized, float_name: params - quantized}
    high = [f"embeddings, lm_head, norms and biases stay {float_name}",
            {"W8A8": "one scale per output channel",
             "FP8": f"one float32 scale per {FP8_BLOCK}x{FP8_BLOCK} block"}.get(v, f"one scale per {W4A16_GROUP} weights")]
    return WeightEstimate(v, total, params, counts, high)


# ------------------------------------------------------------------------------------- GGUF files

def gguf_header_bytes(tensors: Sequence[PlanTensor], metadata_bytes: int) -> int:
    """Bytes before the tensor data: fixed header, key-value metadata, tensor infos, alignment padding."""
    infos = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in tensors)
    raw = 4 + 4 + 8 + 8 + metadata_bytes + infos
    return -(-raw // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


def gguf_file_bytes(tensors: Sequence[PlanTensor], plan: dict[str, T], metadata_bytes: int) -> int:
    """Size of the GGUF file: header + each tensor's data padded to the 32-byte alignment."""
    data = sum(-(-tensor_bytes(t, plan[t.name]) // GGUF_ALIGNMENT) * GGUF_ALIGNMENT for t in tensors)
    return gguf_header_bytes(tensors, metadata_bytes) + data


def estimate_metadata_bytes(vocab_size: int) -> int:
    """Key-value metadata of a converted model when only the vocabulary size is known (mostly tokenizer)."""
    return vocab_size * METADATA_BYTES_PER_VOCAB_ENTRY


def gguf_metadata_bytes(path: str) -> int:
    """Key-value metadata bytes of an existing GGUF file, alignment padding included (header only)."""
    from pathlib import Path

    from slimlm.checkpoint.gguf_file import read_gguf

    return metadata_bytes_of(read_gguf(Path(path))[0])


def metadata_bytes_of(gguf_tensors: Sequence[Any]) -> int:
    """Metadata bytes of an opened GGUF from its tensors' absolute offsets: the data starts right after the
    fixed header, the key-value pairs, the tensor infos and the alignment padding."""
    if not gguf_tensors:
        return 0
    start = min(int(t.offset) for t in gguf_tensors)
    infos = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in gguf_tensors)
    return start - 24 - infos


# ------------------------------------------------------------------------------------------ KV cache

@dataclass
class KVCache:
    bytes: int
    per_token_bytes: float  # for one sequence, averaged over layers at this context
    cache_type: str
    context: int
    batch: int
    kind: str  # "gqa", "mha", "mqa", "mla"
    sliding_layers: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "per_token_bytes": round(self.per_token_bytes, 1), "cache_type": self.cache_type,
                "context": self.context, "batch": self.batch, "attention": self.kind,
                "sliding_layers": self.sliding_layers, "note": self.note}


def kv_cache(spec: ModelSpec, context: int, batch: int = 1, cache_type: str = "f16") -> KVCache:
    """KV-cache bytes for ``batch`` sequences of ``context`` tokens; sliding layers hold ``sliding_window`` at most.

    MLA (DeepSeek-V2/V3) caches one latent of kv_lora_rank + qk_rope_head_dim, not doubled: K and V are rebuilt
    from it.
    """
    if context <= 0 or batch <= 0:
        raise SlimlmError("context and batch must be positive")
    ct = cache_type.lower()
    if ct not in CACHE_TYPES:
        raise SlimlmError(f"unknown KV cache type {cache_type!r}; known: {', '.join(CACHE_TYPES)}")
    if spec.is_mla:
        per_layer = (spec.kv_lora_rank or 0) + (spec.qk_rope_head_dim or 0)
        kind, note = "mla", "MLA: one compressed latent (kv_lora_rank + rope dim) per token per layer"
    else:
        per_layer = spec.n_kv_heads * (spec.head_dim + spec.v_head_dim)
        kind = "mqa" if spec.n_kv_heads == 1 else "mha" if spec.n_kv_heads == spec.n_heads else "gqa"
        note = f"{spec.n_kv_heads} KV heads for {spec.n_heads} query heads"
    layer_types = spec.layer_types or ("full",) * spec.n_layers
    elements = 0
    sliding = 0
    for kind_i in layer_types:
        tokens = context
        if kind_i == "sliding" and spec.sliding_window:
            tokens = min(context, spec.sliding_window)
            sliding += 1
        elements += per_layer * tokens
    total = elements * batch * CACHE_TYPES[ct]
    if sliding:
        note += f"; {sliding} sliding-window layers keep at most {spec.sliding_window} tokens"
    return KVCache(int(math.ceil(total)), total / (context * batch), ct, context, batch, kind, sliding, note)


def runtime_overhead(spec: ModelSpec, context: int, batch: int = 1) -> int:
    """The stated runtime overhead (RUNTIME_OVERHEAD_DOC): fixed buffers plus one micro-batch's logits."""
    ubatch = min(MICRO_BATCH, context * batch)
    return RUNTIME_FIXED_BYTES + ubatch * spec.vocab_size * 4


# --------------------------------------------------------------------------------------- summaries

@dataclass
class MemoryEstimate:
    variant: str
    weights: WeightEstimate
    kv: KVCache
    overhead: int
    file_bytes: int | None = None

    @property
    def total(self) -> int:
        return self.weights.bytes + self.kv.bytes + self.overhead

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "weights": self.weights.to_dict(), "kv_cache": self.kv.to_dict(),
                "overhead_bytes": self.overhead, "overhead_rule": RUNTIME_OVERHEAD_DOC,
                "total_bytes": self.total, "file_bytes": self.file_bytes}


def estimate_memory(spec: ModelSpec, variant: str, *, context: int = 4096, batch: int = 1,
                    cache_type: str = "f16", tensors: Sequence[PlanTensor] | None = None,
                    metadata_bytes: int | None = None, dtype_bytes: int = 2) -> MemoryEstimate:
    """Weights + KV cache + overhead to run ``spec`` as ``variant``, and (GGUF) the file size; ``tensors`` and
    ``metadata_bytes`` default to what the spec implies."""
    tensors = list(tensors) if tensors is not None else gguf_tensors_from_spec(spec)
    arch = arch_facts(spec)
    v = normalize_variant(variant)
    file_bytes = None
    if v in CT_VARIANTS or v in INT4_FORMATS or v == "FP8":
        weights = ct_weight_estimate(tensors, v, dtype_bytes)
    else:
        weights, plan = gguf_weight_estimate(tensors, arch, v)
        meta = metadata_bytes if metadata_bytes is not None else estimate_metadata_bytes(spec.vocab_size)
        file_bytes = gguf_file_bytes(tensors, plan, meta)
    kv = kv_cache(spec, context, batch, cache_type)
    return MemoryEstimate(v, weights, kv, runtime_overhead(spec, context, batch), file_bytes)
