"""Distillation on the real SmolLM2-135M: a depth-pruned student recovers with logit KD vs without the teacher.

Same student (teacher minus N least-influential layers), same data, steps, batch and learning rate; the only
difference is the loss: alpha=0 (pure forward KL to the cached top-k teacher) vs alpha=1 (CE on the text).
Held-out: the last sequences of the text, never trained on.
"""

import argparse
import tempfile
from pathlib import Path

from _common import append_section, markdown_table

from slimlm import resources
from slimlm.distill.run import distill
from slimlm.distill.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prune-layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chars", type=int, default=300_000)
    args = ap.parse_args()
    teacher = resources.builtin_hf_dir()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "train.txt"
        text.write_text(resources.wikitext_path("valid").read_text()[: args.chars])
        runs = {}
        for name, alpha in (("logit KD (forward KL, top-16 cache)", 0.0), ("no teacher (CE on text)", 1.0)):
            cfg = TrainConfig(alpha=alpha, max_steps=args.steps, batch_size=args.batch, lr=1e-4, warmup_steps=4,
                              eval_every=0, seed=0)
            runs[name] = distill(teacher, text, Path(tmp) / name.split()[0], prune_layers=args.prune_layers,
                                 seq_len=args.seq_len, top_k=16, eval_sequences=16, config=cfg)
    first = next(iter(runs.values()))
    rows = [["pruned student, before training", f"{first['before']['ppl']:.2f}", f"{first['before']['kld']:.4f}", "-", "-"]]
    for name, rep in runs.items():
        rows.append([name, f"{rep['after']['ppl']:.2f}", f"{rep['after']['kld']:.4f}", f"{rep['tokens_per_s']:.0f}",
                     f"{rep['train_seconds']:.0f}"])
    rows.append(["teacher (SmolLM2-135M, 30 layers)", f"{first['teacher_heldout']['ppl']:.2f}", "0", "-", "-"])
    cache = first.get("teacher_cache", {})
    body = (f"Student: SmolLM2-135M minus {args.prune_layers} layers (dropped {first['student']['dropped_layers']} by "
            f"block influence), {first['student_parameters']:,} of {first['teacher_parameters']:,} parameters. "
            f"{args.steps} steps x {args.batch} sequences x {args.seq_len} tokens of wikitext-2 valid, AdamW lr 1e-4, "
            f"cosine with 4 warm-up steps; held-out: 16 sequences. Teacher cache: top-{cache.get('top_k')} at "
            f"{cache.get('bytes_per_token')} bytes per token.\n\n"
            + markdown_table(["student", "held-out ppl", "KL(teacher ‖ student)", "train tokens/s", "seconds"], rows))
    append_section("distill: pruned SmolLM2 student, KD vs no teacher (bench_distill.py)", body)


if __name__ == "__main__":
    main()
