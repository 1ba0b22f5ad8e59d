"""Shared test helpers: deterministic seeds and small generated scenes."""

from __future__ import annotations

import os

import pytest
import torch

# One thread per test process: pytest-xdist runs two workers on this 2-core machine, and two busy
# threads per process made a tiny forward take 520 ms instead of 3 ms.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
