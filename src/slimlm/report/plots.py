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
