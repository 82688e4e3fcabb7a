"""Budget mixes (quantize.budget): the allocation, the candidate types, and a tiny model end to end — the file
fits the budget, llama.cpp loads it, and llama.cpp's own quantizer told the same per-tensor types writes the same
tensor bytes."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from slimlm.errors import SlimlmError
from slimlm.formats.gguf_mix import PlanTensor, budget_bytes_range
from slimlm.formats.gguf_mix import budget_candidates_for as candidates_for
from slimlm.quantize.budget import Budget, Option, TensorOptions, allocate, group_of


def _random_options(rng: np.random.Generator, name: str) -> TensorOptions:
    sizes = np.sort(rng.choice(np.arange(10, 200), size=5, replace=False))
    costs = np.sort(rng.random(5) * 10)[::-1]  # more bytes, less cost (not necessarily convex)
    return TensorOptions(name, [Option(T.Q4_0, int(b), float(c)) for b, c in zip(sizes, costs)])


def test_allocate_fits_and_is_near_the_exact_optimum() -> None:
    """Against brute force on small random instances: never over budget; cost within the exact optimum plus the
    largest single step (the greedy's known bound); more budget never costs more."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        tensors = [_random_options(rng, f"t{i}") for i in range(4)]
        for t in tensors:  # distinct types so the plan names the option
            for o, q in zip(t.options, (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)):
                o.qtype = q
        lo = sum(min(o.bytes for o in t.options) for t in tensors)
        hi = sum(max(o.bytes for o in t.options) for t in tensors)
        prev = None
        for budget in np.linspace(lo, hi, 6).astype(int):
            plan = allocate(tensors, int(budget))
            pick = {t.name: next(o for o in t.options if o.qtype == plan[t.name]) for t in tensors}
            used = sum(o.bytes for o in pick.values())
            cost = sum(o.cost for o in pick.values())
            assert used <= budget
            best = min(sum(o.cost for o in combo) for combo in itertools.product(*(t.options for t in tensors))
                       if sum(o.bytes for o in combo) <= budget)
            step = max(max(o.cost for o in t.options) - min(o.cost for o in t.options) for t in tensors)
            assert best - 1e-9 <= cost <= best + step
            if prev is not None:
                assert cost <= prev + 1e-9
            prev = cost


def test_allocate_refuses_a_budget_below_the_smallest_types() -> None:
    t = TensorOptions("a", [Option(T.Q4_0, 100, 1.0), Option(T.Q8_0, 200, 0.1)])
    with pytest.raises(SlimlmError, match="smallest"):
        allocate([t], 99)
    assert allocate([t], 100) == {"a": T.Q4_0} and allocate([t], 200) == {"a": T.Q8_0}


def test_candidates_follow_llama_cpp_row_sizes() -> None:
    """A 576-wide row (SmolLM2) only takes 32-wide blocks, as llama.cpp's fallback would give it."""
    narrow = candidates_for(PlanTensor("blk.0.attn_q.weight", (576, 576)))
    assert narrow and all(q in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.F16) for q in narrow)
    wide = candidates_for(PlanTensor("blk.0.ffn_down.weight", (576, 1536)))
    assert {T.IQ2_XS, T.Q3_K, T.Q4_K, T.IQ4_XS, T.Q6_K} <= set(wide)
    # so the smallest mix of a 576-wide model is near 4.5 bits/weight, not IQ2_XXS's 2.06; norms keep F32
    q_proj, down = PlanTensor("blk.0.attn_q.weight", (576, 576)), PlanTensor("blk.0.ffn_down.weight", (576, 1536))
    small, large = budget_bytes_range([q_proj, PlanTensor("blk.0.attn_norm.weight", (576,))])
    assert small == 576 * 576 // 32 * 18 + 576 * 4 and large == 576 * 576 * 2 + 576 * 4
    assert budget_bytes_range([q_proj, down])[0] == 576 * 576 // 32 * 18 + 576 * 1536 // 256 * 66  # Q4_0 + IQ2_XXS
    assert group_of("blk.12.attn_v.weight", False) == "attn_v.weight"
    assert group_of("blk.12.attn_v.weight", True) == "blk.12.attn_v.weight"


