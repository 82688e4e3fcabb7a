"""Calibration spread over processes (``torchrun`` / ``accelerate launch``, any torch.distributed backend).

Each rank runs its share of the calibration batches (batch ``b`` goes to rank ``b % world``) through the layer
stream; before a layer's scales are chosen, its input statistics are summed over the ranks (max for ``max |x|``),
so every rank makes the same choices, and rank 0 alone writes. The statistics are float64 sums of float32
per-batch terms (``algorithms.stats``): with one batch per rank the reduced sums are bitwise the one-process
sums, so the output is byte-identical to a one-process run with the same batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from slimlm.algorithms.stats import LayerStats
from slimlm.errors import SlimlmError
from slimlm.util.process import destroy_process_group_at_exit


@dataclass(frozen=True)
class Share:
    """This process's place in the group (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1

    def batches(self, n: int) -> list[int]:
        """The calibration batches this rank runs, of ``n``."""
        if n < self.world:
            raise SlimlmError(f"{n} calibration batches cannot be shared by {self.world} processes; pass more "
                              "--samples or a smaller batch")
        return list(range(self.rank, n, self.world))

    @property
    def writes(self) -> bool:
        return self.rank == 0


def current() -> Share:
    """This process's share: of the default process group, which is set up here from the environment
    ``torchrun`` and ``accelerate launch`` give each process (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``/``PORT``;
    gloo on CPU, nccl with CUDA) unless the caller did; a lone process has all of it."""
    import torch.distributed as dist

    if not dist.is_available():
        return Share()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        destroy_process_group_at_exit()
    if dist.is_initialized():
        return Share(dist.get_rank(), dist.get_world_size())
    return Share()


def reduce_stats(stats: LayerStats, share: Share) -> None:
    """Sum every rank's statistics into each rank's (in place; in the same order on every rank)."""
    if share.world == 1:
        return
    import torch.distributed as dist

    seen: set[int] = set()
    for name in sorted(stats.by_linear):
        s = stats.by_linear[name]
        if id(s) in seen:
            continue
        seen.add(id(s))
        for t in (s.gram, s.abs_sum, s.sq_sum):
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if s.abs_max is not None:
            dist.all_reduce(s.abs_max, op=dist.ReduceOp.MAX)
        counts = torch.tensor([s.tokens, s.gram_tokens], dtype=torch.int64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        s.tokens, s.gram_tokens = int(counts[0]), int(counts[1])


def barrier(share: Share) -> None:
    """Wait for every rank (rank 0 has published the output once this returns)."""
    if share.world > 1:
        import torch.distributed as dist

        dist.barrier()
