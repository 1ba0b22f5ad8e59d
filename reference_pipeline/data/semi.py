"""Training sets of the three stages: two views per image, labeled and pseudo-labeled parts.

Every stage trains on the same kind of batch (:class:`SemiBatch`): a labeled part (weak and strong
views with ground-truth instances) and, in the stages that use unlabeled data, a pseudo-labeled part
(weak and strong views with the teacher's pseudo-instances). Each part also carries the *ground-truth*
instance-id map of each view when ground truth exists: it feeds only the library's diagnostics
(false-negative rate), never a loss.

Randomness is explicit and resumable: item ``i`` of a dataset of length ``n`` is drawn with the
generator ``TwoViewTransform.rng_for(seed, i // n, i % n)``; a sampler that hands out *stream
positions* (``epoch · n + index``) therefore gets fresh augmentations every epoch and the same ones
after a resume, whatever the worker scheduling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..models.outputs import InstanceTargets
from ..pseudo_labels import PseudoInstances
from .augment import TwoViewTransform, View, ViewBatch, collate_views
from .structures import InstanceDataset, InstanceSample, instance_id_map

__all__ = [
    "PseudoLabeledDataset",
    "SemiBatch",
    "SemiSupervisedDataset",
    "TwoViewBatch",
    "TwoViewDataset",
    "TwoViews",
    "collate_semi",
    "view_instance_ids",
]

IGNORE_ID = -1


class PseudoLabeledDataset:
    """An unlabeled dataset whose instances are replaced by pseudo-labels.

    Item ``i`` is ``(pseudo_sample, ground_truth_sample)``: the same image with the pseudo-instances
    as its annotations, and with its real annotations (possibly empty) for diagnostics only.

    The pseudo-labels stay compressed (RLE, :class:`~reference_pipeline.pseudo_labels.PseudoInstances`)
    and an item's masks are decoded when it is drawn: the dataset holds kilobytes per image, not
    ``M × H × W`` bytes (tens of GB for a Cityscapes-sized split at 1024×2048).

    Args:
        base: the unlabeled images (their annotations, if any, are used only for diagnostics).
        pseudo: pseudo-instances per image id; an image without an entry has none.

    Raises:
        TypeError: if a value is not a :class:`~reference_pipeline.pseudo_labels.PseudoInstances`.
        ValueError: for pseudo-labels of image ids not in ``base``.
    """

    def __init__(self, base: InstanceDataset, pseudo: Mapping[int, PseudoInstances]) -> None:
        unknown = set(pseudo) - {int(i) for i in base.image_ids}
        if unknown:
            raise ValueError(f"pseudo-labels given for image ids not in the dataset: {sorted(unknown)[:10]}")
        wrong = next((type(v).__name__ for v in pseudo.values() if not isinstance(v, PseudoInstances)), None)
        if wrong is not None:
            raise TypeError(f"pseudo-labels must be PseudoInstances (RLE masks), got {wrong}")
        self.base = base
        self.pseudo = dict(pseudo)
        self.class_names = list(base.class_names)
        self.image_ids = list(base.image_ids)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[InstanceSample, InstanceSample]:
        sample = self.base[index]
        labels = self.pseudo.get(int(sample.image_id))
        if labels is None:
            masks = np.zeros((0, sample.height, sample.width), dtype=bool)
            class_ids = np.zeros((0,), dtype=np.int64)
        else:
            if labels.size != (sample.height, sample.width):
                raise ValueError(
                    f"pseudo-labels of image {sample.image_id} are {labels.size}, the image is {(sample.height, sample.width)}"
                )
            masks, class_ids = labels.decode_masks(), labels.class_ids  # (M, H, W) decoded for this item only
        pseudo_sample = InstanceSample(
            image=sample.image,
            masks=masks,
            class_ids=class_ids,
            is_crowd=np.zeros(masks.shape[0], dtype=bool),
            image_id=sample.image_id,
            file_name=sample.file_name,
        )
        return pseudo_sample, sample


@dataclass
class TwoViews:
    """Weak and strong views of one image with their training targets and diagnostic ids.

    Attributes:
        weak: the weak view (its masks are the training targets).
        strong: the strong view (its masks are the training targets).
        weak_ids: ``(h, w)`` ground-truth instance ids in the weak view (``-1`` = none / unknown).
        strong_ids: ``(h, w)`` the same for the strong view.
    """

    weak: View
    strong: View
    weak_ids: Tensor
    strong_ids: Tensor


def view_instance_ids(masks: Tensor, is_crowd: Tensor) -> Tensor:
    """Collapse a view's ``(M, h, w)`` masks into an ``(h, w)`` instance-id map (crowd skipped)."""
    keep = ~is_crowd
    return torch.from_numpy(instance_id_map(masks[keep].numpy(), ignore_id=IGNORE_ID))  # (h, w)