def test_budget_needs_exactly_one_target() -> None:
    with pytest.raises(SlimlmError, match="exactly one"):
        Budget()
    with pytest.raises(SlimlmError, match="exactly one"):
        Budget(target_bpw=4.0, target_bytes=10)
    with pytest.raises(SlimlmError, match="positive"):
        Budget(target_bpw=-1.0)


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory, wikitext_valid: Path) -> tuple[Path, Path]:
    """A tiny Llama with 256-wide rows (so K- and i-quants apply) and a byte tokenizer, and calibration text."""
    from conftest import make_byte_tokenizer, make_tiny_llama

    base = tmp_path_factory.mktemp("budget")
    src = make_byte_tokenizer(make_tiny_llama(base / "m", hidden=256, ffn=512, heads=4, kv_heads=2, vocab=258))
    calib = base / "calib.txt"
    calib.write_text(wikitext_valid.read_text()[:6000])
    return src, calib


def test_budget_file_fits_and_llama_cpp_writes_the_same_bytes(tiny_wide: tuple[Path, Path], tmp_path: Path) -> None:
    import gguf

    from test_gguf_mix_llamacpp import llama_quantize

    from slimlm.quantize.gguf import quantize_gguf
    from slimlm.quantize.imatrix import collect_imatrix, write_imatrix

    src, calib = tiny_wide
    im = tmp_path / "im.gguf"
    write_imatrix(collect_imatrix(src, calib, ctx=512, chunks=4), im)
    out = tmp_path / "budget.gguf"
    r = quantize_gguf(src, None, out, imatrix=im, calib=calib, budget=Budget(target_bpw=4.0), budget_windows=2)
    assert r.bits_per_weight <= 4.0 and r.tensor_bytes * 8 <= 4.0 * r.n_params
    assert r.tensor_bytes * 8 > 3.7 * r.n_params  # the budget is spent, not wasted
    assert r.budget["group_kld"] and all(v >= 0 for v in r.budget["group_kld"].values())
    types = {t.name: T[t.type] for t in r.tensors}
    assert len({q for n, q in types.items() if n.startswith("blk.")} - {T.F32}) >= 2  # a real mix, not one type

    from slimlm.inspect import inspect

    shown = inspect(str(out)).to_dict()["gguf"]  # `slimlm inspect` names the budget and each tensor's type
    assert shown["budget"] == "4 bits/weight"
    assert {q for q in shown["per_tensor_kind"]["ffn_down.weight"]} == {types[f"blk.{i}.ffn_down.weight"].name
                                                                      for i in range(2)}

    f32 = tmp_path / "f32.gguf"
    quantize_gguf(src, "f32", f32)
    theirs = tmp_path / "lcpp.gguf"
    overrides = [(f"^{n.replace('.', '[.]')}$", q) for n, q in types.items() if q != T.F32]
    llama_quantize(f32, theirs, "Q8_0", overrides, imatrix=im)
    ours_t = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(out).tensors}
    theirs_t = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(theirs).tensors}
    assert ours_t == theirs_t


