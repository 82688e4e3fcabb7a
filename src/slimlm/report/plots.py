"""Pareto plots of measured variants: quality vs size, quality vs speed (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: the report must render on machines without a screen
import matplotlib.pyplot as plt  # noqa: E402

KIND_COLORS = {"original": "#222222", "bf16": "#7a7a7a", "gguf": "#1f77b4", "compressed-tensors": "#d62728",
               "student": "#2ca02c"}


def _scatter(ax: Any, rows: list[dict[str, Any]], x_key: str, x_scale: float, pareto: set[str], chosen: str | None,
             xlabel: str) -> None:
    floor = min([r["kld_mean"] for r in rows if r["kld_mean"] > 0] or [1e-6]) / 2
    for r in rows:
        y = max(r["kld_mean"], floor)  # the original has KLD 0: drawn at the floor of a log axis
        color = KIND_COLORS.get(r["kind"], "#9467bd")
        ax.scatter(r[x_key] / x_scale, y, s=90 if r["name"] in pareto else 40, color=color,
                   edgecolors="gold" if r["name"] == chosen else "none", linewidths=2.5, zorder=3)
        low, high = (r.get("intervals") or {}).get(x_key, (None, None))
        if low is not None:  # the speed's interval as a horizontal bar: overlapping bars are a tie
            ax.plot([low / x_scale, high / x_scale], [y, y], color=color, alpha=0.5, linewidth=2, zorder=2)
        ax.annotate(r["name"], (r[x_key] / x_scale, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((r for r in rows if r["name"] in pareto), key=lambda r: r[x_key])
    if len(front) > 1:
        ax.plot([r[x_key] / x_scale for r in front], [max(r["kld_mean"], floor) for r in front], "--",
                color="#999999", zorder=1, label="Pareto front")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KL divergence vs original (nats, log)")
    ax.grid(True, alpha=0.3)


def plot_results(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the two Pareto plots for one recommendation result; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["measured"]
    pareto = set(result.get("pareto", []))
    chosen = result.get("choice")
    paths = []
    for name, key, scale, label in (
        ("quality_vs_size", "memory_bytes", 2**20, "memory needed (MiB, weights + KV cache + overhead)"),
        ("quality_vs_speed", "prefill_tok_s" if result["goal"] == "throughput" else "decode_tok_s", 1,
         "prefill tokens/s" if result["goal"] == "throughput" else "decode tokens/s (batch %d)" % result["batch"]),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
        _scatter(ax, rows, key, scale, pareto, chosen, label)
        ax.set_title(f"{Path(result['model']).name}: {name.replace('_', ' ')} (goal: {result['goal']})")
        fig.tight_layout()
        path = out_dir / f"{name}-{result['goal']}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ---- quality per size: KLD against file bytes for many files of one or more models (bench_budget.py's points) ----

QUALITY_PER_SIZE = "quality_per_size"
_SERIES_STYLE = {"llama.cpp": ("#1f77b4", "o"), "slimlm budget": ("#d62728", "s"), "W4A16": ("#2ca02c", "^"),
                 "W8A8": ("#9467bd", "v")}


def read_json(path: Path, what: str) -> Any:
    """A results file's JSON; a missing or unreadable file is a SlimlmError naming ``what`` it should have been."""
    import json

    from slimlm.errors import SlimlmError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SlimlmError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SlimlmError(f"{path} is not {what}: {exc}") from None


def load_quality_points(paths: list[Path]) -> list[dict[str, Any]]:
    """Read quality-per-size files: {"kind": "quality_per_size", "model": ..., "points": [{name, kind, bytes,
    kld_mean}, ...]} (one model each)."""
    from slimlm.errors import SlimlmError

    out = []
    for path in paths:
        data = read_json(path, "a quality-per-size file")
        if not isinstance(data, dict) or data.get("kind") != QUALITY_PER_SIZE or not data.get("points"):
            raise SlimlmError(f"{path} is not a quality-per-size file (kind {QUALITY_PER_SIZE!r} with points)")
        for p in data["points"]:
            if not {"name", "kind", "bytes", "kld_mean"} <= set(p):
                raise SlimlmError(f"{path}: a point needs name, kind, bytes and kld_mean: {p}")
        out.append(data)
    if not out:
        raise SlimlmError("give at least one quality-per-size file")
    return out


def plot_quality_per_size(models: list[dict[str, Any]], out: Path) -> Path:
    """One panel per model: KLD (log) against MiB, a series per producer; each series' lower envelope drawn as a
    line (the best file of that producer at each size), llama.cpp's points named."""
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 5.2), dpi=100, squeeze=False)
    for ax, data in zip(axes[0], models):
        floor = min([p["kld_mean"] for p in data["points"] if p["kld_mean"] > 0] or [1e-6]) / 2
        kinds = list(dict.fromkeys(p["kind"] for p in data["points"]))
        for kind in kinds:
            pts = sorted((p for p in data["points"] if p["kind"] == kind), key=lambda p: p["bytes"])
            color, marker = _SERIES_STYLE.get(kind, ("#7f7f7f", "D"))
            xs, ys = [p["bytes"] / 2**20 for p in pts], [max(p["kld_mean"], floor) for p in pts]
            ax.scatter(xs, ys, color=color, marker=marker, s=36, label=kind, zorder=3)
            best, env = float("inf"), []
            for x, y in zip(xs, ys):  # the producer's Pareto front: points no smaller file beats
                if y < best:
                    best = y
                    env.append((x, y))
            if len(env) > 1:
                ax.plot(*zip(*env), color=color, alpha=0.6, linewidth=1.2, zorder=2)
            if kind.startswith("llama.cpp") or len(pts) <= 16:
                for p, x, y in zip(pts, xs, ys):
                    ax.annotate(p["name"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                                color=color)
        ax.set_yscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("KL divergence vs fp32 (nats, log)")
        ax.set_title(f"{data.get('model', '')}\n{data.get('evaluator', '')}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
