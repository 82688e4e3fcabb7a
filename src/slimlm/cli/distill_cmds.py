"""CLI: distill (logits KD or teacher-generated data) and distill cache-teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimlm.cli.app import JSON_OPTION, app, console, print_json, progress_task

distill_app = typer.Typer(help="Distill a teacher into a smaller student (logits KD or teacher-generated data).",
                          invoke_without_command=True, no_args_is_help=False)
app.add_typer(distill_app, name="distill")


@distill_app.callback(invoke_without_command=True)
def distill(
    ctx: typer.Context,
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="Teacher: HF dir or GGUF file."),
    data: Optional[Path] = typer.Option(None, "--data", help="Training text (.txt or .jsonl with a text field)."),
    out: Optional[Path] = typer.Option(None, "--out", help=(
        "Output dir: student/, checkpoints/, report.json (each written whole, then renamed in: a kill or a full "
        "disk leaves none or a complete one). While a run uses it, a second run to the same dir refuses at once.")),
    method: str = typer.Option("logits", "--method", help="logits | sequence"),
    student: Optional[Path] = typer.Option(None, "--student", help="An existing student checkpoint (HF dir)."),
    student_config: Optional[Path] = typer.Option(None, "--student-config", help="A config.json: random-init student."),
    prune_layers: int = typer.Option(0, "--prune-layers", help="Derive the student: drop N least-influential layers."),
    prune_mlp: float = typer.Option(1.0, "--prune-mlp", help="Derive the student: keep this fraction of MLP channels."),
    prune_heads: float = typer.Option(1.0, "--prune-heads",
                                      help="Derive the student: keep this fraction of attention heads "
                                           "(with GQA, of the query heads in every KV group)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of CE on labels; 1 - alpha on the divergence."),
    temperature: float = typer.Option(1.0, "--temperature"),
    divergence: str = typer.Option("forward_kl", "--divergence", help="forward_kl | reverse_kl | jsd"),
    beta: float = typer.Option(0.5, "--beta", help="Generalized JSD mixing weight."),
    top_k: int = typer.Option(16, "--top-k", help="Teacher log-probs cached per token (4 bytes each); the KD "
                              "loss compares these k tokens plus one bucket for the rest."),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="A cache from `distill cache-teacher`."),
    on_policy: float = typer.Option(0.0, "--on-policy",
                                    help="logits: share of steps where the student samples and the teacher scores."),
    on_policy_prompt: int = typer.Option(0, "--on-policy-prompt",
                                         help="Prompt tokens kept from each sequence on those steps (0: half)."),
    on_policy_temperature: float = typer.Option(1.0, "--on-policy-temperature",
                                                help="The student's sampling temperature (0: greedy)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="sequence: prompts the teacher answers."),
    verifier: Optional[str] = typer.Option(None, "--verifier",
                                           help="sequence: module:function(prompt, response) -> bool, or 'answers' "
                                                "(the task verifiers of prompts from `slimlm zero --write-prompts`)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    sample_temperature: float = typer.Option(0.7, "--sample-temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training row. --method sequence packs whole "
                                "prompt/response pairs into rows (a pair longer than a row is cut, and counted)."),
    steps: int = typer.Option(50, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="Global sequences per optimizer step."),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: float = typer.Option(1e-4, "--lr"),
    warmup: int = typer.Option(5, "--warmup"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16"),
    eval_every: int = typer.Option(25, "--eval-every"),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0: only the final student)."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help=(
        "Continue from the latest checkpoint in --out (bit-identical to an uninterrupted run; a run killed before "
        "its first checkpoint starts again, keeping the teacher cache).")),
    overwrite: bool = typer.Option(False, "--overwrite"),
    json_out: bool = JSON_OPTION,
) -> None:
    """Distill --teacher into a student on --data; see `slimlm distill cache-teacher` to cache the teacher once."""
    if ctx.invoked_subcommand is not None:
        return
    from slimlm.distill.recipe import distill as run
    from slimlm.distill.trainer import TrainConfig
    from slimlm.errors import SlimlmError

    if teacher is None or data is None or out is None:
        raise SlimlmError("slimlm distill needs --teacher, --data and --out")
    config = TrainConfig(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta, lr=lr,
                         warmup_steps=warmup, max_steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                         grad_clip=grad_clip, dtype=dtype, eval_every=eval_every, save_every=save_every, seed=seed,
                         on_policy=on_policy, on_policy_prompt=on_policy_prompt,
                         on_policy_temperature=on_policy_temperature)
    with progress_task("distilling", total=steps, disable=json_out) as bar:
        def update(step: int, total: int, rec: dict) -> None:
            bar(completed=step, description=f"loss {rec['loss']:.4f} | {rec['tokens_per_s']:.0f} tok/s")

        report = run(teacher, data, out, method=method, student=student, student_config=student_config,
                     prune_layers=prune_layers, prune_mlp=prune_mlp, prune_heads=prune_heads, seq_len=seq_len,
                     top_k=top_k, teacher_cache=teacher_cache, prompts=prompts, verifier=verifier,
                     max_new_tokens=max_new_tokens, temperature=sample_temperature, top_p=top_p, config=config,
                     resume=resume, overwrite=overwrite, progress=update)
    if not report:
        return  # a non-main process under accelerate launch
    if json_out:
        print_json(report)
        return
    b, a, t = report["before"], report["after"], report["teacher_heldout"]
    console.print(f"student: {report['student_parameters']:,} parameters (teacher {report['teacher_parameters']:,})")
    if "bits_per_byte" in a:
        console.print(f"held-out bits per byte (tokenizers differ): {b['bits_per_byte']:.3f} → "
                      f"{a['bits_per_byte']:.3f} (teacher {t['bits_per_byte']:.3f})")
    else:
        console.print(f"held-out perplexity: {b['ppl']:.2f} → {a['ppl']:.2f} (teacher {t['ppl']:.2f})")
    if "kld" in a:
        console.print(f"KL(teacher ‖ student): {b['kld']:.4f} → {a['kld']:.4f}")
    console.print(f"{report['steps']} steps, {report['tokens_per_s']:.0f} tokens/s; student in {report['student_dir']}")


@distill_app.command("cache-teacher")
def cache_teacher_cmd(
    teacher: Path = typer.Option(..., "--teacher"),
    data: Path = typer.Option(..., "--data"),
    output: Path = typer.Option(..., "-o", "--output", help="The cache file (.safetensors)."),
    top_k: int = typer.Option(16, "--top-k",
                              help="Log-probs kept per token (4 bytes each with a vocabulary up to 65,536)."),
    seq_len: int = typer.Option(256, "--seq-len"),
    eval_sequences: int = typer.Option(8, "--eval-sequences", help="Held out at the end, as distill does."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Run the teacher once over the training text and store its top-k log-probs compactly."""
    from slimlm.distill.sequences import split_heldout, text_sequences
    from slimlm.distill.recipe import load_teacher
    from slimlm.distill.teacher_cache import cache_teacher
    from slimlm.writers.atomic import Claim, refuse_inputs

    refuse_inputs(output, [teacher, data])
    with Claim(output):  # a second run to the same file refuses at once
        model, tok = load_teacher(teacher)
        train_ids, _ = split_heldout(text_sequences(tok, data, seq_len), eval_sequences)
        info = cache_teacher(model, train_ids, output, top_k=top_k)
    if json_out:
        print_json(info)
    else:
        console.print(f"{info['sequences']} sequences x {info['seq_len']} tokens, top-{info['top_k']}: "
                      f"{info['bytes_per_token']} bytes per token, {info['file_bytes']:,} bytes in {info['path']}")