def test_budget_with_gptq_rounding_keeps_the_types_and_lowers_the_output_error(tiny_wide: tuple[Path, Path],
                                                                               tmp_path: Path) -> None:
    """--method gptq on a budget: the same types (priced once, shared sensitivity), other block bytes, and every
    quantized Linear's calibration output error tr(ΔW H ΔWᵀ) no larger in total than llama.cpp's rounding gives."""
    import gguf
    from safetensors.numpy import load_file

    from slimlm.checkpoint.names import TensorNames, gguf_arch
    from slimlm.formats import ggml
    from slimlm.quantize.gguf import quantize_gguf
    from slimlm.quantize.imatrix import collect_imatrix, write_imatrix

    src, calib = tiny_wide
    im = tmp_path / "im.gguf"
    hessians: dict = {}
    write_imatrix(collect_imatrix(src, calib, ctx=512, chunks=4, hessians=hessians), im)
    plain = quantize_gguf(src, None, tmp_path / "plain.gguf", imatrix=im, calib=calib, budget=Budget(target_bpw=4.0),
                          budget_windows=2)
    gptq = quantize_gguf(src, None, tmp_path / "gptq.gguf", imatrix=im, calib=calib, budget=Budget(target_bpw=4.0),
                         sensitivity=plain.budget["sensitivity"], method="gptq")
    assert [(t.name, t.type, t.bytes) for t in gptq.tensors] == [(t.name, t.type, t.bytes) for t in plain.tensors]
    reader = {k: {t.name: t for t in gguf.GGUFReader(tmp_path / f"{k}.gguf").tensors} for k in ("plain", "gptq")}

    weights = {}
    for f in src.glob("*.safetensors"):
        weights.update(load_file(f))
    names = TensorNames(gguf_arch("llama"), 2)
    hf_of = {names.tensor(k): k for k in weights}
    errors = {"plain": 0.0, "gptq": 0.0}
    differs = 0
    for name, h in hessians.items():
        t = reader["plain"][name]
        if t.tensor_type in (T.F32, T.F16):
            continue
        differs += np.asarray(t.data).tobytes() != np.asarray(reader["gptq"][name].data).tobytes()
        if ".attn_q." in name or ".attn_k." in name:
            continue  # stored rope-permuted in the GGUF: compared through the other five
        w = weights[hf_of[name]].astype(np.float64)
        for k in errors:
            q = reader[k][name]
            d = w - ggml.dequantize(np.asarray(q.data), q.tensor_type, w.shape).astype(np.float64)
            errors[k] += float(((d @ h.astype(np.float64)) * d).sum())
    assert differs > 0
    assert errors["gptq"] < errors["plain"]


