"""Multi-process (gloo, CPU): negatives from every rank, correct gradients, identical memory banks,
and no hang or abort when ranks hold different numbers of anchors (zero included).

Two processes each hold half of a batch. With ``gather_distributed=True`` a rank's anchors draw
negatives from both ranks' pixels. Each rank returns :math:`L_r = W\\sum_{a\\in r}\\ell_a/A_{all}`, so
the mean over ranks is the single-process mean on the concatenated batch and each rank's input
gradients are ``world_size ×`` the single-process gradients (DDP then averages parameter gradients
by ``1/world_size``, which gives exactly the single-process update).

Every scenario runs under a hard timeout (and a short gloo timeout), so a rank stuck in a
collective FAILS the test instead of stalling CI.
"""

from __future__ import annotations

import datetime
import functools
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats as scipy_stats

from instcontrast import InstanceAwarePixelContrast, PixelMemoryBank
from instcontrast.functional import debias_score, fused_probability, pixel_info_nce

WORLD, PER_RANK, DIM, HEIGHT, WIDTH, QUERIES, CLASSES = 2, 2, 5, 4, 5, 3, 2
PIXELS = PER_RANK * HEIGHT * WIDTH  # pixels per rank
SCENARIO_TIMEOUT_S = 120.0
GLOO_TIMEOUT = datetime.timedelta(seconds=45)


def _global_batch():
    generator = torch.Generator().manual_seed(0)
    batch = WORLD * PER_RANK
    z_weak = torch.randn(batch, DIM, HEIGHT, WIDTH, generator=generator)
    z_strong = torch.randn(batch, DIM, HEIGHT, WIDTH, generator=generator)
    mask_logits = torch.randn(batch, QUERIES, HEIGHT * 2, WIDTH * 2, generator=generator)
    class_logits = torch.randn(batch, QUERIES, CLASSES + 1, generator=generator)
    ids = torch.randint(0, 3, (batch, HEIGHT * 2, WIDTH * 2), generator=generator)
    return z_weak, z_strong, mask_logits, class_logits, ids


def _unequal_batch():
    """The global batch, with rank 1's weak view a scaled copy of its strong view, so the two ranks'
    mean losses differ a lot (a mean of per-rank means is then far from the mean over anchors)."""
    z_weak, z_strong, mask_logits, class_logits, ids = _global_batch()
    z_weak = z_weak.clone()
    z_weak[PER_RANK:] = 3.0 * z_strong[PER_RANK:] + 0.1 * z_weak[PER_RANK:]
    return z_weak, z_strong, mask_logits, class_logits, ids


