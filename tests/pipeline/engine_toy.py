"""A tiny model, dataset and step function for the engine tests (also runnable as a script).

Everything that can break exact resumption is exercised: dropout (torch RNG), per-sample noise
drawn from ``(seed, epoch, index)`` (data order and epoch passing), a numpy and a ``random`` draw
per step (their RNG states), an extra stateful object that changes every step (like a memory
bank), a warmup + PolyLR schedule, gradient clipping and a log window that does not divide the
checkpoint interval.

Script use (for the SIGKILL test and the DDP test)::

    python tests/pipeline/engine_toy.py RUN_DIR --workers 0 --step-delay 0.05 [--resume]
    torchrun --standalone --nproc_per_node 2 tests/pipeline/engine_toy.py RUN_DIR --ddp-first-step OUT.pt
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

if __name__ == "__main__":  # run as a script from anywhere: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reference_pipeline.config import TrainConfig
from reference_pipeline.engine import TrainResult, train

NUM_ITEMS, IN_DIM, HIDDEN = 36, 6, 16


class ToyDataset:
    """Fixed inputs plus small per-(epoch, index) noise drawn from its own generator."""

    def __init__(self, seed: int = 3, noise: float = 0.05) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(NUM_ITEMS, IN_DIM, generator=generator)  # (N, IN_DIM)
        self.y = (self.x[:, :2].sum(1, keepdim=True) > 0).float()  # (N, 1)
        self.seed, self.noise = seed, noise
        self.epochs_seen: set[int] = set()

    def __len__(self) -> int:
        return NUM_ITEMS

    def get_item(self, index: int, epoch: int) -> tuple[Tensor, Tensor]:
        self.epochs_seen.add(epoch)
        rng = np.random.default_rng([self.seed, epoch, index])
        jitter = torch.from_numpy(rng.normal(scale=self.noise, size=IN_DIM).astype(np.float32))  # (IN_DIM,)
        return self.x[index] + jitter, self.y[index]


class RunningStat:
    """A stateful object outside the model (stands in for a memory bank)."""

    def __init__(self) -> None:
        self.mean = torch.zeros(HIDDEN)

    def update(self, values: Tensor) -> None:
        self.mean = 0.9 * self.mean + 0.1 * values.detach().mean(0)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = state["mean"].clone()


class ToyModel(nn.Module):
    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Dropout(dropout))
        self.decoder = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.encoder(x)  # (B, HIDDEN)
        return self.decoder(features), features  # (B, 1), (B, HIDDEN)


def make_step_fn(stat: RunningStat | None):
    def step_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        logits, features = model(x)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = bce
        terms = {"bce": float(bce.detach())}
        if stat is not None:
            pull = (features.mean(0) - stat.mean).pow(2).mean()
            loss = loss + 0.01 * pull + 1e-3 * float(np.random.rand()) + 1e-3 * random.random()
            stat.update(features)
            terms["pull"] = float(pull.detach())
        return loss, terms

    return step_fn


def toy_config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "steps": 30,
        "batch_size": 4,
        "lr_encoder": 1e-2,
        "lr_decoder": 3e-2,
        "weight_decay": 0.05,
        "scheduler": "poly",
        "warmup_steps": 3,
        "grad_clip": 1.0,
        "eval_every": 7,
        "checkpoint_every": 5,
        "log_every": 3,
        "num_workers": 0,
        "seed": 11,
        "device": "cpu",
    }
    return TrainConfig(**{**base, **changes})


def run_toy(
    run_dir: Path, *, resume: bool = False, step_delay: float = 0.0, **changes: Any
) -> tuple[ToyModel, TrainResult]:
    torch.manual_seed(0)
    model = ToyModel()
    stat = RunningStat()
    step = make_step_fn(stat)

    def slow_step(m: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        time.sleep(step_delay)
        return step(m, batch)

    def evaluate(m: nn.Module) -> dict[str, float]:
        torch.rand(3)  # evaluation may consume RNG: it must not change training
        logits, _ = m(ToyDataset().x)
        return {"mean_logit": float(logits.mean())}

    result = train(
        model,
        slow_step if step_delay else step,
        ToyDataset(),
        toy_config(**changes),
        run_dir,
        param_groups={"encoder": list(model.encoder.parameters()), "decoder": list(model.decoder.parameters())},
        evaluate_fn=evaluate,
        extra_state={"stat": stat},
        resume=resume,
        desc="toy",
        progress=False,
    )
    return model, result


def _ddp_first_step(run_dir: Path, out: Path) -> None:
    torch.manual_seed(0)
    model = ToyModel(dropout=0.0)
    result = train(
        model,
        make_step_fn(None),
        ToyDataset(),
        toy_config(steps=1, warmup_steps=0, grad_clip=None),
        run_dir,
        progress=False,
    )
    from reference_pipeline.engine import cleanup_distributed, distributed_info, exit_process

    if distributed_info().is_main:
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        torch.save({"loss": result.train_metrics["loss"], "grads": grads, "world": distributed_info().world_size}, out)
    torch.distributed.barrier()  # no rank tears the group down while another still uses it
    cleanup_distributed()
    exit_process(0)  # DDP's gloo threads outlive the group: no interpreter teardown while they run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ddp-first-step", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (match the comparison run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ddp_first_step is not None:
        _ddp_first_step(args.run_dir, args.ddp_first_step)
        return
    run_toy(args.run_dir, resume=args.resume, step_delay=args.step_delay, num_workers=args.workers)


if __name__ == "__main__":
    main()
