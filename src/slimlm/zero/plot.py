"""The picture users watch: mean accuracy and format reward, and mean completion length, against steps."""

from __future__ import annotations

from pathlib import Path

from slimlm.writers.atomic import atomic_path


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so a short noisy run still shows its trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(rows: list[dict], path: str | Path, *, title: str = "") -> Path:
    """Two panels from metrics.jsonl rows (raw and smoothed): rewards per step, completion length per step.
    Written beside ``path`` and renamed in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 10)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, color in (("accuracy", "tab:green"), ("format", "tab:blue")):
        values = [r.get(key, 0.0) for r in rows]
        top.plot(steps, values, color=color, alpha=0.25)
        top.plot(steps, _smooth(values, window), color=color, label=f"{key} reward")
    top.set_ylabel("mean reward")
    top.set_ylim(-0.05, 1.05)
    top.legend(loc="upper left")
    lengths = [r.get("completion_length", 0.0) for r in rows]
    bottom.plot(steps, lengths, color="tab:orange", alpha=0.25)
    bottom.plot(steps, _smooth(lengths, window), color="tab:orange")
    bottom.set_ylabel("mean completion tokens")
    bottom.set_xlabel("GRPO step")
    fig.suptitle(title or "GRPO training")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
