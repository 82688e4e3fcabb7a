"""Quantized runtime: low-bit Linear modules on real kernels, loaders that swap them in, generation."""

from slimlm.runtime.generate import GenerationResult, SamplingConfig, generate, generate_ids
from slimlm.runtime.linear import DequantLinear, W4A16Linear, W8A8Linear, W8A16Linear
from slimlm.models.quantized import load_quantized
from slimlm.runtime.session import open_model, summarize_kernels
from slimlm.runtime.swap import kernel_report, quantize_, to_reference_
from slimlm.quantize.schemes import QuantConfig, W4A16Config, W8A8Config, W8A16Config

__all__ = ["DequantLinear", "GenerationResult", "QuantConfig", "SamplingConfig", "W4A16Config", "W4A16Linear",
           "W8A8Config", "W8A8Linear", "W8A16Config", "W8A16Linear", "generate", "generate_ids", "kernel_report",
           "load_quantized", "open_model", "quantize_", "summarize_kernels", "to_reference_"]
