"""Measure models: perplexity and KL divergence (llama.cpp's protocol), and speed (bench)."""

from slimlm.evaluate.bench import BACKENDS, Backend, bench
from slimlm.evaluate.run import evaluate

__all__ = ["BACKENDS", "Backend", "bench", "evaluate"]
