r"""Teacher predictions → pseudo instances, in the same format as ground truth.

For one image with query outputs ``mask_logits (K, h, w)`` and ``class_logits (K, C + 1)``
(no-object last), :func:`pseudo_label`

1. scores every query by its best foreground class,
   :math:`s_k = \max_{c < C} \operatorname{softmax}(\text{class\_logits}_k)_c`, class
   :math:`c_k = \arg\max_{c < C}`, and keeps queries with :math:`s_k \ge` ``score_threshold``
   (paper: 0.3); the no-object column only enters through the softmax;
2. resizes the mask logits to the image (bilinear, see ``mask_stride``) and binarises them,
   :math:`M_k = [\sigma(m_k) > \text{mask\_threshold}]`;
3. resolves overlaps greedily in decreasing score (Mask2Former's panoptic inference): each
   instance keeps only pixels not already taken, :math:`V_k = M_k \setminus \bigcup_{j \text{ kept}, s_j > s_k} V_j`;
   it is dropped when :math:`|V_k| <` ``min_area`` or :math:`|V_k| / |M_k| <` ``min_visible_fraction``
   (it lost most of its area to higher-scoring instances), and at most ``max_instances`` are kept.

So every pixel belongs to at most one pseudo-instance: the highest-scoring kept instance whose
binary mask covers it. The result is a :class:`PseudoInstances` (masks as compressed RLE at image
size, classes, scores), usable as training targets (:meth:`PseudoInstances.targets`) by
:class:`~reference_pipeline.losses.SetCriterion` and measurable against ground truth with
COCO mask AP (:func:`pseudo_label_quality`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import Tensor

from .atomic import atomic_write_json
from .data.structures import InstanceSample
from .evaluate import InstancePredictions, check_query_outputs, evaluate_coco_masks
from .models.outputs import InstanceTargets, SegmentationOutput

__all__ = [
    "PseudoInstances",
    "PseudoLabelConfig",
    "encode_rle",
    "pseudo_label",
    "pseudo_label_batch",
    "pseudo_label_quality",
    "read_pseudo_labels",
    "resize_mask_logits",
    "summarize_pseudo_labels",
    "write_pseudo_labels",
]


@dataclass
class PseudoLabelConfig:
    """How teacher outputs become pseudo-instances.

    Attributes:
        score_threshold: minimum best foreground-class probability (paper: 0.3).
        mask_threshold: a pixel is in the mask when ``sigmoid(logit) > mask_threshold``.
        min_area: minimum area in image pixels of an instance after overlap resolution.
        max_instances: at most this many instances per image (the highest-scoring ones).
        min_visible_fraction: an instance is dropped when less than this fraction of its binary
            mask is left after higher-scoring instances took their pixels.
        mask_stride: stride of the mask logits: logits of an ``H × W`` image are
            ``ceil(H/s) × ceil(W/s)`` and are upsampled by ``s`` then cropped to ``H × W`` (the
            pipeline's contract, ``s = 4``). ``None`` resizes them straight to ``H × W``.

    Raises:
        ValueError: on an out-of-range value.
    """

    score_threshold: float = 0.3
    mask_threshold: float = 0.5
    min_area: int = 16
    max_instances: int = 100
    min_visible_fraction: float = 0.5
    mask_stride: int | None = 4

    def __post_init__(self) -> None:
        if not 0 <= self.score_threshold <= 1:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold!r}")
        if not 0 < self.mask_threshold < 1:
            raise ValueError(f"mask_threshold must be in (0, 1), got {self.mask_threshold!r}")
        if isinstance(self.min_area, bool) or not isinstance(self.min_area, int) or self.min_area < 1:
            raise ValueError(f"min_area must be an int >= 1, got {self.min_area!r}")
        if isinstance(self.max_instances, bool) or not isinstance(self.max_instances, int) or self.max_instances < 1:
            raise ValueError(f"max_instances must be an int >= 1, got {self.max_instances!r}")
        if not 0 <= self.min_visible_fraction <= 1:
            raise ValueError(f"min_visible_fraction must be in [0, 1], got {self.min_visible_fraction!r}")
        if self.mask_stride is not None and (
            isinstance(self.mask_stride, bool) or not isinstance(self.mask_stride, int) or self.mask_stride < 1
        ):
            raise ValueError(f"mask_stride must be a positive int or None, got {self.mask_stride!r}")


@dataclass(frozen=True)
class PseudoInstances:
    """The pseudo-instances of one image, the one container for pseudo-labels in memory and on disk.

    Masks are held as compressed COCO RLE (a few hundred bytes for a typical instance, against
    ``H·W`` bytes dense: 2 MB at Cityscapes' 1024×2048) and decoded only when a sample is drawn
    (:meth:`decode_masks`), so the pseudo-labels of a whole unlabeled split fit in memory.

    Attributes:
        size: ``(H, W)`` of the image the masks are for.
        rles: one pycocotools RLE ``{"size": [H, W], "counts": bytes}`` per instance, sorted by
            decreasing score; the masks never overlap.
        class_ids: ``(M,)`` int64 class of each instance.
        scores: ``(M,)`` float64 class probability of each instance.
        query_indices: ``(M,)`` int64 the teacher query each instance came from (``None`` when read
            from a file, which does not store them).

    Raises:
        ValueError: on inconsistent lengths or an RLE of another size than ``size``.
    """

    size: tuple[int, int]
    rles: tuple[dict[str, Any], ...]
    class_ids: np.ndarray
    scores: np.ndarray
    query_indices: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "rles", tuple(self.rles))
        object.__setattr__(self, "class_ids", np.asarray(self.class_ids, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float64).reshape(-1))
        if self.query_indices is not None:
            object.__setattr__(self, "query_indices", np.asarray(self.query_indices, dtype=np.int64).reshape(-1))
        count = len(self.rles)
        lengths = [self.class_ids.shape[0], self.scores.shape[0]]
        if self.query_indices is not None:
            lengths.append(self.query_indices.shape[0])
        if any(length != count for length in lengths):
            raise ValueError(f"{count} masks but class_ids / scores / query_indices of lengths {lengths}")
        for rle in self.rles:
            if [int(v) for v in rle["size"]] != list(self.size) or not isinstance(rle["counts"], bytes):
                raise ValueError(f"each RLE must be of size {list(self.size)} with bytes counts, got size {rle['size']}")

    @classmethod
    def from_masks(
        cls,
        masks: np.ndarray | Tensor,
        class_ids: np.ndarray | Tensor,
        scores: np.ndarray | Tensor,
        query_indices: np.ndarray | Tensor | None = None,
    ) -> PseudoInstances:
        """Encode dense masks.

        Shape:
            - masks: ``(M, H, W)`` bool (or 0/1), numpy or torch (any device)
            - class_ids, scores, query_indices: ``(M,)``
        """
        dense = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
        if dense.ndim != 3:
            raise ValueError(f"masks must be (M, H, W), got shape {tuple(dense.shape)}")
        return cls(
            size=(dense.shape[1], dense.shape[2]),
            rles=tuple(encode_rle(mask) for mask in dense),
            class_ids=_numpy(class_ids),
            scores=_numpy(scores),
            query_indices=None if query_indices is None else _numpy(query_indices),
        )

    @classmethod
    def empty(cls, size: tuple[int, int]) -> PseudoInstances:
        """No instance in an image of ``size``."""
        return cls(size=size, rles=(), class_ids=np.zeros(0, np.int64), scores=np.zeros(0), query_indices=None)

    @property
    def num_instances(self) -> int:
        """Number of pseudo-instances ``M``."""
        return len(self.rles)

    @property
    def nbytes(self) -> int:
        """Bytes held by the masks (RLE counts) and the per-instance arrays."""
        arrays = self.class_ids.nbytes + self.scores.nbytes
        arrays += 0 if self.query_indices is None else self.query_indices.nbytes
        return sum(len(rle["counts"]) for rle in self.rles) + arrays

    def decode_masks(self) -> np.ndarray:
        """The dense masks (decoded now, not cached).

        Shape:
            - output: ``(M, H, W)`` bool
        """
        if not self.rles:
            return np.zeros((0, *self.size), dtype=bool)
        return mask_utils.decode(list(self.rles)).transpose(2, 0, 1).astype(bool)  # (M, H, W)

    def targets(self) -> InstanceTargets:
        """The pseudo-instances as training targets (bool masks ``(M, H, W)``, int64 classes; CPU)."""
        return InstanceTargets(masks=torch.from_numpy(self.decode_masks()), class_ids=torch.from_numpy(self.class_ids))

    def to_predictions(self) -> InstancePredictions:
        """The pseudo-labels as scored predictions for :mod:`reference_pipeline.evaluate`."""
        return InstancePredictions(masks=self.decode_masks(), class_ids=self.class_ids, scores=self.scores)

    def select(self, index: Sequence[int] | np.ndarray) -> PseudoInstances:
        """The instances at ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        return PseudoInstances(
            size=self.size,
            rles=tuple(self.rles[i] for i in index.tolist()),
            class_ids=self.class_ids[index],
            scores=self.scores[index],
            query_indices=None if self.query_indices is None else self.query_indices[index],
        )

    def to_record(self) -> dict[str, Any]:
        """The JSON record of the pseudo-label file (see :func:`write_pseudo_labels`)."""
        return {
            "masks": [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")} for rle in self.rles],
            "shape": [self.num_instances, *self.size],
            "class_ids": self.class_ids.tolist(),
            "scores": self.scores.tolist(),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PseudoInstances:
        """Inverse of :meth:`to_record` (no mask is decoded).

        Raises:
            ValueError: on a record without the format's keys or with inconsistent shapes.
        """
        missing = [key for key in _RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(f"not a pseudo-label record: missing {missing} (expected keys {list(_RECORD_KEYS)})")
        count, height, width = (int(v) for v in record["shape"])
        if len(record["masks"]) != count:
            raise ValueError(f"record shape says {count} masks, it holds {len(record['masks'])}")
        rles = tuple({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].encode("ascii")} for rle in record["masks"])
        return cls(size=(height, width), rles=rles, class_ids=record["class_ids"], scores=record["scores"])


_RECORD_KEYS = ("masks", "shape", "class_ids", "scores")


def encode_rle(mask: np.ndarray | Tensor) -> dict[str, Any]:
    """Compressed COCO RLE ``{"size": [H, W], "counts": bytes}`` of one ``(H, W)`` binary mask (numpy or torch)."""
    dense = _numpy(mask)
    if dense.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {tuple(dense.shape)}")
    rle = mask_utils.encode(np.asfortranarray(dense.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def _numpy(values: np.ndarray | Tensor) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)


def write_pseudo_labels(path: str | Path, pseudo: Mapping[int, PseudoInstances]) -> Path:
    """Write pseudo-labels atomically as JSON ``{image_id: record}`` (:meth:`PseudoInstances.to_record`).

    The format is the one every earlier run wrote: masks as compressed COCO RLE strings, plus
    ``shape`` ``[M, H, W]``, ``class_ids`` and ``scores`` per image.

    Returns:
        ``path``.
    """
    return atomic_write_json(path, {str(image_id): labels.to_record() for image_id, labels in pseudo.items()})


def read_pseudo_labels(path: str | Path) -> dict[int, PseudoInstances]:
    """Read a file of :func:`write_pseudo_labels`; masks stay RLE (decoded per sample on access).

    Raises:
        ValueError: naming the file when it is not a pseudo-label file of this format.
    """
    path = Path(path)
    records = json.loads(path.read_text(encoding="utf-8"))
    try:  # a JSON list or scalar fails on .items()
        return {int(image_id): PseudoInstances.from_record(record) for image_id, record in records.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(
            f"{path} is not a pseudo-label file of this format ({error}); delete it to pseudo-label again"
        ) from error


def resize_mask_logits(
    mask_logits: Tensor, image_size: tuple[int, int], stride: int | None = 4, input_size: tuple[int, int] | None = None
) -> Tensor:
    """Resize stride-``s`` mask logits to the image (bilinear, pixel centres aligned).

    With a stride, the logit grid covers ``(h·s, w·s) ≥ (H_in, W_in)`` pixels of the model's input (its
    bottom/right padding to a multiple of ``s``): the logits are upsampled by ``s`` and cropped to the
    input, so each logit cell maps to its own ``s × s`` block of pixels; when the model saw the image
    resized (``input_size`` differs from ``image_size``, e.g. a 1024×2048 Cityscapes image run at
    512×1024) the input-size logits are then resized bilinearly to the image. Without a stride they are
    resized straight to ``(H, W)``.

    Args:
        mask_logits: per-query logits.
        image_size: ``(H, W)`` of the image the masks are for.
        stride: ``s``, or ``None``.
        input_size: ``(H_in, W_in)`` the model's input had (default ``image_size``).

    Shape:
        - mask_logits: :math:`(K, h, w)` with :math:`h = \\lceil H_{in}/s \\rceil, w = \\lceil W_{in}/s \\rceil`
        - output: :math:`(K, H, W)` float32

    Raises:
        ValueError: if the logit grid does not match ``input_size`` and ``stride``.
    """
    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits must be (K, h, w), got {tuple(mask_logits.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {tuple(image_size)}")
    in_height, in_width = (height, width) if input_size is None else (int(input_size[0]), int(input_size[1]))
    logits = mask_logits.float()[None]  # (1, K, h, w)
    if mask_logits.shape[0] == 0:
        return logits.new_zeros((0, height, width))
    if stride is None:
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]  # (K, H, W)
    grid_h, grid_w = mask_logits.shape[-2:]
    if (math.ceil(in_height / stride), math.ceil(in_width / stride)) != (grid_h, grid_w):
        raise ValueError(
            f"mask logits of size {grid_h}x{grid_w} do not match a model input of {in_height}x{in_width} at stride "
            f"{stride} (expected {math.ceil(in_height / stride)}x{math.ceil(in_width / stride)})"
        )
    up = F.interpolate(logits, size=(grid_h * stride, grid_w * stride), mode="bilinear", align_corners=False)
    up = up[:, :, :in_height, :in_width]  # (1, K, H_in, W_in)
    if (in_height, in_width) != (height, width):
        up = F.interpolate(up, size=(height, width), mode="bilinear", align_corners=False)  # (1, K, H, W)
    return up[0]  # (K, H, W)


def pseudo_label(
    mask_logits: Tensor,
    class_logits: Tensor,
    image_size: tuple[int, int],
    config: PseudoLabelConfig | None = None,
    input_size: tuple[int, int] | None = None,
) -> PseudoInstances:
    """Pseudo-instances of one image from its query outputs (see the module docstring).

    Args:
        mask_logits: per-query mask logits (stride ``config.mask_stride``).
        class_logits: per-query class logits, no-object last.
        image_size: ``(H, W)`` of the image the masks are produced for.
        config: thresholds; default :class:`PseudoLabelConfig`.
        input_size: ``(H_in, W_in)`` the model saw when it differs from ``image_size`` (the image was
            resized to the training size); see :func:`resize_mask_logits`.

    Shape:
        - mask_logits: :math:`(K, h, w)`
        - class_logits: :math:`(K, C+1)`

    Returns:
        :class:`PseudoInstances` (masks as RLE, on the host; possibly with ``M = 0``).

    Raises:
        ValueError: on mismatched shapes, fewer than one class, non-finite logits, or a logit
            grid that does not match ``image_size``.
    """
    config = config if config is not None else PseudoLabelConfig()
    check_query_outputs(mask_logits, class_logits)
    height, width = int(image_size[0]), int(image_size[1])
    device = mask_logits.device
    with torch.no_grad():
        probs = class_logits.detach().float().softmax(dim=-1)[:, :-1]  # (K, C) no-object dropped after softmax
        scores, classes = probs.max(dim=-1)  # (K,), (K,)
        candidates = (scores >= config.score_threshold).nonzero(as_tuple=True)[0]  # (K',)
        order = scores[candidates].sort(descending=True, stable=True).indices  # (K',)
        candidates = candidates[order]  # (K',) by decreasing score, ties by query index
        logit_threshold = math.log(config.mask_threshold / (1.0 - config.mask_threshold))
        taken = torch.zeros((height, width), dtype=torch.bool, device=device)  # (H, W)
        kept_rles: list[dict[str, Any]] = []  # encoded as they are kept: never M dense masks at once
        kept: list[int] = []
        for slot in range(candidates.numel()):
            if len(kept) == config.max_instances:
                break
            query = candidates[slot : slot + 1]  # (1,) one query at a time: memory stays O(H·W)
            logits = resize_mask_logits(
                mask_logits.detach()[query], (height, width), config.mask_stride, input_size
            )[0]  # (H, W)
            full = logits > logit_threshold  # (H, W) same as sigmoid(logits) > mask_threshold
            full_area = int(full.sum())
            visible = full & ~taken  # (H, W)
            area = int(visible.sum())
            if area < config.min_area or area < config.min_visible_fraction * full_area:
                continue
            taken |= visible
            kept_rles.append(encode_rle(visible))
            kept.append(slot)
        index = torch.as_tensor(kept, dtype=torch.int64, device=device)  # (M,)
        queries = candidates[index]  # (M,)
    return PseudoInstances(
        size=(height, width), rles=tuple(kept_rles), class_ids=_numpy(classes[queries]), scores=_numpy(scores[queries]),
        query_indices=_numpy(queries),
    )


def pseudo_label_batch(
    output: SegmentationOutput,
    image_size: tuple[int, int] | Sequence[tuple[int, int]],
    config: PseudoLabelConfig | None = None,
) -> list[PseudoInstances]:
    """:func:`pseudo_label` for every image of a batch of model outputs.

    Args:
        output: the (teacher's) outputs; only ``mask_logits`` and ``class_logits`` are used.
        image_size: ``(H, W)`` shared by the batch, or one ``(H, W)`` per image.
        config: thresholds; default :class:`PseudoLabelConfig`.

    Returns:
        One :class:`PseudoInstances` per image.

    Raises:
        ValueError: if the number of image sizes differs from the batch size (and as
            :func:`pseudo_label`).
    """
    if not isinstance(output, SegmentationOutput):
        raise TypeError(f"output must be a SegmentationOutput, got {type(output).__name__}")
    batch = output.mask_logits.shape[0]
    if len(image_size) == 2 and all(isinstance(v, (int, np.integer)) for v in image_size):
        sizes = [tuple(int(v) for v in image_size)] * batch
    else:
        sizes = [tuple(int(v) for v in size) for size in image_size]
        if len(sizes) != batch:
            raise ValueError(f"got {len(sizes)} image sizes for a batch of {batch} images")
    return [
        pseudo_label(output.mask_logits[b], output.class_logits[b], sizes[b], config)  # type: ignore[arg-type]
        for b in range(batch)
    ]


def summarize_pseudo_labels(pseudo: Sequence[PseudoInstances]) -> dict[str, float]:
    """Counts for logging: instances per image and empty images.

    Args:
        pseudo: pseudo-labels of some images.

    Returns:
        ``{"images", "instances", "instances_mean", "instances_min", "instances_max",
        "empty_images", "score_mean"}`` (``score_mean`` is NaN when there is no instance).

    Raises:
        ValueError: if ``pseudo`` is empty.
    """
    if not pseudo:
        raise ValueError("cannot summarise an empty list of pseudo-labels")
    counts = [p.num_instances for p in pseudo]
    scores = np.concatenate([p.scores for p in pseudo])  # (sum M,)
    return {
        "images": float(len(counts)),
        "instances": float(sum(counts)),
        "instances_mean": float(np.mean(counts)),
        "instances_min": float(min(counts)),
        "instances_max": float(max(counts)),
        "empty_images": float(sum(c == 0 for c in counts)),
        "score_mean": float(scores.mean()) if scores.size else math.nan,
    }


def pseudo_label_quality(
    pseudo: Sequence[PseudoInstances],
    samples: Sequence[InstanceSample],
    class_names: Sequence[str],
) -> dict[str, float]:
    """COCO mask AP of pseudo-labels against ground truth (where it exists).

    Each pseudo-instance is a prediction scored by its class probability; crowd regions of the
    ground truth are ignored, as in COCO (:func:`reference_pipeline.evaluate.evaluate_coco_masks`).

    Args:
        pseudo: pseudo-labels, one per sample, in the same order.
        samples: the ground truth of the same images (masks at the pseudo-labels' size).
        class_names: name of each class index.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` on a 0-100 scale.

    Raises:
        ValueError: on a length mismatch, duplicate image ids, masks of another size than the
            image, or ground truth without any non-crowd instance.
    """
    if len(pseudo) != len(samples):
        raise ValueError(f"got {len(pseudo)} pseudo-labels for {len(samples)} samples")
    ids = [int(s.image_id) for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("samples must have unique image ids")
    predictions = {image_id: p.to_predictions() for image_id, p in zip(ids, pseudo)}
    return evaluate_coco_masks(list(samples), predictions, class_names)