def _unequal_valid() -> torch.Tensor:
    """Rank 0: every pixel valid (40 anchors); rank 1: one image's top half only (8 anchors)."""
    valid = torch.zeros(WORLD * PER_RANK, HEIGHT, WIDTH, dtype=torch.bool)
    valid[:PER_RANK] = True
    valid[PER_RANK, : HEIGHT // 2] = True
    return valid


def _empty_rank_valid() -> torch.Tensor:
    """Rank 0: every pixel valid; rank 1: no valid pixel at all."""
    valid = torch.zeros(WORLD * PER_RANK, HEIGHT, WIDTH, dtype=torch.bool)
    valid[:PER_RANK] = True
    return valid


def _part(rank: int) -> slice:
    return slice(rank * PER_RANK, (rank + 1) * PER_RANK)


# ---------------------------------------------------------------------------------------------------
# Scenarios, each run on every rank; each returns what the test checks.
# ---------------------------------------------------------------------------------------------------


def _scenario_matching_counts(rank: int) -> dict:
    z_weak, z_strong, mask_logits, class_logits, _ = (t[_part(rank)] for t in _global_batch())
    weak = z_weak.clone().requires_grad_()
    strong = z_strong.clone().requires_grad_()
    crit = InstanceAwarePixelContrast(num_negatives=7, gather_distributed=True, detach_strong=False, backend="reference")
    out = crit(weak, strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(10 + rank))
    out.loss.backward()

    bank = PixelMemoryBank(embedding_dim=DIM, prob_dim=QUERIES + CLASSES + 1, size=30, pixels_per_step=8)
    banked = InstanceAwarePixelContrast(num_negatives=5, memory_bank=bank, gather_distributed=True)
    for step in range(3):
        banked(z_weak, z_strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(100 * rank + step))
    return {
        "loss": out.loss.detach(),
        "index": out.negative_index,
        "anchors": out.anchor_index,
        "weak_grad": weak.grad,
        "strong_grad": strong.grad,
        "pool_size": out.stats.pool_size,
        "bank": bank.state_dict(),
    }


def _scenario_empty_rank_with_ids(rank: int) -> dict:
    z_weak, z_strong, mask_logits, class_logits, ids = (t[_part(rank)] for t in _global_batch())
    valid = _empty_rank_valid()[_part(rank)]
    crit = InstanceAwarePixelContrast(num_negatives=6, gather_distributed=True)
    results = []
    for step in range(2):
        out = crit(z_weak, z_strong, mask_logits, class_logits, valid=valid, instance_ids=ids,
                   generator=torch.Generator().manual_seed(step))
        results.append((float(out.loss), out.stats.fnr, out.stats.num_anchors, out.stats.total_anchors))
    return {"steps": results}


def _scenario_empty_rank_with_bank(rank: int) -> dict:
    z_weak, z_strong, mask_logits, class_logits, _ = (t[_part(rank)] for t in _global_batch())
    valid = _empty_rank_valid()[_part(rank)]
    bank = PixelMemoryBank(embedding_dim=DIM, prob_dim=QUERIES + CLASSES + 1, size=50, pixels_per_step=12)
    crit = InstanceAwarePixelContrast(num_negatives=6, memory_bank=bank, gather_distributed=True)
    pool_sizes = []
    for step in range(3):
        out = crit(z_weak, z_strong, mask_logits, class_logits, valid=valid, generator=torch.Generator().manual_seed(step))
        pool_sizes.append(out.stats.pool_size)
    return {"bank": bank.state_dict(), "pool_sizes": pool_sizes}


def _scenario_empty_rank_strong_grad(rank: int) -> dict:
    z_weak, z_strong, mask_logits, class_logits, _ = (t[_part(rank)] for t in _global_batch())
    valid = _empty_rank_valid()[_part(rank)]
    weak = z_weak.clone().requires_grad_()
    strong = z_strong.clone().requires_grad_()
    crit = InstanceAwarePixelContrast(num_negatives=6, gather_distributed=True, detach_strong=False)
    out = crit(weak, strong, mask_logits, class_logits, valid=valid, generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    return {"loss": out.loss.detach(), "weak_grad": weak.grad, "strong_grad": strong.grad,
            "index": out.negative_index, "anchors": out.anchor_index}


def _scenario_unequal_counts(rank: int) -> dict:
    z_weak, z_strong, mask_logits, class_logits, _ = (t[_part(rank)] for t in _unequal_batch())
    valid = _unequal_valid()[_part(rank)]
    weak = z_weak.clone().requires_grad_()
    strong = z_strong.clone().requires_grad_()
    crit = InstanceAwarePixelContrast(num_negatives=9, gather_distributed=True, detach_strong=False, backend="reference")
    out = crit(weak, strong, mask_logits, class_logits, valid=valid, generator=torch.Generator().manual_seed(20 + rank))
    out.loss.backward()

    # many uniform draws: the own-row exclusion must skip this anchor's row in the GATHERED pool
    uniform = InstanceAwarePixelContrast(num_negatives=256, strategy="uniform", gather_distributed=True)
    uniform_out = uniform(z_weak, z_strong, valid=valid, generator=torch.Generator().manual_seed(30 + rank))
    # many score-proportional draws, compared with the exact target in the test
    fusion = InstanceAwarePixelContrast(num_negatives=600, gather_distributed=True, compute_stats=False)
    fusion_out = fusion(z_weak, z_strong, mask_logits, class_logits, valid=valid,
                        generator=torch.Generator().manual_seed(40 + rank))
    # large R: the loss value concentrates, so an independent single-process run can be compared
    large = InstanceAwarePixelContrast(num_negatives=2048, strategy="uniform", gather_distributed=True)
    large_weak = z_weak.clone().requires_grad_()
    large_out = large(large_weak, z_strong, valid=valid, generator=torch.Generator().manual_seed(50 + rank))
    large_out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "index": out.negative_index,
        "anchors": out.anchor_index,
        "weak_grad": weak.grad,
        "strong_grad": strong.grad,
        "total_anchors": out.stats.total_anchors,
        "uniform_index": uniform_out.negative_index,
        "uniform_anchors": uniform_out.anchor_index,
        "fusion_index": fusion_out.negative_index,
        "fusion_anchors": fusion_out.anchor_index,
        "large_loss": large_out.loss.detach(),
        "large_weak_grad": large_weak.grad,
    }


def _scenario_unequal_batch_sizes_with_ids(rank: int) -> dict:
    # rank 0 holds images 0 and 1, rank 1 only image 2: image keys must not collide across ranks
    z_weak, z_strong, _, _, ids = (t[:3] for t in _global_batch())
    part = slice(0, 2) if rank == 0 else slice(2, 3)
    crit = InstanceAwarePixelContrast(num_negatives=64, strategy="uniform", gather_distributed=True)
    out = crit(z_weak[part], z_strong[part], instance_ids=ids[part], generator=torch.Generator().manual_seed(rank))
    return {"fnr": out.stats.fnr, "index": out.negative_index, "anchors": out.anchor_index}


SCENARIOS: dict[str, Callable[[int], dict]] = {
    "matching_counts": _scenario_matching_counts,
    "empty_rank_with_ids": _scenario_empty_rank_with_ids,
    "empty_rank_with_bank": _scenario_empty_rank_with_bank,
    "empty_rank_strong_grad": _scenario_empty_rank_strong_grad,
    "unequal_counts": _scenario_unequal_counts,
    "unequal_batch_sizes_with_ids": _scenario_unequal_batch_sizes_with_ids,
}


# Scenarios share one spawned process group per group (spawning costs seconds); a hang anywhere in
# a group fails every test of that group, each naming the group.
GROUPS = {
    "empty_rank": ("empty_rank_with_ids", "empty_rank_with_bank", "empty_rank_strong_grad"),
    "uneven": ("matching_counts", "unequal_counts", "unequal_batch_sizes_with_ids"),
}


def _worker(rank: int, group: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=GLOO_TIMEOUT)
    try:
        results = {scenario: SCENARIOS[scenario](rank) for scenario in GROUPS[group]}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@functools.cache
def _run_group(group: str) -> list[dict]:
    """Run a group of scenarios on two gloo ranks; fail (never wait forever) if they do not finish in time."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        context = mp.start_processes(_worker, args=(group, init_file, tmp), nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + SCENARIO_TIMEOUT_S
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"scenarios {GROUPS[group]} did not finish within {SCENARIO_TIMEOUT_S} s: a rank hangs in a collective")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _run_on_two_ranks(scenario: str) -> list[dict]:
    """Each rank's result of one scenario (its group runs once per test session)."""
    group = next(name for name, members in GROUPS.items() if scenario in members)
    return [per_rank[scenario] for per_rank in _run_group(group)]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (B·h·w, D)


# ---------------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------------


def test_two_ranks_match_one_process_on_the_concatenated_batch() -> None:
    results = _run_on_two_ranks("matching_counts")
    assert all(r["pool_size"] == WORLD * PIXELS for r in results)  # every rank sees every rank's pixels
    assert any((r["index"] >= PIXELS).any() and (r["index"] < PIXELS).any() for r in results)

    z_weak, z_strong, *_ = _global_batch()
    weak = z_weak.clone().requires_grad_()
    strong = z_strong.clone().requires_grad_()
    flat_weak, flat_strong = _flat(weak), _flat(strong)
    losses = []
    for rank, result in enumerate(results):
        anchors = rank * PIXELS + result["anchors"]  # local flat positions -> global
        losses.append(pixel_info_nce(flat_weak[anchors], flat_strong[anchors], flat_strong, result["index"], backend="reference"))
        torch.testing.assert_close(result["loss"], losses[-1].detach())
    torch.stack(losses).mean().backward()
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["weak_grad"] / WORLD, weak.grad[_part(rank)])
        torch.testing.assert_close(result["strong_grad"] / WORLD, strong.grad[_part(rank)])

    first, second = results[0]["bank"], results[1]["bank"]
    assert int(first["filled"]) == 30 and int(first["pointer"]) == (3 * WORLD * 8) % 30
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_rank_without_valid_pixels_does_not_hang_in_the_false_negative_gather() -> None:
    results = _run_on_two_ranks("empty_rank_with_ids")
    for (loss0, fnr0, anchors0, total0), (loss1, fnr1, anchors1, total1) in zip(results[0]["steps"], results[1]["steps"]):
        assert anchors0 == PIXELS and anchors1 == 0 and total0 == total1 == PIXELS
        assert fnr0 is not None and 0.0 <= fnr0 <= 1.0
        assert fnr1 is None  # no anchor, no pair to count
        assert loss0 > 0 and loss1 == 0.0


