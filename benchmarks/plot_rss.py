"""Peak RSS against model size, from bench_real_size.py's saved runs: one line per series, the bf16 weights'
size as the reference a whole-model loader would need.

    python benchmarks/plot_rss.py docs/rss-vs-size.png SERIES:PARAMS:RUN.json [SERIES:PARAMS:RUN.json ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out, points = Path(sys.argv[1]), sys.argv[2:]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    sizes = set()
    for point in points:
        name, params, run = point.split(":", 2)
        data = json.loads(Path(run).read_text())
        series[name].append((int(params) / 1e9, data["peak_tree_mb"] / 1024))
        sizes.add(int(params) / 1e9)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, xy in sorted(series.items()):
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], "o-", label=name)
    xs = sorted(sizes)
    ax.plot(xs, [2 * x * 1e9 / 2**30 for x in xs], "k--", label="bf16 weights (whole-model loader)")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("slimlm peak memory against model size (2-core, 23 GB machine)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
