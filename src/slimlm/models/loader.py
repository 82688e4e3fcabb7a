"""One entry point, ``load_model``, from a path to (torch model, tokenizer, facts about both).

Loading is delegated to transformers (the field library): ``AutoModelForCausalLM`` for safetensors dirs
and compressed-tensors dirs, its GGUF loader for ``.gguf`` files. What we add: format detection,
dtype parsing, the BOS convention eval needs (does the tokenizer add one?), and one-line errors.
Loaders are tried in reverse registration order, so a later, more specific loader (the quantized
runtime's) wins over the generic ones registered here.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch

from slimlm.errors import SlimlmError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "f16": torch.float16,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class ModelInfo:
    """What eval and bench report about a loaded model."""

    path: str
    format: str  # "hf" | "compressed-tensors" | "gguf" | names added by other loaders
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


# load(path, dtype, trust_remote_code) -> (model, tokenizer or None)
Loader = Callable[[Path, torch.dtype, bool], tuple[torch.nn.Module, Any]]
_LOADERS: list[tuple[str, Callable[[Path], bool], Loader]] = []


def register_loader(name: str, detect: Callable[[Path], bool], load: Loader) -> None:
    """Add a format: ``detect(path)`` says whether it applies; ``load(path, dtype, trust_remote_code)``
    returns (model, tokenizer or None).

    Later registrations are tried first, so a specific format can claim paths a generic one would take.
    """
    _LOADERS.append((name, detect, load))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise SlimlmError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16") from None


def detect_format(path: str | Path) -> str:
    """The name of the loader that would load ``path``; a one-line error when none would."""
    path = _existing(path)
    for name, detect, _ in reversed(_LOADERS):
        if detect(path):
            return name
    raise SlimlmError(_unknown_message(path))


def load_model(path: str | Path, dtype: str | torch.dtype = "fp32", *, tokenizer: str | Path | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load ``path`` (HF dir, compressed-tensors dir, GGUF file, ...) as an eval-mode torch model.

    ``tokenizer`` overrides where the tokenizer comes from (a model dir without one, e.g. a bare
    safetensors export). ``trust_remote_code`` is passed to transformers only when asked for.
    """
    path = _existing(path)
    torch_dtype = parse_dtype(dtype)
    fmt = detect_format(path)
    load = next(loader for name, _, loader in reversed(_LOADERS) if name == fmt)
    with _quiet_transformers():
        model, tok = load(path, torch_dtype, trust_remote_code)
        tok_source = str(path) if tok is not None else None
        if tokenizer is not None:
            tok, tok_source = load_tokenizer(tokenizer), str(tokenizer)
    model.eval()
    add_bos, bos_id = tokenizer_adds_bos(tok)
    info = ModelInfo(
        path=str(path), format=fmt, dtype=str(torch_dtype).removeprefix("torch."),
        n_params=sum(p.numel() for p in model.parameters()),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None
        else int(model.config.vocab_size),
        add_bos=add_bos, bos_token_id=bos_id, tokenizer=tok_source,
    )
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
    if tokenizer is None:
        return False, None
    bos = tokenizer.bos_token_id
    if bos is None:
        return False, None
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    return bool(len(special) > len(plain) and special[0] == bos and plain[:1] != [bos]), int(bos)


# ---- built-in loaders -------------------------------------------------------------------------------

def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _is_compressed_tensors_dir(path: Path) -> bool:
    if not _is_hf_dir(path):
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _load_hf(path: Path, dtype: torch.dtype, trust_remote_code: bool, compressed: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickled:
            raise SlimlmError(f"{path} holds only pickle weights ({pickled[0]}); slimlm loads safetensors only")
        raise SlimlmError(f"{path} has a config.json but no .safetensors weights")
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if compressed:
        # Decompress into dense torch weights: eval must see exactly the values the file stores.
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise SlimlmError(f"{path}: transformers cannot load this model ({_first_line(exc)})") from None
    tok = None
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tok = load_tokenizer(path)
    return model, tok


def _load_compressed_tensors(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
    return _load_hf(path, dtype, trust_remote_code, compressed=True)


def _load_gguf(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise SlimlmError(f"{path}: transformers cannot load this GGUF ({_first_line(exc)})") from None
    # The GGUF loader marks the model "quantized by gguf", but its weights are dequantized dense tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    try:
        tok = load_tokenizer(path)
    except (SlimlmError, KeyError, TypeError):
        # transformers rebuilds tokenizers from GGUF metadata for common types only; the weights still
        # load (bench needs no tokenizer) and eval asks for --tokenizer.
        tok = None
    return model, tok


register_loader("hf", _is_hf_dir, _load_hf)
register_loader("compressed-tensors", _is_compressed_tensors_dir, _load_compressed_tensors)
register_loader("gguf", _is_gguf_file, _load_gguf)


# ---- helpers ----------------------------------------------------------------------------------------

def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SlimlmError(f"{p} does not exist")
    if p.is_file() and p.suffix.lower() in _PICKLE_SUFFIXES:
        raise SlimlmError(f"{p}: pickle files are never loaded (they can run code); convert to safetensors")
    return p


def _unknown_message(path: Path) -> str:
    if path.is_dir():
        return f"{path}: not a model dir (no config.json)"
    return f"{path}: not a model slimlm can load (expected an HF model dir or a .gguf file)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info logs and tqdm bars while loading; our CLI shows its own progress.

    The GGUF loader's bar ignores the progress-bar switch, so its module's ``tqdm`` is swapped too.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils = None
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        pass
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
        hf_logging.enable_progress_bar()
