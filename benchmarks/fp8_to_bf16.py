"""The first step of llama.cpp's path for DeepSeek's FP8 checkpoints: the bf16 copy DeepSeek's own
``inference/fp8_cast_bf16.py`` writes (llama.cpp's converter cannot read FP8 blocks). Like that script it works
shard by shard: every ``float8_e4m3fn`` weight times its 128x128 block's ``weight_scale_inv``, in bf16, the scales
dropped, the other tensors copied, a new index, and the config without ``quantization_config``. Used by
bench_real_size.py to time that path on the DeepSeek-V3 slice; slimlm itself reads the FP8 files directly.

    python benchmarks/fp8_to_bf16.py FP8_DIR BF16_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from slimlm.checkpoint import open_checkpoint
from slimlm.writers.compressed_tensors import AUX_FILES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    ckpt = open_checkpoint(src)
    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, list] = {}
    for t in ckpt.weight_tensors:  # FP8 weights come back dequantized; their scales are not weights
        by_file.setdefault(t.file, []).append(t)
    weight_map = {}
    for i, (file, tensors) in enumerate(sorted(by_file.items()), 1):
        name = f"model-{i:05d}-of-{len(by_file):05d}.safetensors"
        save_file({t.name: ckpt.load_torch(t) for t in tensors}, str(out / name), metadata={"format": "pt"})
        weight_map.update({t.name: name for t in tensors})
        print(f"{name}: {len(tensors)} tensors", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(ckpt.config)
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in AUX_FILES:
        if (src / extra).is_file():
            shutil.copy(src / extra, out / extra)


if __name__ == "__main__":
    main()
