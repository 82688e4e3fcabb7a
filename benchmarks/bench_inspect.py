"""Inspection never reads tensor data: time and peak RSS of inspecting a 20 GB sparse safetensors file.

The file is a real safetensors header (Llama-3.1-8B tensor shapes with 42 layers, BF16, 20.4 GB of data)
followed by a hole (``truncate``), so it takes no disk space but any reader that touched the data would
page in gigabytes. Each measurement runs in a fresh subprocess and reports that process's own peak RSS
(``VmHWM`` in /proc/self/status; ``ru_maxrss`` would report the parent's peak, which survives exec) and the time of the call alone. The peer is the safetensors
library (``safe_open`` + every tensor's shape and dtype), measured in the same run; a bare interpreter
with the same imports gives the RSS baseline. The SmolLM2 GGUF row shows a real GGUF file for reference.

    flock /tmp/slimlm-heavy.lock python benchmarks/bench_inspect.py
"""

from __future__ import annotations

import json
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table  # noqa: E402

REPEATS = 5
CONFIG = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 42,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def write_sparse_safetensors(folder: Path) -> tuple[Path, int, int]:
    """Write config.json and a model.safetensors whose header is real and whose data is a hole."""
    h, f, v, n = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], CONFIG["num_hidden_layers"]
    kv = CONFIG["num_key_value_heads"] * h // CONFIG["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for i in range(n):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                       p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                       p + "mlp.gate_proj.weight": [f, h], p + "mlp.up_proj.weight": [f, h],
                       p + "mlp.down_proj.weight": [h, f], p + "input_layernorm.weight": [h],
                       p + "post_attention_layernorm.weight": [h]})
    header, offset, params = {"__metadata__": {"format": "pt"}}, 0, 0
    for name, shape in shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + 2 * numel]}
        offset += 2 * numel
        params += numel
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "model.safetensors"
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)  # the data: a hole, no blocks on disk
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return path, params, 8 + len(raw) + offset


CHILD = r"""
import json, sys, time
kind, target = sys.argv[1], sys.argv[2]
if kind == "slimlm":
    from slimlm.inspect import inspect
elif kind == "safetensors":
    from safetensors import safe_open
else:
    from slimlm.inspect import inspect
    from safetensors import safe_open
start = time.perf_counter()
if kind == "slimlm":
    result = inspect(target).total_params
elif kind == "safetensors":
    result = 0
    with safe_open(target, "np") as f:
        for name in f.keys():
            s = f.get_slice(name)
            n = 1
            for d in s.get_shape():
                n *= d
            s.get_dtype()
            result += n
else:
    result = 0
elapsed = time.perf_counter() - start
# VmHWM is this process image's own peak RSS; ru_maxrss would carry over the parent's peak across exec.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "maxrss_kib": hwm, "result": result}))
"""


def measure(kind: str, target: Path) -> dict:
    runs = []
    for _ in range(REPEATS):
        out = subprocess.run([sys.executable, "-c", CHILD, kind, str(target)], capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout))
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "rss_mib": statistics.median(r["maxrss_kib"] for r in runs) / 1024,
            "result": runs[0]["result"]}


def main() -> None:
    from slimlm.resources import smollm2_gguf_path

    with tempfile.TemporaryDirectory(prefix="bench-inspect-") as tmp:
        folder = Path(tmp)
        path, params, size = write_sparse_safetensors(folder)
        on_disk = path.stat().st_blocks * 512
        baseline = measure("baseline", path)
        ours_file = measure("slimlm", path)
        ours_dir = measure("slimlm", folder)
        peer = measure("safetensors", path)
        gguf = measure("slimlm", smollm2_gguf_path())
    assert ours_file["result"] == ours_dir["result"] == peer["result"] == params
    assert gguf["result"] == 134_515_008
    rows = [
        ["slimlm inspect (single .safetensors)", f"{size / 1e9:.1f} GB", f"{ours_file['seconds'] * 1000:.1f}",
         f"{ours_file['rss_mib']:.0f}", f"{ours_file['rss_mib'] - baseline['rss_mib']:+.0f}",
         f"{peer['seconds'] / ours_file['seconds']:.2f}x"],
        ["slimlm inspect (HF dir, + config check)", f"{size / 1e9:.1f} GB", f"{ours_dir['seconds'] * 1000:.1f}",
         f"{ours_dir['rss_mib']:.0f}", f"{ours_dir['rss_mib'] - baseline['rss_mib']:+.0f}",
         f"{peer['seconds'] / ours_dir['seconds']:.2f}x"],
        ["peer: safetensors safe_open + shapes", f"{size / 1e9:.1f} GB", f"{peer['seconds'] * 1000:.1f}",
         f"{peer['rss_mib']:.0f}", f"{peer['rss_mib'] - baseline['rss_mib']:+.0f}", "1.00x"],
        ["slimlm inspect SmolLM2-135M Q4_1 GGUF (real file)", f"{smollm2_gguf_path().stat().st_size / 1e9:.2f} GB",
         f"{gguf['seconds'] * 1000:.1f}", f"{gguf['rss_mib']:.0f}", f"{gguf['rss_mib'] - baseline['rss_mib']:+.0f}", "-"],
    ]
    body = (f"Sparse safetensors: {params:,} BF16 parameters (Llama-3.1-8B tensor shapes, 42 "
            f"layers), {size:,} bytes apparent size, {on_disk:,} bytes on disk. Medians of {REPEATS} fresh "
            f"processes; time is the call alone, peak RSS is the whole process (baseline: the same imports, "
            f"no call: {baseline['rss_mib']:.0f} MiB).\n\n"
            + markdown_table(["what", "file", "time (ms)", "peak RSS (MiB)", "RSS over baseline", "peer time / ours"],
                             rows))
    append_section("inspect: headers only (20 GB sparse safetensors)", body)


if __name__ == "__main__":
    main()
