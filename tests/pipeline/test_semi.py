"""Two-view training sets: targets, diagnostic ids, determinism, pairing of labeled and pseudo-labeled parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reference_pipeline.data.augment import StrongViewConfig, TwoViewTransform, WeakViewConfig
from reference_pipeline.data.semi import (
    PseudoLabeledDataset,
    SemiSupervisedDataset,
    TwoViewDataset,
    collate_semi,
)
from reference_pipeline.data.synthetic import load_synthetic_split
from reference_pipeline.pseudo_labels import PseudoInstances


@pytest.fixture(scope="module")
def splits(tiny_dataset: Path):
    return load_synthetic_split(tiny_dataset, "target_labeled"), load_synthetic_split(tiny_dataset, "target_unlabeled")


def _transform() -> TwoViewTransform:
    return TwoViewTransform(WeakViewConfig(output_size=(64, 64)), StrongViewConfig(output_size=(64, 64)))


def test_views_are_a_function_of_seed_epoch_and_index(splits) -> None:
    labeled, _ = splits
    dataset = TwoViewDataset(labeled, _transform(), seed=3)
    first, again = dataset[1], dataset[1]
    assert torch.equal(first.strong.image, again.strong.image)
    next_epoch = dataset[1 + len(dataset)]  # the same image, drawn in epoch 1
    assert next_epoch.weak.image_id == first.weak.image_id
    assert not torch.equal(next_epoch.strong.image, first.strong.image)
    other_seed = TwoViewDataset(labeled, _transform(), seed=4)[1]
    assert not torch.equal(other_seed.strong.image, first.strong.image)


def test_labeled_targets_and_ids_come_from_the_ground_truth(splits) -> None:
    labeled, _ = splits
    views = TwoViewDataset(labeled, _transform(), seed=0)[0]
    ids = views.weak_ids
    assert ids.shape == (64, 64)
    for index, mask in enumerate(views.weak.masks):
        assert bool((ids[mask] >= 0).all())  # every target pixel carries an instance id
    assert int(ids.max()) + 1 <= labeled[0].num_instances
    assert views.weak.masks.shape[0] == int((views.weak.masks.flatten(1).any(1)).sum())  # no empty targets


def test_pseudo_labels_replace_targets_but_ids_stay_ground_truth(splits) -> None:
    _, unlabeled = splits
    sample = unlabeled[0]
    one_box = np.zeros((1, sample.height, sample.width), dtype=bool)
    one_box[0, 10:30, 10:30] = True
    pseudo = {int(sample.image_id): PseudoInstances.from_masks(one_box, np.array([2]), np.array([0.9]))}
    dataset = TwoViewDataset(PseudoLabeledDataset(unlabeled, pseudo), _transform(), seed=0)
    views = dataset[0]
    assert views.weak.masks.shape[0] == 1 and int(views.weak.class_ids[0]) == 2
    truth_instances = len(np.unique(views.weak_ids.numpy())) - 1
    assert truth_instances > 1  # diagnostics see the real instances, not the single pseudo box
    without = dataset[1]  # an image with no pseudo-labels: no targets, ids still the ground truth
    assert without.weak.masks.shape[0] == 0 and int(without.weak_ids.max()) >= 0


def test_pseudo_labels_for_unknown_images_are_rejected(splits) -> None:
    _, unlabeled = splits
    with pytest.raises(ValueError, match="not in the dataset"):
        PseudoLabeledDataset(unlabeled, {10**9: PseudoInstances.empty((2, 2))})


def test_empty_dataset_is_rejected(splits) -> None:
    labeled, _ = splits
    from reference_pipeline.data.splits import SubsetDataset

    with pytest.raises(ValueError, match="zero images"):
        TwoViewDataset(SubsetDataset(labeled, []), _transform(), seed=0)


def test_semi_dataset_pairs_each_labeled_item_with_an_unlabeled_one(splits) -> None:
    labeled, unlabeled = splits
    semi = SemiSupervisedDataset(
        TwoViewDataset(labeled, _transform(), 0), TwoViewDataset(PseudoLabeledDataset(unlabeled, {}), _transform(), 1)
    )
    assert len(semi) == max(len(labeled), len(unlabeled))
    batch = collate_semi([semi.get_item(i, epoch=0) for i in range(2)])
    assert batch.labeled.weak.images.shape == (2, 3, 64, 64)
    assert batch.unlabeled is not None and batch.unlabeled.strong_ids.shape == (2, 64, 64)
    seen = {semi.get_item(i, 0)[1].weak.image_id for i in range(len(semi))}
    assert len(seen) == len(unlabeled)  # one epoch covers every unlabeled image once
    assert collate_semi([SemiSupervisedDataset(semi.labeled)[0]]).unlabeled is None
