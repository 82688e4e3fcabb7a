"""When a speed figure is noise: a distribution-free interval for each median, and a watch on the machine.

Interval: the order-statistic (binomial) confidence interval of the median, not a bootstrap. For ``n`` runs it
is ``[x_(k), x_(n+1-k)]`` with the largest ``k`` whose coverage ``1 - 2·P(Binomial(n, ½) < k)`` is still ≥ 95%; it
assumes only that the runs are independent draws of one distribution. Below 6 runs no such ``k`` exists, so the
interval is ``[min, max]`` and its real coverage (75% at 3 runs, 94% at 5) is reported beside it.

Machine watch: while measuring, what share of all cores *other* processes used (/proc/stat's busy time minus this
process's own CPU time), the 1-minute load average before and after, and this process's CPU time over wall
time. A machine is called busy when others took at least ``BUSY_SHARE`` of it (where /proc/stat is missing: when
the load average minus our own busy cores exceeds half the cores); then every speed figure of that session is
flagged. The load average is recorded but not trusted where /proc/stat exists: it lags a minute behind.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

LEVEL = 0.95
BUSY_SHARE = 0.15  # others used ≥ 15% of all cores while we measured
SPREAD_LIMIT = 0.5  # an interval wider than half its median: too unstable to rank on
BUSY_NOTE = "measured while the machine was busy: speed figures unreliable"


def median_interval(values: list[float], level: float = LEVEL) -> tuple[float, float, float, float]:
    """(median, low, high, coverage) of ``values``: the order-statistic interval described above."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    mid = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    if n == 1:
        return mid, xs[0], xs[0], 0.0
    best_k, best_cov = 1, 1 - 2 * 0.5 ** n
    for k in range(2, n // 2 + 1):
        cov = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
        if cov < level:
            break
        best_k, best_cov = k, cov
    return mid, xs[best_k - 1], xs[n - best_k], best_cov


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Do two intervals (low, high) share any value?"""
    return a[0] <= b[1] and b[0] <= a[1]


def _system_busy_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (Linux only)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class MachineLoad:
    """What the machine was doing while one measuring session ran."""

    cores: int
    wall_s: float = 0.0
    own_cpu_s: float = 0.0
    own_cpu_per_wall: float = 0.0  # this process's average busy cores
    others_share: float | None = None  # share of all cores other processes used (None: no /proc/stat)
    loadavg_before: float | None = None
    loadavg_after: float | None = None
    busy: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MachineWatch:
    """``with MachineWatch() as w: ...measure...``; afterwards ``w.load`` says whether the machine was busy."""

    def __init__(self, helpers_cpu: Callable[[], float] | None = None) -> None:
        """``helpers_cpu``: CPU seconds so far of processes doing our measured work (e.g. servers we started),
        counted as ours, not as others'."""
        self.load = MachineLoad(cores=os.cpu_count() or 1)
        self._helpers = helpers_cpu or (lambda: 0.0)

    def _ours(self) -> float:
        return _own_cpu_seconds() + self._helpers()

    def __enter__(self) -> "MachineWatch":
        self.load.loadavg_before = _loadavg()
        self._sys, self._own, self._t0 = _system_busy_seconds(), self._ours(), time.perf_counter()
        return self

    def __exit__(self, *_: Any) -> None:
        load = self.load
        load.wall_s = time.perf_counter() - self._t0
        load.own_cpu_s = self._ours() - self._own
        load.own_cpu_per_wall = load.own_cpu_s / load.wall_s if load.wall_s > 0 else 0.0
        load.loadavg_after = _loadavg()
        now = _system_busy_seconds()
        if self._sys is not None and now is not None and now[1] > self._sys[1]:
            others = (now[0] - self._sys[0]) - load.own_cpu_s
            load.others_share = max(0.0, others / (now[1] - self._sys[1]))
        judge(load)


def judge(load: MachineLoad) -> None:
    """Fill ``busy`` and ``reasons`` from the figures (kept apart from the watch so it can be tested alone)."""
    reasons = []
    if load.others_share is not None and load.others_share >= BUSY_SHARE:
        reasons.append(f"other processes used {100 * load.others_share:.0f}% of the {load.cores} cores")
    if load.others_share is None and load.loadavg_after is not None:  # no /proc/stat: the load average says
        others_load = load.loadavg_after - load.own_cpu_per_wall
        if others_load > 0.5 * load.cores + 0.5:
            reasons.append(f"load average {load.loadavg_after:.2f} on {load.cores} cores "
                           f"(about {others_load:.1f} besides this process)")
    load.reasons, load.busy = reasons, bool(reasons)


def spread(low: float, high: float, median: float) -> float:
    """Width of an interval relative to its median (0 when the median is 0)."""
    return (high - low) / median if median else 0.0


__all__ = ["BUSY_NOTE", "LEVEL", "MachineLoad", "MachineWatch", "judge", "median_interval", "overlaps", "spread"]
