"""Tests of the procedural dataset generator and its COCO round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from reference_pipeline.data import synthetic
from reference_pipeline.data.synthetic import (
    SPLITS,
    THING_CLASSES,
    SyntheticConfig,
    generate_dataset,
    load_synthetic_split,
    read_manifest,
    render_scene,
    synthetic_sample,
    touching_same_class_pairs,
)

#: Stated guarantee: at least this fraction of images has a touching same-class pair.
TOUCHING_FRACTION = 0.9


def test_render_is_deterministic_and_seed_dependent() -> None:
    config = SyntheticConfig(image_size=(64, 64))
    first = render_scene(config, "target_unlabeled", 11)
    render_scene(config, "target_unlabeled", 3)  # rendering another image in between changes nothing
    second = render_scene(config, "target_unlabeled", 11)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    other_seed = render_scene(SyntheticConfig(image_size=(64, 64), seed=1), "target_unlabeled", 11)
    assert not np.array_equal(first[0], other_seed[0])
    other_index = render_scene(config, "target_unlabeled", 12)
    assert not np.array_equal(first[0], other_index[0])


def test_masks_are_nonempty_disjoint_and_inside_the_image() -> None:
    config = SyntheticConfig(image_size=(64, 80))
    for split in SPLITS:
        for index in range(6):
            image, masks, class_ids = render_scene(config, split, index)
            assert image.shape == (64, 80, 3) and image.dtype == np.uint8
            assert masks.ndim == 3 and masks.shape[1:] == (64, 80) and masks.dtype == bool
            assert len(masks) >= 2
            assert masks.reshape(len(masks), -1).sum(1).min() > 0
            assert masks.sum(0).max() <= 1  # visible parts never overlap
            assert class_ids.dtype == np.int64
            assert set(class_ids.tolist()) <= set(range(len(THING_CLASSES)))


def test_touching_same_class_instances_in_most_images() -> None:
    config = SyntheticConfig(image_size=(96, 96))
    touching = 0
    total = 0
    for split in ("source_train", "target_val"):
        for index in range(20):
            _, masks, class_ids = render_scene(config, split, index)
            touching += touching_same_class_pairs(masks, class_ids) > 0
            total += 1
    assert touching / total >= TOUCHING_FRACTION


def test_touching_pairs_counts_4_connected_contact_only() -> None:
    masks = np.zeros((3, 5, 5), dtype=bool)
    masks[0, 1:3, 0:2] = True
    masks[1, 1:3, 2:4] = True  # shares an edge with instance 0
    masks[2, 4, 4] = True  # only diagonal contact with nobody
    assert touching_same_class_pairs(masks, np.array([0, 0, 0])) == 1
    assert touching_same_class_pairs(masks, np.array([0, 1, 0])) == 0
    diagonal = np.zeros((2, 3, 3), dtype=bool)
    diagonal[0, 0, 0] = True
    diagonal[1, 1, 1] = True
    assert touching_same_class_pairs(diagonal, np.array([2, 2])) == 0


def test_source_and_target_appearance_differ() -> None:
    config = SyntheticConfig()
    stats: dict[str, dict[str, list[float]]] = {}
    for split in ("source_train", "target_val"):
        red_blue, sizes, roughness = [], [], []
        for index in range(16):
            image, masks, _ = render_scene(config, split, index)
            pixels = image.astype(np.float64)
            red_blue.append(pixels[..., 0].mean() / pixels[..., 2].mean())
            sizes.extend(masks.reshape(len(masks), -1).sum(1).tolist())
            sky = pixels[:10]  # the sky band: smooth in source, noisy in target
            roughness.append(np.abs(sky - ndimage.uniform_filter(sky, (3, 3, 1))).mean())
        stats[split] = {"red_blue": red_blue, "sizes": sizes, "roughness": roughness}
    source, target = stats["source_train"], stats["target_val"]
    assert np.mean(target["red_blue"]) > np.mean(source["red_blue"]) + 0.2  # warm colour cast
    assert min(target["red_blue"]) > max(source["red_blue"]) - 0.05
    assert np.median(target["sizes"]) < 0.8 * np.median(source["sizes"])  # smaller instances
    # the source is broad (sensor noise 0-6, like a foundation model's data); the target is always noisy (2-6)
    assert np.mean(target["roughness"]) > 1.3 * np.mean(source["roughness"])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="image_size"):
        SyntheticConfig(image_size=(8, 8))
    with pytest.raises(ValueError, match="source_train"):
        SyntheticConfig(source_train=-1)
    with pytest.raises(ValueError, match="group_size"):
        SyntheticConfig(group_size=(1, 3))
    with pytest.raises(ValueError, match="unknown split"):
        render_scene(SyntheticConfig(), "train", 0)
    assert SyntheticConfig.from_dict(SyntheticConfig().to_dict()) == SyntheticConfig()
    assert SyntheticConfig().config_hash() != SyntheticConfig(seed=1).config_hash()


def test_coco_round_trip_preserves_every_mask(tiny_dataset: Path, tiny_config: SyntheticConfig) -> None:
    manifest = read_manifest(tiny_dataset)
    assert manifest is not None and manifest["config_hash"] == tiny_config.config_hash()
    for split, size in tiny_config.split_sizes().items():
        dataset = load_synthetic_split(tiny_dataset, split)
        assert len(dataset) == size
        assert dataset.class_names == list(THING_CLASSES)
        assert manifest["splits"][split]["images"] == size
        for index in range(size):
            read = dataset[index]
            expected = synthetic_sample(tiny_config, split, index)
            assert read.image_id == expected.image_id and read.file_name == expected.file_name
            np.testing.assert_array_equal(read.image, expected.image)  # PNG is lossless
            np.testing.assert_array_equal(read.masks, expected.masks)  # RLE is exact
            np.testing.assert_array_equal(read.class_ids, expected.class_ids)
            assert not read.is_crowd.any()


def test_image_ids_are_unique_across_splits(tiny_dataset: Path) -> None:
    ids = [i for split in SPLITS for i in load_synthetic_split(tiny_dataset, split).image_ids]
    assert len(ids) == len(set(ids))


def test_generation_is_skipped_when_the_config_hash_matches(tiny_dataset: Path, tiny_config: SyntheticConfig) -> None:
    manifest = tiny_dataset / "manifest.json"
    before = manifest.stat().st_mtime_ns
    generate_dataset(tiny_dataset, tiny_config, workers=0, progress=False)
    assert manifest.stat().st_mtime_ns == before


def test_changed_config_regenerates_and_foreign_folders_are_protected(tmp_path: Path) -> None:
    root = tmp_path / "data"
    small = SyntheticConfig(image_size=(48, 48), source_train=2, target_labeled=1, target_unlabeled=1, target_val=1)
    generate_dataset(root, small, workers=0, progress=False)
    bigger = SyntheticConfig(image_size=(48, 48), source_train=3, target_labeled=1, target_unlabeled=1, target_val=1)
    generate_dataset(root, bigger, workers=0, progress=False)
    assert read_manifest(root)["config_hash"] == bigger.config_hash()  # type: ignore[index]
    assert len(load_synthetic_split(root, "source_train")) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp / old folders left

    foreign = tmp_path / "my_photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        generate_dataset(foreign, small, workers=0, progress=False)
    assert (foreign / "keep.txt").read_text() == "precious"


def test_crash_leaves_no_dataset_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synthetic._render_chunk

    def failing(args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(args)

    monkeypatch.setattr(synthetic, "_render_chunk", failing)
    root = tmp_path / "data"
    config = SyntheticConfig(image_size=(48, 48), source_train=2, target_labeled=2, target_unlabeled=2, target_val=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset(root, config, workers=0, progress=False)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_synthetic_split(root, "source_train")


def test_worker_processes_write_identical_files(tmp_path: Path) -> None:
    config = SyntheticConfig(image_size=(32, 32), source_train=40, target_labeled=8, target_unlabeled=20, target_val=4)
    serial = generate_dataset(tmp_path / "serial", config, workers=0, progress=False)
    parallel = generate_dataset(tmp_path / "parallel", config, workers=2, progress=False)
    for split in SPLITS:
        a = json.loads((serial / "annotations" / f"instances_{split}.json").read_text())
        b = json.loads((parallel / "annotations" / f"instances_{split}.json").read_text())
        assert a == b
    files = sorted(p.relative_to(serial / "images") for p in (serial / "images").rglob("*.png"))
    assert len(files) == 72
    for name in files:
        assert (serial / "images" / name).read_bytes() == (parallel / "images" / name).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["parallel", "serial"]  # temp folders renamed away
