"""slimlm bench on tiny models: figures per (backend, batch), backend registry, greedy decoding across engines."""

import json
from pathlib import Path

import numpy as np
import pytest

import importlib

from slimlm.errors import SlimlmError
from slimlm.evaluate.bench import BACKENDS, Backend, TorchFp32Backend, bench

bench_module = importlib.import_module("slimlm.evaluate.bench")  # the package re-exports bench() under this name


def test_bench_reports_every_figure_per_backend_and_batch(tiny_lm_dir: Path) -> None:
    seen = []
    report = bench(tiny_lm_dir, prompt=16, gen=5, batches=[1, 3], backends=["torch-fp32", "torch-bf16"], runs=3,
                   threads=1, progress=lambda done, total, label: seen.append((done, total)))
    rows = report["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("torch-fp32", 1), ("torch-fp32", 3), ("torch-bf16", 1),
                                                          ("torch-bf16", 3)]
    assert [r["dtype"] for r in rows] == ["float32", "float32", "bfloat16", "bfloat16"]
    for r in rows:
        assert r["prompt"] == 16 and r["gen"] == 5 and r["runs"] == 3 and r["threads"] == 1
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "itl_p50_ms", "itl_p95_ms", "peak_rss_mb"):
            assert r[key] > 0, key
        assert r["itl_p95_ms"] >= r["itl_p50_ms"]
        assert r["peak_rss_mb"] >= r["rss_before_mb"] > 0
        # with an odd number of runs, the median prefill rate is batch x prompt / median TTFT
        assert r["prefill_tok_s"] * r["ttft_ms"] / 1000 == pytest.approx(r["batch"] * 16, rel=1e-9)
    assert seen[-1] == (16, 16)  # 2 backends x 2 batches x (1 warm-up + 3 runs)


class CountingBackend(Backend):
    """A fake engine recording what bench asks of it."""

    name = "counting"
    calls: list = []

    def load(self, model_path: Path, threads: int) -> dict:
        CountingBackend.calls = []
        return {"format": "fake", "dtype": "none"}

    def vocab_size(self) -> int:
        return 1000

    def prepare(self, batch: int, max_tokens: int) -> None:
        self.calls.append(("prepare", batch, max_tokens))

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.calls.append(("prefill", prompt.shape))
        assert prompt.min() >= 100 and prompt.max() < 1000  # random ids avoid the low (special) ids
        return np.zeros(prompt.shape[0], dtype=np.int64)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        self.calls.append(("decode", tokens.shape))
        return tokens + 1

    def close(self) -> None:
        self.calls.append(("close",))


def test_backends_register_with_one_line(monkeypatch: pytest.MonkeyPatch, tiny_lm_dir: Path) -> None:
    monkeypatch.setitem(BACKENDS, "counting", CountingBackend)
    report = bench(tiny_lm_dir, prompt=7, gen=20, batches=[2], backends=["counting"], runs=2, warmup=1)
    calls = CountingBackend.calls
    assert calls[0] == ("prepare", 2, 27)
    assert [c for c in calls if c[0] == "prefill"] == [("prefill", (2, 7))] * 3
    # warm-up generates min(gen, 8) tokens, timed runs gen tokens: 7 + 19 + 19 decode steps
    assert len([c for c in calls if c[0] == "decode"]) == 7 + 19 + 19
    assert calls[-1] == ("close",)
    assert report["rows"][0]["backend"] == "counting" and report["rows"][0]["format"] == "fake"


def test_torch_backend_decodes_like_transformers_generate(tiny_lm_dir: Path) -> None:
    import torch

    backend = TorchFp32Backend()
    backend.load(tiny_lm_dir, threads=1)
    prompt = np.random.default_rng(0).integers(0, 256, size=(2, 10))
    tokens = [backend.prefill(prompt)]
    for _ in range(5):
        tokens.append(backend.decode(tokens[-1]))
    ours = np.stack(tokens, axis=1)
    model = backend.loaded.model
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                             pad_token_id=0)[:, 10:]
    assert ours.tolist() == ref.tolist()
    backend.close()


def test_llama_cpp_backend_batches_sequences_like_torch(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from test_gguf_tiny import make_tiny_model

    from slimlm.evaluate.bench import LlamaCppBackend
    from slimlm.quantize.gguf import quantize_gguf

    gguf = tmp_path / "tiny-f32.gguf"
    quantize_gguf(make_tiny_model(tmp_path / "tiny"), "F32", gguf)
    prompt = np.random.default_rng(0).integers(0, 256, size=(3, 12))
    outputs = []
    for cls in (TorchFp32Backend, LlamaCppBackend):
        backend = cls()
        backend.load(gguf, threads=1)
        backend.prepare(3, 20)
        for _ in range(2):  # the second run must start from an empty cache again
            tokens = [backend.prefill(prompt)]
            for _ in range(6):
                tokens.append(backend.decode(tokens[-1]))
            outputs.append(np.stack(tokens, axis=1).tolist())
        backend.close()
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]
    report = bench(gguf, prompt=8, gen=3, batches=[1, 2], backends=["llama.cpp"], runs=1, threads=1)
    assert [(r["backend"], r["batch"], r["format"]) for r in report["rows"]] == [("llama.cpp", 1, "gguf"),
                                                                                ("llama.cpp", 2, "gguf")]


def test_bench_rejects_bad_requests(tiny_lm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SlimlmError, match="unknown backend 'vllm'; available: torch-fp32, torch-bf16, llama.cpp"):
        bench(tiny_lm_dir, backends=["vllm"])
    with pytest.raises(SlimlmError, match="--gen at least 2"):
        bench(tiny_lm_dir, gen=1)
    with pytest.raises(SlimlmError, match="does not exist"):
        bench(tmp_path / "missing")
    if bench_module._llama_cpp_available():
        with pytest.raises(SlimlmError, match="llama.cpp backend runs GGUF files"):
            bench(tiny_lm_dir, backends=["llama.cpp"], prompt=4, gen=2, batches=[1], runs=1)
    assert bench_module.default_backends(tiny_lm_dir) == ["torch-fp32", "torch-bf16"]


def test_cli_bench_json(tiny_lm_dir: Path) -> None:
    from typer.testing import CliRunner

    from slimlm.cli import app

    res = CliRunner().invoke(app, ["bench", str(tiny_lm_dir), "--prompt", "8", "--gen", "3", "--batch", "1,2",
                                   "--backend", "torch-fp32", "--runs", "1", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [(r["backend"], r["batch"]) for r in rows] == [("torch-fp32", 1), ("torch-fp32", 2)]
