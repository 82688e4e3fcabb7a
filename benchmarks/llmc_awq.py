"""The peer's AWQ: llm-compressor's ``oneshot`` (AWQModifier, then its W4A16 asymmetric group quantization) on a
model dir, with the calibration token ids slimlm used, so both tools see the same windows.

Run by ``bench_w4a16_w8a8.py --llmcompressor PYTHON`` with the python of llm-compressor's own venv (it pins its
own transformers): ``PYTHON benchmarks/llmc_awq.py SRC OUT --ids IDS.json --group 64``. Prints one JSON line:
``seconds`` (model load to the saved dir, the same span slimlm's own timer covers), ``peak_rss_mb``, ``version``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--ids", required=True, help="JSON list of calibration windows (token ids)")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    t0 = time.perf_counter()
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations in host memory for faster copies to a GPU, and
        # pinning raises "Cannot access accelerator device" on a machine without one; pinning has no use there.
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    with open(args.ids) as f:
        ids = json.load(f)
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": args.group}
    recipe = [AWQModifier(),  # its defaults: duo scaling, 20 grid points, the model's own mappings
              QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": {"targets": ["Linear"],
                                                                                   "weights": weights}})]
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=len(ids[0]), shuffle_calibration_samples=False)
    model.save_pretrained(args.out, save_compressed=True)
    AutoTokenizer.from_pretrained(args.src).save_pretrained(args.out)
    print(json.dumps({"seconds": time.perf_counter() - t0, "version": llmcompressor.__version__,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
