"""`slimlm distill`: pick or derive the student, prepare data (teacher cache or teacher-generated text), train,
evaluate against the teacher, save the student and a report.json."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from slimlm.distill.data import shifted_labels, split_heldout, text_sequences
from slimlm.distill.trainer import TrainConfig, TrainData, train
from slimlm.errors import SlimlmError

METHODS = ("logits", "sequence")


def _load_teacher(path: str | Path):
    from slimlm.models import load_model

    loaded = load_model(path, "fp32")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded.model.eval(), loaded.tokenizer


def _load_student(teacher: torch.nn.Module, *, student: str | Path | None, student_config: str | Path | None,
                  prune_layers: int, prune_mlp: float, calib_ids: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    chosen = [x for x in (student, student_config) if x] + (["prune"] if prune_layers or prune_mlp < 1 else [])
    if len(chosen) != 1:
        raise SlimlmError("give exactly one student: --student DIR, --student-config FILE, or --prune-layers/--prune-mlp")
    if student:
        if not (Path(student) / "config.json").is_file():
            raise SlimlmError(f"{student} is not a Hugging Face model dir (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        return model, {"source": str(student)}
    if student_config:
        if not Path(student_config).is_file():
            raise SlimlmError(f"{student_config} does not exist")
        cfg = AutoConfig.from_pretrained(Path(student_config).parent if Path(student_config).name == "config.json"
                                         else student_config)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), {"source": f"random init from {student_config}"}
    from slimlm.distill.prune import prune

    model, info = prune(teacher, calib_ids, drop_layers=prune_layers, mlp_keep=prune_mlp)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"source": "pruned teacher", **info}


@torch.no_grad()
def heldout_metrics(student: torch.nn.Module, teacher: torch.nn.Module | None, eval_ids: torch.Tensor,
                    eval_labels: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Held-out perplexity of the student and, with a same-vocabulary teacher, KL(teacher ‖ student) per token."""
    was_training = student.training
    student.eval()
    nll_sum, kld_sum, count = 0.0, 0.0, 0
    for lo in range(0, eval_ids.shape[0], batch_size):
        ids, labels = eval_ids[lo:lo + batch_size], eval_labels[lo:lo + batch_size]
        mask = labels != -100
        s_lp = torch.log_softmax(student(input_ids=ids).logits.float(), -1)[mask]
        nll_sum += float(-s_lp.gather(-1, labels[mask].unsqueeze(-1)).sum())
        if teacher is not None:
            t_lp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)[mask]
            kld_sum += float((t_lp.exp() * (t_lp - s_lp)).sum())
        count += int(mask.sum())
    student.train(was_training)
    out = {"ppl": math.exp(nll_sum / count), "tokens": count}
    if teacher is not None:
        out["kld"] = kld_sum / count
    return out