def test_a_rank_without_valid_pixels_still_writes_the_bank_and_banks_stay_identical() -> None:
    results = _run_on_two_ranks("empty_rank_with_bank")
    first, second = results[0]["bank"], results[1]["bank"]
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # rank 0 writes 12 rows per step, rank 1 none: 3 steps fill 36 rows of 50
    assert int(first["filled"]) == 36 and int(first["pointer"]) == 36
    # every rank's pool: rank 0's 40 valid pixels + the bank rows written by the earlier steps
    assert results[0]["pool_sizes"] == results[1]["pool_sizes"] == [PIXELS, PIXELS + 12, PIXELS + 24]


def test_a_rank_without_valid_pixels_and_gradient_through_the_strong_view_matches_one_process() -> None:
    results = _run_on_two_ranks("empty_rank_strong_grad")
    assert results[1]["index"] is None and float(results[1]["loss"]) == 0.0
    z_weak, z_strong, *_ = _global_batch()
    weak = z_weak.clone().requires_grad_()
    strong = z_strong.clone().requires_grad_()
    # the same sampled indices, so this checks the collectives and the normalization exactly
    flat_weak, flat_strong = _flat(weak)[:PIXELS], _flat(strong)[:PIXELS]
    anchors = results[0]["anchors"]
    reference = pixel_info_nce(flat_weak[anchors], flat_strong[anchors], flat_strong, results[0]["index"])
    reference.backward()
    mean_over_ranks = (results[0]["loss"] + results[1]["loss"]) / WORLD
    torch.testing.assert_close(mean_over_ranks, reference.detach())
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["weak_grad"] / WORLD, weak.grad[_part(rank)])
        torch.testing.assert_close(result["strong_grad"] / WORLD, strong.grad[_part(rank)])
    assert results[1]["strong_grad"].abs().sum() == 0  # rank 1 has no valid pixel, so no negative


