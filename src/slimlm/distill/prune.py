"""Derive a smaller student from the teacher, Minitron-style: drop layers, attention heads and MLP channels
that matter least.

Importance is measured on calibration text: a layer's is 1 - cos(h_in, h_out) averaged over tokens (how
much it changes the hidden state; ShortGPT's "block influence"); an attention head's is the mean L2 norm
of what it writes into the residual stream (its slice of o_proj applied to its output); an MLP channel's
is the mean |act(gate) * up| it feeds into down_proj. The pruned student is then distilled to recover.
"""

from __future__ import annotations

import copy

import torch

from slimlm.errors import SlimlmError


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SlimlmError("pruning supports decoder-only models with model.layers (Llama, Qwen2, Mistral, Gemma)")
    return layers


def _forward_with_hooks(model: torch.nn.Module, calib_ids: torch.Tensor, hooks: list) -> None:
    """One forward pass over the calibration ids with measurement hooks installed, removed whatever happens."""
    try:
        model(input_ids=calib_ids)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def layer_importance(model: torch.nn.Module, calib_ids: torch.Tensor) -> list[float]:
    """Per decoder layer: mean over tokens of 1 - cos(input hidden state, output hidden state)."""
    scores: list[float] = []

    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        scores.append(float((1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).mean()))

    hooks = [layer.register_forward_hook(hook, with_kwargs=True) for layer in _layers(model)]
    _forward_with_hooks(model, calib_ids, hooks)
    return scores


@torch.no_grad()
def mlp_channel_importance(model: torch.nn.Module, calib_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, per intermediate channel: mean |act_fn(gate(x)) * up(x)| over calibration tokens."""
    sums: list[torch.Tensor] = []
    hooks = []
    for layer in _layers(model):
        mlp = layer.mlp

        def hook(module, args, _out, store=sums):
            x = args[0]
            h = (module.act_fn(module.gate_proj(x)) * module.up_proj(x)).abs().float()
            store.append(h.reshape(-1, h.shape[-1]).mean(0))

        hooks.append(mlp.register_forward_hook(hook))
    _forward_with_hooks(model, calib_ids, hooks)
    return sums


@torch.no_grad()
def head_importance(model: torch.nn.Module, calib_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, per query head: mean over tokens of ||o_proj[:, head] @ head_output||, what the head actually
    adds to the residual stream (a head whose output o_proj scales down is unimportant, however large)."""
    scores: list[torch.Tensor] = []
    hooks = []
    for layer in _layers(model):
        attn = layer.self_attn

        def hook(module, args, store=scores, attn=attn):
            x = args[0].float()
            head_dim = int(attn.head_dim)
            n_heads = x.shape[-1] // head_dim
            x = x.reshape(-1, n_heads, head_dim)  # [tokens, H, d]
            w = module.weight.float().view(module.out_features, n_heads, head_dim)  # [hidden, H, d]
            contrib = torch.einsum("thd,ehd->the", x, w)
            store.append(contrib.norm(dim=-1).mean(0))

        hooks.append(attn.o_proj.register_forward_pre_hook(hook))
    _forward_with_hooks(model, calib_ids, hooks)
    return scores


def _rows(lin: torch.nn.Linear, rows: torch.Tensor) -> None:
    """Keep output ``rows``; the bias (Qwen2's q/k/v) is sliced with them, as it belongs to those rows."""
    lin.weight = torch.nn.Parameter(lin.weight.data[rows].clone())
    if lin.bias is not None:
        lin.bias = torch.nn.Parameter(lin.bias.data[rows].clone())
    lin.out_features = int(rows.numel())


def _cols(lin: torch.nn.Linear, cols: torch.Tensor) -> None:
    """Keep input ``cols``; a bias (o_proj/down_proj with attention_bias/mlp_bias) is per output and stays."""
    lin.weight = torch.nn.Parameter(lin.weight.data[:, cols].clone())
    lin.in_features = int(cols.numel())


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def heads_to_keep(scores: torch.Tensor, n_heads: int, n_kv: int, keep: float) -> tuple[list[int], int]:
    """Which query heads of one layer survive (sorted), and the new number of KV heads.

    With GQA every KV group keeps its round(group * keep) (>= 1) most important query heads and all KV heads
    stay: whole groups are a coarse step (SmolLM2 has 3), and this keeps n_heads a multiple of n_kv, as
    transformers requires. Without grouping (n_heads == n_kv) a head goes with its own K and V.
    """
    group = n_heads // n_kv
    if group > 1:
        per_group = max(1, int(round(group * keep)))
        kept: list[int] = []
        for g in range(n_kv):
            members = torch.arange(g * group, (g + 1) * group)
            best = members[scores[members].topk(per_group).indices]
            kept += sorted(int(h) for h in best)
        return kept, n_kv
    new = max(1, int(round(n_heads * keep)))
    return sorted(int(h) for h in scores.topk(new).indices), new


def prune_heads(model: torch.nn.Module, calib_ids: torch.Tensor, keep: float) -> dict:
    """Narrow every layer's attention in place to ``keep`` of its query heads (see ``heads_to_keep``)."""
    cfg = model.config
    n_heads, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    group = n_heads // n_kv
    kept0, new_kv = heads_to_keep(torch.arange(n_heads, dtype=torch.float32), n_heads, n_kv, keep)
    new_heads = len(kept0)
    if new_heads == n_heads:
        step = f"1/{group} (one query head per KV group)" if group > 1 else f"1/{n_heads}"
        raise SlimlmError(f"--prune-heads {keep} removes no head of {n_heads} ({n_kv} KV heads); "
                          f"the fraction moves in steps of {step}")
    scores = head_importance(model, calib_ids)
    kept_all: list[list[int]] = []
    for layer, s in zip(_layers(model), scores):
        kept, _ = heads_to_keep(s, n_heads, n_kv, keep)
        attn = layer.self_attn
        rows = _head_rows(kept, head_dim)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj) if group == 1 else (attn.q_proj,):
            _rows(proj, rows)
        _cols(attn.o_proj, rows)
        attn.num_key_value_groups = new_heads // new_kv
        for name, value in (("num_heads", new_heads), ("num_key_value_heads", new_kv)):
            if hasattr(attn, name):
                setattr(attn, name, value)
        kept_all.append(kept)
    cfg.num_attention_heads, cfg.num_key_value_heads = new_heads, new_kv
    cfg.head_dim = head_dim  # hidden_size / heads no longer gives it
    return {"head_scores": [s.tolist() for s in scores], "kept_heads": kept_all,
            "num_attention_heads": new_heads, "num_key_value_heads": new_kv}


