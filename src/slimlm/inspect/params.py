"""Parameter counts: exact from a checkpoint's tensor table, or computed from a ModelSpec (config alone).

Both paths produce the same ParamCount: a total, a breakdown by role, MoE active parameters per token
(ACTIVE_DEFINITION), and DeepSeek-V3's multi-token-prediction (MTP) module counted apart from the model.
*Active* follows DeepSeek's V3 weight notes ("36.6B activated, including 0.9B for the output head");
``active_with_embeddings`` is the convention behind Mixtral's "12.9B active".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from slimlm.checkpoint.types import TensorInfo
from slimlm.spec import ModelSpec

ROLES = ("embeddings", "attention", "mlp", "routed_experts", "shared_experts", "norms", "biases", "lm_head",
         "other")

ACTIVE_DEFINITION = (
    "active = parameters used to compute one token: attention, dense MLPs, norms, biases, router, shared "
    "experts, the top-k routed experts of each MoE layer, and lm_head; the input embedding table is "
    "excluded (one row is read per token); active_with_embeddings adds it"
)


@dataclass
class ParamCount:
    """Parameter totals by role. ``total`` excludes MTP modules, which are reported in ``mtp``."""

    total: int
    roles: dict[str, int]
    tied_embeddings: bool
    mtp: int = 0
    mtp_shared_copies: int = 0  # MTP's stored copies of the embedding and lm_head (also in ``mtp``)
    router: int = 0  # router weights (part of roles['routed_experts'])
    active: int | None = None
    active_with_embeddings: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = {"total_params": self.total, "label": size_label(self.total), "tied_embeddings": self.tied_embeddings,
                "roles": dict(self.roles)}
        if self.active is not None:
            data.update(active_params=self.active, active_label=active_label(self.active),
                        active_with_embeddings=self.active_with_embeddings, router_params=self.router,
                        active_definition=ACTIVE_DEFINITION)
        if self.mtp:
            data.update(mtp_params=self.mtp, mtp_unique_params=self.mtp - self.mtp_shared_copies)
        if self.notes:
            data["notes"] = list(self.notes)
        return data


# ----------------------------------------------------------------------------------------- size labels

def size_label(n_params: int) -> str:
    """The size as vendors write it in model names: 135M, 360M, 1.5B, 1.7B, 7B, 8B, 14B, 70B, 671B.

    Vendors round small models to a round number of millions and truncate billions (Qwen2.5-7B has 7.6B,
    Llama-3.1-8B 8.03B, Qwen2.5-32B 32.8B, Qwen2.5-1.5B 1.54B, SmolLM2-1.7B 1.71B). So: below 1B, the
    nearest 5M; 1B to 2B, truncated to 0.1B; from 2B, truncated to whole billions; from 1T, to 0.1T.
    """
    if n_params < 0:
        raise ValueError("negative parameter count")
    if n_params < 1_000_000:
        return f"{round(n_params / 1000)}K"
    if n_params < 999_500_000:
        millions = max(5, 5 * round(n_params / 5_000_000))
        return f"{millions}M" if millions < 1000 else "1B"
    if n_params < 2_000_000_000:
        tenths = n_params // 100_000_000
        return f"{tenths // 10}B" if tenths % 10 == 0 else f"{tenths / 10:.1f}B"
    if n_params < 1_000_000_000_000:
        return f"{n_params // 1_000_000_000}B"
    tenths = n_params // 100_000_000_000
    return f"{tenths // 10}T" if tenths % 10 == 0 else f"{tenths / 10:.1f}T"


def active_label(n_params: int) -> str:
    """Active-parameter sizes are rounded, not truncated, in vendors' names (37B for 36.6B, A2.7B)."""
    if n_params >= 10_000_000_000:
        return f"{round(n_params / 1e9)}B"
    if n_params >= 1_000_000_000:
        return f"{round(n_params / 1e8) / 10:g}B"
    return f"{round(n_params / 1e6)}M"


# ------------------------------------------------------------------------------- counts from tensors

