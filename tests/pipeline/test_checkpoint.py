"""Checkpoints: atomic writes, the previous one survives a cut write, safe loading, clear mismatch errors."""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from reference_pipeline import checkpoint as ckpt
from reference_pipeline.checkpoint import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointWriteError,
    capture_rng_state,
    check_writable,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_state,
    restore_rng_state,
    save_checkpoint,
)


def _model(seed: int, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width), nn.Linear(width, 2))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _state(step: int) -> dict:
    return {"step": step, "rng": capture_rng_state(), "tensor": torch.arange(3), "nested": {"a": [1, 2.5, None]}}


def test_round_trip_restores_weights_and_state(tmp_path):
    saved = _model(1)
    save_checkpoint(tmp_path, 7, saved, _state(7))
    loaded = _model(2)
    info, state = load_checkpoint(tmp_path, loaded)
    assert info.step == 7 and state["step"] == 7 and state["nested"] == {"a": [1, 2.5, None]}
    assert _same(saved, loaded)


def test_rng_states_survive_weights_only_loading_and_replay_the_same_draws(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leave a cached Gaussian in numpy's legacy state
    save_checkpoint(tmp_path, 1, _model(0), {"rng": capture_rng_state()})
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    _, state = load_checkpoint(tmp_path, _model(0))  # torch.load(weights_only=True) inside
    restore_rng_state(state["rng"])
    replay = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], np.random.randn())
    assert torch.equal(expected[0], replay[0]) and np.array_equal(expected[1], replay[1])
    assert expected[2] == replay[2] and expected[3] == replay[3]


class _Arbitrary:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_pickled_arbitrary_objects_are_refused_on_load(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"payload": _Arbitrary()}, path)
    with pytest.raises(CheckpointCorruptError, match="weights_only=True"):
        load_state(path)


def test_unsafe_state_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match=r"state\['extra'\]\['obj'\].*weights_only"):
        save_checkpoint(tmp_path, 1, _model(0), {"extra": {"obj": _Arbitrary()}})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_containers_weights_only_loading_cannot_read_are_refused_before_writing(tmp_path):
    from collections import defaultdict, namedtuple

    with pytest.raises(TypeError, match=r"state\['bank'\] is a defaultdict"):
        save_checkpoint(tmp_path, 1, _model(0), {"bank": defaultdict(list)})
    with pytest.raises(TypeError, match=r"state\['pair'\] is a Pair"):
        save_checkpoint(tmp_path, 1, _model(0), {"pair": namedtuple("Pair", "a b")(1, 2)})


def test_crash_between_weights_and_pointer_loads_the_previous_checkpoint(tmp_path, monkeypatch):
    first = _model(1)
    save_checkpoint(tmp_path, 1, first, _state(1))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the pointer moved")

    monkeypatch.setattr(ckpt, "_write_pointer", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _model(2), _state(2))
    monkeypatch.undo()
    loaded = _model(5)
    info, state = load_checkpoint(tmp_path, loaded)
    assert info.step == 1 and state["step"] == 1 and _same(loaded, first)


def test_truncated_files_of_a_write_in_progress_are_never_loaded(tmp_path):
    first = _model(1)
    save_checkpoint(tmp_path, 1, first, _state(1))
    save_checkpoint(tmp_path, 2, _model(2), _state(2))
    # a write cut mid-way: a temporary folder with half-written files, pointer untouched
    partial = tmp_path / ".step_00000003.4242.tmp"
    shutil.copytree(tmp_path / "step_00000002", partial)
    for name in ("model.safetensors", "state.pt"):
        data = (partial / name).read_bytes()
        (partial / name).write_bytes(data[: len(data) // 2])
    info, state = load_checkpoint(tmp_path, _model(0))
    assert info.step == 2 and state["step"] == 2
    assert [c.step for c in list_checkpoints(tmp_path)] == [1, 2]


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    first = _model(1)
    save_checkpoint(tmp_path, 1, first, _state(1))
    save_checkpoint(tmp_path, 2, _model(2), _state(2))
    state_file = tmp_path / "step_00000002" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated after the fact (disk corruption)
    loaded = _model(0)
    info, _ = load_checkpoint(tmp_path, loaded)
    assert info.step == 1 and _same(loaded, first)
    assert "skipping unreadable checkpoint" in caplog.text


def test_checkpoint_of_another_model_names_the_file_and_keys_and_leaves_the_model_unchanged(tmp_path):
    save_checkpoint(tmp_path, 1, _model(1, width=4), _state(1))
    other = _model(2, width=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as caught:
        load_checkpoint(tmp_path, other)
    message = str(caught.value)
    assert "step_00000001/model.safetensors" in message and "0.weight" in message and "(5, 3)" in message
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \[4\.bias, 4\.weight\]"):
        load_checkpoint(tmp_path, nn.Sequential(*_model(1), nn.ReLU(), nn.Linear(2, 2)))


def test_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(0)
    saved = Tied()
    save_checkpoint(tmp_path, 1, saved, {})
    torch.manual_seed(1)
    loaded = Tied()
    load_checkpoint(tmp_path, loaded)
    assert torch.equal(loaded.head.weight, saved.embed.weight) and loaded.head.weight is loaded.embed.weight


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, _model(step), _state(step), keep=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path).step == 4


def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    first = _model(1)
    save_checkpoint(tmp_path, 1, first, _state(1))

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", no_space)
    with pytest.raises(CheckpointWriteError, match=r"no space left on the device.*step_00000001 is intact"):
        save_checkpoint(tmp_path, 2, _model(2), _state(2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # temporaries removed
    loaded = _model(0)
    assert load_checkpoint(tmp_path, loaded)[0].step == 1 and _same(loaded, first)


def test_unwritable_run_directory_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError, match=r"a_file/run is not writable: a path component is a file"):
        check_writable(blocker / "run")

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(ckpt.Path, "write_bytes", read_only)
    with pytest.raises(CheckpointWriteError, match="read-only"):
        check_writable(tmp_path / "run")


def test_no_checkpoint_means_none(tmp_path):
    assert load_checkpoint(tmp_path / "missing", _model(0)) is None
    assert latest_checkpoint(tmp_path) is None


def test_state_file_is_a_plain_weights_only_pickle(tmp_path):
    save_checkpoint(tmp_path, 1, _model(0), _state(1))
    raw = torch.load(tmp_path / "step_00000001" / "state.pt", weights_only=True)
    assert raw["step"] == 1
    with open(tmp_path / "step_00000001" / "state.pt", "rb") as handle:
        assert handle.read(2) == b"PK"  # torch's zip container, not a bare pickle
    assert isinstance(pickle.dumps(raw["nested"]), bytes)
    assert os.path.getsize(tmp_path / "step_00000001" / "model.safetensors") > 0
