"""Pruning and distilling a Qwen2 teacher (q/k/v biases, GQA 14:2) and a Qwen3 one (per-head q/k norms).

Every pruning step is checked against the exact property it must have: the pruned student computes what the
teacher computes with the removed parts' contributions zeroed, and transformers saves and reloads it unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_gguf_tiny import make_tiny_model, make_tokenizer
from transformers import AutoModelForCausalLM, Qwen2Config

from slimlm.distill.prune import prune
from slimlm.errors import SlimlmError

HIDDEN, HEADS, KV, HEAD_DIM, FFN = 224, 14, 2, 16, 128


def _with_biases(path: Path, seed: int = 0) -> Path:
    """Give q/k/v their non-zero biases (random init leaves them 0, which would hide a mis-sliced bias)."""
    model = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.copy_(torch.empty(p.shape).normal_(0.0, 0.3, generator=g))
    model.save_pretrained(path)
    return path


def _qwen2(path: Path, *, kv_heads: int = KV, layers: int = 2) -> Path:
    make_tiny_model(path, "qwen2", hidden=HIDDEN, ffn=FFN, layers=layers, heads=HEADS, kv_heads=kv_heads)
    return _with_biases(path)


def _qwen3(path: Path) -> Path:
    """A tiny Qwen3 (q_norm/k_norm over head_dim, attention biases on) with the trained test tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = make_tokenizer(path)
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
                      num_key_value_heads=KV, head_dim=HEAD_DIM, vocab_size=len(tok), attention_bias=True,
                      max_position_embeddings=1024, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return _with_biases(path)


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reloads_identically(student: torch.nn.Module, ids: torch.Tensor, path: Path) -> None:
    student.save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(_logits(reloaded, ids), _logits(student, ids))


