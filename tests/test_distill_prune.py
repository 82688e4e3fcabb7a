"""Width pruning of attention heads: the least important heads go, the config reloads, GQA stays valid."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama
from slimlm.distill.prune import head_importance, heads_to_keep, prune
from slimlm.errors import SlimlmError


def _weaken_heads(model: torch.nn.Module, heads: list[int], head_dim: int, factor: float = 0.01) -> None:
    """Scale what ``heads`` write into the residual stream (their o_proj columns) by ``factor``."""
    with torch.no_grad():
        for layer in model.model.layers:
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] *= factor


def _zero_heads_reference(model: torch.nn.Module, kept: list[list[int]], n_heads: int, head_dim: int) -> None:
    """The same network with the dropped heads' contributions zeroed: what head pruning must compute."""
    with torch.no_grad():
        for layer, keep in zip(model.model.layers, kept):
            for h in range(n_heads):
                if h not in keep:
                    layer.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (2 groups of 2) and plain multi-head attention
def test_pruned_heads_are_the_weakest_and_the_model_reloads(tmp_path: Path, kv_heads: int):
    make_tiny_llama(tmp_path / "t", heads=4, kv_heads=kv_heads, layers=2)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    _weaken_heads(teacher, [0, 3], head_dim=16)  # one weak head in each KV group
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    student, info = prune(teacher, ids, heads_keep=0.5)
    assert info["kept_heads"] == [[1, 2], [1, 2]]
    assert all(min(s[1], s[2]) > 10 * max(s[0], s[3]) for s in info["head_scores"])
    cfg = student.config
    assert cfg.num_attention_heads == 2 and cfg.head_dim == 16
    assert cfg.num_key_value_heads == 2  # GQA keeps both KV heads; MHA drops 2 of 4 with their queries
    assert student.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    # Pruning equals zeroing the dropped heads' output in the teacher, exactly up to float rounding.
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    _weaken_heads(reference, [0, 3], head_dim=16)
    _zero_heads_reference(reference, info["kept_heads"], 4, 16)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # transformers reloads the saved student from its config alone, with the same forward.
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, got)


def test_gqa_keeps_query_heads_evenly_per_group():
    # 9 query heads over 3 KV heads (SmolLM2's shape): keep 2/3 -> the best 2 of each group of 3.
    scores = torch.tensor([5.0, 1.0, 9.0, 0.5, 0.7, 0.1, 3.0, 8.0, 7.0])
    kept, kv = heads_to_keep(scores, 9, 3, 2 / 3)
    assert kept == [0, 2, 3, 4, 7, 8] and kv == 3
    kept, kv = heads_to_keep(scores, 9, 3, 0.2)  # at least one per group
    assert kept == [2, 4, 7] and kv == 3
    kept, kv = heads_to_keep(scores, 9, 9, 0.5)  # no grouping: the top heads overall, with their K/V
    assert kept == [0, 2, 7, 8] and kv == 4  # round(4.5) = 4


def test_head_pruning_combines_with_depth_and_mlp_and_rejects_no_op(tmp_path: Path):
    make_tiny_llama(tmp_path / "t", heads=4, kv_heads=2, layers=3, ffn=128)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    student, info = prune(teacher, ids, drop_layers=1, heads_keep=0.5, mlp_keep=0.5)
    assert len(student.model.layers) == 2 and len(info["kept_heads"]) == 2
    assert student.config.intermediate_size == 64 and student.config.num_attention_heads == 2
    assert len(head_importance(teacher, ids)) == 3  # the teacher itself is untouched
    assert teacher.config.num_attention_heads == 4
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
    with pytest.raises(SlimlmError, match="removes no head"):
        prune(teacher, ids, heads_keep=0.9)
    with pytest.raises(SlimlmError, match="--prune-heads"):
        prune(teacher, ids, heads_keep=0.0)
