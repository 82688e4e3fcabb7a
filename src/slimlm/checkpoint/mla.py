"""DeepSeek's multi-head latent attention (MLA) in llama.cpp's layout, and back.

HF keeps one ``kv_b_proj`` (n_head * (nope + v), kv_lora_rank): per head, the rows that expand the latent into the
key's non-rope part, then the value's. llama.cpp's deepseek2 graph absorbs them into the query and the output
instead, so its converter writes them as two per-head tensors: ``attn_k_b`` (n_head, kv_lora_rank, nope), the key
part transposed, and ``attn_v_b`` (n_head, v, kv_lora_rank). Rope needs no change: DeepSeek's weights are in the
interleaved order llama.cpp's rope uses (transformers re-orders them at run time, ``rope_interleave``).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import numpy as np

from slimlm.errors import SlimlmError

HFTensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]  # HF name, shape, float32 loader

KV_B = re.compile(r"^(?P<prefix>model\.layers\.\d+\.self_attn)\.kv_b_proj\.weight$")


def _dims(config: dict[str, Any]) -> tuple[int, int, int, int]:
    return (int(config["num_attention_heads"]), int(config["qk_nope_head_dim"]), int(config["v_head_dim"]),
            int(config["kv_lora_rank"]))


def split_kv_b(w: np.ndarray, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """HF ``kv_b_proj`` -> (``k_b`` (n_head, kv_lora_rank, nope), ``v_b`` (n_head, v, kv_lora_rank))."""
    n_head, nope, v, rank = _dims(config)
    per_head = w.reshape(n_head, nope + v, rank)
    return np.ascontiguousarray(per_head[:, :nope].transpose(0, 2, 1)), np.ascontiguousarray(per_head[:, nope:])


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """The inverse of :func:`split_kv_b`: HF's (n_head * (nope + v), kv_lora_rank) ``kv_b_proj``."""
    rank = k_b.shape[1]
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, rank)


def split_tensors(tensors: Iterable[HFTensor], config: dict[str, Any]) -> list[HFTensor]:
    """The checkpoint's tensor list with every ``kv_b_proj`` replaced by its ``k_b_proj`` and ``v_b_proj``
    (the names gguf-py maps to ``attn_k_b`` / ``attn_v_b``); each part loads the matrix and keeps its half."""
    n_head, nope, v, rank = _dims(config)
    out: list[HFTensor] = []
    for name, shape, load in tensors:
        m = KV_B.match(name)
        if m is None:
            out.append((name, shape, load))
            continue
        if tuple(shape) != (n_head * (nope + v), rank):
            raise SlimlmError(f"{name} has shape {tuple(shape)}, the config says {(n_head * (nope + v), rank)}")
        out.append((f"{m['prefix']}.k_b_proj.weight", (n_head, rank, nope),
                    lambda load=load: split_kv_b(load(), config)[0]))
        out.append((f"{m['prefix']}.v_b_proj.weight", (n_head, v, rank),
                    lambda load=load: split_kv_b(load(), config)[1]))
    return out