def _mlp_width(width: int, keep: float) -> int:
    """The pruned intermediate size: a multiple of 32 (kernel-friendly) for real widths, never above ``width``
    (rounding up could ask for more channels than exist), and refused when it would remove none."""
    new = max(1, int(round(width * keep / 32)) * 32) if width >= 64 else max(1, int(width * keep))
    new = min(new, width)
    if new == width:
        raise SlimlmError(f"--prune-mlp {keep} removes no channel of {width} (widths move in steps of 32)")
    return new


def prune(teacher: torch.nn.Module, calib_ids: torch.Tensor, *, drop_layers: int = 0,
          mlp_keep: float = 1.0, heads_keep: float = 1.0) -> tuple[torch.nn.Module, dict]:
    """A copy of ``teacher`` with ``drop_layers`` fewest-influence layers removed, then attention narrowed to
    ``heads_keep`` of its query heads and MLPs to ``mlp_keep`` of their channels (importance re-measured on the
    shallower model each time, so it reflects the network that will actually run)."""
    layers = _layers(teacher)
    n = len(layers)
    if not 0 <= drop_layers < n:
        raise SlimlmError(f"--prune-layers must be between 0 and {n - 1} for a {n}-layer model")
    if not 0 < mlp_keep <= 1:
        raise SlimlmError("--prune-mlp keeps a fraction of MLP channels: give a value in (0, 1]")
    if not 0 < heads_keep <= 1:
        raise SlimlmError("--prune-heads keeps a fraction of attention heads: give a value in (0, 1]")
    # checked before any layer or head is measured, so a no-op or impossible width fails at once
    new_width = _mlp_width(int(teacher.config.intermediate_size), mlp_keep) if mlp_keep < 1 else 0
    teacher.eval()
    scores = layer_importance(teacher, calib_ids)
    drop = sorted(sorted(range(n), key=lambda i: scores[i])[:drop_layers])
    keep = [i for i in range(n) if i not in drop]
    student = copy.deepcopy(teacher)
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in keep])
    for new_idx, layer in enumerate(student.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    cfg = student.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    if drop and isinstance(getattr(cfg, "max_window_layers", None), int):
        # Qwen2: layers at index >= max_window_layers use sliding-window attention. The kept layers keep their
        # type (layer_types above), so the threshold moves to the number of kept layers below it; left as it was,
        # anything that derives the layer types from it (vLLM, converters) would give the shallower model others.
        cfg.max_window_layers = sum(1 for i in keep if i < cfg.max_window_layers)
    info = {"layer_scores": scores, "dropped_layers": drop, "mlp_keep": mlp_keep, "heads_keep": heads_keep}
    if heads_keep < 1:
        info.update(prune_heads(student, calib_ids, heads_keep))
    if mlp_keep < 1:
        channel_scores = mlp_channel_importance(student, calib_ids)
        for layer, s in zip(student.model.layers, channel_scores):
            top = s.topk(new_width).indices.sort().values
            _rows(layer.mlp.gate_proj, top)
            _rows(layer.mlp.up_proj, top)
            _cols(layer.mlp.down_proj, top)
        cfg.intermediate_size = new_width
        info["intermediate_size"] = new_width
    info["parameters"] = sum(p.numel() for p in student.parameters())
    return student, info
