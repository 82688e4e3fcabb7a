"""Distillation on tiny random models: KD beats no-teacher, resume is bit-for-bit, DDP matches one process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.distill.losses import kd_loss
from slimlm.distill.recipe import distill
from slimlm.distill.trainer import TrainConfig
from slimlm.errors import SlimlmError
from slimlm.util.process import free_port


@pytest.fixture
def text(tmp_path: Path, wikitext_valid: Path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(wikitext_valid.read_text()[:40000])
    return path


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=12, batch_size=4, lr=2e-3, warmup_steps=2, eval_every=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_losses_are_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    for div in ("forward_kl", "reverse_kl", "jsd"):
        _, parts = kd_loss(logits, labels, teacher_logits=logits, alpha=0.0, divergence=div)
        assert parts["kd"] == pytest.approx(0.0, abs=1e-6)
        _, parts = kd_loss(logits, labels, teacher_logits=torch.randn(2, 5, 11), alpha=0.0, divergence=div)
        assert parts["kd"] > 0.01
    # top-k support with k = V is the full distribution
    lp = torch.log_softmax(torch.randn(2, 5, 11), -1)
    idx = lp.topk(11, -1).indices
    full, _ = kd_loss(logits, labels, teacher_logits=lp, alpha=0.0)
    topk, _ = kd_loss(logits, labels, teacher_topk_idx=idx, teacher_topk_logprobs=lp.gather(-1, idx), alpha=0.0)
    assert float(full) == pytest.approx(float(topk), rel=1e-5)


def test_losses_match_hand_computed_values():
    """Three-token vocabulary, one position: the divergences and the alpha/T^2 mix worked out by hand."""
    p = [0.7, 0.2, 0.1]  # teacher
    q = [0.5, 0.3, 0.2]  # student
    teacher = torch.tensor([p]).log().view(1, 1, 3)
    student = torch.tensor([q]).log().view(1, 1, 3)
    labels = torch.tensor([[1]])
    fkl = sum(a * math.log(a / b) for a, b in zip(p, q))  # 0.7 ln 1.4 + 0.2 ln(2/3) + 0.1 ln 0.5 = 0.085123
    rkl = sum(b * math.log(b / a) for a, b in zip(p, q))  # 0.5 ln(5/7) + 0.3 ln 1.5 + 0.2 ln 2 = 0.092033
    m = [(a + b) / 2 for a, b in zip(p, q)]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    assert fkl == pytest.approx(0.085123, abs=1e-6) and rkl == pytest.approx(0.092033, abs=1e-6)
    for div, want in (("forward_kl", fkl), ("reverse_kl", rkl), ("jsd", jsd)):
        _, parts = kd_loss(student, labels, teacher_logits=teacher, alpha=0.0, divergence=div)
        assert parts["kd"] == pytest.approx(want, rel=1e-5)
    # alpha mixes CE (-log 0.3) with T^2 * KL at temperature 2 (both distributions re-tempered: p^(1/2) / Z)
    pt = [a**0.5 / sum(x**0.5 for x in p) for a in p]
    qt = [b**0.5 / sum(x**0.5 for x in q) for b in q]
    kl_t = sum(a * math.log(a / b) for a, b in zip(pt, qt))
    loss, parts = kd_loss(student, labels, teacher_logits=teacher, alpha=0.25, temperature=2.0)
    assert parts["ce"] == pytest.approx(-math.log(0.3), rel=1e-6)
    assert float(loss) == pytest.approx(0.25 * -math.log(0.3) + 0.75 * 4 * kl_t, rel=1e-5)


def test_topk_cache_compares_k_plus_one_buckets():
    """Top-1 cache of p = (0.7, 0.2, 0.1): buckets (0.7, 0.3) against the student's (0.5, 0.5) - the mass the
    student puts outside the teacher's top-k counts, where renormalising over the top-k alone would give 0."""
    teacher_lp = torch.tensor([0.7, 0.2, 0.1]).log()
    student = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 1, 3).requires_grad_()
    labels = torch.tensor([[0]])
    idx = teacher_lp.topk(1).indices.view(1, 1, 1)
    _, parts = kd_loss(student, labels, teacher_topk_idx=idx, teacher_topk_logprobs=teacher_lp[:1].view(1, 1, 1),
                       alpha=0.0)
    assert parts["kd"] == pytest.approx(0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5), rel=1e-5)
    # the gradient pushes mass onto the teacher's top token, away from the rest
    loss, _ = kd_loss(student, labels, teacher_topk_idx=idx, teacher_topk_logprobs=teacher_lp[:1].view(1, 1, 1),
                      alpha=0.0)
    loss.backward()
    assert student.grad[0, 0, 0] < 0 < student.grad[0, 0, 1]
    # at T = 2 the buckets are tempered as two categories: (sqrt .7, sqrt .3) / Z against (.5, .5), times T^2
    pt = [math.sqrt(0.7) / (math.sqrt(0.7) + math.sqrt(0.3)), math.sqrt(0.3) / (math.sqrt(0.7) + math.sqrt(0.3))]
    loss, parts = kd_loss(student, labels, teacher_topk_idx=idx, teacher_topk_logprobs=teacher_lp[:1].view(1, 1, 1),
                          alpha=0.0, temperature=2.0)
    assert parts["kd"] == pytest.approx(sum(p * math.log(p / 0.5) for p in pt), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(4 * parts["kd"], rel=1e-6)
    # the student matching the teacher's buckets exactly costs nothing, whatever it does inside "the rest"
    same = torch.tensor([0.7, 0.05, 0.25]).log().view(1, 1, 3)
    _, parts = kd_loss(same, labels, teacher_topk_idx=idx, teacher_topk_logprobs=teacher_lp[:1].view(1, 1, 1),
                       alpha=0.0)
    assert parts["kd"] == pytest.approx(0.0, abs=1e-6)


def test_kd_beats_the_same_student_without_teacher(sharp_teacher_dir: Path, text: Path, tmp_path: Path):
    kd = distill(sharp_teacher_dir, text, tmp_path / "kd", prune_layers=1, seq_len=64, top_k=32,
                 config=_cfg(alpha=0.0))
    ce = distill(sharp_teacher_dir, text, tmp_path / "ce", prune_layers=1, seq_len=64, config=_cfg(alpha=1.0))
    assert kd["student_parameters"] < kd["teacher_parameters"]
    assert kd["student"]["dropped_layers"] and len(kd["student"]["layer_scores"]) == 2
    assert kd["teacher_cache"]["bytes_per_token"] == 32 * (2 + 2)
    assert kd["after"]["kld"] < kd["before"]["kld"]
    assert kd["after"]["kld"] < 0.8 * ce["after"]["kld"]
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert report["steps"] == 12 and len(report["history"]) == 12
    assert (tmp_path / "kd" / "student" / "model.safetensors").is_file()


def test_resume_continues_bit_for_bit(tiny_lm_dir: Path, text: Path, tmp_path: Path):
    full = distill(tiny_lm_dir, text, tmp_path / "full", prune_layers=1, seq_len=64, config=_cfg(max_steps=6))
    distill(tiny_lm_dir, text, tmp_path / "part", prune_layers=1, seq_len=64, config=_cfg(max_steps=3, save_every=3))
    resumed = distill(tiny_lm_dir, text, tmp_path / "part", prune_layers=1, seq_len=64,
                      config=_cfg(max_steps=6, save_every=3), resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one(tiny_lm_dir: Path, text: Path, tmp_path: Path):
    """accelerate launch, 2 CPU processes (gloo DDP): same loss curve as one process at the same global batch."""
    single = distill(tiny_lm_dir, text, tmp_path / "one", prune_layers=1, seq_len=64, config=_cfg(max_steps=5))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # accelerate's multi-process launcher (torchrun underneath); with no GPU, Accelerator runs DDP on gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "slimlm", "distill",
           "--teacher", str(tiny_lm_dir), "--data", str(text), "--out", str(tmp_path / "two"), "--prune-layers", "1",
           "--seq-len", "64", "--steps", "5", "--batch-size", "4", "--lr", "2e-3", "--warmup", "2",
           "--eval-every", "0", "--alpha", "0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["world_size"] == 2
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in single["history"]], rel=1e-4)


