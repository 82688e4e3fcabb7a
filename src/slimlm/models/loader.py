"""THE torch loader: ``load_model`` from a path to (torch model, tokenizer, facts about both).

Dense (``kernels=False``): transformers loads HF dirs, compressed-tensors dirs (decompressed) and GGUF files
(dequantized). ``kernels=True``: a quantized file keeps its integer weights on ``models.quantized``'s low-bit
modules. We add format detection, dtype parsing, the BOS convention eval needs and one-line errors. Tokenizers
load here, configs and skeletons in ``models.skeleton``: no other module calls transformers' Auto classes.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple

import torch
from torch import nn

from slimlm.checkpoint import open_checkpoint, read_config
from slimlm.errors import SlimlmError
from slimlm.models.skeleton import is_gguf_file

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "f16": torch.float16,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class ModelInfo:
    """What eval and bench report about a loaded model."""

    path: str
    format: str  # "hf" | "compressed-tensors" | "gguf"
    dtype: str
    n_params: int
    vocab_size: int  # rows of the output layer (logit width)
    add_bos: bool  # the tokenizer prepends BOS (llama.cpp's add_bos), so eval windows start with it
    bos_token_id: int | None
    tokenizer: str | None  # where the tokenizer came from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer, or None when the model dir holds none
    info: ModelInfo


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise SlimlmError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16") from None


def detect_format(path: str | Path) -> str:
    """"gguf", "compressed-tensors" or "hf": how ``path`` loads; a one-line error when it does not."""
    path = _existing(path)
    if is_gguf_file(path):
        return "gguf"
    if path.is_dir():
        if (path / "config.json").is_file():
            return "compressed-tensors" if _is_compressed_tensors_dir(path) else "hf"
        raise SlimlmError(f"{path}: not a model dir (no config.json)")
    raise SlimlmError(f"{path}: not a model slimlm can load (expected an HF model dir or a .gguf file)")


def load_model(source: str | Path, dtype: str | torch.dtype | None = None, *, kernels: bool = False,
               reference: bool = False, tokenizer: str | Path | Literal[False] | None = None,
               trust_remote_code: bool = False, progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Load ``source`` (HF dir, compressed-tensors dir, GGUF file) as an eval-mode torch model: dense weights in
    ``dtype`` (default fp32), or with ``kernels=True`` a quantized file's Linear layers on low-bit kernel modules
    (``reference=True``: their fp32 references, same integer weights), the rest in ``dtype`` (default bf16, the
    kernels' dtype; fp32 for the reference). ``tokenizer``: None takes the source's own when it has one, a path
    overrides it (e.g. for a bare safetensors export), False loads none. ``trust_remote_code``: off unless asked."""
    path = _existing(source)
    torch_dtype = None if dtype is None else parse_dtype(dtype)
    fmt = detect_format(path)
    with _quiet_transformers():
        if kernels:
            # Lazy: models.quantized needs the runtime kernels, which dense loading never imports.
            from slimlm.models.quantized import load_quantized

            model = load_quantized(path, reference=reference, progress=progress, dtype=torch_dtype)
        else:
            torch_dtype = torch_dtype or torch.float32
            model = _load_dense(path, fmt, torch_dtype, trust_remote_code)
        if tokenizer is False:
            tok, tok_source = None, None
        elif tokenizer is None:
            tok, tok_source = _own_tokenizer(path, fmt), str(path)
        else:
            tok, tok_source = load_tokenizer(tokenizer), str(tokenizer)
    model.eval()
    add_bos, bos_id = tokenizer_adds_bos(tok)
    info = ModelInfo(path=str(path), format=fmt, dtype=str(torch_dtype or model.dtype).removeprefix("torch."),
                     n_params=sum(p.numel() for p in model.parameters()), vocab_size=_logit_width(model),
                     add_bos=add_bos, bos_token_id=bos_id, tokenizer=tok_source if tok is not None else None)
    return LoadedModel(model, tok, info)


def load_tokenizer(source: str | Path) -> Any:
    """A tokenizer from an HF dir or a GGUF file."""
    from transformers import AutoTokenizer

    path = _existing(source)
    with _quiet_transformers():
        try:
            if path.is_file():
                return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise SlimlmError(f"{path}: no usable tokenizer ({_first_line(exc)})") from None


