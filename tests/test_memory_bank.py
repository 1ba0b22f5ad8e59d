"""PixelMemoryBank: a FIFO ring that is just more pool for the exact sampler."""

from __future__ import annotations

import io
import math

import pytest
import torch
from scipy.stats import chisquare

from instcontrast import InstanceAwarePixelContrast, PixelMemoryBank
from instcontrast.functional import debias_score, fused_probability


def _rows(start: int, count: int, dim: int = 3) -> torch.Tensor:
    """Rows whose first coordinate encodes their order (after normalization still monotone)."""
    values = torch.arange(start, start + count, dtype=torch.float32)
    return torch.stack([values + 1, torch.ones(count), torch.zeros(count)], dim=1)[:, :dim]


def test_fifo_order_and_wrap_around() -> None:
    bank = PixelMemoryBank(embedding_dim=3, prob_dim=2, size=5, pixels_per_step=None)
    bank.enqueue(_rows(0, 3), torch.ones(3, 2))
    assert int(bank.pointer) == 3 and int(bank.filled) == 3
    bank.enqueue(_rows(3, 4), torch.ones(4, 2))  # rows 3..6: 3,4 at slots 3,4; 5,6 wrap to 0,1
    assert int(bank.pointer) == 2 and int(bank.filled) == 5
    stored_order = (bank.embeddings[:, 0] / bank.embeddings[:, 1]).round() - 1  # recover the row number
    assert stored_order.tolist() == [5, 6, 2, 3, 4]


def test_pointer_after_many_enqueues() -> None:
    bank = PixelMemoryBank(embedding_dim=3, prob_dim=2, size=7, pixels_per_step=None)
    total = 0
    for count in [1, 5, 3, 9, 2, 6, 4]:
        bank.enqueue(torch.randn(count, 3), torch.rand(count, 2))
        total += min(count, 7)
    assert int(bank.pointer) == total % 7 and int(bank.filled) == 7


def test_enqueue_larger_than_the_bank_keeps_the_newest_rows() -> None:
    bank = PixelMemoryBank(embedding_dim=3, prob_dim=2, size=4, pixels_per_step=None)
    bank.enqueue(_rows(0, 10), torch.ones(10, 2))
    stored = sorted(((bank.embeddings[:, 0] / bank.embeddings[:, 1]).round() - 1).tolist())
    assert stored == [6, 7, 8, 9]


def test_pixels_per_step_enqueues_a_random_subset() -> None:
    bank = PixelMemoryBank(embedding_dim=3, prob_dim=2, size=100, pixels_per_step=8)
    assert bank.enqueue(torch.randn(50, 3), torch.rand(50, 2), generator=torch.Generator().manual_seed(0)) == 8
    assert int(bank.filled) == 8


def test_state_dict_round_trips_exactly() -> None:
    bank = PixelMemoryBank(embedding_dim=4, prob_dim=3, size=6, pixels_per_step=None)
    for _ in range(3):
        bank.enqueue(torch.randn(4, 4), torch.rand(4, 3))
    restored = PixelMemoryBank(embedding_dim=4, prob_dim=3, size=6, pixels_per_step=None)
    restored.load_state_dict(bank.state_dict())
    for key, value in bank.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    bank.enqueue(torch.ones(1, 4), torch.ones(1, 3))
    restored.enqueue(torch.ones(1, 4), torch.ones(1, 3))
    assert torch.equal(restored.embeddings, bank.embeddings) and int(restored.pointer) == int(bank.pointer)


def test_no_gradient_reaches_the_bank() -> None:
    bank = PixelMemoryBank(embedding_dim=4, prob_dim=7, size=50)
    z_weak = torch.randn(1, 4, 3, 3, requires_grad=True)
    z_strong = torch.randn(1, 4, 3, 3, requires_grad=True)
    crit = InstanceAwarePixelContrast(num_negatives=5, memory_bank=bank, detach_strong=False)
    crit(z_weak, z_strong, torch.randn(1, 3, 3, 3), torch.randn(1, 3, 4))
    out = crit(z_weak, z_strong, torch.randn(1, 3, 3, 3), torch.randn(1, 3, 4))
    assert out.stats.bank_candidates == 9
    out.loss.backward()
    assert not bank.embeddings.requires_grad and bank.embeddings.grad is None
    assert all(not buffer.requires_grad for buffer in bank.buffers())


def test_mismatched_dimensions_are_refused() -> None:
    bank = PixelMemoryBank(embedding_dim=4, prob_dim=7, size=10)
    with pytest.raises(ValueError, match=r"stores \(D, E\) = \(4, 7\)"):
        bank.enqueue(torch.randn(2, 5), torch.rand(2, 7))
    crit = InstanceAwarePixelContrast(num_negatives=3, memory_bank=bank)
    with pytest.raises(ValueError, match="prob_dim=K \\+ C \\+ 1"):
        crit(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), torch.randn(1, 2, 3, 3), torch.randn(1, 2, 4))


