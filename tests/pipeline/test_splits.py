"""Labeled-fraction splits: determinism, nesting, exact counts, list-file round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reference_pipeline.data.splits import (
    LabelSplit,
    SubsetDataset,
    labeled_count,
    make_label_split,
    make_label_splits,
    read_split_file,
    resolve_unlabeled,
    split_file_name,
    write_label_splits,
    write_split_file,
)
from reference_pipeline.data.structures import InstanceSample

IDS = list(range(1000, 1101))  # 101 images


def test_same_seed_same_split_and_input_order_does_not_matter() -> None:
    a = make_label_split(IDS, 0.1, seed=3)
    shuffled = list(np.random.default_rng(0).permutation(IDS).tolist())
    assert make_label_split(shuffled, 0.1, seed=3) == a
    assert make_label_split(IDS, 0.1, seed=4) != a
    assert a == sorted(a)


@pytest.mark.parametrize("num", [1, 7, 20, 101, 333])
def test_fractions_are_exact_up_to_rounding_and_nested(num: int) -> None:
    ids = list(range(num))
    splits = make_label_splits(ids, (0.05, 0.10, 0.30), seed=1)
    for fraction, labeled in splits.items():
        assert len(set(labeled)) == len(labeled)
        assert set(labeled) <= set(ids)
        if fraction * num >= 0.5:
            assert abs(len(labeled) - fraction * num) <= 0.5
        else:
            assert len(labeled) == 1  # a positive fraction labels at least one image
    assert set(splits[0.05]) <= set(splits[0.10]) <= set(splits[0.30])


def test_labeled_count_rounds_half_up() -> None:
    assert labeled_count(101, 0.05) == 5  # 5.05
    assert labeled_count(101, 0.10) == 10  # 10.1
    assert labeled_count(101, 0.30) == 30  # 30.3
    assert labeled_count(10, 0.05) == 1  # 0.5 -> 1
    assert labeled_count(30, 0.05) == 2  # 1.5 -> 2
    assert labeled_count(5, 1.0) == 5
    with pytest.raises(ValueError, match="fraction"):
        labeled_count(10, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        labeled_count(10, 1.5)


def test_unlabeled_modes() -> None:
    labeled = make_label_split(IDS, 0.3, seed=0)
    complement = resolve_unlabeled(IDS, labeled, "complement")
    assert not set(complement) & set(labeled)
    assert set(complement) | set(labeled) == set(IDS)
    assert resolve_unlabeled(IDS, labeled, "all") == IDS
    split = LabelSplit.from_ids(IDS, labeled)
    assert split.mode == "complement" and split.unlabeled == complement
    with pytest.raises(ValueError, match="mode"):
        resolve_unlabeled(IDS, labeled, "both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not in the dataset"):
        resolve_unlabeled(IDS, [5], "complement")


def test_invalid_ids() -> None:
    with pytest.raises(ValueError, match="empty"):
        make_label_split([], 0.1)
    with pytest.raises(ValueError, match="duplicate"):
        make_label_split([1, 1, 2], 0.5)


def test_split_file_round_trip(tmp_path: Path) -> None:
    labeled = make_label_split(IDS, 0.1, seed=2)
    path = write_split_file(tmp_path / "splits" / "perc_10.txt", labeled)
    assert path.read_text().splitlines() == [str(i) for i in labeled]
    assert read_split_file(path) == labeled
    names = ["aachen_000000_000019", "bochum_000000_000313"]
    write_split_file(tmp_path / "names.txt", names)
    assert read_split_file(tmp_path / "names.txt", id_type=str) == names


def test_read_split_file_errors_name_path_and_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_split_file(tmp_path / "missing.txt")
    path = tmp_path / "perc_5.txt"
    path.write_text("# labeled ids\n\n12\n 13 \n")
    assert read_split_file(path) == [12, 13]  # comments and blank lines are skipped
    path.write_text("12\nabc\n")
    with pytest.raises(ValueError, match=r"perc_5\.txt:2"):
        read_split_file(path)
    path.write_text("12\n12\n")
    with pytest.raises(ValueError, match=r"perc_5\.txt:2: duplicate"):
        read_split_file(path)
    with pytest.raises(ValueError, match="one per line"):
        write_split_file(tmp_path / "bad.txt", ["a\nb"])


def test_write_label_splits_uses_perc_file_names(tmp_path: Path) -> None:
    paths = write_label_splits(tmp_path / "seed0", IDS, (0.05, 0.1, 0.3), seed=0)
    assert {p.name for p in paths.values()} == {"perc_5.txt", "perc_10.txt", "perc_30.txt"}
    expected = make_label_splits(IDS, (0.05, 0.1, 0.3), seed=0)
    for fraction, path in paths.items():
        assert read_split_file(path) == expected[fraction]
    assert split_file_name(0.025) == "perc_2.5.txt"


class _FakeDataset:
    class_names = ["a"]

    def __init__(self) -> None:
        self.image_ids = [10, 20, 30]

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> InstanceSample:
        return InstanceSample(
            np.zeros((2, 2, 3), np.uint8),
            np.zeros((0, 2, 2), bool),
            np.zeros(0, np.int64),
            np.zeros(0, bool),
            self.image_ids[index],
            f"{index}.png",
        )


def test_subset_dataset_selects_by_image_id() -> None:
    subset = SubsetDataset(_FakeDataset(), [30, 10])
    assert len(subset) == 2 and subset.class_names == ["a"]
    assert [subset[i].image_id for i in range(2)] == [30, 10]
    assert subset[-1].image_id == 10
    with pytest.raises(IndexError):
        subset[2]
    with pytest.raises(ValueError, match="not in the dataset"):
        SubsetDataset(_FakeDataset(), [40])
