"""Shared test helpers: deterministic seeds and small generated scenes."""

from __future__ import annotations

import os

import pytest
import torch

# Keep each test process to the machine's two cores and deterministic kernels.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
