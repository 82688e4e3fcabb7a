"""On-policy distillation (student samples, live teacher scores): sampling is exact and seeded, training
pulls the student toward the teacher, and --resume stays bit-for-bit."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_byte_tokenizer, make_tiny_llama
from slimlm.distill.onpolicy import (
    _pick,
    is_on_policy_step,
    on_policy_labels,
    sample_continuations,
    step_uniforms,
)
from slimlm.distill.recipe import distill
from slimlm.distill.trainer import TrainConfig


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=8, batch_size=4, lr=2e-3, warmup_steps=1, eval_every=0, seed=0, alpha=0.0,
                on_policy=1.0, on_policy_prompt=16)
    base.update(kw)
    return TrainConfig(**base)


def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = _pick(logits, u, temperature=1.0)
    freq = torch.bincount(tokens, minlength=4).double() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.01, rtol=0)
    assert torch.equal(_pick(logits[:3], u[:3], temperature=0.0), torch.full((3,), 2))


def test_samples_are_seeded_and_independent_of_the_batch_split(tiny_lm_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    prompts = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    u = step_uniforms(seed=3, step=5, batch=4, new_tokens=6)
    assert torch.equal(u, step_uniforms(seed=3, step=5, batch=4, new_tokens=6))
    assert not torch.equal(u, step_uniforms(seed=3, step=6, batch=4, new_tokens=6))
    whole = sample_continuations(model, prompts, u)
    halves = torch.cat([sample_continuations(model, prompts[:2], u[:2]),
                        sample_continuations(model, prompts[2:], u[2:])])
    assert whole.shape == (4, 14) and torch.equal(whole[:, :8], prompts)
    assert torch.equal(whole, halves)
    # The KV-cached loop samples what a full forward would: each sampled token is the inverse CDF of the
    # model's distribution at its position.
    with torch.no_grad():
        logits = model(input_ids=whole).logits
    for t in range(6):
        assert torch.equal(_pick(logits[:, 7 + t], u[:, t], 1.0), whole[:, 8 + t])


def test_labels_score_only_sampled_tokens_up_to_eos():
    ids = torch.tensor([[10, 11, 12, 99, 13, 14], [10, 11, 12, 13, 14, 15]])
    labels = on_policy_labels(ids, prompt_len=2, eos_ids={99})
    assert labels.tolist() == [[-100, 12, 99, -100, -100, -100], [-100, 12, 13, 14, 15, -100]]


def test_step_choice_is_seeded_with_the_requested_share():
    picks = [is_on_policy_step(0, s, 0.3) for s in range(2000)]
    assert picks == [is_on_policy_step(0, s, 0.3) for s in range(2000)]
    assert 0.25 < sum(picks) / 2000 < 0.35
    assert not any(is_on_policy_step(0, s, 0.0) for s in range(50))
    assert all(is_on_policy_step(0, s, 1.0) for s in range(50))


def test_on_policy_training_pulls_the_student_to_the_teacher(sharp_teacher_dir: Path, distill_text: Path, tmp_path: Path):
    student = make_byte_tokenizer(make_tiny_llama(tmp_path / "student", vocab=258, layers=1, seed=1))
    rep = distill(sharp_teacher_dir, distill_text, tmp_path / "op", student=student, seq_len=48, config=_cfg(lr=1e-2))
    assert all(h["on_policy"] for h in rep["history"])
    assert "teacher_cache" not in rep  # every step used the live teacher
    assert rep["on_policy"] == {"fraction": 1.0, "prompt_tokens": 16, "sampled_tokens": 32, "temperature": 1.0}
    # KL(teacher || student) on held-out real text falls (4.25 -> 3.41 with seed 0), and so does the
    # training divergence on the student's own samples.
    assert rep["after"]["kld"] < 0.85 * rep["before"]["kld"]
    assert rep["history"][-1]["kd"] < 0.85 * rep["history"][0]["kd"]


def test_mixed_on_policy_resume_is_bit_for_bit(tiny_lm_dir: Path, distill_text: Path, tmp_path: Path):
    """A run stopped after its step-3 checkpoint and resumed ends with the same weights as one run."""
    cfg = dict(on_policy=0.5, max_steps=6, save_every=3)
    full = distill(tiny_lm_dir, distill_text, tmp_path / "full", prune_layers=1, seq_len=32, config=_cfg(**cfg))
    kinds = [h["on_policy"] for h in full["history"]]
    assert any(kinds[3:]) and not all(kinds)  # seed 0: both kinds of step, and on-policy ones after the resume

    def stop_at_4(step: int, total: int, rec: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(tiny_lm_dir, distill_text, tmp_path / "part", prune_layers=1, seq_len=32, config=_cfg(**cfg),
                progress=stop_at_4)
    resumed = distill(tiny_lm_dir, distill_text, tmp_path / "part", prune_layers=1, seq_len=32, config=_cfg(**cfg),
                      resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