def _split_view(view: View, count: int) -> tuple[View, Tensor]:
    """Split a view of concatenated (targets, ground truth) instances into targets and a GT id map."""
    target = View(
        image=view.image,
        masks=view.masks[:count],
        class_ids=view.class_ids[:count],
        is_crowd=view.is_crowd[:count],
        instance_index=view.instance_index[:count],
        box=view.box,
        flip=view.flip,
        image_id=view.image_id,
    )
    ids = view_instance_ids(view.masks[count:], view.is_crowd[count:])  # (h, w)
    return target, ids


def _drop_empty(view: View) -> View:
    """Drop target instances that vanished from a view (kept only to keep indices aligned)."""
    keep = view.masks.flatten(1).any(dim=1) if view.masks.shape[0] else torch.zeros(0, dtype=torch.bool)
    return View(
        image=view.image,
        masks=view.masks[keep],
        class_ids=view.class_ids[keep],
        is_crowd=view.is_crowd[keep],
        instance_index=view.instance_index[keep],
        box=view.box,
        flip=view.flip,
        image_id=view.image_id,
    )


class TwoViewDataset:
    """Two views of every image of a labeled or pseudo-labeled dataset.

    Args:
        dataset: an :class:`~reference_pipeline.data.structures.InstanceDataset` (labeled: its
            annotations are both targets and diagnostics) or a :class:`PseudoLabeledDataset`
            (targets are the pseudo-labels; the real annotations feed only diagnostics).
        transform: the weak/strong view transform.
        seed: seed of the per-item generators.

    Item ``i`` (any non-negative stream position, see the module docstring) is a :class:`TwoViews`.
    """

    def __init__(self, dataset: InstanceDataset | PseudoLabeledDataset, transform: TwoViewTransform, seed: int) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot build a training set from a dataset with zero images")
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> TwoViews:
        if position < 0:
            raise IndexError(f"stream position must be >= 0, got {position}")
        epoch, index = divmod(int(position), len(self.dataset))
        rng = TwoViewTransform.rng_for(self.seed, epoch, index)
        item = self.dataset[index]
        if isinstance(item, tuple):  # pseudo-labeled: (targets, ground truth)
            target_sample, truth = item
            truth = truth.without_crowd()
            count = target_sample.num_instances
            combined = InstanceSample(
                image=target_sample.image,
                masks=np.concatenate([target_sample.masks, truth.masks]),
                class_ids=np.concatenate([target_sample.class_ids, truth.class_ids]),
                is_crowd=np.concatenate([target_sample.is_crowd, truth.is_crowd]),
                image_id=target_sample.image_id,
                file_name=target_sample.file_name,
            )
            weak, strong = self._views(combined, rng)
            weak, weak_ids = _split_view(weak, count)
            strong, strong_ids = _split_view(strong, count)
            return TwoViews(_drop_empty(weak), _drop_empty(strong), weak_ids, strong_ids)
        weak, strong = self._views(item, rng)
        weak, strong = _drop_empty(weak), _drop_empty(strong)
        return TwoViews(
            weak, strong, view_instance_ids(weak.masks, weak.is_crowd), view_instance_ids(strong.masks, strong.is_crowd)
        )

    def _views(self, sample: InstanceSample, rng: np.random.Generator) -> tuple[View, View]:
        """Both views, keeping vanished instances so target and ground-truth indices stay aligned."""
        return TwoViewTransform(self.transform.weak, self.transform.strong, keep_empty=True)(sample, rng)


