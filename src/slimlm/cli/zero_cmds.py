"""CLI: zero (GRPO from verifiable rewards alone), its held-out --eval, and --write-prompts for distill."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimlm.cli.app import JSON_OPTION, app, console, print_json, progress_task


@app.command()
def zero(
    model: Path = typer.Argument(..., help="Start model: HF dir or GGUF file (base or instruct; no SFT step)."),
    task: str = typer.Option(..., "--task", help="arithmetic | countdown | ordering | a .jsonl of prompt/answer."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output dir: model/, checkpoints/, metrics.jsonl, "
                                       "curves.png, report.json (each written whole, then renamed in); while a run "
                                       "uses it, a second run to it refuses at once."),
    eval_: bool = typer.Option(False, "--eval", help="Score MODEL on the task's held-out split instead of training."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="--eval: also score this model on the same "
                                            "problems and report the paired difference."),
    n: int = typer.Option(200, "--n", help="--eval: held-out problems; --write-prompts: training prompts."),
    write_prompts: Optional[Path] = typer.Option(None, "--write-prompts", help="Write training prompts with answers "
                                                 "(JSONL) for `distill --method sequence --verifier answers`."),
    difficulty: int = typer.Option(1, "--difficulty", help="Task difficulty (operands, numbers, people)."),
    verifier: str = typer.Option("exact", "--verifier", help="A .jsonl task's check: exact | numeric."),
    template: str = typer.Option("chat", "--template", help="chat (the tokenizer's template) | plain (R1-Zero's "
                                 "text template, for base models)."),
    prefill: str = typer.Option("", "--prefill", help="Text the answer starts with, e.g. '<think>'."),
    steps: int = typer.Option(100, "--steps"),
    batch_size: int = typer.Option(16, "--batch-size", help="Completions per step."),
    group_size: int = typer.Option(8, "--group-size", help="Completions per prompt; must divide --batch-size."),
    lr: float = typer.Option(1e-5, "--lr", help="Full fine-tuning of a 0.5B model: about 3e-6 (2e-5 collapsed "
                            "Qwen2.5-0.5B by step 6; BENCHMARKS)."),
    beta: float = typer.Option(0.0, "--beta", help="KL coefficient to the start model (0: no reference model)."),
    loss_type: str = typer.Option("dapo", "--loss-type", help="dapo | grpo | dr_grpo | bnpo (TRL's)."),
    max_completion: int = typer.Option(256, "--max-completion", help="Tokens per completion."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature in training (--eval: "
                                      "greedy unless --eval-temperature)."),
    eval_temperature: float = typer.Option(0.0, "--eval-temperature"),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (needs peft), merged into model/."),
    save_every: int = typer.Option(10, "--save-every", help="Checkpoint every N steps (resume point)."),
    max_minutes: float = typer.Option(0.0, "--max-minutes", help="Stop and save after the step that passes this "
                                      "many minutes (0: run all --steps)."),
    vllm: bool = typer.Option(False, "--vllm", help="Generate with vLLM (colocated; GPU, vLLM installed)."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="Train with bf16 autocast and sample with "
                                        "bf16 weights (default: where bf16 is fast, i.e. a GPU or a CPU with AMX / "
                                        "AVX-512 BF16)."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    json_out: bool = JSON_OPTION,
) -> None:
    """Reinforcement learning from rewards alone (the R1-Zero recipe): GRPO with accuracy and format rewards."""
    import slimlm.api as slim
    from slimlm.errors import SlimlmError

    tmpl = slim.ZeroTemplate(template, prefill)
    if write_prompts is not None:
        info = slim.zero_prompts(slim.zero_task(task, difficulty, verifier), write_prompts, n=n, seed=seed)
        if json_out:
            print_json(info)
        else:
            console.print(f"{info['problems']} {task} prompts in {info['path']}")
        return
    if eval_:
        _eval(slim, model, task, baseline, n=n, seed=seed, difficulty=difficulty, verifier=verifier, template=tmpl,
              max_new_tokens=max_completion, temperature=eval_temperature, json_out=json_out,
              bf16=bf16)
        return
    if out is None:
        raise SlimlmError("slimlm zero needs -o DIR to train (or --eval to score MODEL)")
    config = slim.ZeroConfig(steps=steps, batch_size=batch_size, group_size=group_size, lr=lr, beta=beta,
                             loss_type=loss_type, max_completion=max_completion, temperature=temperature, lora=lora,
                             save_every=save_every, seed=seed, use_vllm=vllm,
                             max_minutes=max_minutes, bf16=bf16)
    with progress_task("GRPO", total=steps, remaining=True) as bar:
        def update(step: int, total: int, row: dict) -> None:
            bar(completed=step, description=f"acc {row.get('accuracy', 0):.2f} fmt {row.get('format', 0):.2f} "
                                             f"len {row.get('completion_length', 0):.0f}")

        report = slim.zero(model, task, out, config=config, difficulty=difficulty, verifier=verifier, template=tmpl,
                           resume=resume, overwrite=overwrite, progress=update)
    if report and json_out:
        print_json(report)
    elif report:  # empty on the other processes under `accelerate launch`
        _print_run(report, task)


def _print_run(report: dict, task: str) -> None:
    first, last = report["first_steps"], report["last_steps"]
    console.print(f"{report['steps']} GRPO steps in {report['train_seconds']:.0f} s; training reward (first → last "
                  f"10 steps): accuracy {first['accuracy']:.2f} → {last['accuracy']:.2f}, format "
                  f"{first['format']:.2f} → {last['format']:.2f}, completion tokens "
                  f"{first['completion_length']:.0f} → {last['completion_length']:.0f}")
    console.print(f"model in {report['model_dir']}; curves in {report['curves']}; "
                  f"held-out score: slimlm zero {report['model_dir']} --task {task} --eval")


def _eval(slim, model: Path, task: str, baseline: Optional[Path], *, json_out: bool, **kwargs) -> None:
    """Held-out accuracy ± SE of MODEL (and of --baseline with the paired difference)."""
    results = {}
    for name, path in (("model", model), ("baseline", baseline)):
        if path is None:
            continue
        with progress_task(f"answering ({path.name})", total=kwargs["n"]) as bar:
            results[name] = slim.zero_eval(path, task, progress=lambda done, total: bar(completed=done), **kwargs)
    if baseline is not None:
        results["paired"] = slim.paired_difference(results["model"]["scores"]["correct"],
                                                   results["baseline"]["scores"]["correct"])
    if json_out:
        print_json(results if baseline is not None else results["model"])
        return
    for name in ("baseline", "model"):
        if name in results:
            r = results[name]
            console.print(f"{r['model']}: accuracy {r['accuracy']:.3f} ± {r['accuracy_se']:.3f}, format "
                          f"{r['format']:.3f}, both {r['correct_and_formatted']:.3f} on {r['n']} held-out "
                          f"{r['task']} problems (difficulty {r['difficulty']}, seed {r['seed']})")
    if "paired" in results:
        p = results["paired"]
        console.print(f"paired difference (model − baseline): {p['difference']:+.3f} ± {p['se']:.3f} "
                      f"({p['z']:.1f} standard errors)")