def test_sequence_method_with_verifier(tiny_lm_dir: Path, text: Path, tmp_path: Path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Question {i}: tell me about the number {i}." for i in range(12)))
    verifier = tmp_path / "myverifier.py"
    verifier.write_text("def keep(prompt, response):\n    return not prompt.startswith('Question 1:')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rep = distill(tiny_lm_dir, text, tmp_path / "seq", method="sequence", student=tiny_lm_dir, prompts=prompts,
                  verifier="myverifier:keep", max_new_tokens=48, seq_len=64, config=_cfg(max_steps=3, batch_size=2))
    rows = [json.loads(x) for x in (tmp_path / "seq" / "teacher_data.jsonl").read_text().splitlines()]
    assert rep["generation"]["rejected"] == 1 and len(rows) == 11
    assert not any(r["prompt"].startswith("Question 1:") for r in rows)
    assert rep["config"]["alpha"] == 1.0 and rep["steps"] == 3


def test_bad_input_is_one_line_exit_2(tiny_lm_dir: Path, text: Path, tmp_path: Path):

    with pytest.raises(SlimlmError, match="give exactly one student"):
        distill(tiny_lm_dir, text, tmp_path / "x", config=_cfg())
    with pytest.raises(SlimlmError, match="--prune-layers must be between 0 and 1"):
        distill(tiny_lm_dir, text, tmp_path / "x", prune_layers=5, config=_cfg())
    result = subprocess.run([sys.executable, "-m", "slimlm", "distill", "--teacher", str(tmp_path / "nope"),
                             "--data", str(text), "--out", str(tmp_path / "o"), "--prune-layers", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