def test_unequal_anchor_counts_average_over_all_ranks_anchors() -> None:
    results = _run_on_two_ranks("unequal_counts")
    counts = [r["anchors"].numel() for r in results]
    assert counts == [PIXELS, WIDTH * (HEIGHT // 2)]
    assert all(r["total_anchors"] == sum(counts) for r in results)

    valid = _unequal_valid()
    global_valid = valid.reshape(-1).nonzero(as_tuple=True)[0]  # rank 0's rows first, then rank 1's
    z_weak, z_strong, *_ = _unequal_batch()
    weak = z_weak.clone().requires_grad_()
    strong = z_strong.clone().requires_grad_()
    flat_weak, flat_strong = _flat(weak), _flat(strong)
    # the same indices: the mean over ALL anchors, not the mean of the two ranks' means
    anchors = torch.cat([rank * PIXELS + r["anchors"] for rank, r in enumerate(results)])
    index = torch.cat([r["index"] for r in results])
    reference = pixel_info_nce(flat_weak[anchors], flat_strong[anchors], flat_strong[global_valid], index, backend="reference")
    reference.backward()
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, reference.detach())
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["weak_grad"] / WORLD, weak.grad[_part(rank)])
        torch.testing.assert_close(result["strong_grad"] / WORLD, strong.grad[_part(rank)])


def test_no_anchor_on_any_rank_samples_its_own_global_row() -> None:
    results = _run_on_two_ranks("unequal_counts")
    valid = _unequal_valid().reshape(-1)
    row_of_flat = torch.full((valid.numel(),), -1, dtype=torch.long)
    row_of_flat[valid] = torch.arange(int(valid.sum()))  # global flat position -> row of the gathered pool
    pool_size = int(valid.sum())
    for rank, result in enumerate(results):
        own_row = row_of_flat[rank * PIXELS + result["uniform_anchors"]]  # (A,)
        index = result["uniform_index"]  # (A, 256)
        assert not (index == own_row[:, None]).any(), f"rank {rank} sampled its own row"
        # uniform over the other rows: every other row is drawn about 256 / (M - 1) times per anchor
        counts = torch.zeros(index.shape[0], pool_size).scatter_add_(1, index, torch.ones_like(index, dtype=torch.float))
        counts[torch.arange(index.shape[0]), own_row] = float("nan")
        expected = index.shape[1] / (pool_size - 1)
        statistic = float(((counts - expected) ** 2 / expected).nansum())
        dof = index.shape[0] * (pool_size - 2)
        assert scipy_stats.chi2.sf(statistic, dof) > 1e-4, (rank, statistic, dof)


