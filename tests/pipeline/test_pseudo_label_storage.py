"""Pseudo-labels are stored as RLE, in memory and on disk, and decoded per sample (issue 16 §8, issue 19).

A dense ``(M, H, W)`` bool array per image for a whole unlabeled split is ``images × M × H × W`` bytes:
2 677 Cityscapes images at 1024×2048 with 20 instances each would hold 112 GB. These tests fail if
reading the pseudo-label file, or building the pseudo-labeled dataset, decodes the masks of the split.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from paper_standins import write_cityscapes
from torch import nn

from reference_pipeline.config import load_pipeline_config
from reference_pipeline.data import CityscapesInstanceDataset, encode_mask
from reference_pipeline.data.semi import PseudoLabeledDataset
from reference_pipeline.models.outputs import SegmentationOutput
from reference_pipeline.pseudo_labels import PseudoInstances, read_pseudo_labels, write_pseudo_labels
from reference_pipeline.stages import Datasets, make_pseudo_labels


def _blobs(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` non-overlapping rectangles, ``(count, H, W)`` bool."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, height, width), dtype=bool)
    step = width // count
    for index in range(count):
        top = int(rng.integers(0, height // 2))
        masks[index, top : top + height // 3, index * step : index * step + step // 2] = True
    return masks


def test_the_container_round_trips_masks_classes_and_scores_through_rle() -> None:
    masks = _blobs(4, 40, 64)
    labels = PseudoInstances.from_masks(masks, np.array([3, 1, 0, 2]), np.array([0.9, 0.8, 0.5, 0.4]))
    assert labels.size == (40, 64) and labels.num_instances == 4
    assert all(isinstance(rle["counts"], bytes) for rle in labels.rles)
    assert not any(isinstance(v, np.ndarray) and v.size >= 40 * 64 for v in vars(labels).values())  # no dense field
    assert np.array_equal(labels.decode_masks(), masks)
    assert labels.targets().masks.dtype == torch.bool and torch.equal(labels.targets().masks, torch.from_numpy(masks))
    assert labels.select([2, 0]).class_ids.tolist() == [0, 3]
    assert np.array_equal(labels.select([2, 0]).decode_masks(), masks[[2, 0]])
    assert PseudoInstances.empty((5, 7)).decode_masks().shape == (0, 5, 7)


def test_the_file_keeps_the_format_earlier_runs_wrote(tmp_path: Path) -> None:
    masks = _blobs(3, 24, 48)
    old = {"7": {"masks": [encode_mask(m) for m in masks], "shape": [3, 24, 48], "class_ids": [1, 2, 0],
                 "scores": [0.9, 0.7, 0.5]}}  # what stages._write_pseudo wrote before issue 19  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(old))
    read = read_pseudo_labels(tmp_path / "old.json")
    assert list(read) == [7] and np.array_equal(read[7].decode_masks(), masks)
    assert read[7].class_ids.tolist() == [1, 2, 0] and read[7].scores.tolist() == [0.9, 0.7, 0.5]
    write_pseudo_labels(tmp_path / "new.json", read)
    assert json.loads((tmp_path / "new.json").read_text()) == old


def test_a_file_of_another_format_is_rejected_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"7": {"masks": [], "version": 2}}))
    with pytest.raises(ValueError, match=r"bad\.json is not a pseudo-label file.*delete it"):
        read_pseudo_labels(tmp_path / "bad.json")


class _ListDataset:
    """``InstanceDataset`` protocol over image ids of one size (images are never read here)."""

    def __init__(self, ids: list[int]) -> None:
        self.image_ids, self.class_names = ids, ["a", "b"]

    def __len__(self) -> int:
        return len(self.image_ids)


def test_a_split_of_pseudo_labels_is_read_and_held_without_decoding_its_masks(tmp_path: Path) -> None:
    images, count, height, width = 40, 10, 512, 1024  # dense: 40 × 10 × 512 × 1024 B = 210 MB
    records = PseudoInstances.from_masks(_blobs(count, height, width), np.arange(count) % 2, np.full(count, 0.5))
    write_pseudo_labels(tmp_path / "split.json", dict.fromkeys(range(images), records))
    tracemalloc.start()
    try:
        pseudo = read_pseudo_labels(tmp_path / "split.json")
        dataset = PseudoLabeledDataset(_ListDataset(list(range(images))), pseudo)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense = images * count * height * width
    held = sum(labels.nbytes for labels in dataset.pseudo.values())
    assert held < dense / 100, f"{held} bytes held for {dense} dense bytes"
    assert peak < 16 * 2**20, f"reading the split allocated {peak / 2**20:.0f} MiB (dense masks: {dense / 2**20:.0f} MiB)"


def test_the_pseudo_labeled_dataset_takes_only_the_rle_container(tiny_dataset: Path) -> None:
    from reference_pipeline.data.synthetic import load_synthetic_split

    unlabeled = load_synthetic_split(tiny_dataset, "target_unlabeled")
    sample = unlabeled[0]
    dense = {"masks": np.ones((1, sample.height, sample.width), bool)}
    with pytest.raises(TypeError, match="PseudoInstances"):
        PseudoLabeledDataset(unlabeled, {int(sample.image_id): dense})  # type: ignore[dict-item]
    labels = PseudoInstances.from_masks(_blobs(2, sample.height, sample.width), np.array([1, 0]), np.array([0.9, 0.8]))
    pseudo_sample, _truth = PseudoLabeledDataset(unlabeled, {int(sample.image_id): labels})[0]
    assert np.array_equal(pseudo_sample.masks, labels.decode_masks()) and pseudo_sample.class_ids.tolist() == [1, 0]


class _BoxTeacher(nn.Module):
    """One box-shaped instance of class 0 per image."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        batch, _, height, width = images.shape
        masks = torch.full((batch, 2, (height + 3) // 4, (width + 3) // 4), -10.0)
        masks[:, 0, 2:8, 2:12] = 10.0
        classes = torch.tensor([[8.0] + [0.0] * 8, [0.0] * 8 + [8.0]]).expand(batch, -1, -1)
        return SegmentationOutput(mask_logits=masks * self.scale, class_logits=classes,
                                  pixel_embeddings=torch.zeros(batch, 4, *masks.shape[-2:]))  # fmt: skip


def test_make_pseudo_labels_returns_rle_writes_the_file_and_reads_it_back(tmp_path: Path) -> None:
    write_cityscapes(tmp_path / "cityscapes", train=3, val=1)
    cfg = load_pipeline_config(None, ["data.format=cityscapes", "data.image_size=[64,128]", "eval.batch_size=2"])
    train = CityscapesInstanceDataset(tmp_path / "cityscapes", "train")
    datasets = Datasets(train, train, train, None, list(train.class_names))
    path = tmp_path / "pseudo.json"
    made = make_pseudo_labels(_BoxTeacher(), cfg, datasets, path, progress=False)
    assert path.is_file() and (tmp_path / "pseudo_quality.json").is_file()
    assert all(isinstance(v, PseudoInstances) and v.num_instances == 1 for v in made.values())
    assert made[int(train.image_ids[0])].size == (128, 256)  # native size, not the 64×128 training size
    cached = make_pseudo_labels(None, cfg, datasets, path, progress=False)  # type: ignore[arg-type]  # from the file
    assert sorted(cached) == sorted(made)
    for image_id, labels in made.items():
        assert np.array_equal(cached[image_id].decode_masks(), labels.decode_masks())
        assert cached[image_id].class_ids.tolist() == labels.class_ids.tolist()
