"""Layer-by-layer streaming quantization with calibration, writing compressed-tensors as layers finish.

For each decoder layer in order: load its weights (only that layer is materialised), run the calibration inputs
through it in float while hooks gather input statistics, let the algorithm pick scales (AWQ, SmoothQuant folding,
GPTQ), quantize, then run the *quantized* layer (with activation fake-quant for W8A8) so the next layer calibrates
on what it will really receive. Memory: one layer + the calibration activations (``spill_dir`` keeps those on disk
between layers). RTN needs no calibration and skips the forward passes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from slimlm.algorithms.mappings import smoothing_pairs
from slimlm.archs import family
from slimlm.algorithms.methods import Method, get_method
from slimlm.algorithms.smoothquant import DEFAULT_STRENGTH
from slimlm.algorithms.stats import StatsCollector
from slimlm.data.calibration import DEFAULT_SEQ_LEN, Calibration, load_calibration
from slimlm.checkpoint import Checkpoint, open_checkpoint, read_config
from slimlm.checkpoint.tensor_data import check_finite
from slimlm.errors import SlimlmError
from slimlm.writers.atomic import check_output
from slimlm.writers.compressed_tensors import ShardWriter, attach_activation_quant, compress_linear, quantization_config
from slimlm.formats.groupint import QuantizedWeight, QuantSpec
from slimlm.models import empty_model, load_config, load_model, load_tokenizer
from slimlm.quantize import distributed
from slimlm.quantize.schemes import QuantConfig, check_method, get_scheme
from slimlm.util.process import peak_rss_mb


def _materialize(module: torch.nn.Module, prefix: str, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    state = {name: ckpt.load_torch(prefix + name).to(dtype) for name, _ in module.named_parameters()}
    module.load_state_dict(state, strict=False, assign=True)


# A routed expert's projection as checkpoints store it (one 2-D Linear per expert; transformers 5 fuses them into
# 3-D parameters in memory, but saves and loads this layout, as llm-compressor writes it).
EXPERT_LINEAR = re.compile(r"^(?P<layer>.*\.layers\.\d+\.)(?P<name>.*\.experts\.\d+\.\w+)\.weight$")


def _decoder(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The decoder stack holding ``.layers`` and its name prefix in the checkpoint."""
    for prefix in ("model", "transformer", "model.decoder"):
        mod = _module_at(model, prefix)
        if mod is not None and isinstance(getattr(mod, "layers", None), torch.nn.ModuleList):
            return mod, prefix + "."
    raise SlimlmError(f"{type(model).__name__}: no decoder with a .layers list found; architecture not supported")


class _Activations:
    """Hidden states per calibration batch; kept in memory or spilled to safetensors files."""

    def __init__(self, spill_dir: Path | None):
        self.spill_dir = spill_dir
        self._mem: dict[int, torch.Tensor] = {}
        self.stage = "entering layer 0"  # where the activations come from, for a NaN/Inf message

    def put(self, i: int, t: torch.Tensor) -> None:
        check_finite(t, f"calibration activations (batch {i}, {self.stage})")
        if self.spill_dir is None:
            self._mem[i] = t
        else:
            save_file({"h": t.contiguous()}, str(self.spill_dir / f"batch-{i}.safetensors"))

    def get(self, i: int) -> torch.Tensor:
        if self.spill_dir is None:
            return self._mem[i]
        return load_file(str(self.spill_dir / f"batch-{i}.safetensors"))["h"]


class _Stop(Exception):
    pass


class _NoWriter:
    """The writer of a rank other than 0: it computes what rank 0 writes, and drops it."""

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def abort(self) -> None:
        pass


@dataclass
class GroupChoice:
    linear: str  # name suffix inside a layer, e.g. mlp.down_proj
    in_features: int
    group_size: int | None
    note: str


@dataclass
class SchemeResult:
    output: str
    scheme: str
    method: str
    format: str
    group_size: int | None
    symmetric: bool
    activations: str
    layers: int
    quantized_linears: int
    ignored: list[str]
    group_choices: list[GroupChoice]
    calibration: str
    calibration_tokens: int
    calibration_warning: str | None
    seconds: float
    peak_rss_mb: float
    output_bytes: int
    layer_reports: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _run_layer(layer, acts: _Activations, kwargs_list: list[dict], n_batches: int,
               store_out: _Activations | None) -> None:
    with torch.no_grad():
        for b in range(n_batches):
            out = layer(acts.get(b), **kwargs_list[b])
            if isinstance(out, tuple):
                out = out[0]
            if store_out is not None:
                store_out.put(b, out)


