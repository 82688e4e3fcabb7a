"""Zero on CPU (issue 16's must-show): held-out accuracy of a small instruct model before and after a GRPO run
from rewards alone, with the paired difference and its standard error over the same held-out problems.

1. Baseline: the start model answers N held-out problems of the task (greedy), scored by the task's verifier.
2. GRPO (`slimlm zero`): accuracy + format rewards, no SFT, at most --minutes of wall time (--steps caps it).
3. The trained model answers the same N problems; paired difference after − before ± SE, for correct answers
   (any format) and for correct answers in the <think>…</think><answer>…</answer> format, and the format rate,
   so the gain splits into format and correctness.
4. The reward / completion-length curves go to docs/zero-curves.png; the table is appended to BENCHMARKS.md.

Usage (the must-show run, about 45 minutes of GRPO plus two evaluations; run it alone under the CPU lock):
    flock /tmp/cpu.lock python benchmarks/bench_zero.py --minutes 45
    python benchmarks/bench_zero.py --minutes 2 --n 16 --no-append      # a quick smoke run
Seeds: problems from --seed (training) and the task's held-out split with --seed; GRPO sampling from --seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import ROOT, markdown_table, publish

from slimlm import resources
from slimlm.distill.recipe import distill
from slimlm.distill.trainer import TrainConfig
from slimlm.zero.evaluate import evaluate_task, paired_difference
from slimlm.zero.prompts import write_prompts, write_reference_responses
from slimlm.zero.tasks import get_task
from slimlm.zero.template import Template
from slimlm.zero.train import ZeroConfig, train_zero


def add_recipe_args(ap: argparse.ArgumentParser, **defaults) -> None:
    """The recipe's knobs (shared with gpu_zero.py, which changes the defaults)."""
    ap.add_argument("--model", type=Path, default=None,
                    help="start model (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--difficulty", type=int, default=1)
    ap.add_argument("--n", type=int, default=200, help="held-out problems scored before and after")
    ap.add_argument("--minutes", type=float, default=45.0, help="GRPO wall-time limit")
    ap.add_argument("--steps", type=int, default=400, help="GRPO step cap (the time limit usually ends it first)")
    ap.add_argument("--batch", type=int, default=16, help="completions per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--lr", type=float, default=2e-5, help="2e-5 moved SmolLM2-135M's training accuracy in 8 steps; "
                    "Qwen2.5-0.5B collapsed at 2e-5 and learned at 3e-6")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--max-completion", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7, help="GRPO sampling temperature")
    ap.add_argument("--prefill", default="", help="text the answer starts with, e.g. '<think>'")
    ap.add_argument("--eval-batch", type=int, default=16, help="prompts per generate call in the evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm", action="store_true")
    ap.add_argument("--distill", action="store_true", help="then the R1 story: pruned students trained on the Zero "
                    "model's verified traces vs on the reference answers, equal tokens")
    ap.add_argument("--distill-prompts", type=int, default=128, help="training prompts the Zero teacher answers")
    ap.add_argument("--distill-samples", type=int, default=4, help="teacher samples per prompt (kept if verified)")
    ap.add_argument("--distill-steps", type=int, default=30, help="student steps (8 x --distill-seq-len tokens each)")
    ap.add_argument("--distill-seq-len", type=int, default=256, help="rows of whole prompt/response pairs; a chat "
                    "prompt is ~100 tokens on Qwen2.5, a Zero trace ~70 more")
    ap.add_argument("--distill-lr", type=float, default=2e-5)
    ap.add_argument("--distill-dtype", default="bf16", help="student training: bf16 autocast or fp32")
    ap.add_argument("--prune-layers", type=int, default=4, help="student: the Zero model minus this many layers")
    ap.add_argument("--zero-model", type=Path, default=None, help="skip GRPO: distill from this saved Zero model "
                    "(with --distill; its run dir is two levels up)")
    ap.add_argument("--traces", type=Path, default=None, help="reuse this teacher_data.jsonl of verified Zero traces "
                    "from an earlier run of the same Zero model and prompts instead of sampling them again")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run dir (model, metrics, report) here")
    ap.add_argument("--no-append", action="store_true", help="print the section; touch neither BENCHMARKS.md nor docs/")
    ap.set_defaults(**defaults)


