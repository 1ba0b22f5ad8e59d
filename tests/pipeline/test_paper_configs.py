"""The paper's configs at their defaults: what stopped `docs/reproduce.rst` before (issue 19), one test per cause.

The end-to-end runs of every documented command on tiny stand-ins are in ``test_reproduce_commands.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reference_pipeline.config import TrainConfig
from reference_pipeline.engine import build_optimizer
from reference_pipeline.models.teacher import DEFAULT_TRAINABLE, FoundationTeacher, TeacherConfig
from reference_pipeline.models.tiny_configs import tiny_teacher_components
from reference_pipeline.pseudo_labels import pseudo_label, resize_mask_logits

CLASSES = ("car", "person")


def _teacher(**overrides: object) -> FoundationTeacher:
    components = tiny_teacher_components(CLASSES)
    config = TeacherConfig(class_names=CLASSES, num_queries=4, embedding_dim=8, detector_shortest_edge=None,
                           **overrides)  # type: ignore[arg-type]  # fmt: skip
    return FoundationTeacher.from_configs(config, components.detector_config, components.segmenter_config,
                                          components.tokenizer)  # fmt: skip


# ---- 1. stage 1 with the teacher's default trainable parts -------------------------------------------


def test_the_default_teacher_builds_an_optimizer_without_its_frozen_backbones_and_without_bert() -> None:
    teacher = _teacher()
    assert teacher.config.trainable == DEFAULT_TRAINABLE
    optimizer = build_optimizer(teacher, TrainConfig(), teacher.parameter_groups())
    assert [group["name"] for group in optimizer.param_groups] == ["decoder"]  # the backbones are all frozen
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    bert = list(teacher.detector.model.text_backbone.parameters())
    assert bert and not any(id(p) in optimized for p in bert)
    assert not any(p.requires_grad for p in bert)
    trainable = {id(p) for p in teacher.parameters() if p.requires_grad}
    assert optimized == trainable


def test_a_trained_backbone_gets_the_encoder_learning_rate_and_bert_only_when_asked() -> None:
    teacher = _teacher(trainable=(*DEFAULT_TRAINABLE, "segmenter_backbone"))
    optimizer = build_optimizer(teacher, TrainConfig(lr_encoder=1e-5, lr_decoder=1e-4), teacher.parameter_groups())
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"encoder": 1e-5, "decoder": 1e-4}
    assert not any(p.requires_grad for p in teacher.detector.model.text_backbone.parameters())


def test_a_model_with_nothing_to_train_and_an_empty_group_are_refused() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, TrainConfig())
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, TrainConfig(), {"encoder": [model.weight], "decoder": [model.bias]})
    with pytest.raises(ValueError, match="'decoder' is empty"):
        linear = nn.Linear(2, 2)
        build_optimizer(linear, TrainConfig(), {"encoder": [linear.weight, linear.bias], "decoder": []})


# ---- 4. teacher outputs of an image run below its native size ---------------------------------------


def test_logits_of_a_resized_input_are_mapped_back_to_the_native_image() -> None:
    native, model_input = (128, 256), (64, 128)
    logits = torch.full((1, 16, 32), -10.0)  # stride 4 of the 64x128 input
    logits[0, 4:8, 8:16] = 10.0  # input pixels [16, 32) x [32, 64) -> native [32, 64) x [64, 128)
    with pytest.raises(ValueError, match="model input of 128x256"):
        resize_mask_logits(logits, native, stride=4)  # the native size alone does not fit the grid
    mask = resize_mask_logits(logits, native, stride=4, input_size=model_input)[0] > 0  # (128, 256)
    assert mask.shape == native
    expected = torch.zeros(native, dtype=torch.bool)
    expected[32:64, 64:128] = True
    assert (mask ^ expected).float().mean() < 0.01  # only the bilinear edge differs
    assert mask[40:56, 72:120].all() and not mask[:28].any() and not mask[:, :60].any()


def test_pseudo_labels_of_a_resized_input_are_at_the_native_size() -> None:
    logits = torch.full((2, 16, 32), -10.0)
    logits[0, 2:6, 2:10] = 10.0
    classes = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # query 1 is no-object
    labels = pseudo_label(logits, classes, (128, 256), input_size=(64, 128))
    assert labels.targets().masks.shape == (1, 128, 256)
    area = int(labels.targets().masks.sum())
    assert math.isclose(area, 32 * 64, rel_tol=0.05)  # a 16x32 region of the input, doubled each way


# ---- 2. parameters a stage gives no gradient are frozen for it (no find_unused_parameters under DDP) ----


class _HalfUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)  # like a projection head when λ_pxl = 0
        self.token = nn.Parameter(torch.zeros(3))  # like DINOv2's mask token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.used(x))


def test_parameters_without_gradient_are_frozen_and_the_probe_leaves_no_trace() -> None:
    from instcontrast import PixelMemoryBank
    from reference_pipeline.engine import freeze_unused_parameters

    model = _HalfUsed()
    bank = PixelMemoryBank(4, 3, size=8)

    def step_fn(module: nn.Module, batch: torch.Tensor):
        out = module(batch) * torch.rand(())  # consumes the RNG
        bank.enqueue(torch.randn(out.shape[0], 4), torch.ones(out.shape[0], 3))
        return out.square().mean(), {}

    model.used.weight.grad = torch.ones(3, 3)  # an existing gradient survives
    bank_before = {k: v.clone() for k, v in bank.state_dict().items()}
    stats_before = model.norm.running_mean.clone()
    batch = torch.randn(5, 3)
    rng = torch.get_rng_state()
    frozen = freeze_unused_parameters(model, step_fn, batch, extra_state={"bank": bank})
    assert sorted(frozen) == ["head.bias", "head.weight", "token"]
    assert not model.head.weight.requires_grad and not model.token.requires_grad and model.used.weight.requires_grad
    assert torch.equal(model.used.weight.grad, torch.ones(3, 3)) and model.head.weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model.norm.running_mean, stats_before)
    assert all(torch.equal(bank.state_dict()[k], v) for k, v in bank_before.items())


# ---- 6. SAM2's per-box copies of the image features: bounded by box_chunk, not by the number of boxes ---


def _saved_bytes(teacher: FoundationTeacher, boxes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mask logits of the boxes and the bytes autograd keeps for the backward pass of their decoding."""
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        embeddings = [level.detach() for level in teacher.image_embeddings(images)]
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        masks = teacher.segment(embeddings, boxes)
    return masks, saved