def test_distributed_negatives_follow_the_single_process_score_distribution() -> None:
    results = _run_on_two_ranks("unequal_counts")
    _, _, mask_logits, class_logits, _ = _unequal_batch()
    valid = _unequal_valid().reshape(-1)
    probs = fused_probability(mask_logits, class_logits, (HEIGHT, WIDTH)).reshape(-1, QUERIES + CLASSES + 1)
    pool_probs = probs[valid]  # (M, E) the concatenated batch's pool, computed here independently
    row_of_flat = torch.full((valid.numel(),), -1, dtype=torch.long)
    row_of_flat[valid] = torch.arange(int(valid.sum()))
    statistic, dof = 0.0, 0
    for rank, result in enumerate(results):
        flat = rank * PIXELS + result["fusion_anchors"]  # (A,)
        target = debias_score(probs[flat][:, None, :], pool_probs[None, :, :])  # (A, M)
        target[torch.arange(flat.numel()), row_of_flat[flat]] = 0.0
        target = target / target.sum(dim=1, keepdim=True)
        index = result["fusion_index"]  # (A, R)
        counts = torch.zeros_like(target).scatter_add_(1, index, torch.ones_like(index, dtype=target.dtype))
        expected = target * index.shape[1]
        assert (counts[expected == 0] == 0).all()
        kept = expected > 0
        statistic += float(((counts - expected)[kept] ** 2 / expected[kept]).sum())
        dof += int(kept.sum()) - index.shape[0]
    assert scipy_stats.chi2.sf(statistic, dof) > 1e-4, (statistic, dof)


def test_unequal_counts_match_an_independent_single_process_run_on_the_concatenated_batch() -> None:
    results = _run_on_two_ranks("unequal_counts")
    z_weak, z_strong, *_ = _unequal_batch()
    weak = z_weak.clone().requires_grad_()
    # one process, its own random draws (R = 2048 makes the sampled loss concentrate)
    single = InstanceAwarePixelContrast(num_negatives=2048, strategy="uniform")
    out = single(weak, z_strong, valid=_unequal_valid(), generator=torch.Generator().manual_seed(123))
    out.loss.backward()
    single_loss = out.loss.detach()
    ddp_loss = sum(r["large_loss"] for r in results) / WORLD
    torch.testing.assert_close(ddp_loss, single_loss, rtol=2e-3, atol=0)
    ddp_grad = torch.cat([r["large_weak_grad"] for r in results]) / WORLD
    assert float((ddp_grad - weak.grad).norm() / weak.grad.norm()) < 0.1  # sampling noise ~0.04; per-rank means ~0.4
    # a mean of per-rank means would be far off: the two ranks' mean losses differ
    rank_means = [float(r["large_loss"]) * r["total_anchors"] / (WORLD * r["uniform_anchors"].numel()) for r in results]
    assert abs(sum(rank_means) / WORLD - float(single_loss)) > 10 * abs(float(ddp_loss) - float(single_loss))


def test_false_negative_rate_with_different_batch_sizes_per_rank() -> None:
    results = _run_on_two_ranks("unequal_batch_sizes_with_ids")
    ids = _global_batch()[4][:3]
    resized = torch.nn.functional.interpolate(ids[:, None].double(), size=(HEIGHT, WIDTH), mode="nearest")[:, 0].long()
    image = torch.arange(3)[:, None, None].expand_as(resized)
    keys = (image * 100 + resized).reshape(-1)  # (3·h·w,): the gathered pool is images 0, 1, 2 in order
    for rank, result in enumerate(results):
        first_flat = 0 if rank == 0 else 2 * HEIGHT * WIDTH
        anchor_keys = keys[first_flat + result["anchors"]]  # (A,)
        same = keys[result["index"]] == anchor_keys[:, None]  # (A, R)
        assert result["fnr"] == pytest.approx(float(same.double().mean()), abs=1e-6), rank
