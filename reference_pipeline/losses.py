r"""Training losses of the reference pipeline: set criterion, contrastive term, unified objective.

Every stage of the pipeline (teacher adaptation, knowledge transfer, student refinement)
minimises the same objective

.. math::
    J = L_{\text{sup}} + \lambda_{\text{semi}} L_{\text{semi}} + \lambda_{\text{pxl}} L_{\text{pxl}},

where :math:`L_{\text{sup}}` and :math:`L_{\text{semi}}` are the set criterion of Mask2Former
(:class:`SetCriterion`) on ground truth and on pseudo-labels, and :math:`L_{\text{pxl}}` is the
instance-aware pixel contrastive term on two views of the same images
(:func:`pixel_contrast_term`). Stages differ only in which terms are present and in the weights
(:func:`unified_objective`).

The set criterion is ``transformers``' ``Mask2FormerLoss`` (Hungarian matching on point-sampled
mask BCE + dice + class costs, then point-sampled mask BCE and dice on the matched pairs with
importance sampling of uncertain points, and class cross-entropy with a down-weighted no-object
class); this module only converts the pipeline's :class:`~reference_pipeline.models.outputs.SegmentationOutput`
and :class:`~reference_pipeline.models.outputs.InstanceTargets` to its inputs, applies the
weights and normalises the number of masks across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

from instcontrast.loss import ContrastOutput, InstanceAwarePixelContrast
from instcontrast.views import ViewGeometry, align_views

from .models.outputs import InstanceTargets, SegmentationOutput

if TYPE_CHECKING:
    from .data.semi import SemiBatch

__all__ = [
    "CriterionConfig",
    "Objective",
    "SetCriterion",
    "other_view_outputs",
    "pixel_contrast_term",
    "unified_objective",
]


@dataclass
class CriterionConfig:
    """Weights and point sampling of the set criterion.

    Defaults are the paper's (Table 7: mask 5, dice 5, class 2) and Mask2Former's (no-object
    weight 0.1, oversampling 3, 75 % importance-sampled points). ``train_num_points`` is lowered
    from Mask2Former's 12,544 to 1,024 for CPU speed: on a demo-size batch (4 images, 50 queries,
    32 × 32 mask logits, 8 targets per image; forward + backward of one layer, one thread) it
    measured 23 ms with 1,024 points, 16 ms with 256 and 273 ms with 12,544. At demo size the
    mask logits have 1,024 cells, so 1,024 points still sample about one point per cell.

    Attributes:
        mask_weight: weight of the point-sampled sigmoid BCE (and of its matching cost).
        dice_weight: weight of the dice loss (and of its matching cost).
        class_weight: weight of the class cross-entropy (and of its matching cost).
        no_object_weight: class weight of the no-object class in the cross-entropy.
        train_num_points: points sampled per mask for the mask losses and for matching.
        oversample_ratio: candidate points per sampled point for importance sampling.
        importance_sample_ratio: fraction of points taken among the most uncertain candidates.
        mask_stride: stride of the mask logits with respect to the target masks: the logits of an
            ``H × W`` image are ``ceil(H / s) × ceil(W / s)`` (the pipeline's contract, ``s = 4``).
            Targets are zero-padded to ``(h·s, w·s)`` so that normalised point coordinates address
            the same scene point in both.

    Raises:
        ValueError: on a negative weight, all-zero weights, or out-of-range sampling parameters.
    """

    mask_weight: float = 5.0
    dice_weight: float = 5.0
    class_weight: float = 2.0
    no_object_weight: float = 0.1
    train_num_points: int = 1024
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    mask_stride: int = 4

    def __post_init__(self) -> None:
        for name in ("mask_weight", "dice_weight", "class_weight", "no_object_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.mask_weight == self.dice_weight == self.class_weight == 0:
            raise ValueError("mask_weight, dice_weight and class_weight cannot all be 0")
        for name in ("train_num_points", "mask_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.oversample_ratio, (int, float)) and self.oversample_ratio >= 1):
            raise ValueError(f"oversample_ratio must be >= 1, got {self.oversample_ratio!r}")
        if not (isinstance(self.importance_sample_ratio, (int, float)) and 0 <= self.importance_sample_ratio <= 1):
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio!r}")

    @property
    def weights(self) -> dict[str, float]:
        """Weight of each term, keyed by ``transformers``' term names."""
        return {"loss_mask": self.mask_weight, "loss_dice": self.dice_weight, "loss_cross_entropy": self.class_weight}


class _Mask2FormerLossAllRanks(Mask2FormerLoss):
    """``Mask2FormerLoss`` whose mask count is averaged over ``torch.distributed`` ranks.

    ``transformers`` averages the number of target masks over ranks only through ``accelerate``
    (and only once an ``accelerate`` state exists); under plain ``torchrun`` DDP every rank would
    normalise by its own count. Like the original Mask2Former, this all-reduces the count when a
    process group is initialized and divides by the world size (at least 1).
    """

    def get_num_masks(self, class_labels: Sequence[Tensor], device: torch.device) -> Tensor:
        num_masks = torch.as_tensor(float(sum(len(labels) for labels in class_labels)), device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            world_size = dist.get_world_size()
        return torch.clamp(num_masks / world_size, min=1)


class SetCriterion(nn.Module):
    r"""Mask2Former's set criterion on :class:`SegmentationOutput` and :class:`InstanceTargets`.

    For each image the Hungarian matcher assigns at most one query to each target by the cost
    :math:`\lambda_{\text{cls}}(-p_k(c_j)) + \lambda_{\text{mask}}\,\mathrm{BCE}(m_k, t_j) + \lambda_{\text{dice}}\,\mathrm{dice}(m_k, t_j)`
    on ``train_num_points`` random points; then, with :math:`N` the number of targets averaged over
    ranks (at least 1),

    .. math::
        L = \lambda_{\text{mask}} \frac{1}{N}\sum_{(k,j)} \mathrm{BCE}(m_k, t_j)
          + \lambda_{\text{dice}} \frac{1}{N}\sum_{(k,j)} \mathrm{dice}(m_k, t_j)
          + \lambda_{\text{cls}}\, \frac{\sum_k w_{c_k} \mathrm{CE}(k, c_k)}{\sum_k w_{c_k}},

    where unmatched queries have target class :math:`c_k = \varnothing` (no-object, weight
    ``no_object_weight``; every other class has weight 1), and the mask terms are averaged over
    importance-sampled points. The same is computed for each auxiliary (intermediate decoder)
    output with its own matching (deep supervision).

    An image without instances is valid: no query is matched, its mask terms are 0 and all of its
    queries are pushed to no-object by the cross-entropy.

    Args:
        num_classes: number of foreground classes ``C`` (class logits have ``C + 1`` columns).
        config: weights and point sampling; default :class:`CriterionConfig`.

    Raises:
        ValueError: if ``num_classes < 1``.
    """

    def __init__(self, num_classes: int, config: CriterionConfig | None = None) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.config = config if config is not None else CriterionConfig()
        hf_config = Mask2FormerConfig(
            num_labels=num_classes,
            mask_weight=float(self.config.mask_weight),
            dice_weight=float(self.config.dice_weight),
            class_weight=float(self.config.class_weight),
            no_object_weight=float(self.config.no_object_weight),
            train_num_points=self.config.train_num_points,
            oversample_ratio=float(self.config.oversample_ratio),
            importance_sample_ratio=float(self.config.importance_sample_ratio),
        )
        self.loss = _Mask2FormerLossAllRanks(hf_config, weight_dict=self.config.weights)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, config={self.config}"

    def forward(self, output: SegmentationOutput, targets: Sequence[InstanceTargets]) -> dict[str, Tensor]:
        """Weighted loss terms of the final and auxiliary decoder layers, and their sum.

        Args:
            output: model predictions; ``aux_outputs`` (if any) get deep supervision.
            targets: one :class:`InstanceTargets` per image, masks at the input image size.

        Shape:
            - output.mask_logits: :math:`(B, K, h, w)` with :math:`h = \\lceil H/s \\rceil`,
              :math:`w = \\lceil W/s \\rceil` (``s = config.mask_stride``)
            - output.class_logits: :math:`(B, K, C+1)`
            - targets[b].masks: :math:`(M_b, H, W)` bool or float in ``[0, 1]``, ``M_b`` may be 0
            - targets[b].class_ids: :math:`(M_b,)` integer in ``0 .. C-1``

        Returns:
            ``{"loss_mask", "loss_dice", "loss_cross_entropy"}`` for the final layer,
            ``"loss_mask_<i>"`` etc. for auxiliary layer ``i``, each already multiplied by its
            weight, and ``"total"``, their sum (a scalar with gradient).

        Raises:
            ValueError: on an empty batch, a batch size mismatch, inconsistent shapes, target sizes
                that do not match the stride, class ids out of range, or non-finite logits.
            TypeError: if ``output``, an auxiliary output or a target has the wrong type.
        """
        mask_labels, class_labels = self._prepare(output, targets)
        aux = [
            {
                "masks_queries_logits": layer["masks_queries_logits"].float(),
                "class_queries_logits": layer["class_queries_logits"].float(),
            }
            for layer in output.aux_outputs
        ]
        raw = self.loss(
            masks_queries_logits=output.mask_logits.float(),
            class_queries_logits=output.class_logits.float(),
            mask_labels=mask_labels,
            class_labels=class_labels,
            auxiliary_predictions=aux or None,
        )
        weighted = {name: value * self._weight_of(name) for name, value in raw.items()}
        weighted["total"] = torch.stack(list(weighted.values())).sum()
        return weighted

    @torch.no_grad()
    def match(self, output: SegmentationOutput, targets: Sequence[InstanceTargets]) -> list[tuple[Tensor, Tensor]]:
        """The Hungarian assignment of the final layer (as used by :meth:`forward`).

        Args:
            output: model predictions.
            targets: one :class:`InstanceTargets` per image.

        Returns:
            Per image, ``(query_indices, target_indices)`` int64 tensors of length
            ``min(K, M_b)``; query ``query_indices[i]`` is assigned target ``target_indices[i]``.

        Raises:
            ValueError, TypeError: as :meth:`forward`.
        """
        mask_labels, class_labels = self._prepare(output, targets)
        return self.loss.matcher(output.mask_logits.float(), output.class_logits.float(), mask_labels, class_labels)

    def _weight_of(self, name: str) -> float:
        for base, weight in self.config.weights.items():
            if name == base or name.startswith(base + "_"):
                return weight
        raise KeyError(f"unexpected loss term {name!r} from Mask2FormerLoss")

    def _prepare(
        self, output: SegmentationOutput, targets: Sequence[InstanceTargets]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Validate inputs; return float target masks padded to the stride grid and int64 classes."""
        if not isinstance(output, SegmentationOutput):
            raise TypeError(f"output must be a SegmentationOutput, got {type(output).__name__}")
        if isinstance(targets, InstanceTargets) or not isinstance(targets, Sequence):
            raise TypeError(f"targets must be a list of InstanceTargets (one per image), got {type(targets).__name__}")
        mask_logits, class_logits = output.mask_logits, output.class_logits
        if mask_logits.ndim != 4 or class_logits.ndim != 3 or mask_logits.shape[:2] != class_logits.shape[:2]:
            raise ValueError(
                f"expected mask_logits (B, K, h, w) and class_logits (B, K, C+1) with equal B and K, got "
                f"{tuple(mask_logits.shape)} and {tuple(class_logits.shape)}"
            )
        batch, _, height, width = mask_logits.shape
        if batch == 0 or len(targets) == 0:
            raise ValueError("the set criterion needs at least one image; got an empty batch")
        if class_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"class_logits has {class_logits.shape[-1]} columns, expected {self.num_classes} classes + no-object"
            )
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        for index, layer in enumerate(output.aux_outputs):
            aux_masks, aux_classes = layer.get("masks_queries_logits"), layer.get("class_queries_logits")
            if not isinstance(aux_masks, Tensor) or not isinstance(aux_classes, Tensor):
                raise TypeError(
                    f"aux_outputs[{index}] must hold tensors 'masks_queries_logits' and 'class_queries_logits'"
                )
            if aux_masks.shape != mask_logits.shape or aux_classes.shape != class_logits.shape:
                raise ValueError(
                    f"aux_outputs[{index}] has shapes {tuple(aux_masks.shape)} and {tuple(aux_classes.shape)}, "
                    f"expected those of the final layer, {tuple(mask_logits.shape)} and {tuple(class_logits.shape)}"
                )
            _check_finite(f"aux_outputs[{index}]", aux_masks, aux_classes)
        _check_finite("output", mask_logits, class_logits)

        stride = self.config.mask_stride
        sizes = set()
        mask_labels, class_labels = [], []
        for index, target in enumerate(targets):
            if not isinstance(target, InstanceTargets):
                raise TypeError(f"targets[{index}] must be InstanceTargets, got {type(target).__name__}")
            masks, classes = target.masks, target.class_ids
            if masks.ndim != 3 or classes.ndim != 1 or masks.shape[0] != classes.shape[0]:
                raise ValueError(
                    f"targets[{index}] must have masks (M, H, W) and class_ids (M,), got "
                    f"{tuple(masks.shape)} and {tuple(classes.shape)}"
                )
            if classes.is_floating_point() or classes.dtype == torch.bool:
                raise TypeError(f"targets[{index}].class_ids must be integer, got {classes.dtype}")
            if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
                raise ValueError(
                    f"targets[{index}].class_ids must be in 0..{self.num_classes - 1}, got {classes.tolist()}"
                )
            image_h, image_w = masks.shape[-2:]
            if math.ceil(image_h / stride) != height or math.ceil(image_w / stride) != width:
                raise ValueError(
                    f"targets[{index}] masks are {image_h}x{image_w} but the mask logits are {height}x{width}; "
                    f"with mask_stride={stride} they must be ceil(H/{stride}) x ceil(W/{stride})"
                )
            sizes.add((image_h, image_w))
            masks = masks.to(device=mask_logits.device, dtype=torch.float32)  # (M, H, W)
            if masks.numel() and (float(masks.min()) < 0 or float(masks.max()) > 1):
                raise ValueError(f"targets[{index}].masks must be bool or floats in [0, 1]")
            masks = F.pad(masks, (0, width * stride - image_w, 0, height * stride - image_h))  # (M, h·s, w·s)
            mask_labels.append(masks)
            class_labels.append(classes.to(device=mask_logits.device, dtype=torch.int64))  # (M,)
        if len(sizes) > 1:
            raise ValueError(f"all targets of a batch must have the same image size, got {sorted(sizes)}")
        return mask_labels, class_labels


def _check_finite(name: str, *tensors: Tensor) -> None:
    for tensor in tensors:
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds NaN or Inf logits")


def _term_value(name: str, term: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """A term's scalar loss and its sub-terms to log (``"<name>/<key>"``)."""
    if isinstance(term, Mapping):
        if "total" not in term:
            raise ValueError(f"{name} is a dict without a 'total' entry (keys: {sorted(term)})")
        value = term["total"]
        parts = {f"{name}/{key}": part for key, part in term.items() if key != "total"}
    else:
        value, parts = term, {}
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor or a dict of Tensors with 'total', got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar loss, got shape {tuple(value.shape)}")
    return value.reshape(()), parts


def unified_objective(
    sup: Tensor | Mapping[str, Tensor] | None,
    semi: Tensor | Mapping[str, Tensor] | None,
    pxl: Tensor | None,
    lambda_semi: float,
    lambda_pxl: float,
) -> tuple[Tensor, dict[str, float]]:
    r"""The objective every stage minimises, with its terms for logging.

    .. math::
        J = L_{\text{sup}} + \lambda_{\text{semi}}\, L_{\text{semi}} + \lambda_{\text{pxl}}\, L_{\text{pxl}}

    An absent term (``None``) contributes nothing and is not logged; a present term is logged
    even when its weight is 0.

    Args:
        sup: supervised set-criterion loss on labeled images (a scalar, or the dict of
            :meth:`SetCriterion.forward`, whose ``"total"`` is used), or ``None``.
        semi: set-criterion loss on pseudo-labeled images (same forms), or ``None``.
        pxl: pixel contrastive loss (``ContrastOutput.loss``), or ``None``.
        lambda_semi: :math:`\lambda_{\text{semi}} \ge 0`.
        lambda_pxl: :math:`\lambda_{\text{pxl}} \ge 0` (paper: 0.2).

    Returns:
        ``(J, log)``: the scalar objective (with gradient) and a dict of floats holding the
        *unweighted* present terms ``"sup"``, ``"semi"``, ``"pxl"``, their sub-terms
        (``"sup/loss_mask"``, ...) when given as dicts, and ``"total"`` (:math:`J`).

    Raises:
        ValueError: if no term is present, a term is not a scalar, a weight is negative or not
            finite, or a present term (hence :math:`J`) is NaN or infinite.
        TypeError: if a term or a weight has the wrong type.
    """
    for name, weight in (("lambda_semi", lambda_semi), ("lambda_pxl", lambda_pxl)):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(weight).__name__}")
        if not 0 <= weight < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")
    candidates = (("sup", sup, 1.0), ("semi", semi, lambda_semi), ("pxl", pxl, lambda_pxl))
    present = [(name, term, weight) for name, term, weight in candidates if term is not None]
    if not present:
        raise ValueError("unified_objective needs at least one of sup, semi, pxl")
    logged: dict[str, Tensor] = {}
    contributions: list[Tensor] = []
    for name, term, weight in present:
        value, parts = _term_value(name, term)
        logged[name] = value
        logged.update(parts)
        contributions.append(value if name == "sup" else weight * value)
    total = sum(contributions[1:], contributions[0])
    logged["total"] = total
    values = torch.stack([value.detach().float().reshape(()) for value in logged.values()]).tolist()  # one sync
    log = dict(zip(logged, values))
    bad = [name for name, _, _ in present if not math.isfinite(log[name])]
    if bad:
        raise ValueError(f"non-finite loss term(s) {bad}: {{{', '.join(f'{k}={log[k]}' for k in bad)}}}")
    return total, log


def pixel_contrast_term(
    criterion: InstanceAwarePixelContrast,
    weak: SegmentationOutput,
    strong: SegmentationOutput,
    weak_geometry: ViewGeometry,
    strong_geometry: ViewGeometry,
    instance_ids: Tensor | None = None,
    prediction_source: SegmentationOutput | None = None,
    generator: torch.Generator | None = None,
) -> ContrastOutput:
    r"""The instance-aware pixel contrastive term on a weak and a strong view of the same images.

    The strong view's embeddings are resampled onto the weak view's grid with
    :func:`instcontrast.views.align_views` (bilinear), so that position :math:`p` of both maps
    shows the same scene point: the positive pair. Weak pixels whose scene point lies outside the
    strong crop are invalid (neither anchors nor negatives). Negatives are sampled from the fused
    mask/class probabilities of ``prediction_source`` (detached), and

    .. math::
        \ell = -\log\frac{e^{\langle z^w_p, z^s_p\rangle/T}}
        {e^{\langle z^w_p, z^s_p\rangle/T} + \sum_r e^{\langle z^w_p, z^s_{q_r}\rangle/T}}

    averaged over valid anchors (see :class:`instcontrast.InstanceAwarePixelContrast`). Gradients
    reach the strong embeddings only when the criterion was built with ``detach_strong=False``.

    Args:
        criterion: the library loss (temperature, negatives, strategy, memory bank, ...).
        weak: the model's outputs on the weak view (anchors: ``weak.pixel_embeddings``).
        strong: the model's outputs on the strong view (positives and negatives).
        weak_geometry: crop boxes and flips of the weak views (``ViewBatch.geometry``).
        strong_geometry: crop boxes and flips of the strong views.
        instance_ids: ground-truth instance ids of the weak view for the false-negative rate
            (negative ids are ignored), at any resolution (resized nearest by the library).
        prediction_source: outputs whose mask and class logits drive the sampler; default the
            weak view's own outputs (what the stages use: the trained model's own predictions, as in the
            paper's Sec. 3.2); another model's outputs on the weak view can be given instead.
        generator: random generator for anchor subsampling and negative sampling.

    Shape:
        - weak.pixel_embeddings: :math:`(B, D, h, w)`
        - strong.pixel_embeddings: :math:`(B, D, h_s, w_s)` (any size; resampled to :math:`h \times w`)
        - prediction_source.mask_logits: :math:`(B, K, h', w')`, class_logits :math:`(B, K, C+1)`
        - instance_ids: :math:`(B, H, W)` integer

    Returns:
        The library's :class:`~instcontrast.loss.ContrastOutput` (``loss`` and ``stats``: FNR when
        ``instance_ids`` is given, margin, acceptance, fallbacks, ...).

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if batch sizes or embedding dimensions of the views differ (further shape
            errors come from the library).
    """
    if not isinstance(criterion, InstanceAwarePixelContrast):
        raise TypeError(f"criterion must be an InstanceAwarePixelContrast, got {type(criterion).__name__}")
    source = weak if prediction_source is None else prediction_source
    for name, value in (("weak", weak), ("strong", strong), ("prediction_source", source)):
        if not isinstance(value, SegmentationOutput):
            raise TypeError(f"{name} must be a SegmentationOutput, got {type(value).__name__}")
    for name, value in (("weak_geometry", weak_geometry), ("strong_geometry", strong_geometry)):
        if not isinstance(value, ViewGeometry):
            raise TypeError(f"{name} must be a ViewGeometry, got {type(value).__name__}")
    z_weak, z_strong = weak.pixel_embeddings, strong.pixel_embeddings
    if z_weak.ndim != 4 or z_strong.ndim != 4 or z_weak.shape[:2] != z_strong.shape[:2]:
        raise ValueError(
            f"weak and strong pixel_embeddings must be (B, D, h, w) with equal B and D, got "
            f"{tuple(z_weak.shape)} and {tuple(z_strong.shape)}"
        )
    if source.class_logits.shape[0] != z_weak.shape[0]:
        raise ValueError(
            f"prediction_source has batch size {source.class_logits.shape[0]}, the views {z_weak.shape[0]}"
        )
    aligned, valid = align_views(z_strong, strong_geometry, weak_geometry, output_size=tuple(z_weak.shape[-2:]))
    return criterion(
        z_weak,
        aligned,  # (B, D, h, w) strong embeddings on the weak grid
        source.mask_logits.detach(),  # (B, K, h', w')
        source.class_logits.detach(),  # (B, K, C+1)
        valid=valid,  # (B, h, w)
        instance_ids=instance_ids,
        generator=generator,
    )


# ------------------------------------------------------------------------------- one step's J
def _slice_output(output: SegmentationOutput, start: int, stop: int) -> SegmentationOutput:
    return SegmentationOutput(
        mask_logits=output.mask_logits[start:stop],
        class_logits=output.class_logits[start:stop],
        pixel_embeddings=output.pixel_embeddings[start:stop],
        aux_outputs=[{key: value[start:stop] for key, value in aux.items()} for aux in output.aux_outputs],
    )


def _cat_geometry(parts: Sequence[ViewGeometry], device: torch.device) -> ViewGeometry:
    return ViewGeometry(
        boxes=torch.cat([g.boxes for g in parts]).to(device), flips=torch.cat([g.flips for g in parts]).to(device)
    )


class Objective:
    """``J = L_sup + λ_semi·L_semi + λ_pxl·L_pxl`` on a :class:`~reference_pipeline.data.semi.SemiBatch`.

    Args:
        criterion: the set criterion (Hungarian matching, mask BCE + dice, class CE).
        contrast: the library's instance-aware contrastive loss, or ``None`` (no pixel term).
        lambda_semi: weight of the pseudo-label term.
        lambda_pxl: weight of the pixel contrastive term.
    """

    def __init__(
        self, criterion: SetCriterion, contrast: InstanceAwarePixelContrast | None, lambda_semi: float, lambda_pxl: float
    ) -> None:
        self.criterion = criterion
        self.contrast = contrast if lambda_pxl > 0 else None
        self.lambda_semi = float(lambda_semi)
        self.lambda_pxl = float(lambda_pxl)

    def __call__(self, model: nn.Module, batch: SemiBatch) -> tuple[Tensor, dict[str, float]]:
        """One step's objective and its logged terms (each loss term, FNR, margin, acceptance)."""
        device = next(model.parameters()).device
        labeled, unlabeled = batch.labeled, batch.unlabeled
        num_labeled = len(labeled)
        anchor_images = [labeled.weak.images]
        if unlabeled is not None:
            anchor_images.append(unlabeled.strong.images)
        output = model(torch.cat(anchor_images).to(device))  # anchors: (B_l + B_u, ...)
        sup = self.criterion(_slice_output(output, 0, num_labeled), _to(labeled.targets("weak"), device))
        semi = None
        if unlabeled is not None and self.lambda_semi > 0:
            semi = self.criterion(
                _slice_output(output, num_labeled, output.mask_logits.shape[0]), _to(unlabeled.targets("strong"), device)
            )
        pxl, stats = None, {}
        if self.contrast is not None:
            contrast_out = self._pixel_term(model, output, batch, device)
            pxl = contrast_out.loss
            stats = _contrast_stats(contrast_out.stats)
        loss, logs = unified_objective(sup, semi, pxl, self.lambda_semi, self.lambda_pxl)
        logs.update(stats)
        return loss, logs

    def _pixel_term(self, model: nn.Module, output: SegmentationOutput, batch: SemiBatch, device: torch.device) -> Any:
        labeled, unlabeled = batch.labeled, batch.unlabeled
        target_images = [labeled.strong.images]
        anchor_geometry, target_geometry = [labeled.weak.geometry], [labeled.strong.geometry]
        instance_ids = [labeled.weak_ids]
        if unlabeled is not None:
            target_images.append(unlabeled.weak.images)
            anchor_geometry.append(unlabeled.strong.geometry)
            target_geometry.append(unlabeled.weak.geometry)
            instance_ids.append(unlabeled.strong_ids)
        core = getattr(model, "module", model)  # the DDP wrapper's forward is for gradient passes only
        target = other_view_outputs(core, torch.cat(target_images).to(device))  # the other view of each image
        return pixel_contrast_term(
            self.contrast,  # type: ignore[arg-type]
            output,
            target,
            _cat_geometry(anchor_geometry, device),
            _cat_geometry(target_geometry, device),
            instance_ids=torch.cat(instance_ids).to(device),
        )


@torch.no_grad()
def other_view_outputs(model: nn.Module, images: Tensor) -> SegmentationOutput:
    """The other view's outputs for ``L_pxl``, without gradients: only its pixel embeddings are read.

    The sampler is driven by the anchor view's predictions, so of the other view the contrastive term
    needs the embeddings alone. A model with an ``embed(images)`` method (the :class:`Student`) computes
    just those — the same tensor as ``model(images).pixel_embeddings``, without the decoder — and the
    returned output carries empty ``(B, 0, h, w)`` mask and ``(B, 0, 1)`` class logits; any other model
    runs its full forward.

    Args:
        model: the model (not a DDP wrapper).
        images: ``(B, 3, H, W)``.

    Returns:
        A :class:`SegmentationOutput` whose ``pixel_embeddings`` are ``(B, D, h, w)``.
    """
    embed = getattr(model, "embed", None)
    if not callable(embed):
        return model(images)
    embeddings = embed(images)  # (B, D, h, w)
    batch, _, height, width = embeddings.shape
    return SegmentationOutput(
        mask_logits=embeddings.new_empty(batch, 0, height, width),
        class_logits=embeddings.new_empty(batch, 0, 1),
        pixel_embeddings=embeddings,
    )


def _to(targets: list[InstanceTargets], device: torch.device) -> list[InstanceTargets]:
    return [InstanceTargets(t.masks.to(device), t.class_ids.to(device)) for t in targets]


def _contrast_stats(stats: Any) -> dict[str, float]:
    return {
        "margin": float(stats.margin),
        "acceptance": float(stats.acceptance),
        "fallbacks": float(stats.fallbacks),
        "fnr": float(stats.fnr) if stats.fnr is not None else float("nan"),  # same keys every step
    }
