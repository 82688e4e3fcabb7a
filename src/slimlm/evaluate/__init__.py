"""Measure models: perplexity and KL divergence (llama.cpp's protocol), and speed (bench)."""

from slimlm.evaluate.run import evaluate

__all__ = ["evaluate"]