def quantize_model(model: str | Path, output: str | Path, *, scheme: str | QuantConfig = "w4a16",
                   method: str | None = None, group_size: int | str | None = "default", symmetric: bool | None = None,
                   ignore: list[str] | None = None, calib: str | Path | torch.Tensor | None = None,
                   samples: int | None = None, seq_len: int = DEFAULT_SEQ_LEN, act_dynamic: bool = True,
                   smoothing_strength: float = DEFAULT_STRENGTH, actorder: bool = True, batch_size: int = 4,
                   spill_dir: str | Path | None = None, threads: int | None = None, uniform_groups: bool = True,
                   overwrite: bool = False, progress: Callable[[int, int, str], None] | None = None,
                   say: Callable[[str], None] | None = None, resume: bool = False) -> SchemeResult:
    """Quantize an HF model dir to a compressed-tensors dir in the streaming order of the module docstring;
    ``threads`` sets torch's CPU threads for the run (restored afterwards). ``samples`` None: 16 sequences of
    text, fewer when the model writes its own (see ``load_calibration``); ``say`` gets one-line announcements.
    ``resume``: keep each finished layer in ``OUTPUT.partial/`` (see ``Progress``) and start after the last one a
    killed run of the same request finished; the output is byte-identical to an uninterrupted run's."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        start = time.perf_counter()
        model_dir, out_dir = Path(model), Path(output)
        if not (model_dir / "config.json").is_file():
            raise SlimlmError(f"{model_dir} is not a Hugging Face model dir (no config.json)")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if distributed.current().writes:  # only rank 0 writes OUT: the other ranks would see its claim as a rival
            check_output(out_dir, overwrite, sources=[model_dir])
        cfg = scheme if isinstance(scheme, QuantConfig) else get_scheme(
            scheme, group_size=group_size, symmetric=symmetric, ignore=ignore, act_dynamic=act_dynamic)
        run = _open_run(model_dir, out_dir, cfg, method, smoothing_strength, actorder)
        if run.algo.calibration or (cfg.act_bits is not None and not cfg.act_dynamic):
            run.calibration = _calibration(run, calib, samples, seq_len, say, progress)
        spill_ctx = tempfile.TemporaryDirectory(prefix="slimlm-spill-", dir=spill_dir) if spill_dir else nullcontext()
        writer = ShardWriter(run.out_dir) if run.share.writes else _NoWriter()
        saved = Progress(run, _request(run, calib, samples, seq_len, batch_size, smoothing_strength, uniform_groups))\
            if resume and run.share.world == 1 else None
        try:
            with spill_ctx as spill_path, torch.no_grad():
                acts = _Activations(Path(spill_path) if spill_path else None)
                kwargs_list = _capture_inputs(run, acts, batch_size) if run.calibration is not None else []
                widths = {m.in_features for j, lyr in enumerate(run.layers) for n, m in lyr.named_modules()
                          if isinstance(m, torch.nn.Linear) and not cfg.is_ignored(f"{run.dprefix}layers.{j}.{n}")}
                widths |= {int(shape[1]) for shape in run.experts.values()}
                plan = cfg.plan_group_sizes(widths, uniform=uniform_groups)
                first = saved.restore(acts, len(kwargs_list), say) if saved is not None else 0
                for i in range(first, len(run.layers)):
                    if saved is None:
                        _quantize_layer(run, i, plan, acts, kwargs_list, writer)
                    else:
                        _quantize_layer(run, i, plan, acts, kwargs_list, saved.layer_writer(i))
                        saved.finish_layer(i, acts, len(kwargs_list))
                    if progress is not None:
                        progress(i + 1, len(run.layers), f"layer {i}")
                if saved is not None:
                    saved.replay(writer)
                if run.share.writes:
                    _write_rest(run, writer, overwrite)
        except BaseException:
            writer.abort()
            raise
        distributed.barrier(run.share)
        if saved is not None:
            saved.remove()
        return _result(run, start)
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Run:
    """What the steps of one ``quantize_model`` run share: the scheme and method, the lazy checkpoint, the
    meta-device skeleton, the calibration ids, and what the layers have reported so far."""

    cfg: QuantConfig
    method: str
    algo: Method
    model_dir: Path
    out_dir: Path
    hf_config: Any
    ckpt: Checkpoint
    skeleton: torch.nn.Module
    decoder: torch.nn.Module
    dprefix: str
    store_dtype: torch.dtype  # scales are stored in the model's own dtype
    calibration: Calibration | None
    smoothing_strength: float
    actorder: bool
    group_choices: dict[str, GroupChoice] = field(default_factory=dict)
    spec_groups: dict[tuple, set[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    layer_reports: list[dict] = field(default_factory=list)
    n_quantized: int = 0
    experts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # expert Linear weight -> shape (quantized)
    float_modules: tuple[str, ...] = ()  # routers and gates kept in full precision (the family table's)
    share: distributed.Share = field(default_factory=distributed.current)  # this process's calibration batches

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.decoder.layers

    @property
    def act(self) -> dict | None:
        return {"bits": self.cfg.act_bits, "dynamic": self.cfg.act_dynamic} if self.cfg.act_bits else None


def _open_run(model_dir: Path, out_dir: Path, cfg: QuantConfig, method: str | None, smoothing_strength: float,
              actorder: bool) -> _Run:
    """Check the request before any work (method for this scheme and architecture, float weights)."""
    method = check_method(cfg, method)
    algo = get_method(method)
    hf_config = load_config(model_dir)
    ckpt = open_checkpoint(model_dir)  # tensors read one layer at a time
    if getattr(hf_config, "quantization_config", None):
        if ckpt.fp8_block is None:
            raise SlimlmError(f"{model_dir} is already quantized; start from the float model")
        del hf_config.quantization_config  # DeepSeek's FP8 blocks: the reader hands out the bf16 weights
    # Read before empty_model, which overwrites config.dtype.
    store_dtype = getattr(hf_config, "dtype", None)
    store_dtype = getattr(torch, str(store_dtype).replace("torch.", "")) if store_dtype else torch.float32
    if not ckpt.tensors:
        raise SlimlmError(f"{model_dir} holds no .safetensors weights (an HF model dir is needed)")
    ckpt.check_complete()
    skeleton = empty_model(hf_config, torch.float32).eval()
    decoder, dprefix = _decoder(skeleton)
    model_type = getattr(hf_config, "model_type", "?")
    experts = {t.name: tuple(t.shape) for t in ckpt.weight_tensors if EXPERT_LINEAR.match(t.name)}
    if experts:
        _check_experts(cfg, method, algo, model_type)
    if algo.smoothing:  # fail fast when the method has no mapping for this architecture
        smoothing_pairs(model_type, decoder.layers[0], algo.smoothing)
    spec = family(hf_config.to_dict())
    return _Run(cfg, method, algo, model_dir, out_dir, hf_config, ckpt, skeleton, decoder, dprefix, store_dtype,
                None, smoothing_strength, actorder, experts=experts,
                float_modules=spec.float_modules if spec is not None else ())


def _check_experts(cfg: QuantConfig, method: str, algo: Method, model_type: str) -> None:
    """What a mixture of experts can take: transformers keeps the experts fused (3-D parameters, not Linears), so
    the layer stream cannot run calibration through them, and its compressed-tensors loader fuses only packed
    symmetric experts (no zero points; neither int8 nor full-precision experts load)."""
    if cfg.act_bits:
        raise SlimlmError(f"{model_type}: {cfg.name} is not supported for a mixture of experts (transformers loads "
                          f"neither int8 nor full-precision experts from compressed-tensors); use w4a16 or w8a16")
    if algo.calibration:
        raise SlimlmError(f"{model_type}: --method {method} needs calibration through the fused experts, which the "
                          f"compressed-tensors export of a mixture of experts does not run; use --method rtn")
    if cfg.format == "pack-quantized" and not cfg.symmetric:
        raise SlimlmError(f"{model_type}: {cfg.name} experts must be symmetric (transformers decompresses MoE experts "
                          f"without zero points); pass --sym")


def _calibration(run: _Run, calib, samples: int | None, seq_len: int, say: Callable[[str], None] | None,
                 steps: Callable[[int, int, str], None] | None) -> Calibration:
    try:
        tokenizer = load_tokenizer(run.model_dir)
    except Exception:  # a dir without tokenizer files: only token-id / self-generated calibration works
        tokenizer = None
    vocab = run.hf_config.vocab_size
    calibration = load_calibration(calib, tokenizer=tokenizer, vocab_size=vocab, n_samples=samples, seq_len=seq_len,
                                   model_loader=lambda: load_model(run.model_dir, "fp32", tokenizer=False).model,
                                   say=say, steps=steps)
    if calibration.input_ids.max() >= vocab:
        raise SlimlmError("calibration token ids exceed the model's vocabulary")
    return calibration


def _capture_inputs(run: _Run, acts: _Activations, batch_size: int) -> list[dict]:
    """Run the embeddings over the calibration ids and store what the first decoder layer receives: its hidden
    states (in ``acts``) and keyword arguments (returned, one dict per batch)."""
    embed = run.decoder.get_input_embeddings() if hasattr(run.decoder, "get_input_embeddings") else None
    if type(embed) is not torch.nn.Embedding:  # e.g. Gemma's scaled embedding multiplies in the weight's dtype
        embed = None
    for name, mod in run.decoder.named_children():
        if name != "layers" and any(p.is_meta for p in mod.parameters()):
            # The embedding as stored (a 14B's is 3 GB in float32): its rows are exact in float32 once looked up.
            _materialize(mod, f"{run.dprefix}{name}.", run.ckpt, torch.float32 if mod is not embed else
                         run.ckpt.torch_dtype(f"{run.dprefix}{name}.weight"))
    to_f32 = embed.register_forward_hook(lambda _m, _a, out: out.float()) if embed is not None else None
    captured: list[tuple] = []

    def grab(_mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = run.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    ids = run.calibration.input_ids
    for b in run.share.batches(-(-ids.shape[0] // batch_size)):
        b0 = b * batch_size
        with suppress(_Stop):
            run.decoder(input_ids=ids[b0:b0 + batch_size], use_cache=False)
    handle.remove()
    if embed is not None:
        to_f32.remove()
        embed.to("meta")  # the decoder layers never look tokens up again
    kwargs_list = []
    for b, (args, kwargs) in enumerate(captured):
        kwargs = dict(kwargs)
        acts.put(b, args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append(kwargs)
    captured.clear()  # the store (memory or disk) now owns the hidden states
    return kwargs_list


def _quantize_layer(run: _Run, i: int, plan: dict, acts: _Activations, kwargs_list: list[dict],
                    writer: ShardWriter) -> None:
    """Layer ``i``: materialise, gather statistics, smooth and round, write, then run the quantized layer so the
    next one calibrates on what it will really receive; the layer goes back to the meta device."""
    layer, prefix, cfg = run.layers[i], f"{run.dprefix}layers.{i}.", run.cfg
    if run.experts or run.float_modules:
        _materialize_stored(layer, prefix, run.ckpt)
    else:
        _materialize(layer, prefix, run.ckpt, torch.float32)
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    floats = [n for n in run.float_modules if f"{prefix}{n}.weight" in run.ckpt]
    quant_names = [n for n in linears if not cfg.is_ignored(prefix + n) and n not in floats]
    run.ignored += [prefix + n for n in linears if n not in quant_names] + [prefix + n for n in floats]
    specs = {}
    for n in quant_names:
        gs, why = plan[linears[n].in_features]
        specs[n] = QuantSpec(cfg.weight_bits, gs, cfg.symmetric)
        run.group_choices.setdefault(n, GroupChoice(n, linears[n].in_features, gs, why))
    t0 = time.perf_counter()
    report: dict = {"layer": i}
    pairs = []
    if run.algo.smoothing:
        model_type = getattr(run.hf_config, "model_type", "?")
        pairs = [p for p in smoothing_pairs(model_type, layer, run.algo.smoothing)
                 if all(n in specs for n in p.linears)]
    stats = None
    if run.calibration is not None:
        with StatsCollector({n: linears[n] for n in quant_names}, need_gram=run.algo.gram,
                            gram_blocks=run.algo.gram_blocks(pairs, linears, specs)) as col:
            _run_layer(layer, acts, kwargs_list, len(kwargs_list), None)
        stats = col.stats
        distributed.reduce_stats(stats, run.share)
    report["stats_s"] = round(time.perf_counter() - t0, 3)
    clips = None
    if run.algo.smoothing:
        clips, rep = run.algo.smooth(layer, stats, pairs, specs, run.smoothing_strength)
        report.update(rep)
    qws = run.algo.round(linears, quant_names, stats, specs, run.actorder, clips)
    report["algorithm_s"] = round(time.perf_counter() - t0 - report["stats_s"], 3)
    run_next = run.calibration is not None and i + 1 < len(run.layers)
    tensors, hooks = _layer_tensors(run, layer, prefix, linears, quant_names, qws, stats, run_next)
    writer.add(tensors)
    del tensors, qws
    _write_experts(run, prefix, plan, writer)
    if run_next:
        t1 = time.perf_counter()
        acts.stage = f"leaving layer {i}"
        _run_layer(layer, acts, kwargs_list, len(kwargs_list), acts)
        report["forward_s"] = round(time.perf_counter() - t1, 3)
    for h in hooks:
        h.remove()
    layer.to("meta")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    run.layer_reports.append(report)


def _layer_tensors(run: _Run, layer: torch.nn.Module, prefix: str, linears: dict[str, torch.nn.Linear],
                   quant_names: list[str], qws: dict[str, QuantizedWeight], stats, run_next: bool
                   ) -> tuple[dict[str, torch.Tensor], list]:
    """The layer's tensors as stored (quantized Linears compressed, the rest as the checkpoint has them). With
    ``run_next`` the Linears now hold exactly what was stored, with activation quantization hooked on for W8A8."""
    cfg, act = run.cfg, run.act
    tensors: dict[str, torch.Tensor] = {}
    hooks = []
    for n in quant_names:
        qw = qws[n]
        in_scale = None
        if act is not None and not cfg.act_dynamic:
            in_scale = stats[n].abs_max.max().reshape(1) / ((2 ** cfg.act_bits - 1) / 2)
            in_scale = in_scale.clamp(min=torch.finfo(torch.float32).eps)
        tensors.update(compress_linear(prefix + n, qw, cfg.format, run.store_dtype, in_scale))
        run.spec_groups.setdefault((qw.spec.bits, qw.spec.group_size, qw.spec.symmetric), set()).add(n)
        if run_next:
            # The forward must see exactly what was stored (scales in the stored dtype).
            deq = QuantizedWeight(qw.q, qw.scale.to(run.store_dtype).float(), qw.zero, qw.spec).dequantize()
            linears[n].weight.data = deq
        if run_next and act is not None:
            s = None if in_scale is None else in_scale.to(run.store_dtype).float()
            hooks.append(attach_activation_quant(linears[n], cfg.act_bits, s))
        run.n_quantized += 1
    for pname, p in layer.named_parameters():
        owner = pname.rsplit(".", 1)[0]
        if owner in quant_names and pname.endswith(".weight"):
            continue
        if p.is_meta:  # fused experts: the checkpoint's per-expert tensors are written below
            continue
        tensors[prefix + pname] = p.detach().to(run.ckpt.torch_dtype(prefix + pname))
    for key in [t.name for t in run.ckpt.weight_tensors if t.name.startswith(prefix)]:
        if key in run.experts:  # written one by one (_write_experts)
            continue
        if key not in tensors and not any(key.startswith(prefix + n + ".") for n in quant_names):
            tensors[key] = run.ckpt.load_torch(key)
    return tensors, hooks


def _materialize_stored(module: torch.nn.Module, prefix: str, ckpt: Checkpoint) -> None:
    """As :func:`_materialize`, for the parameters the checkpoint stores under the model's names; a MoE layer's
    fused experts (and Mixtral's renamed router) stay on the meta device: the checkpoint's tensors go out as stored
    or through :func:`_expert_linears`."""
    state = {name: ckpt.load_torch(prefix + name).float() for name, _ in module.named_parameters()
             if prefix + name in ckpt}
    module.load_state_dict(state, strict=False, assign=True)


def _write_experts(run: _Run, prefix: str, plan: dict, writer: ShardWriter) -> None:
    """The layer's routed experts as the checkpoint stores them, one Linear per expert projection (named as in the
    checkpoint, e.g. ``mlp.experts.3.down_proj``), each loaded, rounded and handed to the writer before the next
    loads: a DeepSeek-V3 layer's 768 expert matrices are 45 GB in float32, one is 59 MB. Experts take RTN only
    (``_check_experts``), so nothing else needs them together."""
    cfg = run.cfg
    for key in run.experts:
        m = EXPERT_LINEAR.match(key)
        if m["layer"] != prefix:
            continue
        n = m["name"]
        if cfg.is_ignored(prefix + n):
            run.ignored.append(prefix + n)
            writer.add({key: run.ckpt.load_torch(key)})
            continue
        weight = run.ckpt.load_torch(key).float()
        gs, why = plan[weight.shape[1]]
        spec = QuantSpec(cfg.weight_bits, gs, cfg.symmetric)
        run.group_choices.setdefault(n, GroupChoice(n, weight.shape[1], gs, why))
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
        qw = run.algo.round({n: lin}, [n], None, {n: spec}, run.actorder, None)[n]
        writer.add(compress_linear(prefix + n, qw, cfg.format, run.store_dtype))
        run.spec_groups.setdefault((qw.spec.bits, qw.spec.group_size, qw.spec.symmetric), set()).add(n)
        run.n_quantized += 1


def _request(run: _Run, calib, samples, seq_len, batch_size, strength, uniform) -> dict:
    """What must be equal for a saved run to be continued: the request and the source's tensor table."""
    ids = run.calibration.input_ids if run.calibration is not None else None
    return {"scheme": asdict(run.cfg) if hasattr(run.cfg, "__dataclass_fields__") else str(run.cfg),
            "method": run.method, "samples": samples, "seq_len": seq_len, "batch_size": batch_size,
            "strength": strength, "uniform": uniform, "actorder": run.actorder,
            "calibration": None if ids is None else hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "tensors": hashlib.sha256(json.dumps([[t.name, list(t.shape), t.dtype, t.nbytes]
                                                  for t in run.ckpt.tensors]).encode()).hexdigest()}


