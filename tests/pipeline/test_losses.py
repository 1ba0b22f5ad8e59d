"""Set criterion, unified objective and the two-view contrastive term, on hand-made model outputs."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from instcontrast import InstanceAwarePixelContrast
from instcontrast.views import ViewGeometry
from reference_pipeline.losses import CriterionConfig, SetCriterion, pixel_contrast_term, unified_objective
from reference_pipeline.models.outputs import InstanceTargets, SegmentationOutput

torch.set_num_threads(1)

C = 3  # foreground classes; no-object is index C
STRIDE = 4
IMAGE = (30, 30)  # not a multiple of the stride: targets must be padded to the 32 x 32 the logits cover
GRID = (8, 8)  # ceil(30 / 4)
BIG = 30.0  # a confident logit

# Uniform points only: importance sampling would put 75 % of the points on mask boundaries, where
# bilinear interpolation of a perfect stride-4 prediction is necessarily uncertain.
UNIFORM = CriterionConfig(importance_sample_ratio=0.0)


def _cells_to_image(cells: torch.Tensor) -> torch.Tensor:
    """A (M, 8, 8) cell mask as the (M, 30, 30) image mask it stands for (each cell is 4 x 4 pixels)."""
    return cells.repeat_interleave(STRIDE, -2).repeat_interleave(STRIDE, -1)[..., : IMAGE[0], : IMAGE[1]]


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, InstanceTargets]:
    """2 targets, 3 queries: query 2 predicts target 0, query 0 predicts target 1, query 1 is no-object."""
    cells = torch.zeros(2, *GRID, dtype=torch.bool)
    cells[0, :7, :4] = True  # target 0: left half, class 1 (the last cell row/column is half padding)
    cells[1, 4:7, 5:7] = True  # target 1: lower-right block, class 2
    targets = InstanceTargets(masks=_cells_to_image(cells), class_ids=torch.tensor([1, 2]))
    mask_logits = torch.full((3, *GRID), -BIG)  # (K, h, w)
    mask_logits[2][cells[0]] = BIG
    mask_logits[0][cells[1]] = BIG
    mask_logits[1, :2, 6:] = BIG  # a stray mask, classified as no-object
    class_logits = torch.tensor(
        [[0.0, 0.5, 4.0, 1.0], [0.2, 0.0, 0.1, 5.0], [0.3, 3.5, 0.0, 0.5]]
    )  # (K, C+1) query 0 -> class 2, query 1 -> no-object, query 2 -> class 1
    return mask_logits, class_logits, targets


def _output(mask_logits: torch.Tensor, class_logits: torch.Tensor, aux=None) -> SegmentationOutput:
    batch = mask_logits.shape[0]
    return SegmentationOutput(
        mask_logits=mask_logits,
        class_logits=class_logits,
        pixel_embeddings=torch.zeros(batch, 2, *mask_logits.shape[-2:]),
        aux_outputs=aux or [],
    )


def _seeded(criterion: SetCriterion, output: SegmentationOutput, targets: list[InstanceTargets], seed: int = 0):
    torch.manual_seed(seed)  # the same random points for every call compared
    return criterion(output, targets)


def _weighted_ce(class_logits: torch.Tensor, target_classes: torch.Tensor, no_object_weight: float) -> float:
    """sum_k w_k CE_k / sum_k w_k with w = no_object_weight for the no-object class, 1 otherwise."""
    nll = -class_logits.log_softmax(-1).gather(-1, target_classes[..., None])[..., 0]
    weights = torch.where(target_classes == C, no_object_weight, 1.0)
    return float((weights * nll).sum() / weights.sum())


# --- set criterion ------------------------------------------------------------------------------


def test_hungarian_matching_assigns_each_target_its_predicting_query() -> None:
    mask_logits, class_logits, targets = _hand_case()
    queries, target_index = SetCriterion(C, UNIFORM).match(_output(mask_logits[None], class_logits[None]), [targets])[0]
    assignment = dict(zip(target_index.tolist(), queries.tolist()))
    assert assignment == {0: 2, 1: 0}


@pytest.mark.parametrize("no_object_weight", [0.1, 0.5])
def test_matched_masks_cost_almost_nothing_and_class_ce_is_weighted_by_no_object(no_object_weight: float) -> None:
    mask_logits, class_logits, targets = _hand_case()
    config = CriterionConfig(no_object_weight=no_object_weight, importance_sample_ratio=0.0)
    losses = _seeded(SetCriterion(C, config), _output(mask_logits[None], class_logits[None]), [targets])
    chance = 5.0 * math.log(2.0)  # weighted BCE of a mask logit of 0 everywhere
    assert float(losses["loss_mask"]) < 0.15 * chance  # only points within a pixel of a boundary cost anything
    assert float(losses["loss_dice"]) < 5.0 * 0.05  # dice < 0.05 per mask
    expected_ce = _weighted_ce(class_logits, torch.tensor([2, C, 1]), no_object_weight=no_object_weight)
    assert float(losses["loss_cross_entropy"]) == pytest.approx(2.0 * expected_ce, rel=1e-5)
    assert float(losses["total"]) == pytest.approx(
        sum(float(losses[k]) for k in ("loss_mask", "loss_dice", "loss_cross_entropy"))
    )


def test_permuted_assignment_costs_more() -> None:
    mask_logits, class_logits, targets = _hand_case()
    criterion = SetCriterion(C, UNIFORM)
    right = _seeded(criterion, _output(mask_logits[None], class_logits[None]), [targets])
    swapped_masks = mask_logits[[2, 1, 0]]  # queries 0 and 2 keep their classes but swap masks
    wrong = _seeded(criterion, _output(swapped_masks[None], class_logits[None]), [targets])
    assert float(wrong["total"]) > float(right["total"]) + 5.0


def test_loss_does_not_depend_on_query_or_target_order() -> None:
    mask_logits, class_logits, targets = _hand_case()
    criterion = SetCriterion(C, CriterionConfig(train_num_points=12544, importance_sample_ratio=0.0))
    reference = _seeded(criterion, _output(mask_logits[None] / 4, class_logits[None]), [targets])
    mask_logits = mask_logits / 4  # soft masks: the mask terms are well above 0
    order = [1, 2, 0]
    permuted_queries = _seeded(criterion, _output(mask_logits[order][None], class_logits[order][None]), [targets])
    flipped_targets = InstanceTargets(targets.masks.flip(0), targets.class_ids.flip(0))
    permuted_targets = _seeded(criterion, _output(mask_logits[None], class_logits[None]), [flipped_targets])
    for other in (permuted_queries, permuted_targets):
        assert float(other["loss_cross_entropy"]) == pytest.approx(float(reference["loss_cross_entropy"]), rel=1e-6)
        for name in ("loss_mask", "loss_dice"):  # equal up to the random points
            assert float(other[name]) == pytest.approx(float(reference[name]), rel=0.1)


def test_each_term_is_multiplied_by_its_configured_weight() -> None:
    mask_logits, class_logits, targets = _hand_case()
    mask_logits = mask_logits / 10  # uncertain masks so the mask terms are far from 0
    output = _output(mask_logits[None], class_logits[None])
    unit = _seeded(SetCriterion(C, CriterionConfig(1.0, 1.0, 1.0, importance_sample_ratio=0.0)), output, [targets])
    paper = _seeded(SetCriterion(C, UNIFORM), output, [targets])
    for name, weight in (("loss_mask", 5.0), ("loss_dice", 5.0), ("loss_cross_entropy", 2.0)):
        assert float(unit[name]) > 0.01
        assert float(paper[name]) == pytest.approx(weight * float(unit[name]), rel=1e-5)


def test_image_without_instances_pushes_every_query_to_no_object() -> None:
    mask_logits, class_logits, targets = _hand_case()
    empty = InstanceTargets(torch.zeros(0, *IMAGE, dtype=torch.bool), torch.zeros(0, dtype=torch.int64))
    batch_classes = torch.stack([class_logits, class_logits.flip(0)]).requires_grad_()  # (2, K, C+1)
    output = _output(torch.stack([mask_logits, mask_logits]), batch_classes)
    losses = SetCriterion(C, UNIFORM)(output, [targets, empty])
    # image 0: queries 0, 2 matched; image 1: every query is no-object
    target_classes = torch.tensor([[2, C, 1], [C, C, C]])
    expected = _weighted_ce(batch_classes.detach(), target_classes, no_object_weight=0.1)
    assert losses["loss_cross_entropy"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    losses["total"].backward()
    no_object_grad = batch_classes.grad[1, :, C]  # (K,)
    assert bool((no_object_grad < 0).all())  # descending raises every no-object logit of the empty image


def test_batch_without_any_instance_gives_finite_class_only_loss() -> None:
    empty = InstanceTargets(torch.zeros(0, *IMAGE), torch.zeros(0, dtype=torch.int64))
    class_logits = torch.randn(2, 4, C + 1)
    losses = SetCriterion(C)(_output(torch.randn(2, 4, *GRID, requires_grad=True), class_logits), [empty, empty])
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    expected = float(-class_logits.log_softmax(-1)[..., C].mean())  # equal weights cancel
    assert float(losses["loss_cross_entropy"]) == pytest.approx(2.0 * expected, rel=1e-5)
    assert losses["total"].requires_grad


def test_deep_supervision_adds_each_aux_layer_terms() -> None:
    mask_logits, class_logits, targets = _hand_case()
    aux = [
        {"masks_queries_logits": mask_logits[None] / 10, "class_queries_logits": class_logits[None]},
        {"masks_queries_logits": mask_logits[None], "class_queries_logits": class_logits[None]},
    ]
    losses = _seeded(SetCriterion(C, UNIFORM), _output(mask_logits[None], class_logits[None], aux), [targets])
    names = {
        f"{term}{suffix}" for term in ("loss_mask", "loss_dice", "loss_cross_entropy") for suffix in ("", "_0", "_1")
    }
    assert set(losses) == names | {"total"}
    assert float(losses["total"]) == pytest.approx(sum(float(v) for k, v in losses.items() if k != "total"), rel=1e-6)
    assert float(losses["loss_dice_0"]) > float(losses["loss_dice_1"])  # the blurred layer is worse
    assert float(losses["loss_cross_entropy_0"]) == pytest.approx(float(losses["loss_cross_entropy"]), rel=1e-6)


def test_bool_and_float_target_masks_give_the_same_loss() -> None:
    mask_logits, class_logits, targets = _hand_case()
    criterion = SetCriterion(C)
    output = _output(mask_logits[None] / 5, class_logits[None])
    as_bool = _seeded(criterion, output, [targets])
    as_float = _seeded(criterion, output, [InstanceTargets(targets.masks.float(), targets.class_ids)])
    assert float(as_float["total"]) == pytest.approx(float(as_bool["total"]), rel=1e-6)


def test_targets_are_padded_to_the_area_the_stride_4_logits_cover() -> None:
    # The 30 x 30 targets and the 8 x 8 logits describe the same 32 x 32 padded grid; resizing the
    # targets to the logits without padding would shift the boundary by ~1 px and cost a lot.
    mask_logits, class_logits, targets = _hand_case()
    output = _output(mask_logits[None], class_logits[None])
    padded = _seeded(SetCriterion(C, UNIFORM), output, [targets])
    stretched = F.interpolate(targets.masks[None].float(), size=(32, 32), mode="nearest")[0]  # wrong alignment
    misaligned = _seeded(SetCriterion(C, UNIFORM), output, [InstanceTargets(stretched, targets.class_ids)])
    assert float(misaligned["loss_mask"]) > 3 * float(padded["loss_mask"]) + 0.2


def test_gradients_reach_mask_and_class_logits() -> None:
    mask_logits, class_logits, targets = _hand_case()
    masks = (mask_logits[None] / 10).requires_grad_()
    classes = class_logits[None].clone().requires_grad_()
    SetCriterion(C)(_output(masks, classes), [targets])["total"].backward()
    assert masks.grad is not None and float(masks.grad.abs().sum()) > 0
    assert classes.grad is not None and float(classes.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("empty_batch", ValueError, "empty batch"),
        ("missing_target", ValueError, "1 targets for a batch of 2"),
        ("class_out_of_range", ValueError, r"class_ids must be in 0\.\.2"),
        ("wrong_size", ValueError, "ceil"),
        ("mixed_sizes", ValueError, "same image size"),
        ("nan_logits", ValueError, "NaN"),
        ("wrong_class_columns", ValueError, "3 classes"),
        ("soft_mask_out_of_range", ValueError, r"\[0, 1\]"),
        ("single_target", TypeError, "list of InstanceTargets"),
        ("bad_aux", TypeError, "aux_outputs"),
        ("aux_other_resolution", ValueError, "those of the final layer"),
    ],
)
def test_invalid_inputs_raise_clear_errors(change: str, error: type, match: str) -> None:
    mask_logits, class_logits, targets = _hand_case()
    masks, classes = torch.stack([mask_logits, mask_logits]), torch.stack([class_logits, class_logits])
    target_list: object = [targets, targets]
    aux: list = []
    if change == "empty_batch":
        masks, classes, target_list = masks[:0], classes[:0], []
    elif change == "missing_target":
        target_list = [targets]
    elif change == "class_out_of_range":
        target_list = [targets, InstanceTargets(targets.masks, torch.tensor([0, 3]))]
    elif change == "wrong_size":
        target_list = [InstanceTargets(torch.zeros(2, 33, 30), targets.class_ids)] * 2
    elif change == "mixed_sizes":
        target_list = [targets, InstanceTargets(torch.zeros(2, 29, 30), targets.class_ids)]
    elif change == "nan_logits":
        masks[0, 0, 0, 0] = math.nan
    elif change == "wrong_class_columns":
        classes = classes[..., 1:]
    elif change == "soft_mask_out_of_range":
        target_list = [targets, InstanceTargets(targets.masks.float() * 2, targets.class_ids)]
    elif change == "single_target":
        target_list = targets
    elif change == "bad_aux":
        aux = [{"masks_queries_logits": masks}]
    elif change == "aux_other_resolution":
        aux = [{"masks_queries_logits": masks[..., :4, :4], "class_queries_logits": classes}]
    with pytest.raises(error, match=match):
        SetCriterion(C)(_output(masks, classes, aux), target_list)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_weight": -1.0},
        {"mask_weight": 0.0, "dice_weight": 0.0, "class_weight": 0.0},
        {"train_num_points": 0},
        {"importance_sample_ratio": 1.5},
        {"oversample_ratio": 0.5},
        {"mask_stride": 0},
    ],
)
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CriterionConfig(**kwargs)


def _count_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    criterion = SetCriterion(C)
    labels = [torch.tensor([0, 1, 2])] if rank == 0 else [torch.tensor([1])]  # 3 and 1 masks
    count = criterion.loss.get_num_masks(labels, torch.device("cpu"))
    torch.save(count, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_mask_count_is_averaged_over_ranks_under_plain_torch_distributed() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        # fork: the children inherit the imported modules (spawn would re-import transformers)
        mp.start_processes(_count_worker, args=(init_file, tmp), nprocs=2, join=True, start_method="fork")
        counts = [float(torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True)) for r in range(2)]
    assert counts == [2.0, 2.0]  # (3 + 1) / 2 on both ranks, as in Mask2Former


def test_mask_count_is_local_and_at_least_one_in_one_process() -> None:
    criterion = SetCriterion(C)
    assert float(criterion.loss.get_num_masks([torch.tensor([0, 1]), torch.tensor([2])], torch.device("cpu"))) == 3.0
    assert float(criterion.loss.get_num_masks([torch.zeros(0, dtype=torch.int64)], torch.device("cpu"))) == 1.0


# --- unified objective --------------------------------------------------------------------------


def test_unified_objective_weights_each_term_and_logs_them_unweighted() -> None:
    sup, semi, pxl = (torch.tensor(v, requires_grad=True) for v in (1.0, 2.0, 3.0))
    total, log = unified_objective(sup, semi, pxl, lambda_semi=0.5, lambda_pxl=0.2)
    assert total.item() == pytest.approx(1.0 + 0.5 * 2.0 + 0.2 * 3.0)
    assert log == pytest.approx({"sup": 1.0, "semi": 2.0, "pxl": 3.0, "total": 2.6})
    total.backward()
    assert [float(t.grad) for t in (sup, semi, pxl)] == pytest.approx([1.0, 0.5, 0.2])


def test_absent_terms_contribute_nothing_and_are_not_logged() -> None:
    total, log = unified_objective(None, torch.tensor(2.0), None, lambda_semi=0.5, lambda_pxl=0.2)
    assert float(total) == pytest.approx(1.0)
    assert set(log) == {"semi", "total"}
    total, log = unified_objective(torch.tensor(1.5), None, None, lambda_semi=0.5, lambda_pxl=0.2)
    assert float(total) == pytest.approx(1.5) and set(log) == {"sup", "total"}


def test_a_present_term_with_zero_weight_is_still_logged() -> None:
    total, log = unified_objective(torch.tensor(1.0), None, torch.tensor(4.0), lambda_semi=0.0, lambda_pxl=0.0)
    assert float(total) == 1.0 and log["pxl"] == 4.0


def test_criterion_dicts_use_their_total_and_log_sub_terms() -> None:
    mask_logits, class_logits, targets = _hand_case()
    losses = SetCriterion(C)(_output(mask_logits[None], class_logits[None]), [targets])
    total, log = unified_objective(losses, None, torch.tensor(1.0), lambda_semi=1.0, lambda_pxl=0.2)
    assert float(total) == pytest.approx(float(losses["total"]) + 0.2)
    assert log["sup"] == pytest.approx(float(losses["total"]))
    assert log["sup/loss_cross_entropy"] == pytest.approx(float(losses["loss_cross_entropy"]))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((None, None, None, 1.0, 0.2), ValueError),
        ((torch.tensor(1.0), None, None, -0.1, 0.2), ValueError),
        ((torch.tensor(1.0), None, None, 1.0, math.inf), ValueError),
        ((torch.tensor(1.0), None, None, "1", 0.2), TypeError),
        ((torch.ones(2), None, None, 1.0, 0.2), ValueError),
        ((torch.tensor(math.nan), None, None, 1.0, 0.2), ValueError),
        ((None, {"loss_mask": torch.tensor(1.0)}, None, 1.0, 0.2), ValueError),
        ((1.0, None, None, 1.0, 0.2), TypeError),
    ],
)
def test_unified_objective_rejects_bad_input(args: tuple, error: type) -> None:
    with pytest.raises(error):
        unified_objective(*args)


# --- contrastive term on two views --------------------------------------------------------------

B, D, H, W = 2, 8, 6, 8


def _views(z_weak: torch.Tensor, z_strong: torch.Tensor, mask_logits: torch.Tensor | None = None):
    k = 3
    masks = mask_logits if mask_logits is not None else torch.randn(B, k, H, W)
    weak = SegmentationOutput(masks, torch.randn(B, k, C + 1), z_weak)
    strong = SegmentationOutput(torch.randn(B, k, H, W), torch.randn(B, k, C + 1), z_strong)
    return weak, strong


def test_flipped_strong_view_is_aligned_to_the_same_scene_points() -> None:
    z_weak = torch.randn(B, D, H, W)
    weak, strong = _views(z_weak, z_weak.flip(-1))  # the strong view is the mirrored image
    criterion = InstanceAwarePixelContrast(num_negatives=4)
    identity = ViewGeometry.identity(B)
    flipped = ViewGeometry(identity.boxes, torch.ones(B, dtype=torch.bool))
    out = pixel_contrast_term(criterion, weak, strong, identity, flipped, generator=torch.Generator().manual_seed(0))
    assert out.stats.num_anchors == B * H * W
    assert out.stats.positive_cosine == pytest.approx(1.0, abs=1e-5)  # every positive is the same scene point
    unaligned = pixel_contrast_term(criterion, weak, strong, identity, identity)  # geometry ignored: wrong pairs
    assert unaligned.stats.positive_cosine < 0.9


def test_cropped_strong_view_marks_pixels_outside_the_crop_invalid() -> None:
    z_weak = torch.randn(B, D, H, W)
    right_half = z_weak[..., W // 2 :].repeat_interleave(2, dim=-1)  # (B, D, H, W) crop x in [0.5, 1], resized x2
    weak, strong = _views(z_weak, right_half)
    crop = ViewGeometry(torch.tensor([[0.5, 0.0, 1.0, 1.0]] * B), torch.zeros(B, dtype=torch.bool))
    out = pixel_contrast_term(InstanceAwarePixelContrast(num_negatives=4), weak, strong, ViewGeometry.identity(B), crop)
    columns = (out.anchor_index % (H * W)) % W  # (A,) anchor column on the weak grid
    assert out.stats.num_anchors == B * H * W // 2
    assert bool((columns >= W // 2).all())  # only the right half of the weak view is seen by the crop
    assert out.stats.positive_cosine == pytest.approx(1.0, abs=1e-5)


def test_gradient_reaches_the_weak_embeddings_only() -> None:
    z_weak = torch.randn(B, D, H, W, requires_grad=True)
    z_strong = torch.randn(B, D, H, W, requires_grad=True)
    weak, strong = _views(z_weak, z_strong, torch.randn(B, 3, H, W, requires_grad=True))
    identity = ViewGeometry.identity(B)
    out = pixel_contrast_term(InstanceAwarePixelContrast(num_negatives=4), weak, strong, identity, identity)
    out.loss.backward()
    assert z_weak.grad is not None and float(z_weak.grad.abs().sum()) > 0
    assert z_strong.grad is None  # the strong view is a detached target (library default)
    assert weak.mask_logits.grad is None  # predictions only drive the sampler


def _instance_scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instance ids (left / right half) and perfect mask / class logits for them."""
    ids = torch.zeros(B, H, W, dtype=torch.int64)
    ids[..., W // 2 :] = 1
    mask_logits = torch.where(F.one_hot(ids, 2).permute(0, 3, 1, 2).bool(), BIG, -BIG)  # (B, 2, H, W)
    class_logits = torch.tensor([[BIG, 0.0, 0.0, 0.0], [BIG, 0.0, 0.0, 0.0]]).expand(B, 2, C + 1)
    return ids, mask_logits, class_logits


def test_sampler_uses_the_prediction_source_and_reports_fnr() -> None:
    ids, perfect_masks, perfect_classes = _instance_scene()
    z_weak = torch.randn(B, D, H, W)
    flat = torch.zeros(B, 2, H, W)  # the student knows nothing: every pixel scores alike
    weak = SegmentationOutput(flat, torch.zeros(B, 2, C + 1), z_weak)
    strong = SegmentationOutput(flat, torch.zeros(B, 2, C + 1), z_weak.clone())
    teacher = SegmentationOutput(perfect_masks, perfect_classes, torch.zeros(B, 1, H, W))
    identity = ViewGeometry.identity(B)
    criterion = InstanceAwarePixelContrast(num_negatives=64)
    own = pixel_contrast_term(
        criterion, weak, strong, identity, identity, ids, generator=torch.Generator().manual_seed(1)
    )
    taught = pixel_contrast_term(
        criterion,
        weak,
        strong,
        identity,
        identity,
        ids,
        prediction_source=teacher,
        generator=torch.Generator().manual_seed(1),
    )
    assert own.stats.fnr is not None and own.stats.fnr > 0.15  # uniform over both images: ~1/4 same instance
    assert taught.stats.fnr == 0.0  # the teacher separates the instances: no same-instance negative


def test_contrast_term_rejects_mismatched_views() -> None:
    weak, strong = _views(torch.randn(B, D, H, W), torch.randn(B, D + 1, H, W))
    identity = ViewGeometry.identity(B)
    with pytest.raises(ValueError, match="equal B and D"):
        pixel_contrast_term(InstanceAwarePixelContrast(), weak, strong, identity, identity)
    with pytest.raises(TypeError, match="ViewGeometry"):
        pixel_contrast_term(InstanceAwarePixelContrast(), weak, weak, identity, identity.boxes)  # type: ignore[arg-type]


def _fourier_features(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) coordinate-encoding images -> (B, 4, h/4, w/4) features whose cosine is 1 only at equal x, y."""
    coords = F.avg_pool2d(images[:, :2], 4) * 4 * math.pi  # (B, 2, h/4, w/4) x, y in [0, 4π]
    return torch.cat([coords.cos(), coords.sin()], dim=1)  # (B, 4, h/4, w/4)


def test_views_from_the_augmentation_pipeline_pair_the_same_scene_points() -> None:
    # Each pixel's colour encodes its original (x, y); after the weak and strong views, features
    # computed from those colours agree at a weak pixel and its aligned strong pixel only if the
    # geometry conventions of augment.py and align_views match.
    from reference_pipeline.data.augment import StrongViewConfig, TwoViewTransform, WeakViewConfig, collate_views
    from reference_pipeline.data.structures import InstanceSample

    size = 64
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([xs * 255 // (size - 1), ys * 255 // (size - 1), torch.full_like(xs, 128)], -1)
    sample = InstanceSample(
        image.numpy().astype("uint8"),
        torch.zeros(0, size, size, dtype=torch.bool).numpy(),
        torch.zeros(0, dtype=torch.int64).numpy(),
        torch.zeros(0, dtype=torch.bool).numpy(),
        0,
        "coords.png",
    )
    transform = TwoViewTransform(
        WeakViewConfig(output_size=(size, size)),
        StrongViewConfig(output_size=(48, 48), jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0),
    )
    pairs = [transform(sample, TwoViewTransform.rng_for(3, 0, i)) for i in range(4)]
    weak_batch, strong_batch = collate_views([w for w, _ in pairs]), collate_views([s for _, s in pairs])
    assert bool(strong_batch.geometry.flips.any()) and not bool(strong_batch.geometry.flips.all())
    weak = SegmentationOutput(torch.zeros(4, 2, 16, 16), torch.zeros(4, 2, C + 1), _fourier_features(weak_batch.images))
    strong = SegmentationOutput(
        torch.zeros(4, 2, 12, 12), torch.zeros(4, 2, C + 1), _fourier_features(strong_batch.images)
    )
    criterion = InstanceAwarePixelContrast(num_negatives=4, strategy="uniform")
    aligned = pixel_contrast_term(criterion, weak, strong, weak_batch.geometry, strong_batch.geometry)
    ignored = pixel_contrast_term(criterion, weak, strong, weak_batch.geometry, weak_batch.geometry)
    assert aligned.stats.positive_cosine > 0.98
    assert ignored.stats.positive_cosine < 0.7
