"""Shared fixtures for the reference-pipeline data / evaluation tests (tiny sizes only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reference_pipeline.data.synthetic import SyntheticConfig, generate_dataset


@pytest.fixture(scope="session")
def tiny_config() -> SyntheticConfig:
    """A few 64x64 images per split."""
    return SyntheticConfig(
        image_size=(64, 64), source_train=4, target_labeled=3, target_unlabeled=5, target_val=3, seed=7
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, tiny_config: SyntheticConfig) -> Path:
    """The tiny synthetic dataset written to disk once per session (in-process)."""
    root = tmp_path_factory.mktemp("synthetic") / "dataset"
    return generate_dataset(root, tiny_config, workers=0, progress=False)