class _LayerFile:
    """A writer that keeps each of one layer's ``add`` calls in its own file (``layer-00007.000002.safetensors``),
    so ``groups`` hands the tensors back in the same calls and order (the shard writer flushes between calls)."""

    def __init__(self, folder: Path, layer: int):
        self.folder, self.layer, self.calls = folder, layer, 0
        for stale in self.files(folder, layer):  # a layer a killed run had begun
            stale.unlink()

    @staticmethod
    def files(folder: Path, layer: int) -> list[Path]:
        return sorted(folder.glob(f"layer-{layer:05d}.*.safetensors"))

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        _save_replacing({k: t.detach().contiguous().cpu() for k, t in tensors.items()},
                        self.folder / f"layer-{self.layer:05d}.{self.calls:06d}.safetensors")
        self.calls += 1

    @classmethod
    def groups(cls, folder: Path, layer: int) -> Iterator[dict[str, torch.Tensor]]:
        from safetensors import safe_open

        for path in cls.files(folder, layer):
            with safe_open(str(path), "pt") as f:
                yield {name: f.get_tensor(name) for name in json.loads(f.metadata()["order"])}


class Progress:
    """A resumable run's saved layers, in ``OUTPUT.partial/``: each finished layer's tensors
    (``layer-00007.safetensors``), the calibration activations entering the next layer (``acts.safetensors``),
    and ``state.json`` (the request, the last finished layer, what the layers reported), each replaced by a
    rename so a kill at any moment leaves the last whole state. The output is assembled from the layer files in
    order, as an uninterrupted run hands them to the writer, so both write the same bytes."""

    def __init__(self, run: _Run, request: dict):
        self.run, self.request = run, json.loads(json.dumps(request, default=str))
        self.dir = Path(f"{run.out_dir}.partial")
        self.dir.mkdir(parents=True, exist_ok=True)

    def _state(self) -> dict | None:
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        return state if state.get("request") == self.request else None

    def restore(self, acts: _Activations, n_batches: int, say: Callable[[str], None] | None) -> int:
        """The first layer still to do (0 for a fresh start); the run's records and activations restored."""
        state = self._state()
        if state is None:
            for stale in self.dir.glob("*"):
                stale.unlink()
            return 0
        run = self.run
        run.ignored = state["ignored"]
        run.n_quantized = state["n_quantized"]
        run.layer_reports = state["layer_reports"]
        run.group_choices = {k: GroupChoice(**v) for k, v in state["group_choices"].items()}
        run.spec_groups = {tuple(json.loads(k)): set(v) for k, v in state["spec_groups"].items()}
        if n_batches:
            saved = load_file(str(self.dir / "acts.safetensors"))
            for b in range(n_batches):
                acts.put(b, saved[f"batch-{b}"])
        done = state["layers_done"]
        if say is not None:
            say(f"resuming from {self.dir}: layers 0-{done - 1} were finished by an earlier run")
        return done

    def layer_writer(self, i: int) -> _LayerFile:
        return _LayerFile(self.dir, i)

    def finish_layer(self, i: int, acts: _Activations, n_batches: int) -> None:
        if n_batches and i + 1 < len(self.run.layers):
            _save_replacing({f"batch-{b}": acts.get(b).contiguous() for b in range(n_batches)},
                            self.dir / "acts.safetensors")
        run = self.run
        state = {"request": self.request, "layers_done": i + 1, "ignored": run.ignored, "n_quantized": run.n_quantized,
                 "layer_reports": run.layer_reports,
                 "group_choices": {k: asdict(v) for k, v in run.group_choices.items()},
                 "spec_groups": {json.dumps(list(k)): sorted(v) for k, v in run.spec_groups.items()}}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.dir / "state.json")

    def replay(self, writer: ShardWriter) -> None:
        """Every layer's tensors to the writer, layer by layer (the order and grouping of an uninterrupted run)."""
        for i in range(len(self.run.layers)):
            for group in _LayerFile.groups(self.dir, i):
                writer.add(group)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _save_replacing(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"order": json.dumps(list(tensors))})
    os.replace(tmp, path)