def _row(label: str, r: dict) -> list[str]:
    return [label, f"{r['accuracy']:.3f} ± {r['accuracy_se']:.3f}", f"{r['format']:.3f} ± {r['format_se']:.3f}",
            f"{r['correct_and_formatted']:.3f} ± {r['correct_and_formatted_se']:.3f}",
            f"{r['mean_completion_tokens']:.1f}"]


def run_recipe(args: argparse.Namespace, title: str, curves_name: str) -> dict:
    """Baseline eval, GRPO, eval after, paired differences; publishes the table and returns all figures."""
    model = args.model or resources.builtin_hf_dir()
    template = Template("chat", args.prefill)
    run_dir = args.keep or Path(tempfile.mkdtemp(prefix="bench_zero_"))
    evals = dict(n=args.n, seed=args.seed, difficulty=args.difficulty, template=template,
                 max_new_tokens=args.max_completion, batch_size=args.eval_batch)
    t0 = time.time()
    before = evaluate_task(model, args.task, **evals)
    t_before = time.time() - t0
    config = ZeroConfig(steps=args.steps, batch_size=args.batch, group_size=args.group, lr=args.lr, beta=args.beta,
                        loss_type=args.loss_type, max_completion=args.max_completion, seed=args.seed,
                        temperature=args.temperature,
                        max_minutes=args.minutes, use_vllm=args.vllm, save_every=25)
    report = train_zero(model, args.task, run_dir / "run", config=config, difficulty=args.difficulty,
                        template=template, overwrite=True)
    t1 = time.time()
    after = evaluate_task(report["model_dir"], args.task, **evals)
    t_after = time.time() - t1
    correct = paired_difference(after["scores"]["correct"], before["scores"]["correct"])
    both = paired_difference([c * f for c, f in zip(after["scores"]["correct"], after["scores"]["format"])],
                             [c * f for c, f in zip(before["scores"]["correct"], before["scores"]["format"])])
    fmt = paired_difference(after["scores"]["format"], before["scores"]["format"])
    if not args.no_append:
        shutil.copyfile(report["curves"], ROOT / "docs" / curves_name)

    table = markdown_table(["model", "correct (any format)", "format rate", "correct in format", "mean tokens"],
                           [_row(f"start ({Path(str(model)).name})", before),
                            _row(f"after {report['steps']} GRPO steps", after)])
    diffs = markdown_table(["after − before (paired, same problems)", "difference ± SE", "z"],
                           [[name, f"{d['difference']:+.3f} ± {d['se']:.3f}", f"{d['z']:.1f}"]
                            for name, d in (("correct answers (any format)", correct), ("format rate", fmt),
                                            ("correct in the answer format", both))])
    c = report["config"]
    body = (f"Task `{args.task}` difficulty {args.difficulty}; {args.n} held-out problems (split by hash, never "
            f"trained on), greedy answers of at most {args.max_completion} tokens, seed {args.seed}. GRPO (TRL "
            f"GRPOTrainer via `slimlm zero`): {report['steps']} steps in {report['train_seconds'] / 60:.1f} min "
            f"(limit {args.minutes} min), {c['batch_size']} completions per step in groups of {c['group_size']}, "
            f"lr {c['lr']}, beta {c['beta']}, loss {c['loss_type']}, temperature {c['temperature']}, prefill "
            f"{args.prefill!r}, bf16 autocast {c['bf16']}; both evaluations sample with {before['dtype']} weights and "
            f"took {t_before / 60:.1f} and {t_after / 60:.1f} min.\n\n{table}\n\n"
            f"{diffs}\n\nCorrect answers rose by {correct['difference']:+.3f} ({correct['z']:.1f} SE); the share "
            f"of answers in the required format by {fmt['difference']:+.3f}. Curves: docs/{curves_name}.\n")
    publish(title, body, args.no_append)
    result = {"before": before, "after": after, "paired_correct": correct, "paired_format": fmt,
              "paired_correct_in_format": both, "train": report, "run_dir": str(run_dir)}
    (run_dir / "bench_zero.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def distill_stage(args: argparse.Namespace, zero_model: Path) -> dict:
    """Two students pruned from the Zero model (same layers dropped), trained for the same steps x batch x
    sequence length: one on the Zero model's own completions that the task verifier accepts, one on the reference
    answers alone; both answer the same held-out problems."""
    run_dir = zero_model.parent.parent
    prompts = run_dir / "distill_prompts.jsonl"
    write_prompts(get_task(args.task, args.difficulty), prompts, n=args.distill_prompts, seed=args.seed + 1)
    reference = write_reference_responses(prompts, run_dir / "reference_responses.jsonl")["path"]
    common = dict(method="sequence", prune_layers=args.prune_layers, seq_len=args.distill_seq_len, overwrite=True)
    text = resources.wikitext_path("valid")  # held-out text for the students' perplexity (reported, not judged)
    students = {}
    sample = dict(prompts=prompts, verifier="answers", temperature=args.temperature,
                  samples_per_prompt=args.distill_samples, max_new_tokens=args.max_completion)
    for name, extra in (("verified Zero traces", dict(responses=args.traces) if args.traces else sample),
                        ("reference answers", dict(responses=reference))):
        config = TrainConfig(max_steps=args.distill_steps, batch_size=8, lr=args.distill_lr, seed=args.seed,
                             dtype=args.distill_dtype, eval_every=0)
        rep = distill(zero_model, text, run_dir / name.replace(" ", "_"), config=config, **common, **extra)
        ev = evaluate_task(rep["student_dir"], args.task, n=args.n, seed=args.seed, difficulty=args.difficulty,
                           template=Template("chat", args.prefill), max_new_tokens=args.max_completion,
                           batch_size=args.eval_batch)
        students[name] = {"report": rep, "eval": ev}
    a, b = students["verified Zero traces"]["eval"], students["reference answers"]["eval"]
    d = paired_difference(a["scores"]["correct"], b["scores"]["correct"])
    gen = students["verified Zero traces"]["report"].get("generation")
    traces = (f"{gen['kept']} of {gen['generated']} sampled completions" if gen else
              f"the verified completions in {args.traces} (sampled by an earlier run of this Zero model)")
    sft = {name: s["report"]["sft_data"] for name, s in students.items()}
    table = markdown_table(["student trained on", "correct (any format)", "format rate", "correct in format",
                            "mean tokens"], [_row(name, s["eval"]) for name, s in students.items()])
    data = "; ".join(f"{name}: {v['pairs']} pairs in {v['sequences']} rows, {v['scored_tokens']} scored tokens"
                     for name, v in sft.items())
    body = (f"Students: the Zero model minus {args.prune_layers} layers "
            f"({students['reference answers']['report']['student_parameters']:,} parameters), "
            f"{args.distill_steps} steps x 8 rows x {args.distill_seq_len} tokens each (equal tokens; rows hold whole "
            f"prompt/response pairs), lr {args.distill_lr}, {args.distill_dtype}, seed {args.seed}. Teacher traces: "
            f"{traces} on {args.distill_prompts} training prompts passed the verifier; the reference arm has the same "
            f"prompts' reference answers. Data: {data}. Same {args.n} held-out problems as above.\n\n{table}\n\n"
            f"verified traces − reference answers: {d['difference']:+.3f} ± {d['se']:.3f} ({d['z']:.1f} SE)\n")
    publish("Zero → distilled student: verified traces vs reference answers (issue 16)", body, args.no_append)
    result = {"students": students, "paired": d}
    (run_dir / "bench_zero_distill.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_args(ap)
    args = ap.parse_args()
    if args.zero_model:
        if not args.distill:
            ap.error("--zero-model needs --distill")
        distill_stage(args, args.zero_model)
        return
    result = run_recipe(args, "Zero: GRPO from rewards alone on CPU (issue 16)", "zero-curves.png")
    if args.distill:
        distill_stage(args, Path(result["train"]["model_dir"]))
    if args.keep is None:
        shutil.rmtree(result["run_dir"])  # checkpoints with optimizer state are gigabytes


if __name__ == "__main__":
    main()