# Scales, zero points and index tensors of quantized safetensors checkpoints (FP8 block scales, GPTQ/AWQ,
# compressed-tensors): they are not model parameters, so they are counted apart from the total.
_QUANT_META_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "weight_zero_point", "weight_g_idx",
                        "weight_shape", ".scales", ".qzeros", ".g_idx", "output_scale", "k_scale", "v_scale")
_HF_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.")


def tensor_role(name: str, n_layers: int | None = None) -> tuple[str, bool]:
    """(role, is_router) of a tensor from its HF or GGUF name; role 'mtp' for MTP-module tensors."""
    if name.endswith(_QUANT_META_SUFFIXES):
        return "quant_meta", False
    match = _HF_LAYER.search(name) or _GGUF_LAYER.match(name)
    if ".nextn." in name or (match and n_layers is not None and int(match.group(1)) >= n_layers):
        return "mtp", False
    last = name.rsplit(".", 2)
    leaf = last[-2] if len(last) >= 2 and last[-1] in ("weight", "bias") else last[-1]
    if name.endswith(".bias") or "e_score_correction_bias" in name or "exp_probs_b" in name:
        return "biases", False
    if name.startswith("token_embd.") or "embed_tokens" in name or leaf in ("wte", "tok_embeddings"):
        return "embeddings", False
    if name.startswith("lm_head.") or name == "output.weight":
        return "lm_head", False
    if "norm" in leaf:
        return "norms", False
    if "shared_expert" in name or "_shexp" in leaf:
        return "shared_experts", False
    if leaf == "ffn_gate_inp" or name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")):
        return "routed_experts", True
    if ".experts." in name or name.endswith((".experts.gate_up_proj", ".experts.down_proj")) or "_exps" in leaf:
        return "routed_experts", False
    if "self_attn" in name or ".attention." in name or leaf.startswith("attn_"):
        return "attention", False
    if ".mlp." in name or "feed_forward" in name or "block_sparse_moe" in name or leaf.startswith("ffn_"):
        return "mlp", False
    return "other", False


def count_tensors(tensors: Iterable[TensorInfo], spec: ModelSpec | None = None) -> ParamCount:
    """Exact counts from a tensor table; ``spec`` (if known) supplies the layer count, tying and MoE k/E."""
    n_layers = spec.n_layers if spec else None
    roles = dict.fromkeys(ROLES, 0)
    mtp = mtp_shared = router = quant_meta = 0
    tensors = list(tensors)
    has_lm_head = any(tensor_role(n)[0] == "lm_head" for n in {t.name for t in tensors})
    tied = (spec.tie_word_embeddings if spec else False) or not has_lm_head
    notes = []
    if has_lm_head and spec and spec.tie_word_embeddings:
        notes.append("lm_head is stored but the config ties it to the embeddings; counted once")
    for t in tensors:
        role, is_router = tensor_role(t.name, n_layers)
        if role == "lm_head" and tied:
            continue
        if role == "quant_meta":
            quant_meta += t.numel
            continue
        if role == "mtp":
            mtp += t.numel
            if "embed_tokens" in t.name or "shared_head.head" in t.name or "shared_head_head" in t.name:
                mtp_shared += t.numel
            continue
        roles[role] += t.numel
        router += t.numel if is_router else 0
    total = sum(roles.values())
    if quant_meta:
        notes.append(f"{quant_meta:,} elements of quantization scales/zero points are not counted as parameters")
    result = ParamCount(total=total, roles=roles, tied_embeddings=tied, mtp=mtp, mtp_shared_copies=mtp_shared,
                        router=router, notes=notes)
    if spec is not None and spec.is_moe and spec.n_experts:
        expert_weights = roles["routed_experts"] - router
        idle = expert_weights - expert_weights * spec.n_experts_per_tok // spec.n_experts
        result.active = total - roles["embeddings"] - idle
        result.active_with_embeddings = total - idle
    return result


# ---------------------------------------------------------------------------------- counts from a spec