def test_full_warmup_offers_no_candidates_until_the_ring_is_full() -> None:
    bank = PixelMemoryBank(embedding_dim=3, prob_dim=2, size=5, pixels_per_step=None, warmup="full")
    bank.enqueue(torch.randn(4, 3), torch.rand(4, 2))
    assert bank.candidates()[0].shape[0] == 0
    bank.enqueue(torch.randn(1, 3), torch.rand(1, 2))
    assert bank.candidates()[0].shape[0] == 5


def test_sampling_from_batch_and_bank_matches_the_score_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    mask_logits = 2 * torch.randn(1, 3, 2, 3, generator=generator)  # 6 batch pixels
    class_logits = 2 * torch.randn(1, 3, 3, generator=generator)
    bank_masks = 2 * torch.randn(1, 3, 2, 3, generator=generator)
    bank_probs = fused_probability(bank_masks, class_logits)[0]  # (6, E) bank rows
    bank = PixelMemoryBank(embedding_dim=4, prob_dim=6, size=6, pixels_per_step=None)
    bank.enqueue(torch.randn(6, 4), bank_probs)
    valid = torch.zeros(1, 2, 3, dtype=torch.bool)
    valid[0, 0, 0] = valid[0, 1, 2] = True  # 2 batch candidates; anchor 0 is pixel 0
    draws = 6000
    crit = InstanceAwarePixelContrast(num_negatives=draws, memory_bank=bank, compute_stats=False).eval()
    out = crit(torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3), mask_logits, class_logits, valid=valid,
               generator=torch.Generator().manual_seed(1))
    assert out.stats.pool_size == 8 and out.stats.fallbacks == 0
    batch_probs = fused_probability(mask_logits, class_logits)[0][[0, 5]]
    pool_probs = torch.cat([batch_probs, bank_probs])  # (8, E): batch first, then bank
    weights = debias_score(pool_probs[0][None].double(), pool_probs.double())
    weights[0] = 0.0
    observed = torch.bincount(out.negative_index[0], minlength=8).double()
    assert observed[0] == 0
    result = chisquare(observed[1:].numpy(), (weights[1:] / weights.sum() * draws).numpy())
    assert result.pvalue > 1e-3


def test_bank_negatives_change_the_loss_as_computed_by_hand() -> None:
    # both batch pixels predict the same instance (s = 0 between them), the bank row predicts
    # another (s = 1): every negative must be the bank row.
    mask_logits = torch.zeros(1, 2, 1, 2)
    mask_logits[:, 0] = 30.0
    class_logits = torch.tensor([[[30.0, 0.0], [0.0, 30.0]]])
    z_weak = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)  # both (1, 0)
    z_strong = z_weak.clone()  # cos+ = 1
    bank = PixelMemoryBank(embedding_dim=2, prob_dim=4, size=1, pixels_per_step=None)
    bank.enqueue(torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 1.0, 0.0, 1.0]]) / math.sqrt(2))
    crit = InstanceAwarePixelContrast(temperature=0.5, num_negatives=4, memory_bank=bank, max_rounds=50).eval()
    out = crit(z_weak, z_strong, mask_logits, class_logits)
    assert (out.negative_index == 2).all() and out.stats.fallbacks == 0
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 4 * math.exp(0.6 / 0.5)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_fifo_order_after_the_ring_wrapped_several_times() -> None:
    size = 5
    bank = PixelMemoryBank(embedding_dim=3, prob_dim=2, size=size, pixels_per_step=None)
    ring: list[int | None] = [None] * size  # what each slot should hold: the row number
    pointer, written = 0, 0
    for count in [3, 4, 2, 6, 1, 5, 7]:  # 28 rows: wraps five times, twice with a batch > size
        rows = list(range(written, written + count))[-size:]
        bank.enqueue(_rows(written, count), torch.rand(count, 2))
        for row in rows:
            ring[pointer] = row
            pointer = (pointer + 1) % size
        written += count
        stored = ((bank.embeddings[:, 0] / bank.embeddings[:, 1]).round() - 1).long().tolist()
        assert stored[: int(bank.filled)] == ring[: int(bank.filled)]
        assert int(bank.pointer) == pointer
    assert int(bank.filled) == size
    assert set(ring) == set(range(written - size, written))  # the newest `size` rows, nothing older


