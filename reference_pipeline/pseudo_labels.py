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
binary mask covers it. The result is an :class:`~reference_pipeline.models.outputs.InstanceTargets`
at image size plus the scores, usable as training targets by
:class:`~reference_pipeline.losses.SetCriterion` and measurable against ground truth with
COCO mask AP (:func:`pseudo_label_quality`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data.structures import InstanceSample
from .evaluate import InstancePredictions, check_query_outputs, evaluate_coco_masks
from .models.outputs import InstanceTargets, SegmentationOutput

__all__ = [
    "PseudoLabelConfig",
    "PseudoLabels",
    "pseudo_label",
    "pseudo_label_batch",
    "pseudo_label_quality",
    "resize_mask_logits",
    "summarize_pseudo_labels",
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


@dataclass
class PseudoLabels:
    """The pseudo-instances of one image.

    Attributes:
        targets: bool masks ``(M, H, W)`` at image size and class ids ``(M,)``, sorted by
            decreasing score; masks never overlap.
        scores: ``(M,)`` class probability of each instance.
        query_indices: ``(M,)`` the query each instance came from.
    """

    targets: InstanceTargets
    scores: Tensor
    query_indices: Tensor

    @property
    def num_instances(self) -> int:
        """Number of pseudo-instances ``M``."""
        return int(self.scores.shape[0])

    def to_predictions(self) -> InstancePredictions:
        """The pseudo-labels as scored predictions (numpy, CPU) for :mod:`reference_pipeline.evaluate`."""
        return InstancePredictions(
            masks=self.targets.masks.bool().cpu().numpy(),
            class_ids=self.targets.class_ids.cpu().numpy(),
            scores=self.scores.detach().double().cpu().numpy(),
        )


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
) -> PseudoLabels:
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
        :class:`PseudoLabels` on the device of ``mask_logits`` (possibly with ``M = 0``).

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
        kept_masks: list[Tensor] = []
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
            kept_masks.append(visible)
            kept.append(slot)
        index = torch.as_tensor(kept, dtype=torch.int64, device=device)  # (M,)
        queries = candidates[index]  # (M,)
        masks = (
            torch.stack(kept_masks) if kept_masks else torch.zeros((0, height, width), dtype=torch.bool, device=device)
        )
    return PseudoLabels(
        targets=InstanceTargets(masks=masks, class_ids=classes[queries].to(torch.int64)),
        scores=scores[queries],
        query_indices=queries,
    )


def pseudo_label_batch(
    output: SegmentationOutput,
    image_size: tuple[int, int] | Sequence[tuple[int, int]],
    config: PseudoLabelConfig | None = None,
) -> list[PseudoLabels]:
    """:func:`pseudo_label` for every image of a batch of model outputs.

    Args:
        output: the (teacher's) outputs; only ``mask_logits`` and ``class_logits`` are used.
        image_size: ``(H, W)`` shared by the batch, or one ``(H, W)`` per image.
        config: thresholds; default :class:`PseudoLabelConfig`.

    Returns:
        One :class:`PseudoLabels` per image.

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


def summarize_pseudo_labels(pseudo: Sequence[PseudoLabels]) -> dict[str, float]:
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
    scores = torch.cat([p.scores.detach().float().cpu() for p in pseudo])  # (sum M,)
    return {
        "images": float(len(counts)),
        "instances": float(sum(counts)),
        "instances_mean": float(np.mean(counts)),
        "instances_min": float(min(counts)),
        "instances_max": float(max(counts)),
        "empty_images": float(sum(c == 0 for c in counts)),
        "score_mean": float(scores.mean()) if scores.numel() else math.nan,
    }


def pseudo_label_quality(
    pseudo: Sequence[PseudoLabels],
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
