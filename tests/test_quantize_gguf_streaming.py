"""Streaming: a checkpoint larger than the memory the quantizing process may allocate still quantizes.

The cap is RLIMIT_DATA on the subprocess: it bounds anonymous memory (heap, numpy/torch buffers) but not
read-only file mappings, which is exactly the claim: tensors are mmapped and processed one at a time, so the
working set is a few tensors, never the model. A control run that loads the whole checkpoint under the
same cap must fail, proving the cap binds.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

QUANTIZE = r"""
import json, sys
from slimlm.quantize.gguf import quantize_gguf
r = quantize_gguf(sys.argv[1], sys.argv[2], sys.argv[3])
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
print(json.dumps({"bytes": r.file_bytes, "hwm_kb": int(status["VmHWM"].split()[0])}))
"""
LOAD_ALL = r"""
import sys
from safetensors.torch import load_file
state = load_file(sys.argv[1] + "/model.safetensors")
print(sum(t.numel() for t in state.values()))
"""


def make_big_checkpoint(path: Path) -> int:
    """A 6-layer Llama with hidden 2048 / FFN 5632 in float32 (~1.1 GB); returns its weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=True)
    path.mkdir()
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (8192, 2048), "model.norm.weight": (2048,)}
    for i in range(6):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (2048,), p + "post_attention_layernorm.weight": (2048,),
                       p + "self_attn.q_proj.weight": (2048, 2048), p + "self_attn.k_proj.weight": (512, 2048),
                       p + "self_attn.v_proj.weight": (512, 2048), p + "self_attn.o_proj.weight": (2048, 2048),
                       p + "mlp.gate_proj.weight": (5632, 2048), p + "mlp.up_proj.weight": (5632, 2048),
                       p + "mlp.down_proj.weight": (2048, 5632)})
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() * 4 for t in state.values())


def _run(code: str, args: list[str], cap: int) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, preexec_fn=limit,
                          timeout=600)


@pytest.mark.slow
def test_checkpoint_larger_than_memory_cap(tmp_path: Path) -> None:
    model_bytes = make_big_checkpoint(tmp_path / "big")
    cap = 640 << 20
    assert model_bytes > 1.6 * cap
    control = _run(LOAD_ALL, [str(tmp_path / "big")], cap)
    assert control.returncode != 0, "the cap does not bind: the whole model fit"
    out = tmp_path / "big-q8.gguf"
    proc = _run(QUANTIZE, [str(tmp_path / "big"), "q8_0", str(out)], cap)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bytes"] == out.stat().st_size
    assert report["hwm_kb"] * 1024 < model_bytes / 2  # resident peak: a fraction of the model
    reader = gguf.GGUFReader(out)
    t = {x.name: x for x in reader.tensors}
    assert len(t) == 2 + 6 * 9 and t["blk.5.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    # spot-check one tensor's values against the source
    from safetensors import safe_open

    with safe_open(str(tmp_path / "big" / "model.safetensors"), framework="pt") as f:
        ref = f.get_tensor("model.layers.3.mlp.up_proj.weight").numpy()
    got = gguf.quants.dequantize(np.asarray(t["blk.3.ffn_up.weight"].data), gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(got.reshape(ref.shape) - ref).max() < np.abs(ref).max() / 100
