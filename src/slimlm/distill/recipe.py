"""`slimlm distill`: pick or derive the student, prepare data (teacher cache or teacher-generated text), train,
evaluate against the teacher, save the student and a report.json."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from slimlm.distill.sequences import shifted_labels, split_heldout, text_sequences
from slimlm.distill.trainer import TrainConfig, TrainData, train
from slimlm.errors import SlimlmError
from slimlm.models import load_config, load_model, load_tokenizer, random_model
from slimlm.writers.atomic import Claim, atomic_dir, atomic_path, refuse_inputs

DISTILL_METHODS = ("logits", "sequence")


def load_teacher(path: str | Path):
    loaded = load_model(path, "fp32")
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded.model.eval(), loaded.tokenizer


def _load_student(teacher: torch.nn.Module, *, student: str | Path | None, student_config: str | Path | None,
                  prune_layers: int, prune_mlp: float, calib_ids: torch.Tensor,
                  prune_heads: float = 1.0) -> tuple[torch.nn.Module, dict]:
    pruning = prune_layers or prune_mlp < 1 or prune_heads < 1
    chosen = [x for x in (student, student_config) if x] + (["prune"] if pruning else [])
    if len(chosen) != 1:
        raise SlimlmError("give exactly one student: --student DIR, --student-config FILE, or "
                          "--prune-layers/--prune-heads/--prune-mlp")
    if student:
        if not (Path(student) / "config.json").is_file():
            raise SlimlmError(f"{student} is not a Hugging Face model dir (no config.json)")
        return load_model(student, "fp32", tokenizer=False).model, {"source": str(student)}
    if student_config:
        if not Path(student_config).is_file():
            raise SlimlmError(f"{student_config} does not exist")
        cfg = load_config(Path(student_config).parent if Path(student_config).name == "config.json"
                          else student_config)
        return random_model(cfg, torch.float32), {"source": f"random init from {student_config}"}
    from slimlm.distill.prune import prune

    model, info = prune(teacher, calib_ids, drop_layers=prune_layers, mlp_keep=prune_mlp, heads_keep=prune_heads)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"source": "pruned teacher", **info}


@torch.no_grad()
def heldout_metrics(student: torch.nn.Module, teacher: torch.nn.Module | None, eval_ids: torch.Tensor,
                    eval_labels: torch.Tensor, batch_size: int = 4, tokenizer=None) -> dict[str, float]:
    """Held-out perplexity of the student and, with a same-vocabulary teacher, KL(teacher ‖ student) per token;
    with ``tokenizer`` also bits per byte, which (unlike per-token perplexity) compares different tokenizers."""
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
    if tokenizer is not None:
        n_bytes = sum(len(tokenizer.decode(row[1:].tolist()).encode("utf-8")) for row in eval_ids)
        out["bits_per_byte"] = nll_sum / math.log(2) / max(n_bytes, 1)
    if teacher is not None:
        out["kld"] = kld_sum / count
    return out


# What a run writes under OUT; --overwrite removes these (and only these) before starting again.
OUTPUTS = ("student", "checkpoints", "report.json", "teacher_topk.safetensors", "teacher_data.jsonl")


def _prepare_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty OUT unless --overwrite (start over) or --resume (continue its checkpoints). Under
    `accelerate launch` every process checks before any writes (so they agree); only the main one clears OUT."""
    from accelerate import PartialState

    if out.exists() and not out.is_dir():
        raise SlimlmError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise SlimlmError(f"{out} already exists and is not empty; pass --overwrite to start over "
                          "or --resume to continue from its last checkpoint")
    state = PartialState(cpu=not torch.cuda.is_available())
    state.wait_for_everyone()
    if overwrite and not resume and state.is_main_process:
        import shutil

        for name in OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    state.wait_for_everyone()


def _student_tokenizer(student: str | Path | None, teacher_tokenizer):
    """The student's own tokenizer when its dir has one, else the teacher's (a pruned or config-built student)."""
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not student or not any((Path(student) / f).is_file() for f in files):
        return teacher_tokenizer
    return load_tokenizer(student)


