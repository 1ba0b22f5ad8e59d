"""The training loop: exact resume after SIGKILL, data order, schedules, clipping, AMP, DDP, errors."""

from __future__ import annotations

import errno
import importlib.util
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from reference_pipeline import checkpoint as checkpoint_module
from reference_pipeline.checkpoint import CheckpointMismatchError, CheckpointWriteError, latest_checkpoint
from reference_pipeline.config import TrainConfig
from reference_pipeline.engine import (
    TIMING_KEYS,
    ResumableBatchSampler,
    build_optimizer,
    build_scheduler,
    move_to_device,
    read_metrics,
    train,
)

TOY_PATH = Path(__file__).with_name("engine_toy.py")
REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("engine_toy", TOY_PATH)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    info = latest_checkpoint(run_dir / "checkpoints")
    assert info is not None
    return load_file(str(info.weights))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def _script_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, toy.ToyModel]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    model, result = toy.run_toy(run_dir)
    assert result.step == 30 and result.resumed_from is None
    return run_dir, model


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_run_then_resume_equals_uninterrupted_run_bitwise(tmp_path, uninterrupted, workers):
    reference_dir, _ = uninterrupted
    run_dir = tmp_path / "killed"
    command = [
        sys.executable,
        str(TOY_PATH),
        str(run_dir),
        "--workers",
        str(workers),
        "--step-delay",
        "0.06",
        "--threads",
        str(torch.get_num_threads()),
    ]
    process = subprocess.Popen(command, env=_script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(run_dir / "checkpoints") is None:  # wait for the first checkpoint (step 5)
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the toy run wrote no checkpoint in time"
            time.sleep(0.01)
        time.sleep(random.Random(workers).uniform(0.05, 0.4))  # a random step after a checkpoint
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    killed_at = latest_checkpoint(run_dir / "checkpoints")
    assert killed_at is not None and 5 <= killed_at.step < 30

    _, result = toy.run_toy(run_dir, resume=True, num_workers=workers)

    assert result.resumed_from == killed_at.step
    _assert_same_weights(_final_weights(run_dir), _final_weights(reference_dir))
    assert _without_timing(read_metrics(run_dir / "metrics.jsonl")) == _without_timing(
        read_metrics(reference_dir / "metrics.jsonl")
    )


def test_crash_after_a_checkpoint_in_process_then_resume_matches(tmp_path, uninterrupted, monkeypatch):
    reference_dir, _ = uninterrupted
    real_step_fn = toy.make_step_fn
    calls = []

    def crashing_step_fn(stat):
        step = real_step_fn(stat)

        def step_fn(model, batch):
            calls.append(1)
            if len(calls) == 23:  # step 23: after the checkpoint of step 20 and the log of step 21
                raise KeyboardInterrupt("simulated kill")
            return step(model, batch)

        return step_fn

    monkeypatch.setattr(toy, "make_step_fn", crashing_step_fn)
    with pytest.raises(KeyboardInterrupt):
        toy.run_toy(tmp_path)
    monkeypatch.undo()
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 21
    _, result = toy.run_toy(tmp_path, resume=True)
    assert result.resumed_from == 20
    _assert_same_weights(_final_weights(tmp_path), _final_weights(reference_dir))
    assert _without_timing(read_metrics(tmp_path / "metrics.jsonl")) == _without_timing(
        read_metrics(reference_dir / "metrics.jsonl")
    )


def test_finished_run_resumed_returns_immediately_with_its_weights(uninterrupted):
    reference_dir, trained = uninterrupted
    model, result = toy.run_toy(reference_dir, resume=True)
    assert result.already_finished and result.step == 30
    assert result.eval_metrics["mean_logit"] == read_metrics(reference_dir / "metrics.jsonl")[-1]["mean_logit"]
    for (name, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name


def test_existing_checkpoints_without_resume_are_not_overwritten(uninterrupted):
    reference_dir, _ = uninterrupted
    before = _final_weights(reference_dir)
    with pytest.raises(FileExistsError, match="resume=True"):
        toy.run_toy(reference_dir, resume=False)
    _assert_same_weights(_final_weights(reference_dir), before)


def test_resume_with_a_changed_trajectory_setting_is_refused(uninterrupted):
    reference_dir, _ = uninterrupted
    with pytest.raises(CheckpointMismatchError, match="lr_decoder"):
        toy.run_toy(reference_dir, resume=True, lr_decoder=0.5)


def test_resuming_with_another_model_names_the_checkpoint_and_the_keys(uninterrupted):
    reference_dir, _ = uninterrupted

    class Wider(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(toy.IN_DIM, 32), nn.ReLU())
            self.decoder = nn.Linear(32, 1)

        def forward(self, x):
            features = self.encoder(x)
            return self.decoder(features), features

    with pytest.raises(CheckpointMismatchError, match=r"step_00000030/model.safetensors.*encoder\.0\.weight"):
        train(
            Wider(),
            toy.make_step_fn(None),
            toy.ToyDataset(),
            toy.toy_config(),
            reference_dir,
            resume=True,
            progress=False,
        )


def test_evaluation_does_not_change_training(tmp_path, uninterrupted):
    reference_dir, _ = uninterrupted
    toy.run_toy(tmp_path, eval_every=1)
    _assert_same_weights(_final_weights(tmp_path), _final_weights(reference_dir))


def test_metrics_file_holds_train_and_eval_records_at_their_cadence(uninterrupted):
    reference_dir, _ = uninterrupted
    records = read_metrics(reference_dir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    eval_steps = [r["step"] for r in records if r["kind"] == "eval"]
    assert train_steps == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert eval_steps == [7, 14, 21, 28, 30]
    first = records[0]
    assert {"loss", "bce", "pull", "grad_norm", "lr/encoder", "lr/decoder", "data_time", "step_time"} <= set(first)
    assert math.isclose(first["lr/decoder"] / first["lr/encoder"], 3.0)
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["lr/decoder"] > 0  # the rate used by the last step, not the (zero) one after it


def test_the_last_step_is_logged_even_off_the_log_cadence(tmp_path):
    _, result = toy.run_toy(tmp_path, steps=5, eval_every=0)  # log_every 3: steps 3 and 5 (the last)
    train_steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert train_steps == [3, 5]
    assert result.train_metrics["step"] == 5


# ----------------------------------------------------------------------------- data order


def test_sampler_started_mid_run_yields_exactly_the_remaining_batches():
    full = list(ResumableBatchSampler(10, 4, seed=5, start_step=0, end_step=9))
    tail = list(ResumableBatchSampler(10, 4, seed=5, start_step=4, end_step=9))
    assert tail == full[4:]


def test_sampler_epochs_are_permutations_without_repeats_and_differ():
    sampler = ResumableBatchSampler(12, 4, seed=0, start_step=0, end_step=6)
    batches = list(sampler)
    assert {e for b in batches for e, _ in b} == {0, 1}
    epoch0 = [i for b in batches[:3] for _, i in b]
    epoch1 = [i for b in batches[3:] for _, i in b]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_sampler_ranks_shard_the_same_global_batch():
    single = list(ResumableBatchSampler(20, 4, seed=1, start_step=3, end_step=8))
    shards = [
        list(ResumableBatchSampler(20, 4, seed=1, start_step=3, end_step=8, rank=r, world_size=2)) for r in range(2)
    ]
    assert [a + b for a, b in zip(*shards)] == single


def test_sampler_rejects_a_dataset_smaller_than_one_batch():
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableBatchSampler(3, 4, seed=0, start_step=0, end_step=1)


def test_epoch_aware_dataset_receives_the_epoch(tmp_path):
    dataset = toy.ToyDataset()
    model = toy.ToyModel()
    train(model, toy.make_step_fn(None), dataset, toy.toy_config(steps=20, eval_every=0), tmp_path, progress=False)
    assert dataset.epochs_seen == {0, 1, 2}  # 9 batches of 4 per epoch


# ----------------------------------------------------------------------------- optimisation


def _lr_trace(config: TrainConfig) -> list[float]:
    model = nn.Linear(2, 1)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    trace = []
    for _ in range(config.steps):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace


def test_poly_schedule_follows_one_minus_t_over_T_to_the_power():
    config = TrainConfig(steps=10, lr_decoder=1.0, scheduler="poly", poly_power=0.9)
    expected = [(1 - t / 10) ** 0.9 for t in range(10)]
    assert np.allclose(_lr_trace(config), expected, rtol=1e-6)


def test_multistep_schedule_decays_by_gamma_at_fractional_milestones():
    config = TrainConfig(steps=20, lr_decoder=1.0, scheduler="multistep", milestones=(0.5, 0.75), gamma=0.1)
    expected = [1.0] * 10 + [0.1] * 5 + [0.01] * 5
    assert np.allclose(_lr_trace(config), expected)


def test_warmup_multiplies_the_decay_linearly_from_the_warmup_factor():
    config = TrainConfig(steps=10, lr_decoder=1.0, scheduler="poly", warmup_steps=4, warmup_factor=0.2)
    expected = [(0.2 + 0.8 * min(t, 4) / 4) * (1 - t / 10) ** 0.9 for t in range(10)]
    assert np.allclose(_lr_trace(config), expected, rtol=1e-6)


def test_encoder_group_gets_the_encoder_learning_rate():
    model = toy.ToyModel()
    config = TrainConfig(lr_encoder=1e-5, lr_decoder=1e-3)
    optimizer = build_optimizer(
        model, config, {"encoder": list(model.encoder.parameters()), "decoder": list(model.decoder.parameters())}
    )
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"encoder": 1e-5, "decoder": 1e-3}


def test_a_parameter_in_two_groups_is_refused():
    model = toy.ToyModel()
    with pytest.raises(ValueError, match="in both groups"):
        build_optimizer(
            model, TrainConfig(), {"encoder": list(model.parameters()), "decoder": list(model.parameters())}
        )


def test_gradients_are_clipped_to_the_configured_norm(tmp_path):
    model = toy.ToyModel()
    result = train(
        model,
        toy.make_step_fn(None),
        toy.ToyDataset(),
        toy.toy_config(steps=3, grad_clip=1e-3, eval_every=0),
        tmp_path,
        progress=False,
    )
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm <= 1e-3 * (1 + 1e-4)
    assert result.train_metrics["grad_norm"] > 1e-3  # the logged norm is the one before clipping


def test_bf16_autocast_is_active_inside_the_step_on_cpu(tmp_path):
    seen = []

    def step_fn(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        logits, _ = model(batch[0])
        seen.append(logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), batch[1]), {}

    train(
        toy.ToyModel(),
        step_fn,
        toy.ToyDataset(),
        toy.toy_config(steps=1, amp="bf16", eval_every=0),
        tmp_path,
        progress=False,
    )
    assert seen == [True, torch.bfloat16]


def test_fp16_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="fp16"):
        train(toy.ToyModel(), toy.make_step_fn(None), toy.ToyDataset(), toy.toy_config(amp="fp16"), tmp_path)


def test_a_nan_loss_stops_training_with_the_step(tmp_path):
    def step_fn(model, batch):
        return model(batch[0])[0].mean() * float("nan"), {}

    with pytest.raises(FloatingPointError, match="step 1"):
        train(toy.ToyModel(), step_fn, toy.ToyDataset(), toy.toy_config(), tmp_path, progress=False)


@dataclass
class _Views:
    images: torch.Tensor
    ids: list


def test_move_to_device_reaches_tensors_in_nested_structures():
    batch = {"views": [_Views(images=torch.zeros(1, 3), ids=[torch.ones(1)])], "n": 3, "t": (torch.ones(2),)}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["views"][0].images.device.type == "meta" and moved["views"][0].ids[0].device.type == "meta"
    assert moved["t"][0].device.type == "meta" and moved["n"] == 3


# ----------------------------------------------------------------------------- failures on disk


def test_run_directory_under_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError, match="not_a_folder"):
        toy.run_toy(blocker / "run")


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real_replace = os.replace

    def full_disk_at_step_10(src, dst):
        if "step_00000010" in str(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", full_disk_at_step_10)
    with pytest.raises(CheckpointWriteError, match="no space left.*step_00000005 is intact"):
        toy.run_toy(tmp_path, steps=12)
    monkeypatch.undo()
    latest = latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and latest.step == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000005"]
    _, result = toy.run_toy(tmp_path, steps=12, resume=True)
    assert result.resumed_from == 5 and result.step == 12


# ----------------------------------------------------------------------------- DDP


def test_ddp_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(TOY_PATH),
        str(tmp_path / "ddp_run"),
        "--ddp-first-step",
        str(out),
    ]
    # generous: two ranks start torch under whatever else loads the machine (seconds when idle)
    finished = subprocess.run(command, check=False, env=_script_env(), capture_output=True, timeout=900)
    assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2

    torch.manual_seed(0)
    model = toy.ToyModel(dropout=0.0)
    result = train(
        model,
        toy.make_step_fn(None),
        toy.ToyDataset(),
        toy.toy_config(steps=1, warmup_steps=0, grad_clip=None),
        tmp_path / "single",
        progress=False,
    )
    assert math.isclose(ddp["loss"], result.train_metrics["loss"], rel_tol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-5, atol=1e-7)


def test_a_nan_diagnostic_is_left_out_of_its_window_mean_only() -> None:
    from reference_pipeline.engine import _Window

    window = _Window()
    window.add({"loss": 1.0, "fnr": float("nan")}, 0.0, 0.0)
    window.add({"loss": 3.0, "fnr": 0.25}, 0.0, 0.0)
    means = window.means()
    assert means == {"loss": 2.0, "fnr": 0.25}
    restored = _Window()
    restored.load_state_dict(window.state_dict())
    assert restored.means() == means
    only_nan = _Window()
    only_nan.add({"fnr": float("nan")}, 0.0, 0.0)
    assert math.isnan(only_nan.means()["fnr"])
