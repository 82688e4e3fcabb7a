"""Write (and read back) checkpoints in compressed-tensors' format, exactly as vLLM and transformers load them.

Per quantized Linear ``name``:
- ``pack-quantized`` (W4A16, W8A16): ``name.weight_packed`` int32 (out, in·bits/32), ``name.weight_scale``
  (out, groups), ``name.weight_shape`` int64 [out, in], and when asymmetric ``name.weight_zero_point`` int32
  packed along the output dim (out/8, groups).
- ``int-quantized`` (W8A8): ``name.weight`` int8 (out, in), ``name.weight_scale`` (out, 1) or (out, groups);
  for static activations ``name.input_scale`` (1,).
``config.json`` gains ``quantization_config`` built with compressed-tensors' own pydantic models. Tensors are
written in shards as layers finish, into a temporary dir that is renamed only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimlm.checkpoint import read_config, read_state_dict
from slimlm.errors import SlimlmError, os_reason
from slimlm.writers.atomic import Claim, publish, temp_dir
from slimlm.formats.groupint import (QuantizedWeight, dequantize, pack_codes, pack_zero_points, unpack_codes,
                                     unpack_zero_points)

MAX_SHARD_BYTES = 2 * 1024**3
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def compress_linear(name: str, qw: QuantizedWeight, fmt: str, scale_dtype: torch.dtype,
                    input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one quantized Linear."""
    out: dict[str, torch.Tensor] = {}
    if fmt == "pack-quantized":
        out[f"{name}.weight_packed"] = pack_codes(qw.q, qw.spec.bits)
        out[f"{name}.weight_shape"] = torch.tensor(list(qw.q.shape), dtype=torch.int64)
        if qw.zero is not None:
            out[f"{name}.weight_zero_point"] = pack_zero_points(qw.zero, qw.spec.bits)
    elif fmt == "int-quantized":
        if qw.spec.bits != 8:
            raise SlimlmError(f"int-quantized export expects 8-bit weights, got {qw.spec.bits}")
        out[f"{name}.weight"] = qw.q.to(torch.int8).contiguous()
        if qw.zero is not None:
            out[f"{name}.weight_zero_point"] = qw.zero.to(torch.int8).contiguous()
    else:
        raise SlimlmError(f"unknown compressed-tensors format {fmt}")
    out[f"{name}.weight_scale"] = qw.scale.to(scale_dtype).contiguous()
    if input_scale is not None:
        out[f"{name}.input_scale"] = input_scale.reshape(1).to(scale_dtype)
    return out