@dataclass
class TwoViewBatch:
    """A collated batch of :class:`TwoViews`.

    Attributes:
        weak: weak views.
        strong: strong views.
        weak_ids: ``(B, h, w)`` ground-truth instance ids in the weak views (diagnostics only).
        strong_ids: ``(B, h, w)`` the same for the strong views.
    """

    weak: ViewBatch
    strong: ViewBatch
    weak_ids: Tensor
    strong_ids: Tensor

    def __len__(self) -> int:
        return int(self.weak.images.shape[0])

    def targets(self, which: str) -> list[InstanceTargets]:
        """Training targets of the ``"weak"`` or ``"strong"`` views (crowd regions dropped)."""
        if which not in ("weak", "strong"):
            raise ValueError(f"which must be 'weak' or 'strong', got {which!r}")
        batch = self.weak if which == "weak" else self.strong
        return [
            InstanceTargets(masks=masks[~crowd].float(), class_ids=classes[~crowd])
            for masks, classes, crowd in zip(batch.masks, batch.class_ids, batch.is_crowd)
        ]


@dataclass
class SemiBatch:
    """One training step's data: a labeled part and an optional pseudo-labeled part."""

    labeled: TwoViewBatch
    unlabeled: TwoViewBatch | None


def _collate_two_views(items: Sequence[TwoViews]) -> TwoViewBatch:
    return TwoViewBatch(
        weak=collate_views([item.weak for item in items]),
        strong=collate_views([item.strong for item in items]),
        weak_ids=torch.stack([item.weak_ids for item in items]),  # (B, h, w)
        strong_ids=torch.stack([item.strong_ids for item in items]),  # (B, h, w)
    )


class SemiSupervisedDataset:
    """Pairs each labeled item with a pseudo-labeled one (or none, for supervised stages).

    The length is that of the larger part; stream position ``i`` takes item ``i`` of each part, so
    the smaller part cycles with fresh augmentations (see the module docstring).

    Args:
        labeled: two views of the labeled images.
        unlabeled: two views of the pseudo-labeled images, or ``None``.
    """

    def __init__(self, labeled: TwoViewDataset, unlabeled: TwoViewDataset | None = None) -> None:
        self.labeled = labeled
        self.unlabeled = unlabeled

    def __len__(self) -> int:
        return max(len(self.labeled), len(self.unlabeled) if self.unlabeled is not None else 0)

    def get_item(self, index: int, epoch: int) -> tuple[TwoViews, TwoViews | None]:
        """Item ``index`` as drawn in ``epoch`` (the engine's epoch-aware protocol)."""
        return self[epoch * len(self) + index]

    def __getitem__(self, position: int) -> tuple[TwoViews, TwoViews | None]:
        labeled = self.labeled[position]  # each part maps the stream position onto its own length
        if self.unlabeled is None:
            return labeled, None
        return labeled, self.unlabeled[position]


def collate_semi(items: Sequence[tuple[TwoViews, TwoViews | None]]) -> SemiBatch:
    """Collate :class:`SemiSupervisedDataset` items into a :class:`SemiBatch`."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    labeled = _collate_two_views([item[0] for item in items])
    unlabeled_items = [item[1] for item in items]
    if any(item is None for item in unlabeled_items):
        return SemiBatch(labeled, None)
    return SemiBatch(labeled, _collate_two_views(unlabeled_items))  # type: ignore[arg-type]
