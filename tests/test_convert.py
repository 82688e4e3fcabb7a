"""GGUF -> HF dir (`slimlm convert`): the dir transformers loads is the model the GGUF holds, rope included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_gguf_archs import CASES, IDS, hf_logits, make_model

from slimlm.archs import llama3_rope_factors, llama3_rope_from_factors
from slimlm.errors import SlimlmError
from slimlm.quantize.gguf import quantize_gguf
from slimlm.writers.hf_dir import write_hf_dir


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gemma3"])
def test_gguf_back_to_hf_dir_runs_like_the_original(name: str, tmp_path: Path) -> None:
    src = make_model(tmp_path / "m", CASES[name], layers=6 if name == "gemma3" else 2)
    gguf = tmp_path / "m.gguf"
    quantize_gguf(src, "F32", gguf)
    out = write_hf_dir(gguf, tmp_path / "back")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # transformers alone, from the written config: llama3 rope rebuilt from rope_freqs, biases, tied output
    assert float(np.abs(hf_logits(out) - hf_logits(src)).max()) <= 1e-4
    config = json.loads((out / "config.json").read_text())
    if name == "llama3":
        want = CASES[name].config["rope_parameters"]
        got = config["rope_parameters"]
        assert got["rope_type"] == "llama3" and all(float(got[k]) == float(v) for k, v in want.items()
                                                      if k != "rope_type")
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(SlimlmError, match="exists"):
        write_hf_dir(gguf, out)


def test_rope_factors_that_are_not_llama3_are_refused() -> None:
    config = {"hidden_size": 128, "num_attention_heads": 4, "rope_theta": 500000.0}
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert llama3_rope_from_factors(config, llama3_rope_factors(config, rope)) == rope
    noisy = np.linspace(1.0, 8.0, 16).astype(np.float32)
    assert llama3_rope_from_factors(config, noisy) is None


def test_cli_convert_bad_input_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    out = subprocess.run([sys.executable, "-m", "slimlm", "convert", str(tmp_path / "m"), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a GGUF file" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()
