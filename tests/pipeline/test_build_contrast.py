"""``stages.build_contrast``: the pixel term a stage trains with, built from ``ContrastConfig`` alone.

* a memory bank works with every strategy without the caller sizing it (uniform + a bank raised before);
* under ``torchrun`` (here: 2 gloo processes) a rank's anchors draw negatives from every rank's pixels by
  default (the library's ``gather_distributed``), as one large batch would; ``gather_distributed: false``
  keeps them on the rank.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reference_pipeline import stages
from reference_pipeline.config import ContrastConfig

PIXELS_PER_RANK = 2 * 3 * 4  # B × h × w of each rank's batch


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 8, 3, 4, generator=generator), torch.randn(2, 8, 3, 4, generator=generator),
            torch.randn(2, 5, 6, 8, generator=generator), torch.randn(2, 5, 4, generator=generator))


@pytest.mark.parametrize("strategy", ["uniform", "mask", "class", "fusion"])
def test_a_memory_bank_works_with_every_strategy(strategy: str) -> None:
    contrast = stages.build_contrast(ContrastConfig(strategy=strategy, num_negatives=4, memory_bank=16))
    for step in range(3):
        out = contrast(*_batch(step))
        assert torch.isfinite(out.loss)
    assert int(contrast.memory_bank.filled) == 16 and out.stats.bank_candidates == 16


def _rank_pool_size(rank: int, init_file: str, gather: bool, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=45))
    try:
        contrast = stages.build_contrast(ContrastConfig(num_negatives=4, gather_distributed=gather))
        out = contrast(*_batch(rank))
        torch.save(out.stats.pool_size, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _pool_sizes(gather: bool) -> list[int]:
    """Each rank's candidate pool on 2 gloo processes; fails (never waits forever) after 120 s."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_rank_pool_size, args=(os.path.join(folder, "init"), gather, folder), nprocs=2,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + 120.0
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("a rank did not finish within 120 s")
        return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]


def test_under_torchrun_negatives_come_from_every_rank_by_default() -> None:
    assert ContrastConfig().gather_distributed
    assert _pool_sizes(gather=True) == [2 * PIXELS_PER_RANK] * 2
    assert _pool_sizes(gather=False) == [PIXELS_PER_RANK] * 2
