"""Sorted, multi-block sampler output: the fast paths equal the obviously-correct reference.

The sampler groups anchors by ``U_p`` into blocks (``CandidateBlocks.order``), picks ``λ`` per block
from a grid and stores the columns as int32. Checked here on odd shapes, several blocks (the block
budget is shrunk), with and without memory-bank rows in the pool:

- ``order`` is a permutation and ``to_index`` puts every anchor's negatives back on its own row;
- the blocked log-sum-exp (values and gradients, cloned inputs) and the margin on blocks equal the
  reference on the expanded index;
- every anchor's negatives, whatever block it landed in, follow ``s / Σ s`` (chi-square).
"""

from __future__ import annotations

import pytest
import torch
from blocked_checks import assert_blocked_matches_reference
from frequency_checks import frequency_pvalue

from instcontrast import sampler as sampler_module
from instcontrast.functional import debias_score, empirical_margin, fused_probability
from instcontrast.sampler import InstanceAwareSampler

torch.set_num_threads(1)


def _probs(num: int, seed: int, logit_scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask_logits = logit_scale * torch.randn(1, 5, 1, num, generator=generator)
    class_logits = logit_scale * torch.randn(1, 5, 4, generator=generator)
    return fused_probability(mask_logits, class_logits)[0]  # (num, E)


def _sample(num_anchors: int, batch_pool: int, bank: int, negatives: int, strategy: str, seed: int = 0):
    pool = _probs(batch_pool + bank, seed)  # batch rows first, then bank rows (in no anchor's own row)
    own = torch.arange(num_anchors) % batch_pool  # (A,)
    sampler = InstanceAwareSampler(num_negatives=negatives, strategy=strategy)
    return pool, own, sampler(pool[own], pool, own, generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("bank", [0, 23], ids=["no-bank", "bank"])
@pytest.mark.parametrize("strategy", ["fusion", "mask", "uniform"])
@pytest.mark.parametrize(("num_anchors", "batch_pool", "dim", "negatives"), [(1, 2, 3, 1), (37, 19, 5, 11), (203, 61, 130, 33)])
def test_sorted_blocks_match_the_reference_on_the_index(monkeypatch, num_anchors, batch_pool, dim, negatives, strategy, bank) -> None:
    monkeypatch.setattr(sampler_module, "_BLOCK_ELEMENTS", 300)  # a few rows per block: many blocks
    pool_probs, own, samples = _sample(num_anchors, batch_pool, bank, negatives, strategy)
    blocks = samples.blocks
    assert samples.fallbacks == 0
    if num_anchors > 30:
        assert len(blocks.starts) > 3
    if strategy != "uniform" and num_anchors > 1:
        assert blocks.order is not None
        assert torch.equal(blocks.order.sort().values, torch.arange(num_anchors))  # a permutation
        assert not torch.equal(blocks.order, torch.arange(num_anchors))  # really reordered
    index = samples.index  # (A, R)
    assert index.shape == (num_anchors, negatives)
    assert not (index == own[:, None]).any()  # each row excludes its own anchor: rows are not mixed up
    rebuilt = torch.empty_like(index)
    for block, (candidates, columns) in enumerate(zip(blocks.candidates, blocks.columns)):
        rebuilt[blocks.block_rows(block)] = candidates[columns.long()]
    assert torch.equal(rebuilt, index)

    generator = torch.Generator().manual_seed(7)
    anchors = torch.nn.functional.normalize(torch.randn(num_anchors, dim, generator=generator), dim=1)
    pool = torch.nn.functional.normalize(torch.randn(pool_probs.shape[0], dim, generator=generator), dim=1)
    upstream = torch.randn(num_anchors, generator=generator)
    assert_blocked_matches_reference(anchors, pool, blocks, 3.0, upstream)  # on blocks.to_index() == index
    positives = torch.nn.functional.normalize(torch.randn(num_anchors, dim, generator=generator), dim=1)
    torch.testing.assert_close(empirical_margin(anchors, positives, pool, blocks), empirical_margin(anchors, positives, pool, index))


@pytest.mark.parametrize("bank", [0, 9], ids=["no-bank", "bank"])
@pytest.mark.parametrize("score", ["linear", "squared", "sqrt"])
def test_every_anchor_of_a_sorted_multi_block_call_samples_its_exact_distribution(monkeypatch, score, bank) -> None:
    draws = 3000
    monkeypatch.setattr(sampler_module, "_BLOCK_ELEMENTS", 4 * 2 * draws)  # a few anchors per block
    batch_pool = 16
    pool = _probs(batch_pool + bank, seed=3, logit_scale=1.5)
    own = torch.arange(batch_pool)
    sampler = InstanceAwareSampler(num_negatives=draws, score=score)
    out = sampler(pool[own], pool, own, generator=torch.Generator().manual_seed(5))
    assert out.fallbacks == 0 and len(out.blocks.starts) > 2
    for anchor in (0, 5, 10, 15):
        weights = debias_score(pool[anchor][None].double(), pool.double(), score)  # (M,)
        weights[anchor] = 0.0
        expected = weights / weights.sum() * draws
        observed = torch.bincount(out.index[anchor], minlength=pool.shape[0]).double()
        assert observed[anchor] == 0
        support = expected > 0
        assert observed[~support].sum() == 0
        assert frequency_pvalue(observed[support], expected[support]) > 1e-3, (anchor, observed, expected)


def test_a_blocks_scores_stay_within_the_budget_when_every_row_is_zero_pool(monkeypatch) -> None:
    """Zero-pool rows (every candidate scores 0: a model that predicts the same everywhere) are drawn like
    ``strategy="uniform"``: shared proposals, so the scores stay linear in A·R. With R columns of their
    own each, a block of them made a (c, c·R) score block (9.9 GiB at 128×256) and cost 11× a normal step."""
    budget = 1 << 14
    monkeypatch.setattr(sampler_module, "_BLOCK_ELEMENTS", budget)
    num, negatives = 600, 16
    pool = _probs(1, seed=3).expand(num, -1).clone()  # identical fused probabilities: every score is 0
    own = torch.arange(num)
    samples = InstanceAwareSampler(num_negatives=negatives)(pool, pool, own, generator=torch.Generator().manual_seed(0))
    assert samples.zero_pool_anchors == num and samples.fallbacks == num * negatives
    scored = 0
    for candidates, columns in zip(samples.blocks.candidates, samples.blocks.columns, strict=True):
        assert columns.shape[0] * candidates.numel() <= 2 * budget  # the (c, m) scores of one block
        scored += columns.shape[0] * candidates.numel()
    assert scored <= 4 * num * negatives  # linear in A·R, like uniform sampling (was A·A·R / blocks)
    assert not (samples.index == own[:, None]).any()  # never the anchor itself


def test_zero_pool_rows_draw_uniformly_from_the_pool_minus_themselves() -> None:
    """Each zero-pool anchor's negatives are i.i.d. uniform over the other pool rows (chi-square per anchor:
    anchors of one block share proposals, so pooled counts are not multinomial)."""
    num, draws = 40, 4000
    pool = _probs(1, seed=3).expand(num, -1).clone()  # every score is 0
    own = torch.arange(num)
    samples = InstanceAwareSampler(num_negatives=draws)(pool, pool, own, generator=torch.Generator().manual_seed(1))
    assert samples.zero_pool_anchors == num
    for anchor in (0, 17, 39):
        observed = torch.bincount(samples.index[anchor], minlength=num).double()
        assert observed[anchor] == 0
        others = torch.arange(num) != anchor
        expected = torch.full((num - 1,), draws / (num - 1), dtype=torch.float64)
        assert frequency_pvalue(observed[others], expected) > 1e-3, (anchor, observed)


def test_rows_of_one_block_accept_a_shared_candidate_independently() -> None:
    """Coins are diagonal (row i, candidate j reads v[i + j]): rows of a block share proposals but not coins.

    Two rows of one block, each thinning the same candidate list at rate ``ρ``, pick the same
    candidate ``ρ·ρ'·m`` times as if their coins were independent; one coin per candidate for every
    row would give ``min(ρ, ρ')·m`` (identical negatives at ``ρ = 1/2``, twice as many shared). Checked
    on ``"uniform"``, whose rate does not depend on the candidate; every strategy reads the same coins.
    """
    num_anchors, negatives = 64, 256
    pool = _probs(2000, seed=11)
    own = torch.arange(num_anchors)
    sampler = InstanceAwareSampler(num_negatives=negatives, strategy="uniform")
    out = sampler(pool[own], pool, own, generator=torch.Generator().manual_seed(3))
    assert len(out.blocks.starts) == 1  # one block: every row draws from the same candidate list
    columns, count = out.blocks.columns[0].long(), out.blocks.candidates[0].numel()
    chosen = torch.zeros(num_anchors, count, dtype=torch.bool).scatter_(1, columns, True)  # (A, m)
    rate = chosen.double().mean(dim=1)  # (A,) each row's share of the list it took
    shared = (chosen[:, None, :] & chosen[None, :, :]).double().mean(dim=2)  # (A, A) share both took
    pairs = ~torch.eye(num_anchors, dtype=torch.bool)
    independent = (rate[:, None] * rate[None, :])[pairs].mean()
    assert abs(float(shared[pairs].mean() / independent) - 1.0) < 0.05, (float(shared[pairs].mean()), float(independent))


@pytest.mark.parametrize("segment_cost", [0, 50])
@pytest.mark.parametrize("strategy", ["fusion", "uniform"])
def test_segments_are_prefixes_that_cover_every_chosen_column(monkeypatch, strategy, segment_cost) -> None:
    # rows of a block are sorted by the last candidate they use, so the rows that need a candidate are
    # a prefix: every chosen (row, column) lies in a segment, and the segments score fewer pairs than
    # the whole block (several rounds: max_proposals_per_slot=1)
    monkeypatch.setattr(sampler_module, "_BLOCK_ELEMENTS", 2000)
    monkeypatch.setattr(sampler_module, "_SEGMENT_COST", segment_cost)
    pool = _probs(90, seed=3)
    own = torch.arange(90)
    sampler = InstanceAwareSampler(num_negatives=9, strategy=strategy, max_proposals_per_slot=1)
    blocks = sampler(pool, pool, own, generator=torch.Generator().manual_seed(4)).blocks
    whole = 0
    for block, (candidates, columns) in enumerate(zip(blocks.candidates, blocks.columns, strict=True)):
        extent = columns.long().amax(dim=1)  # (c,)
        assert torch.equal(extent, extent.sort(descending=True).values)
        covered = torch.zeros(columns.shape[0], candidates.numel(), dtype=torch.bool)
        segments = blocks.block_segments(block)
        assert [lo for _, lo, _ in segments] == [0] + [hi for _, _, hi in segments[:-1]]  # consecutive pieces
        for rows, lo, hi in segments:
            assert rows is None or (isinstance(rows, slice) and rows.start == 0)
            covered[slice(None) if rows is None else rows, lo:hi] = True
        assert bool(covered.gather(1, columns.long()).all())
        whole += columns.shape[0] * candidates.numel()
    if segment_cost == 0:
        assert blocks.scored_pairs < whole


def test_a_later_call_leaves_an_earlier_calls_negatives_untouched() -> None:
    # the sampler keeps its per-round buffers between calls: nothing it returns may point into them
    sampler = InstanceAwareSampler(num_negatives=7)
    pool = _probs(60, seed=5)
    first = sampler(pool, pool, torch.arange(60), generator=torch.Generator().manual_seed(1))
    kept = [(cand.clone(), cols.clone()) for cand, cols in zip(first.blocks.candidates, first.blocks.columns, strict=True)]
    index = first.index.clone()
    other = _probs(45, seed=6)
    sampler(other[:30], other, torch.arange(30), generator=torch.Generator().manual_seed(2))
    for (cand, cols), (cand_now, cols_now) in zip(kept, zip(first.blocks.candidates, first.blocks.columns, strict=True), strict=True):
        assert torch.equal(cand, cand_now) and torch.equal(cols, cols_now)
    assert torch.equal(first.blocks.to_index(), index)


def test_copies_and_pickles_of_a_used_sampler_carry_no_scratch_buffers() -> None:
    import copy
    import pickle

    sampler = InstanceAwareSampler(num_negatives=5)
    pool = _probs(40, seed=8)
    sampler(pool, pool, torch.arange(40), generator=torch.Generator().manual_seed(0))
    assert sampler._workspace is not None and sampler._workspace.buffers
    for clone in (copy.deepcopy(sampler), pickle.loads(pickle.dumps(sampler))):
        assert clone._workspace is None and repr(clone) == repr(sampler)
        out = clone(pool, pool, torch.arange(40), generator=torch.Generator().manual_seed(0))
        assert out.index.shape == (40, 5)


@pytest.mark.parametrize("ordered", [False, True])
def test_anchor_rows_of_a_slice_segment_equal_those_of_the_same_rows_as_an_index(ordered) -> None:
    from instcontrast import CandidateBlocks

    columns = (torch.zeros(3, 2, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int32))
    blocks = CandidateBlocks(
        starts=(0, 3), candidates=(torch.tensor([0, 1]), torch.tensor([2])), columns=columns, num_negatives=2,
        order=torch.tensor([6, 0, 4, 2, 5, 1, 3]) if ordered else None,
    )
    every = torch.arange(7)
    for rows in (slice(0, 3), slice(1, 4), slice(0, 1)):
        as_index = torch.arange(4)[rows]
        assert torch.equal(every[blocks.anchor_rows(1, rows)], every[blocks.anchor_rows(1, as_index)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_centered_rows_and_their_norms_match_a_float64_computation_across_chunks(monkeypatch, dtype) -> None:
    monkeypatch.setattr(sampler_module, "_WIDE_ROWS", 7)  # several chunks and an odd last one
    rows = torch.nn.functional.normalize(torch.rand(45, 6, generator=torch.Generator().manual_seed(0)), dim=1).to(dtype)
    center = rows.double().mean(dim=0)
    buffer, excess, centered_sq = sampler_module._centered_rows(rows, center, dtype)
    assert buffer.shape == (45, 8) and buffer.dtype == dtype
    torch.testing.assert_close(buffer[:, :-2], (rows.double() - center).to(dtype))
    wide = rows.double()
    torch.testing.assert_close(excess, 0.5 * (1.0 - wide.square().sum(dim=1)), rtol=0, atol=1e-15)  # exact: rounding-sized values
    torch.testing.assert_close(centered_sq, (wide - center).square().sum(dim=1), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-12)
