"""Shared test helpers: deterministic seeds and small generated scenes."""

from __future__ import annotations

import pytest
import torch

# One thread per test process: pytest-xdist runs two workers on this 2-core machine, and two busy
# threads per process made a tiny forward take 520 ms instead of 3 ms.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def hand_blocks():
    """Three blocks, repeated candidates and repeated columns, one block with per-round segments."""
    from instcontrast import CandidateBlocks

    return CandidateBlocks(
        starts=(0, 3, 5),
        candidates=(torch.tensor([4, 1, 1, 0]), torch.tensor([2, 3, 5, 0, 4]), torch.tensor([5, 2])),
        columns=(
            torch.tensor([[0, 1, 1], [3, 3, 3], [2, 0, 1]]),
            torch.tensor([[0, 2, 1], [4, 3, 0]]),  # row 0 only in round 1 (columns 0..2)
            torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]]),
        ),
        num_negatives=3,
        segments=(
            ((None, 0, 4),),
            ((None, 0, 3), (torch.tensor([1]), 3, 5)),
            ((None, 0, 2),),
        ),
    )