def tokenizer_adds_bos(tokenizer: Any) -> tuple[bool, int | None]:
    """(adds BOS, BOS id): whether encoding with special tokens puts BOS first, as llama.cpp's add_bos."""
    bos = None if tokenizer is None else tokenizer.bos_token_id
    if bos is None:
        return False, None
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    return bool(len(special) > len(plain) and special[0] == bos and plain[:1] != [bos]), int(bos)


# ---- dense loading ----------------------------------------------------------------------------------

def _is_compressed_tensors_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False  # refused with the reason when the dir is opened
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _load_dense(path: Path, fmt: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model of a GGUF file (dequantized), an HF dir or a compressed-tensors dir (decompressed)."""
    from transformers import AutoModelForCausalLM

    if fmt == "gguf":
        # Not transformers' GGUF loader: it gets several families wrong (see models.from_gguf)
        return load_gguf_dense(path, dtype)
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickled:
            raise SlimlmError(f"{path} holds only pickle weights ({pickled[0]}); slimlm loads safetensors only")
        raise SlimlmError(f"{path} has a config.json but no .safetensors weights")
    ckpt = open_checkpoint(path)
    ckpt.check_complete()
    ckpt.validate()  # validated once (types, bounds, heads, against the tensors) before transformers allocates
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if fmt == "compressed-tensors":
        # Decompress into dense torch weights: eval must see exactly the values the file stores.
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SlimlmError(f"{path}: transformers cannot load this model ({_first_line(exc)})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values: evaluating that would measure noise
        raise SlimlmError(f"{path}: the weights lack {len(missing)} of the model's tensors, e.g. {missing[0]}")
    if fmt == "compressed-tensors":
        from slimlm.writers.compressed_tensors import attach_activation_quants, stored_activation_args

        qcfg = read_config(path / "config.json").get("quantization_config") or {}
        scales = {t.name[: -len(".input_scale")]: ckpt.load_torch(t).float()
                  for t in ckpt.tensors if t.name.endswith(".input_scale")}
        attach_activation_quants(model, stored_activation_args(model, qcfg, scales))
    return model


def _own_tokenizer(path: Path, fmt: str) -> Any:
    """The source's own tokenizer, or None when it holds none (eval then asks for --tokenizer)."""
    if fmt != "gguf":
        return load_tokenizer(path) if any((path / name).is_file() for name in _TOKENIZER_FILES) else None
    try:
        return load_tokenizer(path)
    except (SlimlmError, KeyError, TypeError):
        # transformers rebuilds GGUF tokenizers for common types only; the weights still load (bench needs none)
        return None


def _logit_width(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(getattr(head, "out_features", None) or model.config.vocab_size)


# ---- helpers ----------------------------------------------------------------------------------------

def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SlimlmError(f"{p} does not exist")
    if p.is_file() and p.suffix.lower() in _PICKLE_SUFFIXES:
        raise SlimlmError(f"{p}: pickle files are never loaded (they can run code); convert to safetensors")
    return p


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info logs and tqdm bars while loading (our CLI shows its own progress); the GGUF
    loader's bar ignores the progress-bar switch, so its module's ``tqdm`` is swapped too."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils = None
    with contextlib.suppress(ImportError):
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    if original_tqdm is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        with warnings.catch_warnings():
            # e.g. "you passed quantization_config ... the model's will be used": expected for decompression
            warnings.filterwarnings("ignore", message=".*quantization_config.*")
            yield
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        hf_logging.set_verbosity(level)
        if bars:  # as it was: a nested load must not turn bars back on inside an outer quiet load
            hf_logging.enable_progress_bar()


def load_gguf_dense(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """transformers' model of a GGUF's architecture with its tensors dequantized into ``dtype``."""
    from slimlm.models.from_gguf import apply_rope_factors, hf_state_dict, open_gguf_model
    from slimlm.models.skeleton import empty_model

    gm = open_gguf_model(path)
    model = empty_model(gm.hf_config(), dtype)
    model.load_state_dict(hf_state_dict(gm, model, dtype), strict=False, assign=True)
    if gm.config["tie_word_embeddings"]:
        model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise SlimlmError(f"{gm.path}: the GGUF has no tensor for {len(left)} parameters, e.g. {left[0]}")
    apply_rope_factors(model, gm.rope_factors())
    return model.eval()