def quantization_config(groups: dict[tuple, list[str]], fmt: str, ignore: list[str], act: dict | None) -> dict:
    """``quantization_config`` for config.json: one config group per ``(bits, group_size, symmetric)`` key of
    ``groups``. One group targets ``Linear`` (minus ``ignore``); several target anchored regexes of their
    Linear name suffixes (e.g. ``mlp.down_proj``), so groups never overlap."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    config_groups = {}
    for i, ((bits, gs, sym), suffixes) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                   strategy="channel" if gs is None else "group", group_size=gs, dynamic=False)
        inputs = None
        if act is not None:
            inputs = QuantizationArgs(num_bits=act["bits"], type="int", symmetric=True,
                                      strategy="token" if act["dynamic"] else "tensor", dynamic=act["dynamic"])
        targets = ["Linear"] if len(groups) == 1 else [f"re:.*{re.escape(s)}$" for s in sorted(suffixes)]
        config_groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=weights,
                                                         input_activations=inputs, format=fmt)
    qc = QuantizationConfig(config_groups=config_groups, format=fmt, quantization_status="compressed",
                            ignore=sorted(ignore), quant_method="compressed-tensors")
    data = qc.model_dump()
    data["version"] = compressed_tensors.__version__
    return data


# safetensors' dtype names (its format spec) for the dtypes a checkpoint holds
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class _StreamedShard:
    """One safetensors file written a tensor at a time. safetensors' writers take every tensor of a file at once
    (a 2 GiB shard held in memory); here each tensor's bytes go to a data file as it comes, and ``close`` writes
    the header (the format's u64 length, JSON with ``data_offsets``, space-padded to 8 bytes) followed by that
    data."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self._data = open(self.data_path, "wb")
        self.header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().cpu()
        if t.dtype not in _ST_DTYPES:
            raise SlimlmError(f"{name}: cannot store dtype {t.dtype} in safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._data.write(memoryview(raw))
        self.header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.nbytes, self.nbytes + len(raw)]}
        self.nbytes += len(raw)

    def close(self) -> None:
        self._data.close()
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(head).to_bytes(8, "little") + head)
            shutil.copyfileobj(data, out, 16 * 1024**2)
        self.data_path.unlink()

    def discard(self) -> None:
        self._data.close()


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (a bigger tensor alone in its shard) in a
    temporary dir, each tensor streamed to disk as it is added: memory holds one tensor, not one shard."""

    def __init__(self, target: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.target = Path(target)
        self.claim = Claim(self.target)  # held until finish or abort: a second run to this dir refuses
        self.tmp = temp_dir(self.target)
        self.max_bytes = max_bytes
        self._shard: _StreamedShard | None = None
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            for name, t in tensors.items():
                nbytes = t.numel() * t.element_size()
                if self._shard is not None and self._shard.nbytes and self._shard.nbytes + nbytes > self.max_bytes:
                    self._flush()
                if self._shard is None:
                    self._shard = _StreamedShard(self.tmp / f"shard-{len(self._shards):05d}.safetensors")
                self._shard.add(name, t)
        except OSError as exc:  # a full disk or a size limit: name the output, keep nothing
            self.abort()
            raise SlimlmError(f"{self.target}: cannot write ({os_reason(exc)}); nothing was written") from None

    def _flush(self) -> None:
        if self._shard is None:
            return
        shard, self._shard = self._shard, None
        try:
            shard.close()
        except OSError as exc:
            self.abort()
            raise SlimlmError(f"{self.target}: cannot write ({os_reason(exc)}); nothing was written") from None
        self._shards.append(list(shard.header))
        self.total_bytes += shard.nbytes

    def finish(self, config: dict, source_dir: Path | None, overwrite: bool) -> Path:
        """Write config.json, shard names/index and tokenizer files, then move into place atomically."""
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i:05d}.safetensors", self.tmp / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if source_dir is not None:
            for aux in AUX_FILES:
                if (Path(source_dir) / aux).is_file():
                    shutil.copy2(Path(source_dir) / aux, self.tmp / aux)
        try:
            publish(self.tmp, self.target, overwrite)
        finally:
            self.abort()
        return self.target

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.discard()
            self._shard = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.claim.release()


def args_for(qcfg: dict, module: str) -> dict | None:
    """The config group whose targets match ``module``, unless ignored; compressed-tensors' priority: an exact
    module name, then a ``re:`` pattern, then the class name ``Linear``."""
    for pattern in qcfg.get("ignore") or []:
        if (pattern.startswith("re:") and re.match(pattern[3:], module)) or pattern == module:
            return None
    groups = list(qcfg.get("config_groups", {}).values())
    for matches in (module.__eq__, lambda t: t.startswith("re:") and re.match(t[3:], module), "Linear".__eq__):
        for group in groups:
            if any(matches(target) for target in group.get("targets", [])):
                return group
    return None


def read_codes(state: dict[str, torch.Tensor], module: str, bits: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A quantized Linear's integer codes [out, in], float32 scales and zero points (None when symmetric)."""
    scale = state[f"{module}.weight_scale"].float()
    if f"{module}.weight_packed" not in state:
        return state[f"{module}.weight"], scale, state.get(f"{module}.weight_zero_point")
    shape = tuple(int(v) for v in state[f"{module}.weight_shape"])
    q = unpack_codes(state[f"{module}.weight_packed"], shape, bits)
    zero = None
    if f"{module}.weight_zero_point" in state:
        zero = unpack_zero_points(state[f"{module}.weight_zero_point"], (shape[0], scale.shape[1]), bits)
    return q, scale, zero


