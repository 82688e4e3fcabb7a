"""distill across tokenizers, bad input (one line, exit 2), and crash safety of its checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_llama
from slimlm.distill import trainer
from slimlm.distill.recipe import distill
from slimlm.distill.trainer import TrainConfig
from slimlm.errors import SlimlmError


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, lr=2e-3, warmup_steps=2, eval_every=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _bpe_tokenizer(path: Path, text: str, vocab_size: int = 400) -> Path:
    """A byte-level BPE trained on ``text``: a different vocabulary (and segmentation) from the byte tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimlm", "distill", *args], capture_output=True, text=True,
                          timeout=300)


def test_sequence_method_across_different_tokenizers(sharp_teacher_dir: Path, distill_text: Path, tmp_path: Path):
    # Teacher: the tiny LM with a byte tokenizer (258 ids), sharpened so its samples are learnable.
    tiny_lm_dir = sharp_teacher_dir
    # Student: its own BPE tokenizer (400 ids, merges) and a model of that vocabulary.
    student = tmp_path / "student"
    tok = AutoTokenizer.from_pretrained(_bpe_tokenizer(student, distill_text.read_text()))
    make_tiny_llama(student, vocab=len(tok), layers=1, seed=1)
    assert len(tok) == 400 and tok.get_vocab() != AutoTokenizer.from_pretrained(tiny_lm_dir).get_vocab()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"The history of the town number {i} is" for i in range(16)))
    with pytest.raises(SlimlmError, match="use --method sequence across tokenizers"):
        distill(tiny_lm_dir, distill_text, tmp_path / "logits", student=student, config=_cfg())
    rep = distill(tiny_lm_dir, distill_text, tmp_path / "seq", method="sequence", student=student, prompts=prompts,
                  max_new_tokens=40, seq_len=32, config=_cfg(max_steps=8, lr=5e-3))
    assert rep["same_tokenizer"] is False and rep["generation"]["kept"] == 16
    # Held-out quality is compared in bits per byte (KLD needs one vocabulary, so there is none).
    assert {"bits_per_byte", "ppl"} <= set(rep["after"]) and "kld" not in rep["after"]
    assert "bits_per_byte" in rep["teacher_heldout"]
    # The student learned the teacher's text through its own tokenizer.
    assert rep["history"][-1]["ce"] < 0.8 * rep["history"][0]["ce"]
    saved = AutoTokenizer.from_pretrained(tmp_path / "seq" / "student")
    assert saved.get_vocab() == tok.get_vocab()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "seq" / "student")
    assert model.config.vocab_size == 400
    rows = [json.loads(x) for x in (tmp_path / "seq" / "teacher_data.jsonl").read_text().splitlines()]
    ids = saved(rows[0]["response"], add_special_tokens=False).input_ids
    assert saved.decode(ids) == rows[0]["response"] and max(ids) < 400


def test_empty_data_is_one_line_exit_2(tiny_lm_dir: Path, tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = _run_cli("--teacher", str(tiny_lm_dir), "--data", str(empty), "--out", str(tmp_path / "o"),
                      "--prune-layers", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[0]]
    assert "empty" in result.stderr and "no training text" in result.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_dir_needs_overwrite(tiny_lm_dir: Path, distill_text: Path, tmp_path: Path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _run_cli("--teacher", str(tiny_lm_dir), "--data", str(distill_text), "--out", str(out),
                      "--prune-layers", "1", "--seq-len", "32", "--steps", "2", "--batch-size", "2")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--overwrite" in result.stderr and "already exists" in result.stderr
    # --overwrite starts over: our old outputs (a stale checkpoint here) go, other files stay.
    stale = out / "checkpoints" / "step-99"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    rep = distill(tiny_lm_dir, distill_text, out, prune_layers=1, seq_len=32, config=_cfg(max_steps=2, batch_size=2),
                  overwrite=True)
    assert rep["steps"] == 2 and not stale.exists() and (out / "notes.txt").read_text() == "mine"


def test_crash_mid_run_leaves_a_usable_checkpoint_and_resume_matches(tiny_lm_dir: Path, distill_text: Path,
                                                                     tmp_path: Path, monkeypatch):
    cfg = dict(max_steps=6, save_every=2, alpha=0.5)
    full = distill(tiny_lm_dir, distill_text, tmp_path / "full", prune_layers=1, seq_len=32, config=_cfg(**cfg))

    # Crash while writing the step-4 checkpoint: the weights are written, the optimizer state is not.
    real_save_file = trainer.save_file
    calls = {"n": 0}

    def crashing_save_file(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash (power cut) mid-checkpoint")
        return real_save_file(tensors, path, *a, **kw)

    monkeypatch.setattr(trainer, "save_file", crashing_save_file)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(tiny_lm_dir, distill_text, out, prune_layers=1, seq_len=32, config=_cfg(**cfg))
    monkeypatch.setattr(trainer, "save_file", real_save_file)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2"]  # the failed save left nothing
    assert trainer.latest_checkpoint(out) == ckpts / "step-2"
    assert not (out / "report.json").exists() and not (out / "student").exists()
    # The last complete checkpoint is a model dir transformers (and slimlm eval) can load, tokenizer included.
    model = AutoModelForCausalLM.from_pretrained(ckpts / "step-2")
    tok = AutoTokenizer.from_pretrained(ckpts / "step-2")
    ids = tok("The tower is", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
    # Re-running without --resume or --overwrite is refused; --resume finishes as if nothing happened.
    with pytest.raises(SlimlmError, match="--resume"):
        distill(tiny_lm_dir, distill_text, out, prune_layers=1, seq_len=32, config=_cfg(**cfg))
    resumed = distill(tiny_lm_dir, distill_text, out, prune_layers=1, seq_len=32, config=_cfg(**cfg), resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    b = load_file(str(out / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4", "step-6"]


def test_cli_prune_heads(tiny_lm_dir: Path, distill_text: Path, tmp_path: Path):
    result = _run_cli("--teacher", str(tiny_lm_dir), "--data", str(distill_text), "--out", str(tmp_path / "o"),
                      "--prune-heads", "0.5", "--prune-mlp", "0.5", "--seq-len", "32", "--steps", "2",
                      "--batch-size", "2", "--eval-every", "0", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["student"]["num_attention_heads"] == 2 and report["student"]["num_key_value_heads"] == 2
    cfg = json.loads((tmp_path / "o" / "student" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 16)
    assert cfg["intermediate_size"] == 64