def test_sam2_decodes_many_boxes_in_checkpointed_chunks_with_the_same_masks_and_gradients() -> None:
    torch.manual_seed(0)
    corner = torch.rand(1, 12, 2) * 0.5
    boxes = torch.cat([corner, corner + 0.1 + 0.4 * torch.rand(1, 12, 2)], dim=-1)  # (x0, y0, x1, y1)
    teacher = _teacher()
    one_pass, one_pass_bytes = _saved_bytes(teacher, boxes)
    one_pass.square().mean().backward()
    grads = [p.grad.clone() for p in teacher.segmenter.mask_decoder.parameters() if p.grad is not None]
    teacher.zero_grad(set_to_none=True)
    teacher.config.box_chunk = 4
    chunked, chunked_bytes = _saved_bytes(teacher, boxes)
    chunked.square().mean().backward()
    chunked_grads = [p.grad for p in teacher.segmenter.mask_decoder.parameters() if p.grad is not None]
    torch.testing.assert_close(chunked, one_pass, rtol=1e-4, atol=1e-4)  # other batch sizes, other kernels
    assert len(grads) == len(chunked_grads) > 0
    for expected, got in zip(grads, chunked_grads):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)
    assert chunked_bytes * 5 < one_pass_bytes  # the per-box activations are recomputed, not kept


# ---- 3. a missing weights folder given like the configs' defaults ------------------------------------


def test_a_missing_relative_weights_folder_is_named_with_its_files_not_taken_for_a_hub_id(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = TeacherConfig(class_names=CLASSES, detector_path="weights/gdino", segmenter_path="weights/sam2")
    with pytest.raises(FileNotFoundError) as error:
        FoundationTeacher.from_pretrained_dirs(config)
    message = str(error.value)
    assert "'weights/gdino'" in message and "config.json" in message and "tokenizer" in message
    assert "hub cache (" not in message and "huggingface.co" not in message


def test_a_hub_id_present_in_the_local_hub_cache_is_still_read_from_there(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    from reference_pipeline.models.teacher import _is_hub_id

    snapshot = tmp_path / "models--org--sam2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--sam2" / "refs").mkdir()
    (tmp_path / "models--org--sam2" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert _is_hub_id("org/sam2")
    assert not _is_hub_id("weights/sam2")