def dequantized_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32
                           ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Our own reading of a compressed-tensors checkpoint (none of its decompression code): float weights and,
    per Linear with quantized activations, its ``input_activations`` args (+ ``input_scale`` when static)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir / "config.json")
    qcfg = config.get("quantization_config")
    if not qcfg or qcfg.get("quant_method") != "compressed-tensors":
        raise SlimlmError(f"{model_dir} is not a compressed-tensors checkpoint")
    raw = read_state_dict(model_dir)
    out: dict[str, torch.Tensor] = {}
    acts: dict[str, dict] = {}
    modules = {k.rsplit(".", 1)[0] for k in raw if k.endswith((".weight_scale",))}
    for key, t in raw.items():
        mod = key.rsplit(".", 1)[0]
        if mod not in modules or key.endswith(".bias"):  # a quantized Linear's bias is stored as is (Qwen2 q/k/v)
            out[key] = t.to(dtype) if t.is_floating_point() else t
    for mod in modules:
        group = args_for(qcfg, mod)
        if group is None:
            raise SlimlmError(f"{mod} has quantized tensors but no config group matches it")
        w = group["weights"]
        gs = w["group_size"] if w["strategy"] == "group" else None
        q, scale, zero = read_codes(raw, mod, int(w["num_bits"]))
        out[f"{mod}.weight"] = dequantize(q, scale, zero, gs).to(dtype)
        if group.get("input_activations"):
            acts[mod] = dict(group["input_activations"])
            if f"{mod}.input_scale" in raw:
                acts[mod]["scale"] = raw[f"{mod}.input_scale"].float()
    return out, acts


def fake_quant_activation(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric int activation quant-dequant, per token (dynamic) or with a static per-tensor ``scale``; as
    compressed-tensors' dynamic path: scale = max|x| / ((2^bits - 1) / 2), round half to even, then clamp."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if scale is None:
        scale = x.abs().amax(dim=-1, keepdim=True) / ((qmax - qmin) / 2)
        scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale.dtype).eps), scale)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def attach_activation_quant(module: torch.nn.Linear, bits: int, scale: torch.Tensor | None = None):
    """Fake-quantize a Linear's input on every forward (W8A8 as the int8 kernels see it)."""

    def pre_hook(_mod, args):
        return (fake_quant_activation(args[0], bits, scale), *args[1:])

    return module.register_forward_pre_hook(pre_hook)


def attach_activation_quants(model: torch.nn.Module, acts: dict[str, dict]) -> None:
    """Fake-quantize the input of every Linear named in ``acts`` (its ``input_activations`` args, plus
    ``scale`` when the file stores a static ``input_scale``)."""
    modules = dict(model.named_modules())
    for name, args in acts.items():
        attach_activation_quant(modules[name], int(args["num_bits"]), args.get("scale"))


def stored_activation_args(model: torch.nn.Module, qcfg: dict, input_scales: dict[str, torch.Tensor]
                           ) -> dict[str, dict]:
    """The activation quantization a checkpoint's config asks for, per Linear of ``model`` (the ``acts`` of
    :func:`attach_activation_quants`): for a model whose weights were decompressed by transformers'
    ``run_compressed=False`` load, which keeps the weights' values but drops it (a W8A8 file scored without it
    would be scored as W8A16)."""
    acts = {}
    for name, module in model.named_modules():
        group = args_for(qcfg, name) if isinstance(module, torch.nn.Linear) else None
        if group and group.get("input_activations"):
            acts[name] = dict(group["input_activations"])
            if name in input_scales:
                acts[name]["scale"] = input_scales[name]
    return acts


def load_reference_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers model holding our own dequantization of the checkpoint (activation quant attached)."""
    from slimlm.models.skeleton import empty_model, load_config

    model_dir = Path(model_dir)
    state, acts = dequantized_state_dict(model_dir, dtype)
    if any(_PER_EXPERT.search(k) for k in state):
        model = _load_fused(model_dir, state, dtype)
        attach_activation_quants(model, acts)
        return model.eval()
    config = load_config(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = empty_model(config, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise SlimlmError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    attach_activation_quants(model, acts)
    return model.eval()


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _load_fused(model_dir: Path, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """A mixture of experts from our dequantized per-expert state: transformers 5 keeps the experts fused (3-D
    parameters) under renamed modules, so the float state goes through its ordinary checkpoint conversion (renames
    and stacking only; no compressed-tensors code) from a temporary float copy of the dir."""
    from transformers import AutoModelForCausalLM

    config = read_config(model_dir / "config.json")
    config.pop("quantization_config", None)
    with tempfile.TemporaryDirectory(prefix="slimlm-ref-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        model, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, output_loading_info=True)
    bad = {k: sorted(v)[:3] for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                                        "mismatched_keys")}
    if bad:
        raise SlimlmError(f"checkpoint does not fit the model: {bad}")
    return model