def _eos_ids(tokenizer) -> set[int]:
    return {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()


@dataclass
class _Run:
    """What the steps of one distill run share: models, tokenizers, token ids, OUT and the growing report."""

    out: Path
    config: TrainConfig
    seq_len: int
    teacher: torch.nn.Module
    tokenizer: Any  # the teacher's
    student: torch.nn.Module
    student_tok: Any
    same_vocab: bool
    train_ids: torch.Tensor
    eval_ids: torch.Tensor
    report: dict[str, Any]


def _checked_config(method: str, config: TrainConfig, seq_len: int) -> TrainConfig:
    """Refuse option combinations the method cannot honour, before anything is loaded or written."""
    if method not in DISTILL_METHODS:
        raise SlimlmError(f"unknown --method {method!r}; choose one of {', '.join(DISTILL_METHODS)}")
    if method == "sequence":
        if config.on_policy > 0:
            raise SlimlmError("--on-policy applies to --method logits (the teacher scores the student's samples)")
        config.alpha = 1.0  # the teacher's knowledge is in the text; the loss is plain CE on its responses
    config.check(1)
    if config.on_policy > 0:
        config.prompt_len(seq_len)
    return config


def _open_run(teacher: str | Path, text: str | Path, out: Path, config: TrainConfig, *, method: str, seq_len: int,
              eval_sequences: int, student: str | Path | None, student_config: str | Path | None,
              prune_layers: int, prune_mlp: float, prune_heads: float) -> _Run:
    """Load the teacher, cut ``text`` into train and held-out sequences, and get the student and its tokenizer."""
    torch.manual_seed(config.seed)
    teacher_model, tokenizer = load_teacher(teacher)
    train_ids, eval_ids = split_heldout(text_sequences(tokenizer, text, seq_len), eval_sequences)
    student_model, student_info = _load_student(teacher_model, student=student, student_config=student_config,
                                                prune_layers=prune_layers, prune_mlp=prune_mlp, prune_heads=prune_heads,
                                                calib_ids=train_ids[: min(4, train_ids.shape[0])])
    student_tok = _student_tokenizer(student, tokenizer)
    same_vocab = (int(student_model.config.vocab_size) == int(teacher_model.config.vocab_size)
                  and (student_tok is tokenizer or student_tok.get_vocab() == tokenizer.get_vocab()))
    report: dict[str, Any] = {"teacher": str(teacher), "method": method, "student": student_info,
                              "student_parameters": sum(p.numel() for p in student_model.parameters()),
                              "teacher_parameters": sum(p.numel() for p in teacher_model.parameters()),
                              "config": asdict(config), "seq_len": seq_len, "same_tokenizer": same_vocab}
    return _Run(out, config, seq_len, teacher_model, tokenizer, student_model, student_tok, same_vocab,
                train_ids, eval_ids, report)


def _logits_data(run: _Run, *, teacher_cache: str | Path | None, top_k: int) -> TrainData:
    """--method logits: the training ids with the teacher's top-k log-probs (cached once, by the main process)."""
    if not run.same_vocab:
        raise SlimlmError("--method logits needs the same tokenizer and vocabulary in teacher and student; "
                          "use --method sequence across tokenizers")
    config, train_ids = run.config, run.train_ids
    cache_path = Path(teacher_cache) if teacher_cache else run.out / "teacher_topk.safetensors"
    from slimlm.distill.teacher_cache import cache_teacher, load_teacher_cache

    if config.on_policy > 0:
        run.report["on_policy"] = {"fraction": config.on_policy, "prompt_tokens": config.prompt_len(run.seq_len),
                                   "sampled_tokens": run.seq_len - config.prompt_len(run.seq_len),
                                   "temperature": config.on_policy_temperature}
    if not (config.alpha < 1.0 and config.on_policy < 1.0):
        return TrainData(train_ids, shifted_labels(train_ids))
    if not cache_path.is_file():
        from accelerate import PartialState

        # cpu=True without CUDA: a bare PartialState() would settle on "not distributed" for good.
        with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
            if not cache_path.is_file():
                cache_teacher(run.teacher, train_ids, cache_path, top_k=top_k)
    ids, idx, lp, meta = load_teacher_cache(cache_path)
    if ids.shape != train_ids.shape or not torch.equal(ids, train_ids):
        raise SlimlmError(f"{cache_path} was made from other text or another sequence length")
    # the same whether this run made the cache or found it (a resumed run reports as an uninterrupted one)
    run.report["teacher_cache"] = {"path": str(cache_path), "sequences": int(ids.shape[0]),
                                   "seq_len": int(ids.shape[1]), "top_k": int(meta["top_k"]),
                                   "bytes_per_token": idx.shape[-1] * (2 if int(meta["vocab_size"]) <= 65536 else 4)
                                   + idx.shape[-1] * 2, "file_bytes": cache_path.stat().st_size}
    return TrainData(train_ids, shifted_labels(train_ids), idx, lp)


def _sequence_data(run: _Run, *, prompts: str | Path | None, verifier: str | None, eval_text: str | Path,
                   eval_sequences: int, responses: str | Path | None = None,
                   **generation: Any) -> tuple[TrainData, tuple[torch.Tensor, torch.Tensor]]:
    """--method sequence: the teacher answers the prompts (once, into OUT/teacher_data.jsonl) and the student
    trains on that text, or on given prompt/response ``responses`` (e.g. reference answers, the baseline a
    teacher's traces must beat); returns the data and the held-out ids/labels in the student's tokens."""
    from slimlm.distill.teacher_text import generate_responses, load_verifier, read_prompts, sft_sequences

    student_tok, seq_len = run.student_tok, run.seq_len
    if not prompts and not responses:
        raise SlimlmError("--method sequence needs --prompts FILE (the teacher answers them)")
    if int(run.student.config.vocab_size) < len(student_tok):
        raise SlimlmError(f"the student has {run.student.config.vocab_size} embeddings but its tokenizer "
                          f"{len(student_tok)} tokens; give --student a dir with its own tokenizer")
    gen_path = Path(responses) if responses else run.out / "teacher_data.jsonl"
    if responses and not gen_path.is_file():
        raise SlimlmError(f"{responses} does not exist")
    if not gen_path.is_file():
        run.report["generation"] = generate_responses(
            run.teacher, run.tokenizer, read_prompts(Path(prompts)), gen_path, seed=run.config.seed,
            verifier=load_verifier(verifier, Path(prompts)), **generation)
    seq_ids, prompt_mask, run.report["sft_data"] = sft_sequences(student_tok, gen_path, seq_len)
    eval_ids = run.eval_ids
    if not run.same_vocab:
        # The student reads the held-out text through its own tokenizer.
        _, eval_ids = split_heldout(text_sequences(student_tok, eval_text, seq_len), eval_sequences)
    return TrainData(seq_ids, shifted_labels(seq_ids, prompt_mask)), (eval_ids, shifted_labels(eval_ids))


def _save_student(model: torch.nn.Module, tokenizer, out: Path) -> Path:
    """OUT/student, written beside it first and swapped in, so a crash never leaves half a model there."""
    with atomic_dir(out / "student") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out / "student"


def _train_and_report(run: _Run, data_t: TrainData, student_eval: tuple[torch.Tensor, torch.Tensor], *,
                      teacher_arg: torch.nn.Module | None, resume: bool,
                      progress: Callable[[int, int, dict[str, float]], None] | None) -> dict[str, Any]:
    """Train, compare student and teacher on the held-out text, save the student and OUT/report.json."""
    out, report, eval_ids = run.out, run.report, run.eval_ids
    kld_teacher = run.teacher if run.same_vocab else None
    bpb_tok = None if run.same_vocab else run.student_tok

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return heldout_metrics(model, kld_teacher, *student_eval, tokenizer=bpb_tok)

    before = evaluate(run.student)
    result = train(run.student, data_t, run.config, out, teacher=teacher_arg, evaluate=evaluate, resume=resume,
                   progress=progress, eos_ids=_eos_ids(run.student_tok), tokenizer=run.student_tok)
    if not result["is_main"]:
        return {}
    final = result["model"]
    after = evaluate(final)
    teacher_eval = heldout_metrics(run.teacher, None, eval_ids, shifted_labels(eval_ids),
                                   tokenizer=None if run.same_vocab else run.tokenizer)
    final_dir = _save_student(final, run.student_tok, out)
    state = result["state"]
    report.update({"world_size": result["world_size"], "steps": state.step, "history": state.history,
                   "evals": state.evals, "before": before, "after": after, "teacher_heldout": teacher_eval,
                   "student_dir": str(final_dir), "train_seconds": result["seconds"],
                   "tokens_per_s": state.history[-1]["tokens_per_s"] if state.history else None})
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=float))
    return report


