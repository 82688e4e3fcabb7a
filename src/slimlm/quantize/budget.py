"""Budget mixes: a GGML type per tensor chosen to minimise the measured output error within an exact byte budget
(``slimlm quantize --target-bpw 4.25`` / ``--target-size`` / ``--fit 8GiB --context 8192``).

llama.cpp's mixes (Q4_K_M, ...) give every model the same per-tensor rules. Here each tensor's cost of every type
llama.cpp runs is measured instead:

1. *Error*: the importance-weighted squared error of the tensor's own rows quantized to each candidate type with
   the imatrix, ``E(t, q) = sum_rows sum_j p_j (w_ij - q(w)_ij)^2`` (the energy of the output perturbation
   ``E||dW x||^2`` under a diagonal importance), on a sample of rows. The pricing weight ``p_j`` is the imatrix
   capped at ``PRICE_CAP`` times the tensor's median channel (the quantizers still get the whole imatrix): where
   a few "massive activation" channels hold most of the importance, the uncapped sum is the error of those few
   columns alone and ranks types against their measured KLD (seeded-noise SmolLM2, blk.11.ffn_down, 88% of its
   importance in one channel: Q2_K priced at 1/47 of IQ3_S, measured 2.5x its KLD; BENCHMARKS.md).
2. *Scale*: how much of that error reaches the logits depends on where the tensor sits. For each group (each
   tensor with ``per_layer``, the default; else a tensor kind such as ``attn_v``, faster but blind to the
   few layers whose ffn_down carries massive activations) the group is moved to a probe type in a torch copy of
   the model and the KL divergence against the unquantized model is measured on a few calibration windows:
   ``alpha_g = KLD_g / sum_{t in g} E(t, probe)``; the cost of a choice is ``alpha_g * E(t, q)``.
3. *Allocation*: multiple-choice knapsack by marginal cost per byte on each tensor's lower convex hull (start
   everything at its cheapest type, repeatedly take the upgrade that removes most cost per added byte while it
   fits), which is optimal for the convex relaxation and within one upgrade of the exact optimum.
4. *Verification*: a tensor whose top input channel holds over ``CONCENTRATED`` of its importance (a massive
   activation) is priced badly by any diagonal weight for some types (Q4_0, Q5_0, Q8_0 lose that column in ways
   its share of the error does not rank). Its chosen type is measured directly (the tensor alone at that type,
   KLD on the same windows), the price replaced by the measurement, and the allocation rerun, until every such
   tensor's choice is measured or ``VERIFY_ROUNDS`` pass. An underpriced type is exactly one the allocation
   picks, so this finds the errors that matter.

Candidates are the types whose block divides the tensor's row length (a 576-wide row takes only 32-wide types,
exactly llama.cpp's fallback rule); tensors llama.cpp never quantizes keep their type.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from slimlm.errors import SlimlmError
from slimlm.formats import gguf_mix

log = logging.getLogger(__name__)

PROBE_BPW = 3.5  # the bits per weight of the type a group is moved to when its scale is measured
PRICE_CAP = 10.0  # a channel weighs at most this many median channels in the pricing error (module docstring)
CONCENTRATED = 0.5  # top channel's share of a tensor's importance above which its choices are verified
VERIFY_ROUNDS = 4

# The mix name written as general.file_type for a budget file: the one its most common quantized type heads.
_FTYPE_OF_TYPE = {T.Q3_K: "Q3_K_M", T.Q4_K: "Q4_K_M", T.Q5_K: "Q5_K_M", T.IQ2_S: "IQ2_M", T.IQ3_S: "IQ3_S"}


@dataclass(frozen=True)
class Budget:
    """What the user asked for: exactly one of bits per weight (tensor bytes x 8 / parameters, llama.cpp's BPW),
    tensor-data bytes, or a memory size that the weights, a KV cache of ``context`` tokens x ``batch`` sequences
    and the runtime's overhead must fit together (as `slimlm fit` counts them)."""

    target_bpw: float | None = None
    target_bytes: int | None = None
    fit_memory: int | None = None
    context: int = 4096
    batch: int = 1
    cache_type: str = "f16"

    def __post_init__(self) -> None:
        given = [v for v in (self.target_bpw, self.target_bytes, self.fit_memory) if v is not None]
        if len(given) != 1:
            raise SlimlmError("give exactly one budget: --target-bpw, --target-size or --fit")
        if given[0] <= 0:
            raise SlimlmError("the budget must be positive")

    def describe(self) -> str:
        if self.target_bpw is not None:
            return f"{self.target_bpw:g} bits/weight"
        if self.target_bytes is not None:
            return f"{self.target_bytes:,} bytes of tensor data"
        from slimlm.inspect.fit import format_bytes

        return (f"fits {format_bytes(self.fit_memory)} at context {self.context}"
                + (f" x batch {self.batch}" if self.batch != 1 else "")
                + (f", {self.cache_type} KV cache" if self.cache_type != "f16" else ""))


@dataclass
class Option:
    qtype: T
    bytes: int
    cost: float


@dataclass
class TensorOptions:
    """A quantizable tensor's candidate types, each with its bytes and its measured cost (expected KLD added)."""

    name: str
    options: list[Option]


@dataclass
class Sensitivity:
    """Measured costs per tensor and type, plus what was measured to get them (kept in the result for reports)."""

    tensors: list[TensorOptions]
    group_kld: dict[str, float] = field(default_factory=dict)
    windows: int = 0
    #: {tensor: {type: KLD with that tensor alone at that type}}: the verification's direct measurements
    measured: dict[str, dict[T, float]] = field(default_factory=dict)

    def options(self, types: set[T]) -> list[TensorOptions]:
        """Every tensor's options among ``types``, a direct measurement replacing the price where there is one."""
        return [TensorOptions(t.name, [Option(o.qtype, o.bytes, self.measured.get(t.name, {}).get(o.qtype, o.cost))
                                       for o in t.options if o.qtype in types]) for t in self.tensors]


def group_of(name: str, per_layer: bool) -> str:
    """'blk.3.attn_v.weight' -> 'attn_v.weight' (or the whole name per layer); non-block tensors are their own."""
    return name if per_layer else re.sub(r"^blk\.\d+\.", "", name)


def budget_tensor_bytes(budget: Budget, n_params: int, fixed_bytes: int, model: Path | str | None = None) -> int:
    """The tensor-data bytes the quantizable tensors may use together (after ``fixed_bytes`` of kept tensors)."""
    if budget.target_bpw is not None:
        total = int(math.floor(budget.target_bpw * n_params / 8))
    elif budget.target_bytes is not None:
        total = int(budget.target_bytes)
    else:
        from slimlm.inspect.fit import load_model_facts, weights_allowance

        total = weights_allowance(load_model_facts(model).spec, budget.fit_memory, budget.context, budget.batch,
                                  budget.cache_type)
    return total - fixed_bytes


def allocate(tensors: Sequence[TensorOptions], budget_bytes: int) -> dict[str, T]:
    """The type per tensor with the least total cost within ``budget_bytes`` (marginal cost per byte on each
    tensor's lower convex hull; then any remaining upgrade that still fits)."""
    hulls = {t.name: _lower_hull(t.options) for t in tensors}
    chosen = {name: 0 for name in hulls}
    used = sum(h[0].bytes for h in hulls.values())
    if used > budget_bytes:
        raise SlimlmError(f"the budget leaves {max(budget_bytes, 0):,} bytes for the quantized tensors, but even "
                          f"the smallest type for each needs {used:,}")
    import heapq

    def push(heap: list, name: str) -> None:
        i, hull = chosen[name], hulls[name]
        if i + 1 < len(hull):
            gain = hull[i].cost - hull[i + 1].cost
            extra = hull[i + 1].bytes - hull[i].bytes
            heapq.heappush(heap, (-gain / max(extra, 1), name, i))

    heap: list = []
    for name in hulls:
        push(heap, name)
    skipped: list[str] = []
    while heap:
        _, name, i = heapq.heappop(heap)
        if chosen[name] != i:
            continue
        hull = hulls[name]
        extra = hull[i + 1].bytes - hull[i].bytes
        if used + extra > budget_bytes:
            skipped.append(name)  # this step does not fit; smaller steps of other tensors still may
            continue
        chosen[name] = i + 1
        used += extra
        push(heap, name)
    plan = {name: hulls[name][i].qtype for name, i in chosen.items()}
    # Off the hull: the best single change per tensor that still fits (spends what the hull steps left over).
    by_name = {t.name: t for t in tensors}
    while True:
        best = None
        for name in by_name:
            cur = next(o for o in by_name[name].options if o.qtype == plan[name])
            for o in by_name[name].options:
                if o.cost < cur.cost and used - cur.bytes + o.bytes <= budget_bytes:
                    gain = cur.cost - o.cost
                    if best is None or gain > best[0]:
                        best = (gain, name, o, cur)
        if best is None:
            return plan
        _, name, o, cur = best
        plan[name] = o.qtype
        used += o.bytes - cur.bytes


def _lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower-left convex hull of (bytes, cost): the ones a marginal-rate allocation ever picks."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.cost)):
        if pts and o.cost >= pts[-1].cost:
            continue  # more bytes, no less cost: never worth it
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # drop b if it lies on or above the segment a -> o
            if (b.cost - a.cost) * (o.bytes - a.bytes) >= (o.cost - a.cost) * (b.bytes - a.bytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def weighted_error(w: np.ndarray, qtype: T, importance: np.ndarray | None, rows: int,
                   gram: np.ndarray | None = None) -> float:
    """sum p_j (w - q(w))^2 over the tensor (p: :func:`pricing_weights`; ``importance`` still guides the
    rounding), estimated from ``rows`` evenly spaced rows (scaled to all); with ``gram`` (the input's mean x xᵀ)
    the output error itself, sum_rows Δ H Δᵀ, cross-channel terms included."""
    from slimlm.formats import ggml

    if qtype == T.F16:
        deq = w.astype(np.float16).astype(np.float32)
        sub, scale = w, 1.0
    else:
        idx = np.unique(np.linspace(0, w.shape[0] - 1, min(rows, w.shape[0])).round().astype(np.int64))
        sub = np.ascontiguousarray(w[idx])
        scale = w.shape[0] / len(idx)
        deq = ggml.dequantize(ggml.quantize(sub, qtype, importance, threads=1), qtype, sub.shape)
    delta = sub.astype(np.float64) - deq
    if gram is not None:
        return float(((delta @ gram.astype(np.float64)) * delta).sum() * scale)
    return float((delta ** 2 * (1.0 if importance is None else pricing_weights(importance))).sum() * scale)


def pricing_weights(importance: np.ndarray) -> np.ndarray:
    """The imatrix with every channel capped at PRICE_CAP x the median channel (float64)."""
    imp = importance.astype(np.float64)
    return np.minimum(imp, PRICE_CAP * float(np.median(imp)))


def dequantized(w: np.ndarray, qtype: T, importance: np.ndarray | None) -> np.ndarray:
    """The tensor as llama.cpp will see it after quantizing to ``qtype`` with ``importance``."""
    from slimlm.formats import ggml

    if qtype == T.F16:
        return w.astype(np.float16).astype(np.float32)
    return ggml.dequantize(ggml.quantize(w, qtype, importance), qtype, w.shape)


def _probe(types: Sequence[T]) -> T:
    """The candidate nearest PROBE_BPW (the lower one on a tie): where a group's scale is measured."""
    bpw = gguf_mix.type_bpw
    return min((q for q in types if q != T.F16), key=lambda q: (abs(bpw(q) - PROBE_BPW), bpw(q)))


class WindowKld:
    """KL divergence of ``model``'s next-token distributions from what they were at construction, on ``windows``
    calibration windows of ``ctx`` tokens (the second half of each scored, as llama-perplexity does): the probe the
    budget's scales are measured with, and what bench_budget_cost.py checks them against."""

    def __init__(self, model, tokenizer, calib: Path, windows: int, ctx: int = 512,
                 grams_of: dict[str, str] | None = None) -> None:
        import torch

        from slimlm.algorithms.stats import StatsCollector, Wanted
        from slimlm.data.calibration import llama_windows, read_text_file

        self.model, self.half = model, ctx // 2
        self.ids = torch.from_numpy(llama_windows(tokenizer, read_text_file(calib), ctx, windows))
        modules = dict(model.named_modules())
        linears = {m: modules[m] for m in (grams_of or {})}
        with StatsCollector(linears, wanted=Wanted(gram_dtype=torch.float32, abs_stats=False)) as col:
            self.ref = self._logprobs().to(torch.float16)
        #: {name: mean x xᵀ of that Linear's input over the windows} for ``grams_of`` {module name: name}
        self.grams = {name: col.stats[m].hessian.numpy() for m, name in (grams_of or {}).items()}

    def _logprobs(self):
        import torch

        with torch.inference_mode():
            out = [torch.log_softmax(self.model(w[None], use_cache=False).logits[0, self.half:-1].float(), -1)
                   for w in self.ids]
        return torch.stack(out)

    def __call__(self) -> float:
        lp, r = self._logprobs(), self.ref.float()
        return float((r.exp() * (r - lp)).sum(-1).mean())


class _Prober:
    """The float32 torch model, its calibration-window KLD and its weights by GGUF name: moves one tensor (or a
    group) to a type, measures, restores."""

    def __init__(self, model_path: Path, calib: Path, windows: int, ctx: int = 512,
                 grams_of: Callable[[object], dict[str, str]] | None = None) -> None:
        from slimlm.models import load_model

        model, tokenizer, _ = load_model(model_path)
        if tokenizer is None:
            raise SlimlmError(f"{model_path} has no usable tokenizer for the calibration text")
        self.model = model.float().eval()
        self.weights = _weights_by_gguf_name(self.model)
        self.kld = WindowKld(self.model, tokenizer, calib, windows, ctx, grams_of(self.model) if grams_of else None)

    def kld_at(self, moves: dict[str, np.ndarray]) -> float:
        """KLD with each named tensor replaced by the given values, the others as they are."""
        import torch

        originals = []
        with torch.no_grad():
            for name, values in moves.items():
                p = self.weights[name]
                originals.append((p, p.detach().clone()))
                p.copy_(torch.from_numpy(values))
        try:
            return max(self.kld(), 0.0)
        finally:
            with torch.no_grad():
                for p, orig in originals:
                    p.copy_(orig)


def _grams_for(tensors: Sequence[gguf_mix.PlanTensor]) -> Callable[[object], dict[str, str]]:
    """{Linear module name: GGUF name} of a model's Linears among ``tensors``: whose input covariance to gather."""
    def grams_of(model) -> dict[str, str]:
        from slimlm.quantize.imatrix import linear_gguf_names

        wanted = {t.name for t in tensors}
        return {m: g + ".weight" for m, g in linear_gguf_names(model).items() if g + ".weight" in wanted}

    return grams_of


def measure(model_path: Path, calib: Path, tensors: Sequence[gguf_mix.PlanTensor],
            importance_of: Callable[[str], np.ndarray | None], *, windows: int = 4, ctx: int = 512, rows: int = 128,
            per_layer: bool = True, types: Sequence[T] = gguf_mix.BUDGET_CANDIDATES,
            progress: Callable[[int, int, str], None] | None = None, covariance: bool = False,
            prober: _Prober | None = None) -> Sensitivity:
    """Each tensor's cost per candidate type: its weighted error scaled by its group's measured KLD per unit of
    error (module docstring). The torch model is ``model_path`` in float32; ``tensors`` are the quantizable ones
    under their GGUF names (rows as llama.cpp stores them; the Q/K rope permutation moves whole rows, which
    quantize independently, so the HF weight gives the same error). ``covariance``: a Linear's error is its output
    error under the calibration windows' input covariance, not the imatrix diagonal (off by default: on seeded-noise
    SmolLM2 it misprices ffn_down more, not less; BENCHMARKS.md). ``prober``: the loaded model to measure on
    (plan_budget shares it with the verification), built here when not given."""
    prober = prober or _Prober(model_path, calib, windows, ctx, _grams_for(tensors) if covariance else None)
    weights, kld = prober.weights, prober.kld
    missing = [t.name for t in tensors if t.name not in weights]
    if missing:
        raise SlimlmError(f"budget mixes cannot measure {missing[0]} (and {len(missing) - 1} more): only dense "
                          "decoder models whose matrices are torch Linear/Embedding weights are supported")

    groups: dict[str, list[gguf_mix.PlanTensor]] = {}
    for t in tensors:
        groups.setdefault(group_of(t.name, per_layer), []).append(t)
    cands = {t.name: gguf_mix.budget_candidates_for(t, types, importance_of(t.name) is not None) for t in tensors}
    errors: dict[str, dict[T, float]] = {}
    group_kld: dict[str, float] = {}
    alpha: dict[str, float] = {}
    done, total = 0, len(tensors) + len(groups)
    for g, members in groups.items():
        probe_err = 0.0
        moves = {}
        for t in members:
            w = weights[t.name].detach().float().numpy()
            imp = importance_of(t.name)
            gram = kld.grams.pop(t.name, None)
            errors[t.name] = {q: weighted_error(w, q, imp, rows, gram) for q in cands[t.name]}
            probe = _probe(cands[t.name])
            probe_err += errors[t.name][probe]
            moves[t.name] = dequantized(w, probe, imp)
            done += 1
            if progress:
                progress(done, total, t.name)
        group_kld[g] = prober.kld_at(moves)
        alpha[g] = group_kld[g] / probe_err if probe_err > 0 else 0.0
        done += 1
        if progress:
            progress(done, total, f"{g}: KLD {group_kld[g]:.4g}")
        log.info("budget: %s moved to its probe type: KLD %.5f", g, group_kld[g])
    out = []
    for t in tensors:
        a = alpha[group_of(t.name, per_layer)]
        out.append(TensorOptions(t.name, [Option(q, gguf_mix.tensor_bytes(t, q), a * e)
                                          for q, e in errors[t.name].items()]))
    return Sensitivity(out, group_kld, len(kld.ids))


def _weights_by_gguf_name(model) -> dict:
    """GGUF tensor name -> the torch parameter holding it (decoder Linears, the embedding, an untied lm_head)."""
    from slimlm.quantize.imatrix import linear_gguf_names

    modules = dict(model.named_modules())
    out = {g + ".weight": modules[m].weight for m, g in linear_gguf_names(model).items()}
    emb = model.get_input_embeddings()
    out["token_embd.weight"] = emb.weight
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        out["output.weight"] = head.weight
    return out


def file_type_name(plan: Mapping[str, T], sizes: Mapping[str, int]) -> str:
    """The llama.cpp mix name for general.file_type: the one headed by the type holding most of the weights."""
    by_type: dict[T, int] = {}
    for name, q in plan.items():
        if q not in (T.F32,):
            by_type[q] = by_type.get(q, 0) + sizes.get(name, 0)
    if not by_type:
        return "F32"
    top = max(by_type, key=by_type.get)
    name = _FTYPE_OF_TYPE.get(top, top.name)
    return name if name in gguf_mix.FTYPE_DEFAULT else "F16"


def plan_budget(source, infos: Sequence[gguf_mix.PlanTensor], budget: Budget, calib: Path,
                importance_of: Callable[[str], np.ndarray | None], *,
                windows: int = 4, per_layer: bool = True, types: Sequence[T] = gguf_mix.BUDGET_CANDIDATES,
                progress: Callable[[int, int, str], None] | None = None, sensitivity: Sensitivity | None = None,
                covariance: bool = False) -> tuple[dict[str, T], Sensitivity, int]:
    """The budget mix for a ``quantize.sources.ModelSource``: (type per tensor, what was measured, the tensor-data
    bytes allowed). ``infos`` are the source's tensors as the planner sees them (quantize.gguf.plan_tensors, passed
    in so this module does not import its caller). Tensors llama.cpp never quantizes (norms, 1-D) keep their type
    and count against the budget. ``sensitivity`` reuses an earlier measurement of the same model (one per model
    serves every budget)."""
    kept = {t.name: t.type for t in infos if not gguf_mix.allows_quantization(t)}
    quantizable = [t for t in infos if t.name not in kept]
    fixed = sum(gguf_mix.tensor_bytes(t, t.type) for t in infos if t.name in kept)
    allowed = budget_tensor_bytes(budget, sum(t.n_elements for t in infos), fixed, source.path)
    smallest = gguf_mix.budget_bytes_range(quantizable, types, lambda name: importance_of(name) is not None)[0]
    if smallest > allowed:
        from slimlm.inspect.fit import format_bytes

        raise SlimlmError(f"{budget.describe()} leaves {format_bytes(max(allowed, 0))} for the quantized tensors; "
                          f"the smallest types llama.cpp runs need {format_bytes(smallest)} "
                          f"({smallest * 8 / max(sum(t.n_elements for t in quantizable), 1):.2f} bits/weight)")
    probers: list[_Prober] = []  # the model is loaded once, for the measurement and the verification alike

    def prober() -> _Prober:
        if not probers:
            probers.append(_Prober(source.path, calib, sensitivity.windows if sensitivity else windows, 512,
                                   _grams_for(quantizable) if covariance and sensitivity is None else None))
        return probers[0]

    sens = sensitivity or measure(source.path, calib, quantizable, importance_of, windows=windows,
                                  per_layer=per_layer, types=types, progress=progress, covariance=covariance,
                                  prober=prober())
    plan = verified_allocation(sens, set(types), allowed, prober, importance_of, progress)
    return {**kept, **plan}, sens, allowed + fixed


def concentration(importance: np.ndarray | None) -> float:
    """The top input channel's share of a tensor's importance (0 without one)."""
    if importance is None or np.ndim(importance) != 1 or not np.any(importance > 0):
        return 0.0
    imp = importance.astype(np.float64)
    return float(imp.max() / imp.sum())


def verified_allocation(sens: Sensitivity, types: set[T], allowed: int, prober: Callable[[], _Prober],
                        importance_of: Callable[[str], np.ndarray | None],
                        progress: Callable[[int, int, str], None] | None = None,
                        rounds: int = VERIFY_ROUNDS) -> dict[str, T]:
    """Allocate, then measure the chosen type of every concentrated tensor directly and reallocate (module
    docstring, step 4); the measurements are kept in ``sens.measured`` for the next budget. ``prober()`` gives the
    loaded model, called only when something needs measuring."""
    if getattr(sens, "measured", None) is None:  # a sensitivity saved before verification existed
        sens.measured = {}
    watched = [t.name for t in sens.tensors if concentration(importance_of(t.name)) > CONCENTRATED]
    plan = allocate(sens.options(types), allowed)
    for r in range(rounds):
        todo = [n for n in watched if plan[n] != T.F16 and plan[n] not in sens.measured.get(n, {})]
        if not todo:
            break
        for i, name in enumerate(todo):
            w = prober().weights[name].detach().float().numpy()
            sens.measured.setdefault(name, {})[plan[name]] = prober().kld_at(
                {name: dequantized(w, plan[name], importance_of(name))})
            if progress:
                progress(i + 1, len(todo), f"verifying {name} at {plan[name].name} (round {r + 1})")
        log.info("budget: verified %d concentrated tensors' choices (round %d)", len(todo), r + 1)
        plan = allocate(sens.options(types), allowed)
    return plan