def test_cli_budget_options(tiny_wide: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from slimlm.cli import run

    src, calib = tiny_wide
    out = str(tmp_path / "x.gguf")
    assert run(["quantize", str(src), "--to", "Q4_K_M", "--target-bpw", "4", "--calib", str(calib), "-o", out]) == 2
    assert "drop --to" in capsys.readouterr().err
    assert run(["quantize", str(src), "--target-bpw", "4", "-o", out]) == 2
    assert "--calib" in capsys.readouterr().err
    assert run(["quantize", str(src), "--target-bpw", "1.0", "--calib", str(calib), "-o", out]) == 2
    assert "smallest types" in capsys.readouterr().err
    assert run(["quantize", str(src), "--target-bpw", "4", "--fit", "1GiB", "--calib", str(calib), "-o", out]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert run(["quantize", str(src), "--target-bpw", "4", "--calib", str(calib), "--method", "awq", "-o", out]) == 2
    assert "llama.cpp|gptq" in capsys.readouterr().err


def test_report_draws_quality_per_size(tmp_path: Path, capsys) -> None:
    import json

    from slimlm.cli import run

    points = [{"name": "Q4_K_M", "kind": "llama.cpp", "bytes": 105_000_000, "kld_mean": 0.03},
              {"name": "Q2_K", "kind": "llama.cpp", "bytes": 88_000_000, "kld_mean": 0.24},
              {"name": "4.0 bpw", "kind": "slimlm budget", "bytes": 80_000_000, "kld_mean": 0.1},
              {"name": "5.0 bpw", "kind": "slimlm budget", "bytes": 95_000_000, "kld_mean": 0.0}]
    src = tmp_path / "q.json"
    src.write_text(json.dumps({"kind": "quality_per_size", "model": "m", "points": points}))
    out = tmp_path / "docs" / "q.png"
    assert run(["report", str(src), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run(["report", str(src), "-o", str(out)]) == 2  # exists
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "quality_per_size", "points": [{"name": "x"}]}))
    assert run(["report", str(bad), "-o", str(tmp_path / "b.png")]) == 2
    assert "needs name" in capsys.readouterr().err


def test_inspect_layer_ranges() -> None:
    from slimlm.inspect import _ranges

    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _ranges([-1]) == "-" and _ranges([3]) == "3"


def test_fit_budget_leaves_room_for_the_kv_cache(tiny_wide: tuple[Path, Path]) -> None:
    """--fit MEM --context N: the tensors get MEM minus the KV cache and the runtime overhead `slimlm fit` counts."""
    from slimlm.inspect.fit import load_model_facts
    from slimlm.inspect.memory import kv_cache, runtime_overhead
    from slimlm.quantize.budget import budget_tensor_bytes

    src, _ = tiny_wide
    spec = load_model_facts(src).spec
    mem = 64 << 20
    short = budget_tensor_bytes(Budget(fit_memory=mem, context=512), 1000, 100, src)
    long = budget_tensor_bytes(Budget(fit_memory=mem, context=4096), 1000, 100, src)
    assert short == mem - kv_cache(spec, 512).bytes - runtime_overhead(spec, 512) - 100
    assert long < short
    two = budget_tensor_bytes(Budget(fit_memory=mem, context=512, batch=2), 1000, 100, src)
    assert two == mem - kv_cache(spec, 512, 2).bytes - runtime_overhead(spec, 512, 2) - 100 and two < short
    q8 = budget_tensor_bytes(Budget(fit_memory=mem, context=512, cache_type="q8_0"), 1000, 100, src)
    assert q8 > short
    assert budget_tensor_bytes(Budget(target_bpw=4.0), 1000, 100) == 500 - 100


def test_recommend_weighs_the_budget_mix_made_for_the_memory(tiny_wide: tuple[Path, Path], tmp_path: Path) -> None:
    """recommend --budget-mix: the GGUF mix made for exactly --memory at --context is measured beside the fixed
    variants, sized by the file it became, and chosen when nothing else fits."""
    from slimlm.inspect.fit import fit
    from slimlm.recommend import Variant, recommend

    src, calib = tiny_wide
    sizing = fit(src, 1 << 30, context=256)
    shared = sizing["variants"][0]
    params = 8 * shared["weights_bytes"] / shared["bits_per_weight"] if shared["bits_per_weight"] else 0
    memory = shared["kv_cache_bytes"] + shared["overhead_bytes"] + int(params * 5 / 8)
    assert fit(src, memory, context=256)["budget_mix"]["bits_per_weight"] == pytest.approx(5.0, abs=0.02)
    r = recommend(src, memory=memory, goal="quality", data=calib, calib=calib, chunks=2, prompt=16, gen=4, runs=1,
                  cache_dir=tmp_path / "cache", context=256, budget_mix=True,
                  engine="slimlm",  # the byte tokenizer has no merges: llama.cpp cannot load the tiny GGUFs
                  variants=[Variant("FP32 (original)", "original", "F32", backend="torch-fp32"),
                            Variant("Q8_0", "gguf", "Q8_0", "Q8_0", backend="gguf")])
    assert {e["name"] for e in r.excluded} == {"FP32 (original)", "Q8_0"}  # neither fits 5 bits/weight
    assert r.choice == "budget mix"
    row = next(m for m in r.measured if m["name"] == "budget mix")
    assert 0 < row["kld_mean"] < 1 and row["memory_bytes"] <= memory
    mem = next(m for m in r.memory if m["name"] == "budget mix")
    assert mem["fits"] and 4.8 * params < mem["weights_bytes"] * 8 <= 5.0 * params + 64  # spent, not exceeded
    assert mem["weights_bytes"] < row["file_bytes"] < mem["weights_bytes"] + (1 << 20)  # tensor data + header


def test_covariance_error_is_the_output_error_on_the_calibration_inputs() -> None:
    """weighted_error with the input's mean x xᵀ is mean ||ΔW x||² over those inputs (all rows sampled); with only
    the diagonal (the imatrix form) correlated inputs make it differ."""
    from slimlm.quantize.budget import dequantized, weighted_error

    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 256)).astype(np.float32)
    x = rng.normal(size=(300, 256)) + 2.0 * rng.normal(size=(300, 1))  # a shared component: correlated channels
    gram = x.T @ x / len(x)
    delta = w.astype(np.float64) - dequantized(w, T.Q4_K, None)
    exact = float((((x @ delta.T) ** 2).sum(1)).mean())
    assert weighted_error(w, T.Q4_K, None, 16, gram) == pytest.approx(exact, rel=1e-9)
    diag = weighted_error(w, T.Q4_K, np.diag(gram).astype(np.float32), 16)
    assert abs(diag - exact) > 0.01 * exact