def _write_rest(run: _Run, writer: ShardWriter, overwrite: bool) -> None:
    """Everything outside the decoder layers (embeddings, final norm, lm_head) as stored, then config.json."""
    layer_prefix = f"{run.dprefix}layers."
    rest = [t for t in run.ckpt.weight_tensors if not t.name.startswith(layer_prefix)]
    run.ignored += [t.name.rsplit(".", 1)[0] for t in rest
                    if t.name.endswith(".weight") and isinstance(_module_at(run.skeleton, t.name.rsplit(".", 1)[0]),
                                                                 torch.nn.Linear)]
    if getattr(run.hf_config, "tie_word_embeddings", False) and "lm_head" not in run.ignored:
        run.ignored.append("lm_head")
    for t in rest:  # one at a time: a 7B's embedding and lm_head are 1 GB each
        writer.add({t.name: run.ckpt.load_torch(t)})
    config = read_config(run.model_dir / "config.json")
    groups = {k: sorted(v) for k, v in run.spec_groups.items()}
    config["quantization_config"] = quantization_config(groups, run.cfg.format, sorted(set(run.ignored)), run.act)
    writer.finish(config, run.model_dir, overwrite)


def _result(run: _Run, start: float) -> SchemeResult:
    cfg, calibration = run.cfg, run.calibration
    activations = "16-bit"
    if cfg.act_bits:
        activations = f"int{cfg.act_bits} " + ("dynamic per-token" if cfg.act_dynamic else "static per-tensor")
    size = sum(f.stat().st_size for f in run.out_dir.glob("*.safetensors"))
    return SchemeResult(
        output=str(run.out_dir), scheme=cfg.name, method=run.method, format=cfg.format, group_size=cfg.group_size,
        symmetric=cfg.symmetric, activations=activations, layers=len(run.layers), quantized_linears=run.n_quantized,
        ignored=sorted(set(run.ignored)), group_choices=list(run.group_choices.values()),
        calibration=calibration.source if calibration else "none (rtn needs no calibration)",
        calibration_tokens=calibration.tokens if calibration else 0,
        calibration_warning=calibration.warning if calibration else None,
        seconds=round(time.perf_counter() - start, 3), peak_rss_mb=round(peak_rss_mb(), 1),
        output_bytes=size, layer_reports=run.layer_reports)


def _module_at(model: torch.nn.Module, name: str):
    mod = model
    for part in name.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod
