"""Pseudo-labelling under torch.distributed: rank 0 labels for longer than a collective's timeout.

At full scale rank 0 pseudo-labels the unlabeled split for hours while the other ranks wait; a barrier
would time out (30 min by default). Two ``gloo`` processes with a 3 s timeout and a teacher that takes
longer than that show it.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from paper_standins import write_cityscapes
from torch import nn

TIMEOUT_S = 3.0


class _SlowTeacher(nn.Module):
    """Predicts one box-shaped instance per image, slower than the process group's timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor):
        from reference_pipeline.models.outputs import SegmentationOutput

        time.sleep(TIMEOUT_S + 2.0)
        batch, _, height, width = images.shape
        masks = torch.full((batch, 2, (height + 3) // 4, (width + 3) // 4), -10.0)
        masks[:, 0, 2:8, 2:12] = 10.0
        classes = torch.tensor([[8.0] + [0.0] * 8, [0.0] * 8 + [8.0]]).expand(batch, -1, -1)
        return SegmentationOutput(mask_logits=masks * self.scale, class_logits=classes,
                                  pixel_embeddings=torch.zeros(batch, 4, *masks.shape[-2:]))  # fmt: skip


def _worker(rank: int, root: str, port: int, results: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        from reference_pipeline.config import load_pipeline_config
        from reference_pipeline.data import CityscapesInstanceDataset
        from reference_pipeline.stages import Datasets, make_pseudo_labels

        cfg = load_pipeline_config(None, ["data.format=cityscapes", "data.image_size=[64,128]", "eval.batch_size=2"])
        train = CityscapesInstanceDataset(Path(root) / "cityscapes", "train")
        datasets = Datasets(train, train, train, None, list(train.class_names))
        pseudo = make_pseudo_labels(_SlowTeacher(), cfg, datasets, Path(root) / "pseudo.json", progress=False)
        Path(results, f"rank{rank}").write_text(str(sorted((k, v.decode_masks().shape) for k, v in pseudo.items())))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_other_ranks_wait_for_rank_0s_pseudo_labels_longer_than_the_collective_timeout(tmp_path: Path) -> None:
    write_cityscapes(tmp_path / "cityscapes", train=2, val=1)
    results = tmp_path / "results"
    results.mkdir()
    context = mp.start_processes(_worker, args=(str(tmp_path), _free_port(), str(results)), nprocs=2, join=False,
                                 start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 240
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 240 s")
    rank0, rank1 = (results / "rank0").read_text(), (results / "rank1").read_text()
    assert rank0 == rank1 and "(1, 128, 256)" in rank0  # the same labels, at the images' native size