def test_enqueue_with_a_tensor_that_requires_grad_stores_a_detached_copy() -> None:
    bank = PixelMemoryBank(embedding_dim=3, prob_dim=2, size=4, pixels_per_step=None)
    embeddings = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    probs = torch.tensor([[0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    assert bank.enqueue(embeddings * 1.0, probs * 1.0) == 2
    for buffer in bank.buffers():
        assert not buffer.requires_grad and buffer.grad_fn is None
    torch.testing.assert_close(bank.embeddings[:2], torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(bank.probs[:2], probs.detach())
    (embeddings.sum() + probs.sum()).backward()  # the caller's graph is untouched
    assert torch.equal(embeddings.grad, torch.ones(2, 3))
    torch.save(bank.state_dict(), io.BytesIO())  # a buffer with a graph could not be saved like this


def test_training_call_stores_the_strong_view_and_its_fused_probabilities() -> None:
    generator = torch.Generator().manual_seed(0)
    z_weak = torch.randn(2, 4, 3, 3, generator=generator)
    z_strong = 5 * torch.randn(2, 4, 3, 3, generator=generator)
    mask_logits = torch.randn(2, 3, 6, 6, generator=generator)
    class_logits = torch.randn(2, 3, 4, generator=generator)
    valid = torch.rand(2, 3, 3, generator=generator) > 0.3
    bank = PixelMemoryBank(embedding_dim=4, prob_dim=3 + 4, size=64, pixels_per_step=None)
    InstanceAwarePixelContrast(num_negatives=4, memory_bank=bank)(z_weak, z_strong, mask_logits, class_logits, valid=valid)
    count = int(valid.sum())
    assert int(bank.filled) == count
    flat_strong = z_strong.permute(0, 2, 3, 1).reshape(-1, 4)[valid.reshape(-1)]
    torch.testing.assert_close(bank.embeddings[:count], flat_strong / flat_strong.norm(dim=1, keepdim=True))
    probs = fused_probability(mask_logits, class_logits, (3, 3)).reshape(-1, 7)[valid.reshape(-1)]
    torch.testing.assert_close(bank.probs[:count], probs)


def test_defaults_are_the_papers_bank() -> None:
    bank = PixelMemoryBank(embedding_dim=3, prob_dim=2)
    assert (bank.size, bank.pixels_per_step, bank.warmup) == (10_000, 1024, "immediate")
    assert bank.embeddings.shape == (10_000, 3) and bank.probs.shape == (10_000, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embedding_dim": 0}, "embedding_dim must be a positive int"),
        ({"embedding_dim": 2.5}, "embedding_dim must be a positive int"),
        ({"prob_dim": 0}, "prob_dim must be a positive int"),
        ({"prob_dim": 2.5}, "prob_dim must be a positive int"),
        ({"size": 0}, "size must be a positive int"),
        ({"size": 7.5}, "size must be a positive int"),
        ({"pixels_per_step": 0}, "pixels_per_step must be a positive int"),
        ({"pixels_per_step": 1.5}, "pixels_per_step must be a positive int"),
        ({"warmup": "later"}, "warmup must be one of"),
    ],
)
def test_bad_constructor_arguments_raise_naming_the_argument(kwargs: dict, message: str) -> None:
    arguments = {"embedding_dim": 3, "prob_dim": 2, "size": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        PixelMemoryBank(**arguments)


@pytest.mark.parametrize("strategy", ["uniform", "mask", "class", "fusion"])
def test_a_bank_built_without_dims_takes_them_from_the_first_batch_for_every_strategy(strategy: str) -> None:
    generator = torch.Generator().manual_seed(1)
    bank = PixelMemoryBank(size=32, pixels_per_step=None)
    loss = InstanceAwarePixelContrast(num_negatives=4, strategy=strategy, memory_bank=bank)
    for _ in range(2):  # the second call samples from the bank the first one filled
        z_weak, z_strong = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
        out = loss(z_weak, z_strong, torch.randn(2, 3, 6, 6, generator=generator), torch.randn(2, 3, 5, generator=generator))
        assert torch.isfinite(out.loss)
    widths = {"uniform": 3 + 5, "fusion": 3 + 5, "mask": 3, "class": 5}
    assert bank.embeddings.shape == (32, 4) and bank.probs.shape == (32, widths[strategy])
    assert int(bank.filled) == 32 and out.stats.bank_candidates > 0


def test_a_bank_built_without_dims_resumes_from_a_saved_state() -> None:
    bank = PixelMemoryBank(embedding_dim=4, prob_dim=3, size=6, pixels_per_step=None)
    bank.enqueue(torch.randn(5, 4), torch.rand(5, 3))
    restored = PixelMemoryBank(size=6, pixels_per_step=None)
    restored.load_state_dict(bank.state_dict())
    for key, value in bank.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="size mismatch"):
        PixelMemoryBank(embedding_dim=8, size=6).load_state_dict(bank.state_dict())  # a fixed dim is kept
