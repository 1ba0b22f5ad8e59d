"""Labeled-fraction splits (e.g. 5 / 10 / 30 % labeled) as plain list files.

A split is drawn deterministically from a seed: the image ids are sorted, permuted once with
``numpy.random.default_rng(seed)``, and the first ``round(fraction * n)`` ids of the permutation
are labeled. All fractions drawn with the same seed therefore come from the *same* permutation,
so they are nested (the 5 % set is inside the 10 % set, which is inside the 30 % set), as is usual
for semi-supervised benchmarks. Rounding is half-up, and a positive fraction labels at least one
image.

Split files hold one image id per line, like Guided Distillation's ``perc_*.txt``; blank lines
and lines starting with ``#`` are ignored. :func:`split_file_name` gives ``perc_10.txt`` for 10 %.

The unlabeled set is derived with :func:`resolve_unlabeled`:

* ``"complement"`` (default): unlabeled = all images minus the labeled ones, so no image is
  used both as labeled and as unlabeled;
* ``"all"``: unlabeled = all images (the labeled ones are also used unlabeled, as in several
  semi-supervised codebases that run the unsupervised loss on every image).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from ..atomic import atomic_write_text
from ..errors import UserError
from .structures import InstanceDataset, InstanceSample, check_index

__all__ = [
    "DEFAULT_FRACTIONS",
    "LabelSplit",
    "SubsetDataset",
    "labeled_count",
    "make_label_split",
    "make_label_splits",
    "read_split_file",
    "resolve_unlabeled",
    "split_file_name",
    "write_label_splits",
    "write_split_file",
]

logger = logging.getLogger(__name__)

IdT = TypeVar("IdT", bound=Hashable)
UnlabeledMode = Literal["complement", "all"]

#: The labeled fractions of the paper's label-efficiency study.
DEFAULT_FRACTIONS: tuple[float, ...] = (0.05, 0.10, 0.30)


def labeled_count(num_images: int, fraction: float) -> int:
    """Number of labeled images for ``fraction`` of ``num_images`` (half-up rounding, >= 1).

    Raises:
        ValueError: if ``fraction`` is not in ``(0, 1]`` or ``num_images`` < 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if num_images < 1:
        raise ValueError(f"need at least one image, got {num_images}")
    return min(num_images, max(1, math.floor(fraction * num_images + 0.5)))


def _sorted_unique(image_ids: Iterable[IdT]) -> list[IdT]:
    ids = list(image_ids)
    if not ids:
        raise ValueError("image_ids is empty")
    if len(set(ids)) != len(ids):
        raise ValueError(f"image_ids contains {len(ids) - len(set(ids))} duplicate(s)")
    try:
        return sorted(ids)  # type: ignore[type-var]
    except TypeError as error:
        raise ValueError(f"image ids must be mutually comparable (all int or all str): {error}") from error


