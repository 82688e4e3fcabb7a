"""`slimlm zero`: GRPO from rewards alone on TRL's GRPOTrainer, resumable, with a per-step metrics log.

OUT holds checkpoints/ (TRL's, with optimizer and RNG state), metrics.jsonl (one line per step), model/
(the final model, written beside and renamed in), curves.png and report.json.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from slimlm.errors import SlimlmError, os_reason, write_failure
from slimlm.util.cpu import use_bf16
from slimlm.writers.atomic import Claim, atomic_dir, atomic_path, publish, refuse_inputs, temp_dir
from slimlm.zero.rewards import problem_row, reward_funcs
from slimlm.zero.tasks import Task, get_task
from slimlm.zero.template import Template

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
OUTPUTS = ("checkpoints", "metrics.jsonl", "model", "curves.png", "report.json")


class NoSignalWarning(UserWarning):
    """Every group of a step had equal rewards: zero advantages, nothing learned from that step."""


@dataclass
class ZeroConfig:
    """GRPO settings with small-model defaults: beta 0 (no KL term, as DAPO and Dr. GRPO), a learning rate high
    enough to move a small model in a short run, and sampling temperature 0.7 rather than R1-Zero's 1.0: at 1.0
    SmolLM2-135M-Instruct's sampled arithmetic answers were right 1 time in 112 (greedy: 5 in 32), so nearly
    every group had equal rewards and no signal."""

    steps: int = 100
    batch_size: int = 16  # completions per optimizer step (per process)
    group_size: int = 8  # completions per prompt; must divide batch_size
    lr: float = 1e-5
    beta: float = 0.0
    loss_type: str = "dapo"
    max_completion: int = 256
    temperature: float = 0.7
    lora: bool = False
    lora_rank: int = 16
    save_every: int = 10
    seed: int = 0
    use_vllm: bool = False
    max_minutes: float = 0.0  # stop (and save) after the step that passes this wall time; 0: no limit
    bf16: bool | None = None  # bf16 autocast over fp32 master weights; None: where bf16 is fast (util.cpu)

    def check(self) -> None:
        if self.group_size < 2:
            raise SlimlmError(f"--group-size must be at least 2 (GRPO compares completions of one prompt), "
                              f"got {self.group_size}")
        if self.batch_size % self.group_size:
            raise SlimlmError(f"--group-size {self.group_size} does not divide the batch of {self.batch_size} "
                              "completions per step (TRL's rule: every prompt's group must fit in one batch)")
        if self.loss_type not in LOSS_TYPES:
            raise SlimlmError(f"unknown --loss-type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if self.steps < 1 or self.max_completion < 1 or self.lr <= 0 or self.beta < 0 or self.max_minutes < 0:
            raise SlimlmError("--steps, --max-completion and --lr must be positive, --beta and --max-minutes "
                              "at least 0")

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size


def _require_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SlimlmError("slimlm zero needs TRL: pip install 'slimlm[zero]'") from None


def _lora_config(config: ZeroConfig):
    if not config.lora:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise SlimlmError("--lora needs peft: pip install peft") from None
    return LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (TRL writes trainer_state.json last, so a half-written one lacks it)."""
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def _prepare_out(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse a non-empty OUT unless --resume (continue its last checkpoint) or --overwrite (start over)."""
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise SlimlmError(f"{out} already exists and is not empty; pass --resume to continue from its last "
                          "checkpoint or --overwrite to start over")
    if resume:
        ckpt = last_checkpoint(out / "checkpoints")
        if ckpt is None and (out / "model").is_dir():
            raise SlimlmError(f"{out} holds a finished run and no checkpoint to resume")
        return ckpt
    for name in OUTPUTS if overwrite else ():
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return None


_LOGGED = {"accuracy": "rewards/accuracy/mean", "format": "rewards/format/mean", "reward": "reward",
           "completion_length": "completions/mean_length", "clipped_ratio": "completions/clipped_ratio",
           "kl": "kl", "loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate",
           "zero_signal_groups": "frac_reward_zero_std", "entropy": "entropy", "step_seconds": "step_time"}


def _metrics_callback(path: Path, start_step: int, progress: Callable[[int, int, dict], None] | None,
                      max_minutes: float = 0.0):
    """A TRL callback adding one JSON line per step to ``path`` (rows past ``start_step`` from an interrupted
    run are dropped first; the file is rewritten and renamed in each step, so a kill leaves whole rows) and
    reporting live rewards to ``progress``; warns on steps without signal; ends the run after the step that
    passes ``max_minutes`` of this session's wall time."""
    from transformers import TrainerCallback

    kept = [r for r in read_metrics(path) if r["step"] <= start_step]

    def write(rows: list[dict]) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(kept)

    class MetricsLog(TrainerCallback):
        def __init__(self) -> None:
            self.rows, self.started, self.stopped_early = kept, time.time(), False

        def on_step_end(self, args, state, control, **kwargs):
            if max_minutes and time.time() - self.started > 60 * max_minutes and state.global_step < state.max_steps:
                control.should_training_stop = control.should_save = self.stopped_early = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs or not state.is_world_process_zero:
                return
            row = {"step": state.global_step, **{k: float(logs[v]) for k, v in _LOGGED.items() if v in logs},
                   "time": time.time()}
            self.rows.append(row)
            write(self.rows)
            if row.get("zero_signal_groups", 0.0) >= 1.0:
                warnings.warn(f"step {state.global_step}: every group's rewards were equal (no learning signal); "
                              "an easier --difficulty or a larger --group-size gives signal", NoSignalWarning,
                              stacklevel=2)
            if progress:
                progress(state.global_step, state.max_steps, row)

    return MetricsLog()


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a last line cut short by a kill mid-append is dropped (its step is redone)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


def _grpo_args(out: Path, config: ZeroConfig):
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    return GRPOConfig(
        output_dir=str(out / "checkpoints"), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        num_generations=config.group_size, learning_rate=config.lr, beta=config.beta, loss_type=config.loss_type,
        max_completion_length=config.max_completion, temperature=config.temperature, top_p=1.0, top_k=0,
        lr_scheduler_type="constant_with_warmup", warmup_steps=min(5, config.steps // 10),
        logging_steps=1, save_steps=config.save_every, save_total_limit=2, save_only_model=False,
        report_to=[], disable_tqdm=True, seed=config.seed, data_seed=config.seed, use_cpu=not cuda,
        bf16=use_bf16(config.bf16), fp16=False, activation_checkpointing=False,
        use_vllm=config.use_vllm, vllm_mode="colocate", reward_weights=[1.0, 1.0],
        remove_unused_columns=False, shuffle_dataset=True)


def _atomic_checkpoints(trainer, checkpoints: Path) -> None:
    """The Trainer writes checkpoint-N in place (trainer_state.json last); here it writes into a temporary dir
    beside and the complete checkpoint is renamed in, so a kill never leaves a partial checkpoint-N. The
    rotation (save_total_limit) then runs on the real folder."""
    from transformers.trainer_utils import rotate_checkpoints

    save = trainer._save_checkpoint

    def atomic(model, trial):
        final = checkpoints / f"checkpoint-{trainer.state.global_step}"
        staging = temp_dir(final)
        trainer._get_output_dir = lambda trial=None: str(staging)
        try:
            save(model, trial)
            publish(staging / final.name, final, overwrite=True)
        finally:
            del trainer._get_output_dir
            shutil.rmtree(staging, ignore_errors=True)
        if trainer.args.should_save:
            rotate_checkpoints(output_dir=str(checkpoints), save_total_limit=trainer.args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=False)

    trainer._save_checkpoint = atomic


def _save_model(trainer, tokenizer, out: Path) -> Path:
    """OUT/model, written beside it first and renamed in, so an interrupted save never leaves half a model."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # LoRA: ship one plain model
        model = model.merge_and_unload()
    with atomic_dir(out / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out / "model"


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))


def train_zero(model: str | Path, task: str | Task, out: str | Path, *, config: ZeroConfig | None = None,
               difficulty: int = 1, verifier: str = "exact", template: Template | None = None,
               resume: bool = False, overwrite: bool = False,
               progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``task`` by GRPO with the accuracy and format rewards, no SFT; returns the report (also
    OUT/report.json). ``resume`` continues from OUT's last complete checkpoint, bit-identically on CPU."""
    _require_trl()
    config, template, out = config or ZeroConfig(), template or Template(), Path(out)
    config.check()
    task = get_task(task, difficulty, verifier)
    refuse_inputs(out, [model, getattr(task, "path", None)], whole=False)
    with _claim(out):
        return _train(model, task, out, config, template, resume, overwrite, progress)


def _claim(out: Path) -> contextlib.AbstractContextManager:
    """OUT is this run's while it runs (held by the main process): a second run to it refuses at once."""
    from accelerate import PartialState

    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        return contextlib.nullcontext()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Claim(out)


def _train(model: str | Path, task: Task, out: Path, config: ZeroConfig, template: Template, resume: bool,
           overwrite: bool, progress: Callable[[int, int, dict], None] | None) -> dict[str, Any]:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from slimlm.models import load_model
    from slimlm.zero.plot import plot_curves

    ckpt = _prepare_out(out, resume=resume, overwrite=overwrite)
    loaded = load_model(model, "fp32")
    tok = loaded.tokenizer
    if tok is None:
        raise SlimlmError(f"{model} has no tokenizer")
    template.check(tok, str(model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    problems = task.problems(config.steps * config.prompts_per_step, "train", config.seed)
    dataset = Dataset.from_list([problem_row(p, template.render(tok, p.question)) for p in problems])
    out.mkdir(parents=True, exist_ok=True)
    start_step = int(ckpt.name.rsplit("-", 1)[1]) if ckpt else 0
    callback = _metrics_callback(out / "metrics.jsonl", start_step, progress, config.max_minutes)
    policy = loaded.model.train()
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs(task, template), args=_grpo_args(out, config),
                          train_dataset=dataset, processing_class=tok, callbacks=[callback],
                          peft_config=_lora_config(config))
    trainer.remove_callback(PrinterCallback)  # progress and metrics.jsonl report each step instead
    _atomic_checkpoints(trainer, out / "checkpoints")
    started = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except Exception as exc:  # a full disk while TRL saves: one line; the last complete checkpoint stays
        if not write_failure(exc):
            raise
        raise SlimlmError(f"{out}: cannot write ({os_reason(exc)}); --resume continues from the last complete "
                          "checkpoint") from None
    if not trainer.is_world_process_zero():
        return {}
    model_dir = _save_model(trainer, tok, out)
    rows = read_metrics(out / "metrics.jsonl")
    curves = plot_curves(rows, out / "curves.png", title=f"{Path(str(model)).name} on {task.name}")
    report = {"model": str(model), "task": task.name, "difficulty": task.difficulty,
              "config": {**asdict(config), "bf16": use_bf16(config.bf16)},
              "template": asdict(template), "resumed_from": str(ckpt) if ckpt else None,
              "steps": rows[-1]["step"] if rows else 0, "train_seconds": time.time() - started,
              "stopped_at_time_limit": callback.stopped_early, "no_signal_steps": sum(r.get("zero_signal_groups", 0.0) >= 1.0 for r in rows),
              "model_dir": str(model_dir), "curves": str(curves),
              "first_steps": _window(rows[:10]), "last_steps": _window(rows[-10:])}
    _write_json(out / "report.json", report)
    return report


def _window(rows: list[dict]) -> dict[str, float]:
    """Mean accuracy, format reward and completion length over some steps (the report's before/after view)."""
    keys = ("accuracy", "format", "completion_length")
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys} if rows else {}
