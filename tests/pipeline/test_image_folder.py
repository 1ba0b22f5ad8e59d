"""A folder of unlabeled images as users hold them (``data/unlabeled.py`` ``ImageFolderDataset``).

The spec: every image file under the folder (sub-folders included, hidden files and non-images skipped),
sorted by relative path, ids ``0 .. N-1`` in that order (the same folder gives the same ids); grayscale,
RGBA and 16-bit images are read as 8-bit RGB (16-bit scaled, not clipped); samples carry no instances; a
missing or empty folder is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference_pipeline.data.structures import load_rgb_image
from reference_pipeline.data.unlabeled import ImageFolderDataset


def test_files_are_sorted_by_relative_path_with_stable_ids_and_read_as_rgb(user_coco) -> None:
    folder = ImageFolderDataset(user_coco["unlabeled_images"], ["Widget"])
    again = ImageFolderDataset(user_coco["unlabeled_images"], ["Widget"])
    assert folder.file_names == ["a_rgba.png", "b_gray.png", "c_16bit.png", "more/d_rgb.jpg"] == again.file_names
    assert folder.image_ids == [0, 1, 2, 3] == again.image_ids
    shapes = []
    for index in range(len(folder)):
        sample = folder[index]
        assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
        assert sample.num_instances == 0 and sample.image_id == index
        assert sample.file_name == folder.file_names[index]
        shapes.append(sample.image.shape[:2])
    assert shapes == [(36, 52), (40, 56), (44, 48), (48, 40)]


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896], [65535, 1000, 51400]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = load_rgb_image(tmp_path / "deep.png")
    assert image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image[..., 0], values // 257)
    assert (image[..., 0] == image[..., 2]).all()


def test_a_missing_or_imageless_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", ["x"])
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "empty" / ".hidden" / "x.png")
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"no image files .* under .*empty"):
        ImageFolderDataset(tmp_path / "empty", ["x"])
