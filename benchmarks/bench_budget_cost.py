"""Checks the budget mixes' cost model: predicted vs measured KLD when a whole tensor kind moves to one type.

`quantize --target-bpw` prices each (tensor, type) as alpha_kind x E(tensor, type), with E the imatrix-weighted
squared error and alpha measured once per kind at one probe type (slimlm.quantize.budget). This script moves every
tensor of a kind to each listed type in a float32 copy of the model, measures the KLD on the same calibration
windows the sensitivity used, and prints it beside the sum of the predicted costs. A ratio far from 1 for the types
an allocation picks means the allocation misprices that kind.

    python benchmarks/bench_budget_cost.py --work W   (W: a bench_budget.py --work dir holding its sensitivity)
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table

KINDS = {"ffn_down": "Q3_K,IQ3_S,IQ4_XS,Q4_K,Q5_K,Q6_K", "attn_q": "IQ4_NL,Q5_0,Q5_1,Q8_0",
         "ffn_up": "IQ4_NL,Q5_0,Q5_1,Q8_0"}


def main() -> None:
    import torch
    from gguf import GGMLQuantizationType as T

    from slimlm import resources
    from slimlm.models import load_model
    from slimlm.quantize import budget
    from slimlm.quantize.imatrix import read_imatrix

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, help="the HF dir the sensitivity was measured on (default: the "
                                                     "work dir's hf-noise-* copy)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--covariance", action="store_true", help="the sensitivity bench_budget.py --covariance wrote")
    args = ap.parse_args()
    src = args.model_dir or next(args.work.glob("hf-noise-*"))
    sens_file = args.work / f"sensitivity-w{args.windows}{'-cov' if args.covariance else ''}.pkl"
    sens = pickle.loads(sens_file.read_bytes())
    cost = {t.name: {o.qtype: o.cost for o in t.options} for t in sens.tensors}
    im = read_imatrix(next(args.work.glob("slimlm-imatrix-*.gguf")))
    model, tok, _ = load_model(src)
    model = model.float().eval()
    weights = budget._weights_by_gguf_name(model)
    kld_now = budget.WindowKld(model, tok, resources.wikitext_path("valid"), args.windows)
    rows = []
    for kind, types in KINDS.items():
        names = [n for n in weights if f".{kind}." in n]
        for q in (T[t] for t in types.split(",")):
            saved = [(weights[n], weights[n].detach().clone()) for n in names]
            with torch.no_grad():
                for n in names:
                    w = weights[n].detach().float().numpy()
                    weights[n].copy_(torch.from_numpy(budget.dequantized(w, q, im.importance(n))))
            kld = kld_now()
            with torch.no_grad():
                for p, orig in saved:
                    p.copy_(orig)
            pred = sum(cost[n][q] for n in names)
            rows.append([kind, q.name, f"{kld:.5f}", f"{pred:.5f}", f"{kld / pred:.2f}"])
            print(rows[-1], flush=True)
    append_section(f"Budget cost model: predicted vs measured KLD per tensor kind (bench_budget_cost.py, {src.name}"
                   f"{', covariance' if args.covariance else ''})",
                   f"Model {src} (every tensor of one kind moved to one type at a time), {len(kld_now.ids)} calibration "
                   "windows of wikitext-2 valid (those the sensitivity used), KLD vs the unquantized model; "
                   "predicted = the sum of the sensitivity's costs alpha x E for those tensors"
                   + (" (E: output error under the input covariance)" if args.covariance else
                      " (E: imatrix-weighted squared error)") + ".\n\n"
                   + markdown_table(["kind", "type", "measured KLD", "predicted", "measured / predicted"], rows)
                   + f"\n\nCommand: `python benchmarks/bench_budget_cost.py --work {args.work}"
                   f"{' --covariance' if args.covariance else ''}`")


if __name__ == "__main__":
    main()
