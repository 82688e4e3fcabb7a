"""Derive a smaller student from the teacher, Minitron-style: drop layers and MLP channels that matter least.

Importance is measured on calibration text: a layer's is 1 - cos(h_in, h_out) averaged over tokens (how
much it changes the hidden state; ShortGPT's "block influence"); an MLP channel's is the mean |act(gate) *
up| it feeds into down_proj. The pruned student is then distilled to recover.
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


@torch.no_grad()
def layer_importance(model: torch.nn.Module, calib_ids: torch.Tensor) -> list[float]:
    """Per decoder layer: mean over tokens of 1 - cos(input hidden state, output hidden state)."""
    scores: list[float] = []

    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        scores.append(float((1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).mean()))

    hooks = [layer.register_forward_hook(hook, with_kwargs=True) for layer in _layers(model)]
    try:
        model(input_ids=calib_ids)
    finally:
        for h in hooks:
            h.remove()
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
    try:
        model(input_ids=calib_ids)
    finally:
        for h in hooks:
            h.remove()
    return sums


def prune(teacher: torch.nn.Module, calib_ids: torch.Tensor, *, drop_layers: int = 0,
          mlp_keep: float = 1.0) -> tuple[torch.nn.Module, dict]:
    """A copy of ``teacher`` with ``drop_layers`` fewest-influence layers removed and MLPs narrowed to ``mlp_keep``."""
    layers = _layers(teacher)
    n = len(layers)
    if not 0 <= drop_layers < n:
        raise SlimlmError(f"--prune-layers must be between 0 and {n - 1} for a {n}-layer model")
    if not 0 < mlp_keep <= 1:
        raise SlimlmError("--prune-mlp keeps a fraction of MLP channels: give a value in (0, 1]")
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
    info = {"layer_scores": scores, "dropped_layers": drop, "mlp_keep": mlp_keep}
    if mlp_keep < 1:
        channel_scores = mlp_channel_importance(student, calib_ids)
        width = int(cfg.intermediate_size)
        new_width = max(1, int(round(width * mlp_keep / 32)) * 32) if width >= 64 else max(1, int(width * mlp_keep))
        for layer, s in zip(student.model.layers, channel_scores):
            top = s.topk(new_width).indices.sort().values
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj"):
                lin = getattr(mlp, name)
                lin.weight = torch.nn.Parameter(lin.weight.data[top].clone())
                lin.out_features = new_width
            mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.data[:, top].clone())
            mlp.down_proj.in_features = new_width
        cfg.intermediate_size = new_width
        info["intermediate_size"] = new_width
    info["parameters"] = sum(p.numel() for p in student.parameters())
    return student, info