def _attention_weights(s: ModelSpec) -> int:
    h = s.hidden_size
    if s.is_mla:
        q = (h * s.q_lora_rank + s.q_lora_rank * s.n_heads * s.head_dim) if s.q_lora_rank else h * s.n_heads * s.head_dim
        kv_a = h * (s.kv_lora_rank + s.qk_rope_head_dim)
        kv_b = s.kv_lora_rank * s.n_heads * (s.qk_nope_head_dim + s.v_head_dim)
        return q + kv_a + kv_b + s.n_heads * s.v_head_dim * h
    q_out = s.n_heads * s.head_dim
    kv_out = s.n_kv_heads * s.head_dim
    return h * q_out + 2 * h * kv_out + q_out * h


def _attention_biases(s: ModelSpec) -> int:
    h = s.hidden_size
    if s.is_mla:
        if not s.attention_bias:
            return 0
        q_bias = s.q_lora_rank if s.q_lora_rank else 0  # q_proj has no bias when queries are not compressed
        return q_bias + s.kv_lora_rank + s.qk_rope_head_dim + h
    n = 0
    if s.attention_bias:
        n += s.n_heads * s.head_dim + 2 * s.n_kv_heads * s.head_dim
    if s.attention_out_bias:
        n += h
    return n


def _layer_norms(s: ModelSpec) -> int:
    n = s.norms_per_layer * s.hidden_size
    if s.qk_norm:
        n += 2 * s.head_dim
    if s.is_mla:
        n += (s.q_lora_rank or 0) + s.kv_lora_rank
    return n


def _moe_layer(s: ModelSpec) -> tuple[int, int, int, int]:
    """(routed expert weights, router weights, shared expert params, router bias) of one MoE layer."""
    h = s.hidden_size
    experts = s.n_experts * 3 * h * s.moe_intermediate_size
    router = h * s.n_experts
    shared = 3 * h * s.shared_expert_intermediate_size + (h if s.shared_expert_gate else 0)
    return experts, router, shared, s.n_experts if s.router_bias else 0


def count_spec(s: ModelSpec) -> ParamCount:
    """Counts computed from the architecture, with the same roles as count_tensors."""
    h = s.hidden_size
    roles = dict.fromkeys(ROLES, 0)
    roles["embeddings"] = s.vocab_size * h
    roles["lm_head"] = 0 if s.tie_word_embeddings else s.vocab_size * h
    roles["norms"] = s.n_layers * _layer_norms(s) + h
    roles["attention"] = s.n_layers * _attention_weights(s)
    roles["biases"] = s.n_layers * _attention_biases(s)
    n_moe = len(s.moe_layers)
    n_dense = s.n_layers - n_moe
    roles["mlp"] = n_dense * 3 * h * s.intermediate_size
    if s.mlp_bias:
        roles["biases"] += n_dense * (2 * s.intermediate_size + h)
    experts, router, shared, router_bias = _moe_layer(s) if n_moe else (0, 0, 0, 0)
    roles["routed_experts"] = n_moe * (experts + router)
    roles["shared_experts"] = n_moe * shared
    roles["biases"] += n_moe * router_bias
    total = sum(roles.values())
    result = ParamCount(total=total, roles=roles, tied_embeddings=s.tie_word_embeddings, router=n_moe * router)
    if n_moe:
        idle = n_moe * (experts - experts * s.n_experts_per_tok // s.n_experts)
        result.active = total - roles["embeddings"] - idle
        result.active_with_embeddings = total - idle
    if s.mtp_layers:
        # Each DeepSeek-V3 MTP module: a decoder layer (MoE when past the dense layers), two input norms
        # (enorm, hnorm), eh_proj (2h -> h), a final norm, and stored copies of the embedding and lm_head.
        layer = _attention_weights(s) + _layer_norms(s) + _attention_biases(s)
        if n_moe:
            layer += experts + router + shared + router_bias
        else:
            layer += 3 * h * s.intermediate_size
        unique = layer + 2 * h + 2 * h * h + h
        copies = 2 * s.vocab_size * h
        result.mtp = s.mtp_layers * (unique + copies)
        result.mtp_shared_copies = s.mtp_layers * copies
    return result
