"""Which part of AWQ moves Qwen2's KLD? (issue 14: AWQ g128 KLD vs RTN)

Statistics once from the fp32 model (8 × 512 wikitext-2 valid tokens), AWQ's scale searched once per smoothing pair
(slimlm.algorithms.awq.search_scale: the duo-scaling grid scored by each Linear's exact output error), then
variants applied to a copy of the fp32 weights — RTN, clip search only, one pair type's scales only, all scales,
all scales + clip (= AWQ), and AWQ with AutoAWQ's clip rule (every Linear but q/k clipped, gate_proj included) —
each scored by KLD vs fp32 on the same wikitext-2 test windows (ctx 512). A
diagnostic, not a quantizer: inputs are the fp32 model's (not the sequential stream's) so every variant shares
one set of statistics and differences between rows are the methods', not the calibration's.

    python benchmarks/awq_ablation.py --windows 6                          # ~20 min on 2 quiet cores
    python benchmarks/awq_ablation.py --model smollm2 --group 64 --windows 6  # ~5 min; both append to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slimlm.runtime  # noqa: E402,F401  (import order: slimlm.models needs the runtime first)
from _common import machine_line, markdown_table, publish  # noqa: E402
from slimlm import resources  # noqa: E402
from slimlm.algorithms.awq import NO_CLIP, search_clip, search_scale  # noqa: E402

AUTOAWQ_NO_CLIP = ("q_proj", "k_proj")  # AutoAWQ's rule: slimlm's NO_CLIP also leaves gate_proj unclipped
from slimlm.algorithms.mappings import fold_scale, smoothing_pairs  # noqa: E402
from slimlm.algorithms.stats import StatsCollector  # noqa: E402
from slimlm.formats.groupint import QuantSpec, fake_quantize  # noqa: E402
from slimlm.models import load_model  # noqa: E402


def windows(tok, split: str, n: int, ctx: int = 512) -> torch.Tensor:
    ids = tok(resources.wikitext_path(split).read_text()[:120_000], return_tensors="pt").input_ids[0]
    return torch.stack([ids[i * ctx:(i + 1) * ctx] for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--model", choices=("qwen2", "smollm2"), default="qwen2")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    loaded = load_model(resources.qwen2_hf_dir() if args.model == "qwen2" else resources.builtin_hf_dir(), "fp32")
    model, tok = loaded.model.eval(), loaded.tokenizer
    calib, test = windows(tok, "valid", 8), windows(tok, "test", args.windows)
    layers = model.model.layers
    linears = {f"{i}.{n}": mod for i, layer in enumerate(layers) for n, mod in layer.named_modules()
               if isinstance(mod, torch.nn.Linear)}
    with torch.no_grad(), StatsCollector(linears) as col:
        for b in range(0, len(calib), 2):
            model(calib[b:b + 2])
    stats = col.stats
    with torch.no_grad():
        ref = [F.log_softmax(model(test[i:i + 1]).logits[0].float(), -1).half() for i in range(len(test))]
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(4, args.group, False)
    pairs = smoothing_pairs(model.config.model_type, layers[0], "awq")
    scales, ratios = {}, {p.prev: [] for p in pairs}
    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        for p in pairs:
            st = stats[f"{i}.{p.linears[0]}"]
            s, err, err_rtn = search_scale([mods[n].weight.detach() for n in p.linears], [spec] * len(p.linears),
                                           st.abs_mean, st.hessian)
            scales[(i, p.prev)] = s
            ratios[p.prev].append(err / err_rtn)

    def kld() -> float:
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(len(test)):
                lp = F.log_softmax(model(test[i:i + 1]).logits[0].float(), -1)
                r = ref[i].float()
                total += float((r.exp() * (r - lp)).sum()); n += lp.shape[0]
        return total / n

    def variant(scaled: list[str], clip: bool, no_clip: tuple[str, ...] = NO_CLIP) -> float:
        model.load_state_dict(orig)
        for i, layer in enumerate(layers):
            for p in pairs:
                if p.prev in scaled:
                    fold_scale(layer, p, scales[(i, p.prev)])
            for n, mod in layer.named_modules():
                if not isinstance(mod, torch.nn.Linear):
                    continue
                ratio: torch.Tensor | float = 1.0
                if clip and not n.endswith(no_clip):
                    h = stats[f"{i}.{n}"].hessian
                    for p in pairs:  # the Gram matrix of the scaled input
                        if n in p.linears and p.prev in scaled:
                            s = scales[(i, p.prev)]
                            h = h / (s[:, None] * s[None, :])
                    ratio = search_clip(mod.weight.detach(), spec, h)
                mod.weight.data = fake_quantize(mod.weight.detach(), spec, ratio)
        return kld()

    names = [p.prev for p in pairs]
    rows, rtn = [], None
    for label, scaled, clip, no_clip in [
            ("RTN", [], False, NO_CLIP), ("clip search only (not q/k/gate)", [], True, NO_CLIP),
            ("clip search only, AutoAWQ's rule (not q/k)", [], True, AUTOAWQ_NO_CLIP),
            *[(f"scales of {n} → … only", [n], False, NO_CLIP) for n in names],
            ("all scales", names, False, NO_CLIP),
            ("all scales + clip, AutoAWQ's rule (not q/k)", names, True, AUTOAWQ_NO_CLIP),
            ("all scales + clip, not q/k/gate (AWQ)", names, True, NO_CLIP)]:
        k = variant(scaled, clip, no_clip)
        rtn = rtn if rtn is not None else k
        rows.append([label, f"{k:.5f}", f"{k / rtn:.3f}"])
        print(rows[-1], round(time.time() - t0), flush=True)
    per_pair = [[n, f"{min(r):.3f}", f"{sorted(r)[len(r) // 2]:.3f}", sum(x > 0.999 for x in r)]
                for n, r in ratios.items()]
    name = "Qwen2.5-Coder-0.5B-Instruct" if args.model == "qwen2" else "SmolLM2-135M-Instruct"
    body = (f"_{machine_line()}; {time.time() - t0:.0f} s_\n\n{name} (fp32 = the shipped GGUF "
            f"dequantized), W4A16 g{args.group} asymmetric, fake-quantized in place; KLD vs fp32 on {args.windows} × 512 "
            "wikitext-2 test tokens (the same windows for every row).\n\n"
            + markdown_table(["variant", "KLD", "vs RTN"], rows)
            + f"\n\nAWQ's scale search per pair over the {len(layers)} layers: best grid point's output error / RTN's (1 = no "
            "scale beats s = 1):\n\n"
            + markdown_table(["pair (feeds →)", "best layer", "median layer", "layers with no gain"], per_pair)
            + f"\n\nCommand: `python benchmarks/awq_ablation.py --model {args.model} --group {args.group} --windows "
            f"{args.windows}`")
    publish(f"AWQ ablation on {name} (awq_ablation.py)", body, args.no_write)


if __name__ == "__main__":
    main()
