"""The distillation training loop: one code path for one process and for `accelerate launch` (DDP).

Determinism is a feature: the data order is a seeded permutation per epoch, each optimizer step takes
the next global batch of fixed-length sequences, and each rank takes its equal slice of it, so the loss
curve of N processes matches one process at the same global batch, and `--resume` continues
bit-for-bit (weights, AdamW moments and the schedule are saved in safetensors + JSON, never pickle).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from slimlm.distill.losses import DIVERGENCES, kd_loss
from slimlm.distill.onpolicy import is_on_policy_step, on_policy_labels, sample_continuations, step_uniforms
from slimlm.errors import SlimlmError
from slimlm.writers.atomic import atomic_dir


@dataclass
class TrainConfig:
    alpha: float = 0.5  # weight of CE on the labels; 1 - alpha goes to the divergence
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5  # generalized JSD mixing
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_steps: int = 50
    batch_size: int = 8  # global sequences per optimizer step
    grad_accum: int = 1
    grad_clip: float = 1.0
    dtype: str = "fp32"  # or bf16 (autocast)
    eval_every: int = 25
    save_every: int = 0
    seed: int = 0
    on_policy: float = 0.0  # share of steps where the student samples and the live teacher scores (GKD's lambda)
    on_policy_prompt: int = 0  # tokens of each sequence kept as the prompt on those steps (0: half)
    on_policy_temperature: float = 1.0  # the student's sampling temperature (0: greedy)

    def check(self, world: int) -> None:
        if self.divergence not in DIVERGENCES:
            raise SlimlmError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise SlimlmError("--alpha must be between 0 and 1")
        if self.batch_size % (world * self.grad_accum):
            raise SlimlmError(f"--batch-size {self.batch_size} must be a multiple of processes x --grad-accum "
                              f"({world} x {self.grad_accum})")
        if self.dtype not in ("fp32", "bf16"):
            raise SlimlmError("--dtype must be fp32 or bf16")
        if not 0.0 <= self.on_policy <= 1.0:
            raise SlimlmError("--on-policy is the share of steps sampled by the student: give a value in [0, 1]")
        if self.on_policy_temperature < 0:
            raise SlimlmError("--on-policy-temperature must be >= 0")

    def prompt_len(self, seq_len: int) -> int:
        """Prompt tokens of an on-policy sequence; the student samples the remaining ones."""
        p = self.on_policy_prompt or seq_len // 2
        if not 1 <= p < seq_len:
            raise SlimlmError(f"--on-policy-prompt must be between 1 and {seq_len - 1} (the sequence length - 1)")
        return p


@dataclass
class TrainData:
    """Fixed-length training sequences with labels (-100 where not scored) and an optional top-k teacher."""

    input_ids: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N, L], already aligned with the logits (label[t] is the token after input[t])
    topk_idx: torch.Tensor | None = None  # [N, L, k]
    topk_logprobs: torch.Tensor | None = None  # [N, L, k]


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def global_batch_indices(n: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """The sequences of optimizer step ``step``: consecutive slices of a seeded permutation per epoch."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise SlimlmError(f"only {n} training sequences for a global batch of {batch}: give more data or a smaller batch")
    epoch, pos = divmod(step, per_epoch)
    return _order(n, seed, epoch)[pos * batch:(pos + 1) * batch]


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainState, config: TrainConfig, tokenizer: Any = None) -> None:
    """Weights via save_pretrained (+ the tokenizer, so the checkpoint is a usable model dir), AdamW moments in
    safetensors, counters in JSON. All of it goes to a hidden temp dir that is renamed when complete, so a
    crash leaves the previous checkpoints intact and never a half-written ``step-N`` (which --resume reads)."""
    with atomic_dir(path) as tmp:
        _write_checkpoint(tmp, model, optimizer, scheduler, state, config, tokenizer)