def _zero_heads(model: torch.nn.Module, kept: list[list[int]], n_heads: int) -> None:
    """The teacher with the dropped heads' o_proj input columns zeroed: what head pruning must compute."""
    with torch.no_grad():
        for layer, keep in zip(model.model.layers, kept):
            for h in set(range(n_heads)) - set(keep):
                layer.self_attn.o_proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_gqa_14_2_head_pruning_keeps_4_of_7_per_group_with_biases(tmp_path: Path, arch: str):
    src = (_qwen2 if arch == "qwen2" else _qwen3)(tmp_path / "t")
    teacher = AutoModelForCausalLM.from_pretrained(src)
    ids = _ids(teacher.config.vocab_size)
    student, info = prune(teacher, ids, heads_keep=0.5)
    cfg = student.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 2, HEAD_DIM)
    for t_layer, s_layer, kept in zip(teacher.model.layers, student.model.layers, info["kept_heads"]):
        assert len(kept) == 8 and [sum(h // 7 == g for h in kept) for g in (0, 1)] == [4, 4]
        t, s = t_layer.self_attn, s_layer.self_attn
        rows = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in kept])
        assert torch.equal(s.q_proj.bias, t.q_proj.bias[rows]) and s.q_proj.weight.shape == (128, HIDDEN)
        for name in ("k_proj", "v_proj"):  # GQA keeps both KV heads, so K/V and their biases are untouched
            assert torch.equal(getattr(s, name).bias, getattr(t, name).bias)
        assert s.o_proj.weight.shape == (HIDDEN, 128)
        if arch == "qwen3":  # per-head norms over head_dim: shared by all heads, nothing to slice
            assert torch.equal(s.q_norm.weight, t.q_norm.weight) and s.q_norm.weight.shape == (HEAD_DIM,)
    reference = AutoModelForCausalLM.from_pretrained(src)
    _zero_heads(reference, info["kept_heads"], HEADS)
    torch.testing.assert_close(_logits(student, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)
    _reloads_identically(student, ids, tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (8, 2, HEAD_DIM)


def test_mha_head_pruning_slices_k_v_biases_with_their_heads(tmp_path: Path):
    """Without grouping (14:14) a dropped query head takes its K and V rows, and their biases, with it."""
    src = _qwen2(tmp_path / "t", kv_heads=HEADS)
    teacher = AutoModelForCausalLM.from_pretrained(src)
    ids = _ids(teacher.config.vocab_size, seed=1)
    student, info = prune(teacher, ids, heads_keep=0.5)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (7, 7)
    for t_layer, s_layer, kept in zip(teacher.model.layers, student.model.layers, info["kept_heads"]):
        rows = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in kept])
        for name in ("q_proj", "k_proj", "v_proj"):
            t, s = getattr(t_layer.self_attn, name), getattr(s_layer.self_attn, name)
            assert torch.equal(s.bias, t.bias[rows]) and torch.equal(s.weight, t.weight[rows])
    reference = AutoModelForCausalLM.from_pretrained(src)
    _zero_heads(reference, info["kept_heads"], HEADS)
    torch.testing.assert_close(_logits(student, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)
    _reloads_identically(student, ids, tmp_path / "s")


def test_mlp_width_pruning_equals_zeroing_the_dropped_channels(tmp_path: Path):
    src = _qwen2(tmp_path / "t")
    teacher = AutoModelForCausalLM.from_pretrained(src)
    ids = _ids(teacher.config.vocab_size, seed=2)
    student, info = prune(teacher, ids, mlp_keep=0.5)
    assert student.config.intermediate_size == info["intermediate_size"] == 64
    reference = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for s_layer, r_layer in zip(student.model.layers, reference.model.layers):
            mlp, ref = s_layer.mlp, r_layer.mlp
            assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (64, HIDDEN)
            assert mlp.down_proj.weight.shape == (HIDDEN, 64)
            # which channels survived: the kept gate rows, found in the teacher's
            kept = [int((ref.gate_proj.weight == row).all(-1).nonzero()) for row in mlp.gate_proj.weight]
            dropped = sorted(set(range(FFN)) - set(kept))
            ref.down_proj.weight[:, dropped] = 0
    torch.testing.assert_close(_logits(student, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)
    _reloads_identically(student, ids, tmp_path / "s")


def test_layer_pruning_equals_the_teacher_without_those_layers(tmp_path: Path):
    """Sliding-window Qwen2 (layers 2, 3 slide): the kept layers keep their attention type, in layer_types and in
    max_window_layers, from which vLLM and converters derive them."""
    src = make_tiny_model(tmp_path / "t", "qwen2", hidden=HIDDEN, ffn=FFN, layers=4, heads=HEADS, kv_heads=KV,
                          config_extra={"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2})
    teacher = AutoModelForCausalLM.from_pretrained(_with_biases(src))
    with torch.no_grad():  # layers 0 (full) and 2 (sliding) barely change the residual stream: they go
        for i in (0, 2):
            teacher.model.layers[i].self_attn.o_proj.weight.mul_(0.01)
            teacher.model.layers[i].mlp.down_proj.weight.mul_(0.01)
    teacher.save_pretrained(src)
    ids = _ids(teacher.config.vocab_size, seed=3)
    student, info = prune(teacher, ids, drop_layers=2)
    assert info["dropped_layers"] == [0, 2] and student.config.num_hidden_layers == 2
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert student.config.max_window_layers == 1
    reference = AutoModelForCausalLM.from_pretrained(src)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in (1, 3)])
    for new_idx, layer in enumerate(reference.model.layers):  # the KV cache is indexed by position in the stack
        layer.self_attn.layer_idx = new_idx
    reference.config.num_hidden_layers, reference.config.layer_types = 2, ["full_attention", "sliding_attention"]
    torch.testing.assert_close(_logits(student, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)
    _reloads_identically(student, ids, tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    del saved["layer_types"]  # what a reader that only knows max_window_layers sees
    assert Qwen2Config(**saved).layer_types == student.config.layer_types
    # depth, heads and width together still give a model transformers saves and reloads
    small, info = prune(teacher, ids, drop_layers=2, heads_keep=0.5, mlp_keep=0.5)
    assert len(info["kept_heads"]) == 2 and small.config.num_attention_heads == 8
    assert small.config.intermediate_size == 64
    _reloads_identically(small, ids, tmp_path / "small")


def test_mlp_width_that_removes_nothing_is_refused(tmp_path: Path):
    teacher = AutoModelForCausalLM.from_pretrained(_qwen2(tmp_path / "t"))
    with pytest.raises(SlimlmError, match="removes no channel of 128"):  # rounds to 128, once crashed in topk
        prune(teacher, _ids(teacher.config.vocab_size), mlp_keep=0.99)


def test_distill_cli_with_a_pruned_qwen2_student(tmp_path: Path, distill_text: Path):
    src = _qwen2(tmp_path / "t")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "slimlm", "distill", "--teacher", str(src), "--data", str(distill_text),
           "--out", str(out), "--prune-heads", "0.5", "--prune-mlp", "0.5", "--seq-len", "32", "--steps", "2",
           "--batch-size", "2", "--warmup", "1", "--eval-every", "0", "--lr", "1e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["student"]["num_attention_heads"] == 8
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_attention_heads == 8 and student.config.num_key_value_heads == 2
    assert student.model.layers[0].self_attn.q_proj.bias.shape == (128,)
    assert student.config.intermediate_size == 64
    _logits(student, _ids(student.config.vocab_size))


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--prune-heads", "0", "--prune-heads keeps a fraction"),
    ("--prune-heads", "0.95", "removes no head of 14"),
    ("--prune-mlp", "0", "--prune-mlp keeps a fraction"),
    ("--prune-mlp", "0.99", "removes no channel of 128"),
])
def test_bad_pruning_input_is_one_line_exit_2(tmp_path: Path, distill_text: Path, flag: str, value: str,
                                              message: str):
    src = _qwen2(tmp_path / "t")
    proc = subprocess.run([sys.executable, "-m", "slimlm", "distill", "--teacher", str(src), "--data",
                           str(distill_text), "--out", str(tmp_path / "o"), flag, value, "--seq-len", "32"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr

