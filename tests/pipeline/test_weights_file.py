"""``checkpoint.save_weights``: the final ``model.safetensors`` of a stage when the disk fills up mid-write.

The spec: a write that fails part-way raises :class:`CheckpointWriteError` naming the file and the
cause ("no space left"), leaves the previous ``model.safetensors`` intact byte for byte, and leaves
no temporary file behind; a write that succeeds replaces the file with the new weights.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from reference_pipeline import checkpoint
from reference_pipeline.checkpoint import CheckpointWriteError, save_weights


def _model(value: float) -> nn.Module:
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, fraction: float) -> None:
    """Make safetensors' writer write ``fraction`` of the file, then fail with ENOSPC."""
    real = checkpoint.save_model

    def partial(model: nn.Module, filename: str, *args, **kwargs) -> None:
        real(model, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: int(len(data) * fraction)])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint, "save_model", partial)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_disk_full_mid_write_is_a_clear_error_and_the_previous_file_is_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    path = tmp_path / "stage" / "model.safetensors"
    save_weights(_model(1.0), path)
    before = path.read_bytes()
    _fill_disk_after(monkeypatch, fraction)
    with pytest.raises(CheckpointWriteError, match="no space left") as caught:
        save_weights(_model(2.0), path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before  # byte for byte
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]  # no temporary file left


def test_disk_full_on_the_first_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stage" / "model.safetensors"
    _fill_disk_after(monkeypatch, 0.5)
    with pytest.raises(CheckpointWriteError):
        save_weights(_model(2.0), path)
    assert not path.exists() and list(path.parent.iterdir()) == []


def test_a_successful_write_replaces_the_previous_weights(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_weights(_model(1.0), path)
    save_weights(_model(3.0), path)
    assert torch.equal(load_file(str(path))["weight"], torch.full((64, 64), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