def _write_checkpoint(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                      state: TrainState, config: TrainConfig, tokenizer: Any) -> None:
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    tensors, scalars = {}, {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        for key, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{i}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{i}.{key}"] = float(value)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({
        "state": asdict(state), "scheduler": scheduler.state_dict(), "optimizer_scalars": scalars,
        "config": asdict(config)}, default=float))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    from safetensors.torch import load_model

    try:
        load_model(model, str(path / "model.safetensors"), strict=False)
        moments = load_file(str(path / "optimizer.safetensors"))
        meta = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise SlimlmError(f"cannot resume from {path}: {exc}") from None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        st = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if f"{i}.{key}" in moments:
                st[key] = moments[f"{i}.{key}"].to(p.device)
        if f"{i}.step" in meta["optimizer_scalars"]:
            st["step"] = torch.tensor(meta["optimizer_scalars"][f"{i}.step"])
        if st:
            optimizer.state[p] = st
    # Put the schedule at the saved step, computed from this run's schedule (so --steps may grow on resume).
    step = int(meta["scheduler"]["last_epoch"])
    scheduler.last_epoch = step
    for group, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lam(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    s = meta["state"]
    return TrainState(step=s["step"], history=s["history"], evals=s["evals"])


def latest_checkpoint(out: Path) -> Path | None:
    """The highest complete ``checkpoints/step-N`` (temp dirs of an interrupted save are hidden and skipped)."""
    ckpts = [p for p in (out / "checkpoints").glob("step-*")
             if p.name[5:].isdigit() and (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name[5:])) if ckpts else None


def train(student: torch.nn.Module, data: TrainData, config: TrainConfig, out: Path, *,
          teacher: torch.nn.Module | None = None, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          resume: bool = False, progress: Callable[[int, int, dict[str, float]], None] | None = None,
          eos_ids: set[int] | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train ``student`` on ``data``: CE on labels plus the divergence to the teacher (live or cached).

    With ``config.on_policy`` > 0 a seeded share of steps is on-policy (slimlm.distill.onpolicy): the student
    samples each sequence's continuation and the loss is only the divergence to the live ``teacher`` there (no
    CE: the labels would be its own samples); tokens after a sampled ``eos_ids`` are not scored. ``tokenizer``
    goes into every checkpoint. Runs under `accelerate launch` unchanged (each rank slices every global batch).
    """
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    config.check(world)
    torch.manual_seed(config.seed)
    optimizer, scheduler, state = _optimizer_state(student, config, out, resume)
    model, optimizer = acc.prepare(student, optimizer)
    if teacher is not None:
        teacher = teacher.to(acc.device).eval()
    if config.on_policy > 0 and teacher is None:
        raise SlimlmError("--on-policy needs the live teacher (its full logits score the student's samples)")
    n, seq_len = data.input_ids.shape
    prompt_len = config.prompt_len(seq_len) if config.on_policy > 0 else 0
    per_rank = config.batch_size // world
    micro = per_rank // config.grad_accum
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16) if config.dtype == "bf16" else None
    started, tokens_done = time.perf_counter(), 0
    while state.step < config.max_steps:
        idx = global_batch_indices(n, state.step, config.batch_size, config.seed)
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        model.train()
        on_policy = is_on_policy_step(config.seed, state.step, config.on_policy)
        if on_policy:
            uniforms = step_uniforms(config.seed, state.step, config.batch_size, seq_len - prompt_len)
            my_uniforms = uniforms[rank * per_rank:(rank + 1) * per_rank]
        totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        for m in range(config.grad_accum):
            part = mine[m * micro:(m + 1) * micro]
            ids, labels = data.input_ids[part].to(acc.device), data.labels[part].to(acc.device)
            with acc.no_sync(model) if m < config.grad_accum - 1 else nullcontext():
                with autocast or nullcontext():
                    if on_policy:
                        ids = sample_continuations(acc.unwrap_model(model), ids[:, :prompt_len],
                                                   my_uniforms[m * micro:(m + 1) * micro],
                                                   config.on_policy_temperature)
                        labels = on_policy_labels(ids, prompt_len, eos_ids)
                    logits = model(input_ids=ids).logits
                    teacher_kw = _teacher_targets(data, part, ids, teacher, config, on_policy, acc.device)
                    loss, parts = kd_loss(logits, labels, alpha=0.0 if on_policy else config.alpha,
                                          temperature=config.temperature,
                                          divergence=config.divergence, beta=config.beta, **teacher_kw)
                acc.backward(loss / config.grad_accum)
            for key, value in (("loss", float(loss.detach())), ("ce", parts["ce"]), ("kd", parts["kd"])):
                totals[key] += value / config.grad_accum
        grad_norm = acc.clip_grad_norm_(model.parameters(), config.grad_clip) if config.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        reduced = acc.reduce(torch.tensor([totals["loss"], totals["ce"], totals["kd"]], device=acc.device), "mean")
        tokens_done += int(data.input_ids[idx].numel())
        state.step += 1
        record = {"step": state.step, "loss": float(reduced[0]), "ce": float(reduced[1]), "kd": float(reduced[2]),
                  "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                  "tokens_per_s": tokens_done / (time.perf_counter() - started), "on_policy": on_policy}
        state.history.append(record)
        if progress and acc.is_main_process:
            progress(state.step, config.max_steps, record)
        _eval_and_save(acc, model, optimizer, scheduler, state, config, out, evaluate, tokenizer)
    return {"state": state, "model": acc.unwrap_model(model), "world_size": world, "is_main": acc.is_main_process,
            "seconds": time.perf_counter() - started}


def _eval_and_save(acc: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   state: TrainState, config: TrainConfig, out: Path,
                   evaluate: Callable[[torch.nn.Module], dict[str, float]] | None, tokenizer: Any) -> None:
    """After a step: the held-out evaluation and the checkpoint when due (main process), then all ranks meet."""
    if evaluate and config.eval_every and (state.step % config.eval_every == 0 or state.step == config.max_steps):
        if acc.is_main_process:
            state.evals.append({"step": state.step, **evaluate(acc.unwrap_model(model))})
        acc.wait_for_everyone()
    if config.save_every and state.step % config.save_every == 0 and acc.is_main_process:
        save_checkpoint(out / "checkpoints" / f"step-{state.step}", acc.unwrap_model(model), optimizer,
                        scheduler, state, config, tokenizer)
    acc.wait_for_everyone()


def _optimizer_state(student: torch.nn.Module, config: TrainConfig, out: Path,
                     resume: bool) -> tuple[torch.optim.Optimizer, Any, TrainState]:
    """AdamW with a cosine schedule, and the state to start from: fresh, or OUT's latest checkpoint (--resume; a
    run killed before its first checkpoint starts from step 0, so one command resumes whatever happened)."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    state = TrainState()
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, student, optimizer, scheduler)
    return optimizer, scheduler, state


def _teacher_targets(data: TrainData, part: torch.Tensor, ids: torch.Tensor, teacher: torch.nn.Module | None,
                     config: TrainConfig, on_policy: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """The teacher side of kd_loss for one micro-batch: live logits (on-policy steps, or no cache), the cached
    top-k, or nothing when the loss is plain CE (alpha 1)."""
    if on_policy:
        with torch.no_grad():
            return {"teacher_logits": teacher(input_ids=ids).logits}
    if not config.alpha < 1.0:
        return {}
    if data.topk_idx is not None:
        return {"teacher_topk_idx": data.topk_idx[part].to(device),
                "teacher_topk_logprobs": data.topk_logprobs[part].to(device)}
    if teacher is not None:
        with torch.no_grad():
            return {"teacher_logits": teacher(input_ids=ids).logits}
    raise SlimlmError("alpha < 1 needs a teacher (live or a cached top-k file)")