def distill(teacher: str | Path, data: str | Path, out: str | Path, *, method: str = "logits",
            student: str | Path | None = None, student_config: str | Path | None = None, prune_layers: int = 0,
            prune_mlp: float = 1.0, prune_heads: float = 1.0, seq_len: int = 256, eval_sequences: int = 8,
            top_k: int = 16, teacher_cache: str | Path | None = None, prompts: str | Path | None = None,
            eval_data: str | Path | None = None, verifier: str | None = None, max_new_tokens: int = 128,
            temperature: float = 0.7, top_p: float = 0.95, samples_per_prompt: int = 1,
            responses: str | Path | None = None, config: TrainConfig | None = None, resume: bool = False,
            overwrite: bool = False,
            progress: Callable[[int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Distill ``teacher`` into a student; returns the report (also written to OUT/report.json).

    ``logits``: the student (same tokenizer) matches the teacher's next-token distributions on ``data``,
    from a top-k cache and, with ``config.on_policy``, on its own samples scored by the live teacher.
    ``sequence``: the teacher answers ``prompts`` and the student is fine-tuned on that text, so the two may
    have different tokenizers (held-out quality is then compared in bits per byte); ``responses``, a JSONL of
    prompt/response pairs, replaces the teacher's answers.
    """
    out = Path(out)
    config = _checked_config(method, config or TrainConfig(), seq_len)
    refuse_inputs(out, [teacher, student, data, eval_data, prompts, responses], whole=False)
    with _claim(out):
        return _distill(teacher, data, out, method=method, student=student, student_config=student_config,
                        prune_layers=prune_layers, prune_mlp=prune_mlp, prune_heads=prune_heads, seq_len=seq_len,
                        eval_sequences=eval_sequences, top_k=top_k, teacher_cache=teacher_cache, prompts=prompts,
                        eval_data=eval_data, verifier=verifier, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, samples_per_prompt=samples_per_prompt,
                        responses=responses, config=config, resume=resume, overwrite=overwrite, progress=progress)


def _claim(out: Path) -> contextlib.AbstractContextManager:
    """OUT is this run's while it runs (the main process holds it; under `accelerate launch` the others share
    it): a second run to the same OUT refuses at once instead of both writing its checkpoints."""
    from accelerate import PartialState

    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        return contextlib.nullcontext()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Claim(out)


def _distill(teacher: str | Path, data: str | Path, out: Path, *, method: str, student, student_config,
             prune_layers: int, prune_mlp: float, prune_heads: float, seq_len: int, eval_sequences: int, top_k: int,
             teacher_cache, prompts, eval_data, verifier, max_new_tokens: int, temperature: float, top_p: float,
             samples_per_prompt: int, responses, config: TrainConfig, resume: bool, overwrite: bool,
             progress) -> dict[str, Any]:
    _prepare_out(out, overwrite=overwrite, resume=resume)
    text = (eval_data or data) if method == "sequence" else data
    run = _open_run(teacher, text, out, config, method=method, seq_len=seq_len, eval_sequences=eval_sequences,
                    student=student, student_config=student_config, prune_layers=prune_layers,
                    prune_mlp=prune_mlp, prune_heads=prune_heads)
    out.mkdir(parents=True, exist_ok=True)
    if method == "logits":
        data_t = _logits_data(run, teacher_cache=teacher_cache, top_k=top_k)
        # on-policy steps need the teacher's full logits on the student's samples
        teacher_arg = run.teacher if config.on_policy > 0 else None
        student_eval = (run.eval_ids, shifted_labels(run.eval_ids))
    else:
        data_t, student_eval = _sequence_data(run, prompts=prompts, verifier=verifier, eval_text=eval_data or data,
                                              eval_sequences=eval_sequences, max_new_tokens=max_new_tokens,
                                              temperature=temperature, top_p=top_p,
                                              samples_per_prompt=samples_per_prompt, responses=responses)
        teacher_arg = None
    return _train_and_report(run, data_t, student_eval, teacher_arg=teacher_arg, resume=resume, progress=progress)
