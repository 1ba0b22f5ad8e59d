"""The student: every encoder × neck, padding, training, weight loading, parameter groups, contrastive term."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instcontrast import InstanceAwarePixelContrast
from reference_pipeline.models.outputs import SegmentationOutput
from reference_pipeline.models.student import ENCODERS, NECKS, Student, StudentConfig, count_parameters

NUM_CLASSES = 3
TINY_HEAD = {
    "hidden_dim": 32,
    "neck_channels": 16,
    "decoder_layers": 2,
    "num_queries": 5,
    "num_heads": 4,
    "feedforward_dim": 64,
    "projection_hidden_dim": 16,
    "embedding_dim": 8,
}
TINY_DINOV2 = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
# Hiera: global attention must not fall on a stage's first (query-pooling) block.
TINY_HIERA = {
    "hidden_size": 16,
    "blocks_per_stage": [1, 1, 2, 1],
    "embed_dim_per_stage": [16, 32, 64, 128],
    "num_attention_heads_per_stage": [1, 1, 2, 2],
    "global_attention_blocks": [3],
}
TINY_ENCODERS = {
    "dinov2": {
        "encoder_kwargs": TINY_DINOV2,
        "intermediate_layers": (0, 1, 2, 3),
        "reassemble_channels": (8, 16, 32, 64),
    },
    "resnet50": {"encoder_kwargs": {"layers": (1, 1, 1, 1)}},
    "sam2_hiera": {"encoder_kwargs": TINY_HIERA},
    "efficientnet_lite0": {},
}



def tiny_config(encoder: str = "dinov2", neck: str = "dpt", **overrides) -> StudentConfig:
    fields = {**TINY_ENCODERS[encoder], **TINY_HEAD, **overrides}
    return StudentConfig(num_classes=NUM_CLASSES, encoder=encoder, neck=neck, **fields)


def test_tiny_encoders_cover_every_encoder_family():
    assert set(TINY_ENCODERS) | {"efficientnet_lite1", "efficientnet_lite2"} == set(ENCODERS)


@pytest.mark.parametrize("neck", NECKS)
@pytest.mark.parametrize("encoder", list(TINY_ENCODERS))
def test_forward_shapes_on_odd_input_size_are_on_the_stride4_grid(encoder, neck):
    model = Student(tiny_config(encoder, neck)).eval()
    images = torch.rand(2, 3, 70, 90)
    with torch.no_grad():
        out = model(images)
    grid = (math.ceil(70 / 4), math.ceil(90 / 4))  # (18, 23)
    assert isinstance(out, SegmentationOutput)
    assert out.mask_logits.shape == (2, 5, *grid)
    assert out.class_logits.shape == (2, 5, NUM_CLASSES + 1)
    assert out.pixel_embeddings.shape == (2, 8, *grid)
    # Deep supervision: the initial query prediction and every layer but the last.
    assert len(out.aux_outputs) == TINY_HEAD["decoder_layers"]
    for aux in out.aux_outputs:
        assert aux["masks_queries_logits"].shape == (2, 5, *grid)
        assert aux["class_queries_logits"].shape == (2, 5, NUM_CLASSES + 1)
    for tensor in (out.mask_logits, out.class_logits, out.pixel_embeddings):
        assert torch.isfinite(tensor).all()


def test_padding_does_not_depend_on_batch_neighbours():
    model = Student(tiny_config()).eval()
    images = torch.rand(2, 3, 30, 45)
    with torch.no_grad():
        batch = model(images)
        single = model(images[1:])
    torch.testing.assert_close(batch.mask_logits[1:], single.mask_logits, atol=1e-4, rtol=1e-4)


def test_images_are_normalised_with_the_encoder_statistics():
    dinov2 = Student(tiny_config("dinov2"))
    lite = Student(tiny_config("efficientnet_lite0"))
    torch.testing.assert_close(dinov2.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    # timm's tf_efficientnet_lite weights expect inception statistics.
    torch.testing.assert_close(lite.pixel_mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("encoder", ["dinov2", "efficientnet_lite0"])
def test_encoder_sees_normalised_images_and_zero_padding(encoder):
    model = Student(tiny_config(encoder)).eval()
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    mean_colour = model.pixel_mean.expand(1, 3, 30, 45)  # (1, 3, 30, 45): normalises to exactly 0
    with torch.no_grad():
        model(mean_colour.clone())
    divisor = model.encoder.size_divisor
    assert seen[0].shape[-2:] == (math.ceil(30 / divisor) * divisor, math.ceil(45 / divisor) * divisor)
    assert seen[0].abs().max() < 1e-6
    with torch.no_grad():
        model(torch.ones(1, 3, 30, 45))
    white = (1 - model.pixel_mean) / model.pixel_std  # (1, 3, 1, 1)
    torch.testing.assert_close(seen[1][..., :30, :45], white.expand(1, 3, 30, 45))
    assert seen[1][..., 30:, :].abs().max() == 0 and seen[1][..., :, 45:].abs().max() == 0


def test_dropout_does_not_skip_decoder_layers_in_training():
    model = Student(tiny_config(dropout=0.5, decoder_layers=4)).train()
    for _ in range(6):
        out = model(torch.rand(1, 3, 28, 28))
        assert len(out.aux_outputs) == 4


@pytest.mark.parametrize("bad", [torch.rand(1, 1, 32, 32), torch.rand(3, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.uint8)])
def test_forward_rejects_non_rgb_float_images(bad):
    with pytest.raises(ValueError, match="images"):
        Student(tiny_config())(bad)


@pytest.mark.parametrize(
    ("field", "value", "listed"),
    [("encoder", "vit_huge", "dinov2"), ("neck", "unet", "fpn")],
)
def test_unknown_encoder_or_neck_lists_the_valid_ones(field, value, listed):
    with pytest.raises(ValueError, match=listed):
        StudentConfig(num_classes=3, **{field: value})


def test_invalid_sizes_are_rejected_with_the_bad_value():
    with pytest.raises(ValueError, match="num_heads"):
        StudentConfig(num_classes=3, hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="num_queries"):
        StudentConfig(num_classes=3, num_queries=0)
    with pytest.raises(ValueError, match="intermediate_layers"):
        StudentConfig(num_classes=3, intermediate_layers=(1, 2))
    with pytest.raises(ValueError, match="valid variants"):
        StudentConfig.table5(3, "swin_upernet")
    with pytest.raises(ValueError, match="intermediate_layers"):
        Student(tiny_config(intermediate_layers=(0, 1, 2, 7)))


def test_paper_student_has_about_52M_parameters_with_a_22M_dinov2_small_encoder():
    with torch.device("meta"):
        model = Student(StudentConfig.paper(num_classes=80))
    assert 21.5e6 < count_parameters(model.encoder) < 22.5e6
    assert 48e6 < count_parameters(model) < 56e6
    assert len(model.decoder.decoder.layers) == 9
    assert model.decoder.queries_features.num_embeddings == 100


@pytest.mark.parametrize("variant", ["resnet50_dpt", "sam2_hiera_dpt", "dinov2_fpn"])
def test_table5_variants_change_only_encoder_or_neck(variant):
    config = StudentConfig.table5(80, variant)
    paper = StudentConfig.paper(80)
    assert (config.hidden_dim, config.decoder_layers, config.num_queries) == (256, 9, 100)
    assert (config.encoder, config.neck) != (paper.encoder, paper.neck)
    with torch.device("meta"):
        model = Student(config)
    assert count_parameters(model) > 30e6


def test_parameter_groups_cover_every_parameter_exactly_once():
    model = Student(tiny_config("efficientnet_lite0", "fpn"))
    groups = model.parameter_groups()
    assert set(groups) == {"encoder", "decoder"}
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups["encoder"]} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in model.projection_head.parameters()} <= {id(p) for p in groups["decoder"]}


def _supervised_loss(out: SegmentationOutput, target_masks: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
    """BCE on every layer's masks + CE on every layer's classes against a fixed per-query target."""
    layers = [(out.mask_logits, out.class_logits)] + [
        (aux["masks_queries_logits"], aux["class_queries_logits"]) for aux in out.aux_outputs
    ]
    loss = torch.zeros(())
    for masks, classes in layers:
        loss = loss + F.binary_cross_entropy_with_logits(masks, target_masks)
        loss = loss + F.cross_entropy(classes.flatten(0, 1), target_classes.flatten())
    return loss


@pytest.mark.parametrize(("encoder", "neck"), [("dinov2", "dpt"), ("efficientnet_lite0", "fpn")])
def test_training_steps_lower_the_loss_on_a_fixed_batch(encoder, neck):
    torch.manual_seed(0)
    model = Student(tiny_config(encoder, neck)).train()
    images = torch.rand(2, 3, 64, 64)
    target_masks = (torch.rand(2, 5, 16, 16) > 0.5).float()
    target_classes = torch.randint(0, NUM_CLASSES + 1, (2, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = _supervised_loss(model(images), target_masks, target_classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_instance_aware_pixel_contrast_runs_on_student_outputs_and_backprops():
    model = Student(tiny_config("dinov2", "dpt", embedding_dim=16))
    out = model(torch.rand(2, 3, 48, 48))
    crit = InstanceAwarePixelContrast(num_negatives=8)
    result = crit(out.pixel_embeddings, out.pixel_embeddings.detach(), out.mask_logits, out.class_logits)
    assert torch.isfinite(result.loss)
    result.loss.backward()
    head_grad = model.projection_head[0].weight.grad
    encoder_grad = next(model.encoder.parameters()).grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- weight loading


def _encoder_state(model: Student) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.encoder.model.state_dict().items()}


def test_dinov2_encoder_round_trips_through_save_pretrained(tmp_path: Path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    saved = Dinov2Model(Dinov2Config(**TINY_DINOV2))
    saved.save_pretrained(tmp_path)
    model = Student(tiny_config("dinov2", encoder_weights=str(tmp_path)))
    loaded = model.encoder.model.state_dict()
    reference = saved.state_dict()
    shared = [key for key in reference if key in loaded]
    assert len(shared) == len(loaded)
    for key in shared:
        torch.testing.assert_close(loaded[key], reference[key], msg=key)
    # A random student differs, so the comparison above is not vacuous.
    random_student = Student(tiny_config("dinov2"))
    key = "embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(random_student.encoder.model.state_dict()[key], loaded[key])


def test_sam2_hiera_encoder_loads_from_its_own_directory_and_from_a_sam2_model_snapshot(tmp_path: Path):
    from safetensors.torch import save_file
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2HieraDetModel, Sam2VisionConfig

    torch.manual_seed(2)
    hiera = Sam2HieraDetModel(Sam2HieraDetConfig(**TINY_HIERA))
    own = tmp_path / "hiera"
    hiera.save_pretrained(own)
    model = Student(tiny_config("sam2_hiera", encoder_weights=str(own)))
    for key, value in hiera.state_dict().items():
        torch.testing.assert_close(model.encoder.model.state_dict()[key], value, msg=key)

    # A full Sam2Model snapshot: backbone tensors under "vision_encoder.backbone.", other parts ignored.
    snapshot = tmp_path / "sam2"
    Sam2Config(vision_config=Sam2VisionConfig(backbone_config=Sam2HieraDetConfig(**TINY_HIERA))).save_pretrained(
        snapshot
    )
    tensors = {f"vision_encoder.backbone.{k}": v.contiguous() for k, v in hiera.state_dict().items()}
    tensors["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    save_file(tensors, str(snapshot / "model.safetensors"))
    model = Student(tiny_config("sam2_hiera", encoder_weights=str(snapshot)))
    for key, value in hiera.state_dict().items():
        torch.testing.assert_close(model.encoder.model.state_dict()[key], value, msg=key)


def test_timm_encoder_loads_a_local_state_dict_file(tmp_path: Path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    resnet = timm.create_model("resnet50", layers=(1, 1, 1, 1))
    file = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(file))
    model = Student(tiny_config("resnet50", encoder_weights=str(file)))
    for key, value in model.encoder.model.state_dict().items():
        torch.testing.assert_close(value, resnet.state_dict()[key], msg=key)


@pytest.mark.parametrize(
    ("encoder", "expected"),
    [("dinov2", "config.json"), ("sam2_hiera", "config.json"), ("resnet50", ".safetensors")],
)
def test_missing_weights_name_the_path_and_the_files_expected_there(tmp_path: Path, encoder, expected):
    missing = tmp_path / "no_weights_here"
    with pytest.raises(FileNotFoundError) as error:
        Student(tiny_config(encoder, encoder_weights=str(missing)))
    assert str(missing) in str(error.value)
    assert expected in str(error.value)


def test_imagenet_weights_only_exist_for_efficientnet_lite():
    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        StudentConfig(num_classes=3, encoder="dinov2", encoder_weights="imagenet")


def test_outputs_feed_transformers_mask2former_loss_with_deep_supervision():
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    model = Student(tiny_config("efficientnet_lite0", "fpn"))
    out = model(torch.rand(2, 3, 64, 64))
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    criterion = Mask2FormerLoss(Mask2FormerConfig(num_labels=NUM_CLASSES, train_num_points=256), weights)
    masks = [torch.rand(2, 64, 64).gt(0.5).float(), torch.rand(1, 64, 64).gt(0.5).float()]  # at input size
    classes = [torch.tensor([0, 2]), torch.tensor([1])]
    losses = criterion(out.mask_logits, out.class_logits, masks, classes, out.aux_outputs)
    # One set of terms for the final prediction and one per auxiliary output.
    assert {f"loss_mask_{i}" for i in range(TINY_HEAD["decoder_layers"])} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.class_head.weight.grad.abs().sum() > 0