def make_label_splits(
    image_ids: Iterable[IdT],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[float, list[IdT]]:
    """Draw nested labeled subsets for several fractions from one seeded permutation.

    Args:
        image_ids: every image id of the training set (int or str, unique).
        fractions: labeled fractions in ``(0, 1]``.
        seed: seed of the permutation.

    Returns:
        ``{fraction: sorted labeled ids}``; smaller fractions are subsets of larger ones.

    Raises:
        ValueError: on empty or duplicate ids, or a fraction outside ``(0, 1]``.
    """
    ids = _sorted_unique(image_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    splits: dict[float, list[IdT]] = {}
    for fraction in fractions:
        count = labeled_count(len(ids), fraction)
        splits[fraction] = sorted(ids[i] for i in order[:count])  # type: ignore[type-var]
    return splits


def make_label_split(image_ids: Iterable[IdT], fraction: float, seed: int = 0) -> list[IdT]:
    """Draw the labeled subset for one fraction (same ids as :func:`make_label_splits`).

    Args:
        image_ids: every image id of the training set.
        fraction: labeled fraction in ``(0, 1]``.
        seed: seed of the permutation.

    Returns:
        The sorted labeled ids.

    Raises:
        ValueError: on empty or duplicate ids, or a fraction outside ``(0, 1]``.
    """
    return make_label_splits(image_ids, (fraction,), seed)[fraction]


def resolve_unlabeled(
    all_ids: Sequence[IdT],
    labeled_ids: Sequence[IdT],
    mode: UnlabeledMode = "complement",
) -> list[IdT]:
    """The unlabeled set for a labeled set.

    Args:
        all_ids: every image id, in the order the result should keep.
        labeled_ids: the labeled ids (must all be in ``all_ids``).
        mode: ``"complement"`` (all minus labeled) or ``"all"`` (every image).

    Returns:
        The unlabeled ids in ``all_ids`` order.

    Raises:
        ValueError: on an unknown mode or labeled ids that are not in ``all_ids``.
    """
    if mode not in ("complement", "all"):
        raise ValueError(f"unlabeled mode must be 'complement' or 'all', got {mode!r}")
    known = set(all_ids)
    unknown = [i for i in labeled_ids if i not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} labeled id(s) are not in the dataset, e.g. {unknown[:5]}")
    if mode == "all":
        return list(all_ids)
    labeled = set(labeled_ids)
    return [i for i in all_ids if i not in labeled]


@dataclass(frozen=True)
class LabelSplit:
    """A labeled / unlabeled partition of one training set.

    Attributes:
        labeled: labeled image ids.
        unlabeled: unlabeled image ids (see ``mode``).
        mode: how ``unlabeled`` relates to ``labeled`` (``"complement"`` or ``"all"``).
    """

    labeled: list
    unlabeled: list
    mode: UnlabeledMode

    @staticmethod
    def from_ids(all_ids: Sequence[IdT], labeled_ids: Sequence[IdT], mode: UnlabeledMode = "complement") -> LabelSplit:
        """Build a split from all ids and the labeled ids (see :func:`resolve_unlabeled`)."""
        return LabelSplit(list(labeled_ids), resolve_unlabeled(all_ids, labeled_ids, mode), mode)


def split_file_name(fraction: float) -> str:
    """``perc_<percent>.txt`` for a fraction, e.g. ``0.1 -> "perc_10.txt"``, ``0.025 -> "perc_2.5.txt"``.

    Raises:
        ValueError: if ``fraction`` is not in ``(0, 1]``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return f"perc_{round(fraction * 100, 6):g}.txt"


def write_split_file(path: str | os.PathLike[str], image_ids: Iterable[Hashable]) -> Path:
    """Write one image id per line (atomically: temporary file, then rename).

    Args:
        path: destination file; parent folders are created.
        image_ids: ids to write; their ``str`` must not contain line breaks.

    Returns:
        The destination path.

    Raises:
        ValueError: if an id's text contains a line break or is empty.
    """
    path = Path(path)
    lines = [str(i) for i in image_ids]
    bad = [line for line in lines if not line.strip() or "\n" in line or "\r" in line or line.startswith("#")]
    if bad:
        raise ValueError(f"image ids cannot be written one per line: {bad[:5]}")
    return atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def read_split_file(path: str | os.PathLike[str], id_type: Callable[[str], IdT] = int) -> list[IdT]:  # type: ignore[assignment]
    """Read a list file written by :func:`write_split_file` (or Guided Distillation's ``perc_*.txt``).

    Args:
        path: the file.
        id_type: converts each line (stripped) to an id: ``int`` (default) or ``str``.

    Returns:
        The ids in file order.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if a line cannot be converted or an id repeats (message names path and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path} (expected one image id per line)")
    ids: list[IdT] = []
    seen: set[IdT] = set()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            value = id_type(line)
        except ValueError as error:
            raise UserError(
                f"{path}:{number}: cannot parse image id {line!r} with {getattr(id_type, '__name__', id_type)}"
            ) from error
        if value in seen:
            raise UserError(f"{path}:{number}: duplicate image id {line!r}")
        seen.add(value)
        ids.append(value)
    return ids


def write_label_splits(
    directory: str | os.PathLike[str],
    image_ids: Iterable[IdT],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[float, Path]:
    """Draw nested splits (:func:`make_label_splits`) and write one ``perc_*.txt`` per fraction.

    Args:
        directory: output folder (created); use one folder per seed.
        image_ids: every image id of the training set.
        fractions: labeled fractions.
        seed: seed of the permutation.

    Returns:
        ``{fraction: written path}``.

    Raises:
        ValueError: as :func:`make_label_splits`.
    """
    directory = Path(directory)
    splits = make_label_splits(image_ids, fractions, seed)
    paths = {}
    for fraction, ids in splits.items():
        paths[fraction] = write_split_file(directory / split_file_name(fraction), ids)
        logger.info("wrote %d labeled ids (%.1f%%) to %s", len(ids), 100 * fraction, paths[fraction])
    return paths


class SubsetDataset:
    """A view of a dataset restricted to some image ids (e.g. the labeled or unlabeled set).

    Args:
        dataset: any :class:`~reference_pipeline.data.structures.InstanceDataset`.
        image_ids: ids to keep, in the order to expose them.

    Attributes:
        class_names: forwarded from ``dataset``.
        image_ids: the kept ids.

    Raises:
        ValueError: if an id is not in ``dataset.image_ids`` or repeats.
    """

    def __init__(self, dataset: InstanceDataset, image_ids: Sequence[int]) -> None:
        position = {int(i): p for p, i in enumerate(dataset.image_ids)}
        unknown = [i for i in image_ids if int(i) not in position]
        if unknown:
            raise ValueError(f"{len(unknown)} image id(s) are not in the dataset, e.g. {list(unknown)[:5]}")
        if len(set(map(int, image_ids))) != len(image_ids):
            raise ValueError("image_ids contains duplicates")
        self.dataset = dataset
        self.image_ids: list[int] = [int(i) for i in image_ids]
        self.class_names = dataset.class_names
        self._positions = [position[i] for i in self.image_ids]

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> InstanceSample:
        return self.dataset[self._positions[check_index(index, len(self), "subset")]]