def test_sensitivity_with_covariance_prices_every_linear(tiny_wide: tuple[Path, Path]) -> None:
    from slimlm.quantize import budget
    from slimlm.quantize.sources import open_source
    from slimlm.quantize.gguf import plan_tensors

    src, calib = tiny_wide
    infos = [t for t in plan_tensors(open_source(src)) if t.name.startswith("blk.") and len(t.shape) == 2]
    a = budget.measure(src, calib, infos, lambda name: None, windows=2, covariance=False)
    b = budget.measure(src, calib, infos, lambda name: None, windows=2, covariance=True)
    assert a.group_kld == b.group_kld  # the same probes, measured the same way
    costs_a = {t.name: [o.cost for o in t.options] for t in a.tensors}
    costs_b = {t.name: [o.cost for o in t.options] for t in b.tensors}
    assert costs_a.keys() == costs_b.keys()
    # priced wherever the probe moved the KLD (a tiny random model's q/k probes may not)
    assert all(min(costs_b[n]) >= 0 and (max(costs_b[n]) > 0) == (max(v) > 0) for n, v in costs_a.items())
    assert costs_a != costs_b


def test_pricing_caps_massive_channels_but_rounding_keeps_the_imatrix() -> None:
    """One channel holding nearly all the importance (a massive activation) weighs PRICE_CAP median channels in
    the price, while the rounding priced is still the one llama.cpp makes with the whole imatrix."""
    from slimlm.quantize.budget import PRICE_CAP, dequantized, pricing_weights, weighted_error

    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 256)).astype(np.float32)
    imp = rng.uniform(0.5, 1.5, size=256).astype(np.float32)
    imp[3] = 1e6
    p = pricing_weights(imp)
    assert p[3] == pytest.approx(PRICE_CAP * np.median(imp)) and np.array_equal(np.delete(p, 3), np.delete(imp, 3))
    delta = w.astype(np.float64) - dequantized(w, T.Q4_K, imp)
    assert weighted_error(w, T.Q4_K, imp, 8) == pytest.approx(float((delta ** 2 * p).sum()), rel=1e-9)
    assert not np.array_equal(dequantized(w, T.Q4_K, imp), dequantized(w, T.Q4_K, p.astype(np.float32)))


def test_verification_measures_what_the_allocation_picks_for_concentrated_tensors(tiny_wide: tuple[Path, Path]
                                                                                  ) -> None:
    """A tensor with one massive input channel gets its chosen type measured directly; the measurement replaces its
    price (equal to moving that tensor alone), and the final plan is the allocation under those prices."""
    from slimlm.quantize import budget
    from slimlm.quantize.gguf import plan_tensors
    from slimlm.quantize.sources import open_source

    src, calib = tiny_wide
    infos = [t for t in plan_tensors(open_source(src)) if t.name.startswith("blk.") and len(t.shape) == 2]
    massive = "blk.0.ffn_down.weight"
    imp = {t.name: np.ones(t.shape[-1], np.float32) for t in infos}
    imp[massive][5] = 1e4

    def importance_of(name):
        return imp[name]

    assert budget.concentration(imp[massive]) > budget.CONCENTRATED > budget.concentration(imp[infos[0].name])
    sens = budget.measure(src, calib, infos, importance_of, windows=2)
    lo, hi = budget_bytes_range(infos, budget.gguf_mix.BUDGET_CANDIDATES, lambda n: True)
    allowed = (lo + hi) // 2
    types = set(budget.gguf_mix.BUDGET_CANDIDATES)
    used = budget._Prober(src, calib, 2)
    plan = budget.verified_allocation(sens, types, allowed, lambda: used, importance_of)
    assert set(sens.measured) == {massive} and plan[massive] in sens.measured[massive]
    assert plan == budget.allocate(sens.options(types), allowed)
    q = next(iter(sens.measured[massive]))
    prober = budget._Prober(src, calib, 2)
    w = prober.weights[massive].detach().float().numpy()
    again = prober.kld_at({massive: budget.dequantized(w, q, imp[massive])})
    assert sens.measured[massive][q] == pytest.approx(again, rel=1e-6, abs=1e-9)
