"""The Python API; every CLI command is a thin wrapper over one function here.

    import slimlm.api as slim
    report = slim.inspect("path/or/catalog-name")
"""

# --- inspection: lazy checkpoint reading, parameter counts, catalog (inspect) ---
from slimlm.checkpoint import Checkpoint, TensorInfo, open_checkpoint  # noqa: E402,F401
from slimlm.inspect import InspectReport, inspect  # noqa: E402,F401
from slimlm.spec import ModelSpec  # noqa: E402,F401

# --- GGML block codecs: bit-exact llama.cpp blocks for one tensor (formats.ggml) ---
from slimlm.formats.ggml import dequantize as ggml_dequantize, quantize as ggml_quantize  # noqa: E402,F401

# --- GGUF quantization and importance matrices (quantize) ---
from slimlm.quantize.imatrix import Imatrix, make_imatrix as imatrix, read_imatrix, write_imatrix  # noqa: E402,F401
from slimlm.algorithms.methods import GGUF_METHODS  # noqa: E402,F401
from slimlm.quantize.gguf import GGUFResult, quantize_gguf  # noqa: E402,F401
from slimlm.quantize.budget import Budget  # noqa: E402,F401  (quantize_gguf(model, None, out, budget=Budget(...)))

# --- compressed-tensors schemes W4A16/W8A16/W8A8 (RTN, AWQ, GPTQ, SmoothQuant), streaming pipeline ---
from slimlm.quantize.layers import SchemeResult, quantize_model  # noqa: E402,F401
from slimlm.quantize.schemes import (  # noqa: E402,F401
    QuantConfig, W4A16Config, W8A8Config, W8A16Config, check_model as check, get_scheme,
)
from slimlm.writers.compressed_tensors import load_reference_model  # noqa: E402,F401
from slimlm.writers.gguf_equivalent import export_gguf_equivalent  # noqa: E402,F401
from slimlm.writers.hf_dir import write_hf_dir as convert  # noqa: E402,F401

# --- evaluation: model loading, perplexity / KL divergence / top-1, speed (models, evaluate) ---
from slimlm.evaluate import BACKENDS as BENCH_BACKENDS, bench, evaluate  # noqa: E402,F401
from slimlm.models import LoadedModel, ModelInfo, load_model  # noqa: E402,F401

# --- vLLM as an engine, out of process in its own venv (runtime.vllm_engine, evaluate.vllm_bench / vllm_eval) ---
from slimlm.evaluate.vllm_bench import (  # noqa: E402,F401
    Target as VllmTarget, offline_bench as vllm_offline_bench, serve_bench as vllm_serve_bench,
)
from slimlm.evaluate.vllm_eval import evaluate_vllm  # noqa: E402,F401
from slimlm.runtime import vllm_engine  # noqa: E402,F401

# --- quantized runtime: the one quantize_ verb (reference="file": fake-quant), quantized files, generation ---
from slimlm import runtime  # noqa: E402,F401
from slimlm.runtime import (  # noqa: E402,F401
    GenerationResult, SamplingConfig, generate, kernel_report, load_quantized, open_model, quantize_, summarize_kernels,
)

# --- explain / memory / fit, llama.cpp GGUF type plans (inspect.names, inspect.memory, inspect.fit, formats.gguf_mix) ---
from slimlm.formats.gguf_mix import plan_types  # noqa: E402,F401
from slimlm.inspect.fit import fit, parse_memory  # noqa: E402,F401
from slimlm.inspect.memory import estimate_memory, kv_cache  # noqa: E402,F401
from slimlm.inspect.names import explain  # noqa: E402,F401

# --- choosing: measured recommendation, report, demo (recommend, report, demo) ---
from slimlm.demo import run_demo as demo  # noqa: E402,F401
from slimlm.recommend import Recommendation, Variant, recommend  # noqa: E402,F401
from slimlm.report import write_report as report  # noqa: E402,F401

# --- distillation: logits KD / teacher-generated data, pruned students (distill) ---
from slimlm.distill.recipe import distill  # noqa: E402,F401
from slimlm.distill.trainer import TrainConfig  # noqa: E402,F401

# --- zero: GRPO from verifiable rewards alone on TRL, tasks, held-out accuracy (zero) ---
from slimlm.zero.evaluate import evaluate_task as zero_eval, paired_difference  # noqa: E402,F401
from slimlm.zero.prompts import write_prompts as zero_prompts  # noqa: E402,F401
from slimlm.zero.tasks import TASKS as ZERO_TASKS, Task as ZeroTask, get_task as zero_task  # noqa: E402,F401
from slimlm.zero.template import Template as ZeroTemplate  # noqa: E402,F401
from slimlm.zero.train import ZeroConfig, train_zero as zero  # noqa: E402,F401
