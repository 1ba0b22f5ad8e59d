"""A ``transformers`` Mask2Former checkpoint folder as the teacher (``teacher_kind=transformers``).

The spec (``models/transformers_teacher.py``): loaded offline from a ``save_pretrained`` folder; the
checkpoint's classes are matched to the dataset's by name, case-insensitively, and every other checkpoint
class folds into no-object, so the softmax over the dataset's ``C + 1`` outputs equals the checkpoint's
softmax summed per output; a dataset class the checkpoint lacks is an error listing both sets of names; a
missing folder names the files expected there; inputs are normalised with the folder's processor statistics
(ImageNet's otherwise); outputs follow the pipeline's interface (stride-4 masks cropped to the input,
pixel embeddings, auxiliary outputs) and train with ``dropout > 0`` (no layer drop).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reference_pipeline import teachers
from reference_pipeline.config import PipelineConfig
from reference_pipeline.models.transformers_teacher import (
    TransformersTeacher,
    TransformersTeacherConfig,
    class_assignment,
    read_normalisation,
)

SMALL = {"embedding_dim": 8, "projection_hidden_dim": 16}


def _teacher(path: Path, class_names: list[str]) -> TransformersTeacher:
    return TransformersTeacher.from_pretrained_dir(TransformersTeacherConfig(path=str(path), **SMALL), class_names)


def test_class_probabilities_are_the_checkpoints_with_unnamed_classes_folded_into_no_object(tiny_mask2former) -> None:
    teacher = _teacher(tiny_mask2former, ["Car", "person"]).eval()  # checkpoint: person, WIDGET, car, no-object
    logits = torch.randn(2, 5, 4) * 3  # (B, K, L+1)
    probs = teacher.map_class_logits(logits).softmax(-1)  # (B, K, C+1)
    source = logits.softmax(-1)
    torch.testing.assert_close(probs[..., 0], source[..., 2])  # car
    torch.testing.assert_close(probs[..., 1], source[..., 0])  # person
    torch.testing.assert_close(probs[..., 2], source[..., 1] + source[..., 3])  # WIDGET (unnamed) + no-object


def test_forward_matches_the_checkpoint_on_normalised_padded_input(tmp_path: Path, mask2former_writer) -> None:
    processor = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "size_divisor": 32}
    folder = mask2former_writer(tmp_path / "ckpt", ["widget", "other"], processor=processor)
    teacher = _teacher(folder, ["widget"]).eval()
    images = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        out = teacher(images)
        mean = torch.tensor(processor["image_mean"]).view(1, 3, 1, 1)
        std = torch.tensor(processor["image_std"]).view(1, 3, 1, 1)
        pixels = F.pad((images - mean) / std, (0, 64 - 56, 0, 64 - 40))  # (B, 3, 64, 64)
        raw = teacher.model(pixel_values=pixels)
    grid = (math.ceil(40 / 4), math.ceil(56 / 4))
    assert out.mask_logits.shape == (2, 8, *grid)
    assert out.class_logits.shape == (2, 8, 2)
    assert out.pixel_embeddings.shape == (2, 8, *grid)
    assert len(out.aux_outputs) == 2 and out.aux_outputs[0]["class_queries_logits"].shape == (2, 8, 2)
    torch.testing.assert_close(out.mask_logits, raw.masks_queries_logits[..., : grid[0], : grid[1]])
    expected = raw.class_queries_logits.softmax(-1)  # (B, K, 3): widget, other, no-object
    torch.testing.assert_close(out.class_logits.softmax(-1)[..., 0], expected[..., 0])


def test_normalisation_comes_from_the_processor_config_else_imagenet(tmp_path: Path, tiny_mask2former) -> None:
    assert read_normalisation(tiny_mask2former) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [123.675, 116.28, 103.53], "image_std": [58.395, 57.12, 57.375], "size_divisor": 16}))
    mean, std, divisor = read_normalisation(tmp_path)  # written on the 0-255 scale
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    assert divisor == 16


def test_a_dataset_class_the_checkpoint_lacks_is_an_error_naming_both_label_sets(tiny_mask2former) -> None:
    with pytest.raises(ValueError, match=r"no class named \['gizmo'\].*'person', 'WIDGET', 'car'"):
        _teacher(tiny_mask2former, ["widget", "gizmo"])
    assert class_assignment(["a", " B ", "c"], ["b"]) == [1, 0, 1, 1]


def test_a_missing_checkpoint_folder_names_the_folder_and_its_files(tmp_path: Path) -> None:
    cfg = PipelineConfig(teacher_kind="transformers")
    cfg.transformers_teacher = TransformersTeacherConfig(path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*the folder itself.*config\.json.*model\.safetensors"):
        teachers.build_teacher(cfg, ["widget"])
    (tmp_path / "empty").mkdir()
    cfg.transformers_teacher = TransformersTeacherConfig(path=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"missing: config\.json, model\.safetensors"):
        teachers.build_teacher(cfg, ["widget"])


def test_oneformer_and_other_model_types_are_rejected_by_name(tmp_path: Path) -> None:
    for kind in ("oneformer", "detr"):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": kind}))
        (folder / "model.safetensors").write_bytes(b"")
        with pytest.raises(ValueError, match=kind if kind == "detr" else "OneFormer"):
            _teacher(folder, ["widget"])


def test_it_trains_with_dropout_and_splits_encoder_and_decoder_parameters(
    tiny_mask2former, mask2former_writer, tmp_path: Path
) -> None:
    dropping = mask2former_writer(tmp_path / "ckpt", ["widget"], dropout=0.9)  # transformers: layer drop 0.9
    teacher = _teacher(dropping, ["widget"]).train()
    groups = teacher.parameter_groups()
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(teacher.parameters()))
    assert {id(p) for p in teacher.model.model.pixel_level_module.encoder.parameters()} == {id(p) for p in groups["encoder"]}
    for _ in range(3):  # a dropped layer skips its prediction (and breaks the next one's attention mask)
        out = teacher(torch.rand(2, 3, 40, 56))
        assert len(out.aux_outputs) == 2  # every decoder layer predicts, in training too
        loss = out.mask_logits.mean() + out.class_logits.mean() + out.pixel_embeddings.mean()
        loss = loss + sum(aux["masks_queries_logits"].mean() for aux in out.aux_outputs)
        loss.backward()
    assert all(p.grad is not None for p in teacher.projection.parameters())
    frozen = TransformersTeacher.from_pretrained_dir(
        TransformersTeacherConfig(path=str(tiny_mask2former), trainable=("transformer_decoder", "projection_head"), **SMALL),
        ["widget"],
    ).train()
    assert not any(p.requires_grad for p in frozen.model.model.pixel_level_module.parameters())
    assert not frozen.model.model.pixel_level_module.encoder.training  # frozen parts stay in eval mode


def test_a_maskformer_checkpoint_loads_trains_and_maps_its_classes(tmp_path: Path) -> None:
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

    labels = ["person", "Widget", "car"]
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = MaskFormerConfig(backbone_config=backbone, fpn_feature_size=32, mask_feature_size=32, num_queries=6,
                              num_labels=len(labels), id2label=dict(enumerate(labels)),
                              label2id={name: i for i, name in enumerate(labels)})
    config.decoder_config.update({"d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "decoder_attention_heads": 2,
                                  "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "num_queries": 6})
    MaskFormerForInstanceSegmentation(config).save_pretrained(tmp_path / "maskformer")
    teacher = _teacher(tmp_path / "maskformer", ["widget"]).train()
    out = teacher(torch.rand(2, 3, 40, 56))
    assert out.mask_logits.shape == (2, 6, 10, 14) and out.class_logits.shape == (2, 6, 2)
    assert out.pixel_embeddings.shape == (2, 8, 10, 14)
    (out.mask_logits.mean() + out.class_logits.mean() + out.pixel_embeddings.mean()).backward()
    assert any(p.grad is not None for p in teacher.parameters())
    with torch.no_grad():
        logits = torch.randn(1, 6, 4)
        probs = teacher.map_class_logits(logits).softmax(-1)
        torch.testing.assert_close(probs[..., 0], logits.softmax(-1)[..., 1])  # "widget" is the checkpoint's "Widget"
