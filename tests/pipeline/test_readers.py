"""Readers of COCO-format, Cityscapes and ADE20K data on tiny fixture trees in the real formats."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from reference_pipeline.data.ade20k import ADE20K_INSTANCE_CLASSES, ADE20KInstanceDataset, mask2former_ade20k_json
from reference_pipeline.data.cityscapes import CityscapesInstanceDataset
from reference_pipeline.data.coco import CocoInstanceDataset, encode_mask, samples_to_coco_dict
from reference_pipeline.data.structures import InstanceSample

H, W = 8, 10


def _save_rgb(path: Path, height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return image


# ----------------------------------------------------------------------------------------- COCO
def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with zeros (COCO's uncompressed RLE)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


@pytest.fixture()
def coco_tree(tmp_path: Path) -> dict:
    """Two images; polygon, uncompressed RLE, compressed RLE, crowd and an empty annotation."""
    images = tmp_path / "images"
    pixels = {1: _save_rgb(images / "a.png", seed=1), 5: _save_rgb(images / "sub" / "b.png", seed=2)}
    polygon_mask = np.zeros((H, W), bool)
    polygon_mask[2:5, 2:6] = True  # polygon (2,2)-(6,5): pixel centres inside
    rle_mask = np.zeros((H, W), bool)
    rle_mask[5:8, 0:3] = True
    compressed_mask = np.zeros((H, W), bool)
    compressed_mask[0:2, 6:10] = True
    crowd_mask = np.zeros((H, W), bool)
    crowd_mask[3:8, 4:9] = True
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 5, "file_name": "sub/b.png", "height": H, "width": W},
        ],
        "categories": [{"id": 11, "name": "car"}, {"id": 3, "name": "person"}, {"id": 7, "name": "bus"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 11, "iscrowd": 0, "segmentation": [[2, 2, 6, 2, 6, 5, 2, 5]]},
            {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": _uncompressed_rle(rle_mask)},
            {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": encode_mask(compressed_mask)},
            {"id": 4, "image_id": 5, "category_id": 3, "iscrowd": 1, "segmentation": _uncompressed_rle(crowd_mask)},
            {"id": 5, "image_id": 5, "category_id": 3, "iscrowd": 0, "segmentation": []},
        ],
    }
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(data))
    return {
        "file": annotation_file,
        "images": images,
        "data": data,
        "pixels": pixels,
        "masks": {"polygon": polygon_mask, "rle": rle_mask, "compressed": compressed_mask, "crowd": crowd_mask},
    }


def test_coco_reader_parses_polygons_rle_and_crowd(coco_tree: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        dataset = CocoInstanceDataset(coco_tree["file"], coco_tree["images"])
    assert "skipped 1 annotation" in caplog.text  # the empty segmentation is counted, not silently lost
    assert dataset.class_names == ["person", "bus", "car"]  # category ids 3, 7, 11 -> 0, 1, 2
    assert dataset.category_ids == [3, 7, 11]
    assert dataset.image_ids == [1, 5] and len(dataset) == 2

    first = dataset[0]
    np.testing.assert_array_equal(first.image, coco_tree["pixels"][1])
    assert first.image_id == 1 and first.file_name == "a.png"
    np.testing.assert_array_equal(first.class_ids, [2, 0, 1])
    np.testing.assert_array_equal(first.masks[0], coco_tree["masks"]["polygon"])
    np.testing.assert_array_equal(first.masks[1], coco_tree["masks"]["rle"])
    np.testing.assert_array_equal(first.masks[2], coco_tree["masks"]["compressed"])
    assert not first.is_crowd.any()

    second = dataset[-1]
    assert second.num_instances == 1 and bool(second.is_crowd[0]) and second.class_ids[0] == 0
    np.testing.assert_array_equal(second.masks[0], coco_tree["masks"]["crowd"])
    assert CocoInstanceDataset(coco_tree["file"], coco_tree["images"], include_crowd=False)[1].num_instances == 0


def test_coco_writer_round_trip(tmp_path: Path) -> None:
    masks = np.zeros((2, H, W), bool)
    masks[0, 1:4, 1:4] = True
    masks[1, 4:8, 5:9] = True
    image = _save_rgb(tmp_path / "x.png")
    sample = InstanceSample(image, masks, np.array([1, 0]), np.array([False, True]), 42, "x.png")
    (tmp_path / "ann.json").write_text(json.dumps(samples_to_coco_dict([sample], ["a", "b"])))
    read = CocoInstanceDataset(tmp_path / "ann.json", tmp_path)[0]
    np.testing.assert_array_equal(read.masks, masks)
    np.testing.assert_array_equal(read.class_ids, [1, 0])
    np.testing.assert_array_equal(read.is_crowd, [False, True])
    assert read.image_id == 42


def test_coco_string_image_ids_like_mask2former_ade20k(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    _save_rgb(root / "images" / "validation" / "ADE_val_00000001.jpg")
    mask = np.zeros((H, W), bool)
    mask[1:3, 1:3] = True
    data = {
        "images": [{"id": "ADE_val_00000001", "file_name": "ADE_val_00000001.jpg", "height": H, "width": W}],
        "categories": [{"id": 7, "name": "bed"}, {"id": 8, "name": "windowpane"}],
        "annotations": [
            {"id": 1, "image_id": "ADE_val_00000001", "category_id": 8, "iscrowd": 0, "segmentation": encode_mask(mask)}
        ],
    }
    (root / "ade20k_instance_val.json").write_text(json.dumps(data))
    dataset = mask2former_ade20k_json(root, "val")
    assert dataset.image_ids == [0] and dataset.source_image_ids == ["ADE_val_00000001"]
    sample = dataset[0]
    np.testing.assert_array_equal(sample.class_ids, [1])
    np.testing.assert_array_equal(sample.masks[0], mask)
    with pytest.raises(ValueError, match="split must be"):
        mask2former_ade20k_json(root, "training")


def test_coco_missing_annotation_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "instances_val.json"
    with pytest.raises(FileNotFoundError, match="instances_val.json") as info:
        CocoInstanceDataset(missing, tmp_path)
    assert "'images'" in str(info.value)  # the expected layout is described


def test_coco_annotation_referencing_missing_image(coco_tree: dict) -> None:
    data = coco_tree["data"]
    data["annotations"].append({"id": 9, "image_id": 99, "category_id": 3, "segmentation": [[0, 0, 2, 0, 2, 2]]})
    coco_tree["file"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances\.json.*annotation id 9.*image_id 99"):
        CocoInstanceDataset(coco_tree["file"], coco_tree["images"])


def test_coco_missing_image_file_and_bad_inputs(coco_tree: dict) -> None:
    (coco_tree["images"] / "sub" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"sub/b\.png"):
        CocoInstanceDataset(coco_tree["file"], coco_tree["images"])
    lazy = CocoInstanceDataset(coco_tree["file"], coco_tree["images"], check_files=False)
    with pytest.raises(FileNotFoundError, match=r"sub/b\.png"):
        lazy[1]

    data = coco_tree["data"]
    data["annotations"][0]["category_id"] = 4
    coco_tree["file"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category_id 4"):
        CocoInstanceDataset(coco_tree["file"], coco_tree["images"], check_files=False)

    coco_tree["file"].write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoInstanceDataset(coco_tree["file"], coco_tree["images"])

    coco_tree["file"].write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'categories'"):
        CocoInstanceDataset(coco_tree["file"], coco_tree["images"])


def test_coco_rle_of_wrong_size_and_image_size_mismatch(coco_tree: dict) -> None:
    data = coco_tree["data"]
    bad = mask_utils.encode(np.asfortranarray(np.ones((3, 3), np.uint8)))
    data["annotations"][2]["segmentation"] = {"size": [3, 3], "counts": bad["counts"].decode()}
    coco_tree["file"].write_text(json.dumps(data))
    dataset = CocoInstanceDataset(coco_tree["file"], coco_tree["images"])
    with pytest.raises(ValueError, match="annotation id 3.*RLE size"):
        dataset[0]

    data["annotations"].pop(2)
    data["images"][0]["height"] = H + 1
    coco_tree["file"].write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"a\.png"):
        CocoInstanceDataset(coco_tree["file"], coco_tree["images"])[0]


# ----------------------------------------------------------------------------------- Cityscapes
def _cityscapes_tree(root: Path, ids: np.ndarray, split: str = "train") -> tuple[Path, Path]:
    stem = "aachen_000000_000019"
    image_path = root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png"
    _save_rgb(image_path, ids.shape[0], ids.shape[1])
    ann_path = root / "gtFine" / split / "aachen" / f"{stem}_gtFine_instanceIds.png"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint16)).save(ann_path)
    return image_path, ann_path


def _cityscapes_ids() -> np.ndarray:
    ids = np.full((H, W), 7, dtype=np.int64)  # road (stuff, ignored)
    ids[0:3, 0:3] = 26000  # car 0
    ids[0:3, 3:6] = 26001  # car 1, touching car 0
    ids[3:6, 0:2] = 24000  # person
    ids[6:8, 0:4] = 24  # a group of persons without instance ids -> crowd
    ids[3:5, 6:9] = 33005  # bicycle
    ids[6:8, 6:9] = 29000  # caravan (has instances but is not evaluated) -> ignored
    ids[5, 9] = 0  # unlabeled
    return ids


def test_cityscapes_reader_parses_instances_and_crowd_regions(tmp_path: Path) -> None:
    ids = _cityscapes_ids()
    _cityscapes_tree(tmp_path, ids)
    dataset = CityscapesInstanceDataset(tmp_path, "train")
    assert len(dataset) == 1 and dataset.class_names[2] == "car"
    assert dataset.file_names == ["aachen/aachen_000000_000019_leftImg8bit.png"]
    np.testing.assert_array_equal(dataset.read_instance_ids(0), ids)  # 16-bit values survive
    sample = dataset[0]
    assert sample.num_instances == 5  # road, caravan and unlabeled pixels are ignored
    for value, class_id, crowd in (
        (26000, 2, False),
        (26001, 2, False),
        (24000, 0, False),
        (24, 0, True),
        (33005, 7, False),
    ):
        matches = [i for i in range(5) if np.array_equal(sample.masks[i], ids == value)]
        assert len(matches) == 1
        assert sample.class_ids[matches[0]] == class_id and sample.is_crowd[matches[0]] == crowd
    assert CityscapesInstanceDataset(tmp_path, "train", include_crowd=False)[0].num_instances == 4


def test_cityscapes_malformed_inputs_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val") as info:
        CityscapesInstanceDataset(tmp_path, "val")
    assert "gtFine" in str(info.value)  # the expected layout is described

    image_path, ann_path = _cityscapes_tree(tmp_path, _cityscapes_ids())
    ann_path.unlink()
    with pytest.raises(FileNotFoundError, match="aachen_000000_000019_gtFine_instanceIds.png"):
        CityscapesInstanceDataset(tmp_path, "train")

    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(ann_path)  # RGB instead of 16-bit ids
    with pytest.raises(ValueError, match=r"instanceIds\.png.*single-channel"):
        CityscapesInstanceDataset(tmp_path, "train")[0]

    Image.fromarray(np.zeros((H + 2, W), np.uint16)).save(ann_path)  # wrong size
    with pytest.raises(ValueError, match=r"instanceIds\.png.*size"):
        CityscapesInstanceDataset(tmp_path, "train")[0]


# --------------------------------------------------------------------------------------- ADE20K
def _ade_tree(root: Path, encoded: np.ndarray, split: str = "training") -> Path:
    _save_rgb(root / "images" / split / "ADE_train_00000001.jpg", encoded.shape[0], encoded.shape[1])
    ann = root / "annotations_instance" / split / "ADE_train_00000001.png"
    ann.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(encoded.astype(np.uint8)).save(ann)
    return ann


def _ade_encoded() -> np.ndarray:
    encoded = np.zeros((H, W, 3), dtype=np.uint8)
    encoded[0:4, 0:3, 0], encoded[0:4, 0:3, 1] = 9, 1  # car, instance 1
    encoded[0:4, 3:6, 0], encoded[0:4, 3:6, 1] = 9, 2  # car, instance 2 (touching)
    encoded[5:8, 5:9, 0], encoded[5:8, 5:9, 1] = 4, 7  # person, instance 7
    encoded[6:8, 0:2, 0] = 12  # category without an instance id: ignored
    return encoded


def test_ade20k_reader_decodes_rg_instances(tmp_path: Path) -> None:
    encoded = _ade_encoded()
    _ade_tree(tmp_path, encoded)
    dataset = ADE20KInstanceDataset(tmp_path, "training")
    assert len(dataset) == 1 and len(dataset.class_names) == 100
    sample = dataset[0]
    assert sample.image.shape == (H, W, 3)
    np.testing.assert_array_equal(sample.class_ids, [8, 8, 3])  # category k -> class k - 1
    assert ADE20K_INSTANCE_CLASSES[8] == "car" and ADE20K_INSTANCE_CLASSES[3] == "person"
    for slot, instance in enumerate((1, 2, 7)):
        np.testing.assert_array_equal(sample.masks[slot], encoded[..., 1] == instance)
    assert not sample.is_crowd.any()


def test_ade20k_malformed_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images/training") as info:
        ADE20KInstanceDataset(tmp_path)
    assert "annotations_instance" in str(info.value)

    encoded = _ade_encoded()
    ann = _ade_tree(tmp_path, encoded)
    encoded[0, 0, 0] = 5  # instance 1 now has two categories
    Image.fromarray(encoded).save(ann)
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png.*instance 1"):
        ADE20KInstanceDataset(tmp_path)[0]

    encoded = _ade_encoded()
    encoded[5:8, 5:9, 0] = 150  # not one of the 100 instance categories
    Image.fromarray(encoded).save(ann)
    with pytest.raises(ValueError, match="category 150"):
        ADE20KInstanceDataset(tmp_path)[0]

    Image.fromarray(np.zeros((H, W), np.uint8)).save(ann)  # grayscale
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png.*RGB"):
        ADE20KInstanceDataset(tmp_path)[0]

    ann.unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_train_00000001\.png"):
        ADE20KInstanceDataset(tmp_path)


def test_instance_sample_validation() -> None:
    image = np.zeros((H, W, 3), np.uint8)
    with pytest.raises(ValueError, match="masks"):
        InstanceSample(image, np.zeros((1, H + 1, W), bool), np.zeros(1, np.int64), np.zeros(1, bool), 0, "x")
    with pytest.raises(ValueError, match="class_ids"):
        InstanceSample(image, np.zeros((1, H, W), bool), np.zeros(2, np.int64), np.zeros(1, bool), 0, "x")
    with pytest.raises(ValueError, match="image"):
        InstanceSample(image[..., 0], np.zeros((0, H, W), bool), np.zeros(0, np.int64), np.zeros(0, bool), 0, "x")