def distill(teacher: str | Path, data: str | Path, out: str | Path, *, method: str = "logits",
            student: str | Path | None = None, student_config: str | Path | None = None, prune_layers: int = 0,
            prune_mlp: float = 1.0, seq_len: int = 256, eval_sequences: int = 8, top_k: int = 16,
            teacher_cache: str | Path | None = None, prompts: str | Path | None = None,
            eval_data: str | Path | None = None, verifier: str | None = None, max_new_tokens: int = 128,
            temperature: float = 0.7, top_p: float = 0.95, samples_per_prompt: int = 1,
            config: TrainConfig | None = None, resume: bool = False, overwrite: bool = False,
            progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Distill ``teacher`` into a student; returns the report (also written to OUT/report.json)."""
    if method not in METHODS:
        raise SlimlmError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    out = Path(out)
    if (out / "report.json").exists() and not (overwrite or resume):
        raise SlimlmError(f"{out} already holds a distilled student; pass --overwrite or --resume")
    config = config or TrainConfig()
    if method == "sequence":
        config.alpha = 1.0  # the teacher's knowledge is in the text; the loss is plain CE on its responses
    torch.manual_seed(config.seed)
    teacher_model, tokenizer = _load_teacher(teacher)
    text_ids = text_sequences(tokenizer, eval_data or data, seq_len) if method == "sequence" else \
        text_sequences(tokenizer, data, seq_len)
    train_ids, eval_ids = split_heldout(text_ids, eval_sequences)
    student_model, student_info = _load_student(teacher_model, student=student, student_config=student_config,
                                                prune_layers=prune_layers, prune_mlp=prune_mlp,
                                                calib_ids=train_ids[: min(4, train_ids.shape[0])])
    same_vocab = int(student_model.config.vocab_size) == int(teacher_model.config.vocab_size)
    report: dict[str, Any] = {"teacher": str(teacher), "method": method, "student": student_info,
                              "student_parameters": sum(p.numel() for p in student_model.parameters()),
                              "teacher_parameters": sum(p.numel() for p in teacher_model.parameters()),
                              "config": asdict(config), "seq_len": seq_len}
    eval_labels = shifted_labels(eval_ids)
    out.mkdir(parents=True, exist_ok=True)
    if method == "logits":
        if not same_vocab:
            raise SlimlmError("--method logits needs the same vocabulary in teacher and student; "
                              "use --method sequence across tokenizers")
        cache_path = Path(teacher_cache) if teacher_cache else out / "teacher_topk.safetensors"
        from slimlm.distill.teacher_cache import cache_teacher, load_teacher_cache

        if config.alpha < 1.0:
            if not cache_path.is_file():
                from accelerate import PartialState

                # cpu=True without CUDA: a bare PartialState() would settle on "not distributed" for good.
                with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
                    if not cache_path.is_file():
                        report["teacher_cache"] = cache_teacher(teacher_model, train_ids, cache_path, top_k=top_k)
            ids, idx, lp, meta = load_teacher_cache(cache_path)
            if ids.shape != train_ids.shape or not torch.equal(ids, train_ids):
                raise SlimlmError(f"{cache_path} was made from other text or another sequence length")
            report.setdefault("teacher_cache", {"path": str(cache_path), "top_k": int(meta["top_k"]),
                                                "bytes_per_token": idx.shape[-1] * (2 if int(meta["vocab_size"]) <= 65536 else 4) + idx.shape[-1] * 2})
            data_t = TrainData(train_ids, shifted_labels(train_ids), idx, lp)
        else:
            data_t = TrainData(train_ids, shifted_labels(train_ids))
    else:
        from transformers import AutoTokenizer

        from slimlm.distill.generate import generate_responses, load_verifier, read_prompts, sft_sequences

        if not prompts:
            raise SlimlmError("--method sequence needs --prompts FILE (the teacher answers them)")
        gen_path = out / "teacher_data.jsonl"
        if not gen_path.is_file():
            report["generation"] = generate_responses(
                teacher_model, tokenizer, read_prompts(Path(prompts)), gen_path, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, samples_per_prompt=samples_per_prompt, seed=config.seed,
                verifier=load_verifier(verifier))
        student_tok = AutoTokenizer.from_pretrained(student) if student else tokenizer
        seq_ids, prompt_mask = sft_sequences(student_tok, gen_path, seq_len)
        data_t = TrainData(seq_ids, shifted_labels(seq_ids, prompt_mask))
    kld_teacher = teacher_model if same_vocab else None
    before = heldout_metrics(student_model, kld_teacher, eval_ids, eval_labels)
    result = train(student_model, data_t, config, out, teacher=None,
                   evaluate=lambda m: heldout_metrics(m, kld_teacher, eval_ids, eval_labels),
                   resume=resume, progress=progress)
    if not result["is_main"]:
        return {}
    final = result["model"]
    after = heldout_metrics(final, kld_teacher, eval_ids, eval_labels)
    teacher_eval = heldout_metrics(teacher_model, None, eval_ids, eval_labels)
    tmp = out / ".student.tmp"
    final.save_pretrained(tmp)
    (student_tok if method == "sequence" else tokenizer).save_pretrained(tmp)
    final_dir = out / "student"
    if final_dir.exists():
        import shutil

        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    state = result["state"]
    report.update({"world_size": result["world_size"], "steps": state.step, "history": state.history,
                   "evals": state.evals, "before": before, "after": after, "teacher_heldout": teacher_eval,
                   "student_dir": str(final_dir), "train_seconds": result["seconds"],
                   "tokens_per_s": state.history[-1]["tokens_per_s"] if state.history else None})
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report
