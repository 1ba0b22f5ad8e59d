"""Multi-process (gloo, CPU): negatives from every rank, correct gradients, identical memory banks.

Two processes each hold half of a batch. With ``gather_distributed=True`` a rank's anchors draw
negatives from both ranks' pixels. The reference is one process that computes, on the
concatenated batch with the very same sampled indices, the mean of the two ranks' losses. Each
rank's input gradients must equal ``world_size ×`` the reference gradients (DDP then averages
parameter gradients by ``1/world_size``, which gives exactly the single-process update).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instcontrast import InstanceAwarePixelContrast, PixelMemoryBank
from instcontrast.functional import pixel_info_nce

WORLD, PER_RANK, DIM, HEIGHT, WIDTH, QUERIES, CLASSES = 2, 2, 5, 4, 5, 3, 2


def _global_batch():
    generator = torch.Generator().manual_seed(0)
    batch = WORLD * PER_RANK
    z_weak = torch.randn(batch, DIM, HEIGHT, WIDTH, generator=generator)
    z_strong = torch.randn(batch, DIM, HEIGHT, WIDTH, generator=generator)
    mask_logits = torch.randn(batch, QUERIES, HEIGHT * 2, WIDTH * 2, generator=generator)
    class_logits = torch.randn(batch, QUERIES, CLASSES + 1, generator=generator)
    return z_weak, z_strong, mask_logits, class_logits


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    z_weak, z_strong, mask_logits, class_logits = (t[part] for t in _global_batch())
    weak = z_weak.clone().requires_grad_()
    strong = z_strong.clone().requires_grad_()
    crit = InstanceAwarePixelContrast(num_negatives=7, gather_distributed=True, detach_strong=False, backend="reference")
    out = crit(weak, strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(10 + rank))
    out.loss.backward()

    bank = PixelMemoryBank(embedding_dim=DIM, prob_dim=QUERIES + CLASSES + 1, size=30, pixels_per_step=8)
    banked = InstanceAwarePixelContrast(num_negatives=5, memory_bank=bank, gather_distributed=True)
    for step in range(3):
        banked(z_weak, z_strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(100 * rank + step))
    torch.save(
        {
            "loss": out.loss.detach(),
            "index": out.negative_index,
            "anchors": out.anchor_index,
            "weak_grad": weak.grad,
            "strong_grad": strong.grad,
            "pool_size": out.stats.pool_size,
            "bank": bank.state_dict(),
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_concatenated_batch() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    pixels = PER_RANK * HEIGHT * WIDTH
    assert all(r["pool_size"] == WORLD * pixels for r in results)  # every rank sees every rank's pixels
    assert any((r["index"] >= pixels).any() and (r["index"] < pixels).any() for r in results)

    z_weak, z_strong, _, _ = _global_batch()
    weak = z_weak.clone().requires_grad_()
    strong = z_strong.clone().requires_grad_()
    flat_weak = weak.permute(0, 2, 3, 1).reshape(-1, DIM)
    flat_strong = strong.permute(0, 2, 3, 1).reshape(-1, DIM)
    losses = []
    for rank, result in enumerate(results):
        anchors = rank * pixels + result["anchors"]  # local flat positions -> global
        losses.append(pixel_info_nce(flat_weak[anchors], flat_strong[anchors], flat_strong, result["index"], backend="reference"))
        torch.testing.assert_close(result["loss"], losses[-1].detach())
    torch.stack(losses).mean().backward()
    for rank, result in enumerate(results):
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(result["weak_grad"] / WORLD, weak.grad[part])
        torch.testing.assert_close(result["strong_grad"] / WORLD, strong.grad[part])

    first, second = results[0]["bank"], results[1]["bank"]
    assert int(first["filled"]) == 30 and int(first["pointer"]) == (3 * WORLD * 8) % 30
    for key in first:
        assert torch.equal(first[key], second[key]), key
