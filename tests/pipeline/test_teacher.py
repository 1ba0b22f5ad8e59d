"""The Grounding-DINO + SAM2 teacher wrapper: text → boxes → masks → the pipeline's interface.

Tiny random configurations of the real ``transformers`` classes (built offline); the detector's forward
is replaced by a hand-made one where a test needs to control which token scores which query.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput

from instcontrast import InstanceAwarePixelContrast
from reference_pipeline.models.outputs import SegmentationOutput
from reference_pipeline.models.teacher import (
    PADDED_MASK_LOGIT,
    PROBABILITY_FLOOR,
    FoundationTeacher,
    TeacherConfig,
    build_prompt,
    class_logits_from_phrase_scores,
    detector_input_size,
    load_tokenizer,
    phrase_scores,
    select_boxes,
)
from reference_pipeline.models.tiny_configs import tiny_teacher_components, tiny_tokenizer, tiny_vocabulary

torch.set_num_threads(1)

CLASSES = ("car", "person", "traffic light")
SAM_SIZE = 64


def make_teacher(**overrides: object) -> FoundationTeacher:
    kind = overrides.get("detector_kind", "grounding-dino")
    components = tiny_teacher_components(CLASSES, kind=kind, segmenter_image_size=SAM_SIZE)  # type: ignore[arg-type]
    config = TeacherConfig(
        class_names=CLASSES, **({"num_queries": 8, "embedding_dim": 16, "detector_shortest_edge": None} | overrides)
    )  # type: ignore[arg-type]
    torch.manual_seed(0)
    return FoundationTeacher.from_configs(config, components.detector_config, components.segmenter_config,
                                          components.tokenizer)  # fmt: skip


def fake_detector(teacher: FoundationTeacher, token_logits: dict[int, tuple[int, float]], boxes: torch.Tensor):
    """A detector forward where query ``q`` scores token ``t`` with logit ``v`` for ``token_logits[q] = (t, v)``."""
    queries, max_len = teacher.detector.config.num_queries, teacher.detector.config.max_text_len
    num_tokens = teacher.input_ids.shape[1]

    def forward(pixel_values, input_ids, attention_mask=None, **kwargs):
        batch = pixel_values.shape[0]
        logits = torch.full((batch, queries, max_len), float("-inf"))
        logits[:, :, :num_tokens] = -6.0
        for query, (token, value) in token_logits.items():
            logits[:, query, token] = value
        return GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes.expand(batch, -1, -1))

    return forward


# ---- text ----------------------------------------------------------------------------------------


def test_prompt_joins_names_with_dots_and_spans_point_at_each_name() -> None:
    prompt, spans = build_prompt(["Car", "traffic  light"])
    assert prompt == "car . traffic light ."
    assert [prompt[start:end] for start, end in spans] == ["car", "traffic light"]


def test_tiny_vocabulary_puts_special_tokens_at_the_bert_ids_grounding_dino_hard_codes() -> None:
    vocabulary = tiny_vocabulary(["car"])
    assert {vocabulary[i] for i in (101, 102, 1012, 1029)} == {"[CLS]", "[SEP]", ".", "?"}
    assert vocabulary.index("[CLS]") == 101 and vocabulary.index("?") == 1029


def test_tokens_map_to_their_phrases_multi_token_names_included() -> None:
    teacher = make_teacher()
    tokens = teacher.tokenizer.convert_ids_to_tokens(teacher.input_ids[0].tolist())
    assert tokens == ["[CLS]", "car", ".", "person", ".", "traffic", "light", ".", "[SEP]"]
    expected = torch.zeros(3, 9, dtype=torch.bool)
    expected[0, 1] = expected[1, 3] = expected[2, 5] = expected[2, 6] = True
    assert torch.equal(teacher.token_to_phrase, expected)


def test_phrase_score_is_the_max_sigmoid_over_the_phrase_tokens() -> None:
    token_to_phrase = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)  # (C=2, T=4)
    logits = torch.tensor([[[5.0, -1.0, 0.5, 2.0, float("-inf")]]])  # (1, 1, L=5)
    scores = phrase_scores(logits, token_to_phrase)
    expected = torch.tensor([[[torch.sigmoid(torch.tensor(-1.0)), torch.sigmoid(torch.tensor(2.0))]]])
    torch.testing.assert_close(scores, expected)


def test_class_logits_softmax_is_the_renormalized_phrase_and_no_object_scores() -> None:
    scores = torch.tensor([[[0.6, 0.2], [0.9, 0.1]]])  # (1, 2, 2)
    valid = torch.tensor([[True, False]])
    logits = class_logits_from_phrase_scores(scores, valid)
    q = torch.tensor([0.6, 0.2, 0.4])
    torch.testing.assert_close(logits[0, 0].softmax(-1), q / q.sum())
    padded = torch.tensor([math.log(PROBABILITY_FLOOR)] * 2 + [0.0])
    torch.testing.assert_close(logits[0, 1], padded)


def test_tokenizer_with_other_special_ids_is_rejected() -> None:
    from transformers import BertTokenizerFast

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "car", "person", "traffic", "light"]
    components = tiny_teacher_components(CLASSES)
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocabulary)})
    config = TeacherConfig(class_names=CLASSES)
    with pytest.raises(ValueError, match="hard-codes the BERT ids"):
        FoundationTeacher.from_configs(config, components.detector_config, components.segmenter_config, tokenizer)


# ---- the interface -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["grounding-dino", "mm-grounding-dino"])
def test_forward_shapes_follow_the_segmentation_interface(kind: str) -> None:
    teacher = make_teacher(detector_kind=kind, box_threshold=0.0).eval()
    images = torch.rand(2, 3, 62, 70)
    out = teacher(images)
    assert isinstance(out, SegmentationOutput)
    assert out.mask_logits.shape == (2, 8, 16, 18)
    assert out.class_logits.shape == (2, 8, len(CLASSES) + 1)
    assert out.pixel_embeddings.shape == (2, 16, 16, 18)
    assert out.aux_outputs == []
    for tensor in (out.mask_logits, out.class_logits, out.pixel_embeddings):
        assert torch.isfinite(tensor).all()


def test_more_queries_than_the_detector_has_are_padded_no_object() -> None:
    teacher = make_teacher(num_queries=25, box_threshold=0.0).eval()  # the tiny detector has 20 queries
    out = teacher(torch.rand(1, 3, 48, 80))
    assert out.mask_logits.shape[1] == 25
    assert (out.class_logits[0, 20:].argmax(-1) == len(CLASSES)).all()
    assert (out.mask_logits[0, 20:] == PADDED_MASK_LOGIT).all()
    assert (out.mask_logits[0, :20] != PADDED_MASK_LOGIT).any()


def test_class_logits_come_from_the_right_phrase_tokens_and_weak_boxes_are_no_object(monkeypatch) -> None:
    teacher = make_teacher(box_threshold=0.3).eval()
    boxes = torch.rand(1, 20, 4) * 0.5 + 0.2
    # query 3 hits token 6 ("light" of "traffic light"), query 7 hits token 1 ("car"); the rest score sigmoid(-6)
    monkeypatch.setattr(teacher.detector, "forward", fake_detector(teacher, {3: (6, 3.0), 7: (1, 2.0)}, boxes))
    out = teacher(torch.rand(2, 3, 48, 80))
    probabilities = out.class_logits.softmax(-1)  # (B, K, C+1)
    assert (probabilities[:, 0].argmax(-1) == 2).all()  # the best query first: traffic light
    assert (probabilities[:, 1].argmax(-1) == 0).all()  # then car
    torch.testing.assert_close(out.class_logits[:, 0, 2].exp(), torch.sigmoid(torch.tensor(3.0)).expand(2))
    torch.testing.assert_close(out.class_logits[:, 1, 0].exp(), torch.sigmoid(torch.tensor(2.0)).expand(2))
    # every other query scores sigmoid(-6) < 0.3: padded, no-object, empty mask
    assert (probabilities[:, 2:].argmax(-1) == len(CLASSES)).all()
    assert (out.mask_logits[:, 2:] == PADDED_MASK_LOGIT).all()
    assert (out.mask_logits[:, :2] != PADDED_MASK_LOGIT).all()


def test_all_boxes_below_threshold_give_only_no_object_queries() -> None:
    teacher = make_teacher(box_threshold=1.0).eval()  # sigmoid scores never reach 1
    out = teacher(torch.rand(2, 3, 48, 80))
    assert (out.class_logits.argmax(-1) == len(CLASSES)).all()
    assert (out.mask_logits == PADDED_MASK_LOGIT).all()


def test_kept_boxes_prompt_sam2_in_its_input_pixels(monkeypatch) -> None:
    teacher = make_teacher(box_threshold=0.3).eval()
    boxes = torch.zeros(1, 20, 4)
    boxes[0, 5] = torch.tensor([0.5, 0.25, 0.5, 0.25])  # cx, cy, w, h
    monkeypatch.setattr(teacher.detector, "forward", fake_detector(teacher, {5: (3, 4.0)}, boxes))
    seen: list[torch.Tensor] = []
    teacher.segmenter.prompt_encoder.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["input_boxes"]), with_kwargs=True
    )
    teacher(torch.rand(1, 3, 48, 80))
    expected = torch.tensor([[[0.25, 0.125, 0.75, 0.375]]]) * SAM_SIZE  # (x0, y0, x1, y1) in SAM2 pixels
    torch.testing.assert_close(seen[0], expected)


def test_image_embeddings_are_computed_once_per_image_and_boxes_decoded_in_one_call() -> None:
    teacher = make_teacher(box_threshold=0.0).eval()
    encoder_batches: list[int] = []
    decoder_prompts: list[tuple[int, ...]] = []
    teacher.segmenter.vision_encoder.register_forward_hook(
        lambda m, args, out: encoder_batches.append(args[0].shape[0])
    )
    teacher.segmenter.prompt_encoder.register_forward_hook(
        lambda m, args, kwargs, out: decoder_prompts.append(tuple(kwargs["input_boxes"].shape[:2])),
        with_kwargs=True,
    )
    teacher(torch.rand(3, 3, 48, 80))
    assert encoder_batches == [3]  # one encoder pass over the 3 images
    assert decoder_prompts == [(3, 8)]  # one decoder call with all 8 boxes of each image


# ---- training ------------------------------------------------------------------------------------


def test_training_step_lowers_the_loss_and_only_configured_parts_change() -> None:
    teacher = make_teacher(box_threshold=0.0)
    images = torch.rand(2, 3, 48, 80)
    generator = torch.Generator().manual_seed(1)
    target_masks = (torch.rand(2, 8, 12, 20, generator=generator) > 0.5).float()
    target_classes = torch.randint(0, len(CLASSES) + 1, (2, 8), generator=generator)

    def loss_of(out: SegmentationOutput) -> torch.Tensor:
        mask = F.binary_cross_entropy_with_logits(out.mask_logits, target_masks)
        classes = F.cross_entropy(out.class_logits.flatten(0, 1), target_classes.flatten())
        return mask + classes + out.pixel_embeddings.square().mean()

    trainable = {name for name, param in teacher.named_parameters() if param.requires_grad}
    assert trainable and all(name.startswith(("detector.model.decoder", "detector.bbox_embed", "detector.model.enc",
                                              "detector.model.query", "segmenter.mask_decoder", "projection"))
                             for name in trainable)  # fmt: skip
    before = {name: param.detach().clone() for name, param in teacher.named_parameters()}
    with torch.no_grad():
        initial = loss_of(teacher.eval()(images)).item()
    optimizer = torch.optim.Adam(teacher.parameter_groups(trainable_only=True)["decoder"], lr=3e-3)
    teacher.train()
    for _ in range(5):
        optimizer.zero_grad()
        loss_of(teacher(images)).backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_of(teacher.eval()(images)).item()
    assert final < initial - 0.05
    for name, param in teacher.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        if name not in trainable:
            assert not changed, name
    for prefix in ("detector.model.decoder", "segmenter.mask_decoder", "projection"):
        assert any(
            not torch.equal(p.detach(), before[n]) for n, p in teacher.named_parameters() if n.startswith(prefix)
        )


def test_frozen_parts_stay_in_eval_mode() -> None:
    teacher = make_teacher().train()
    assert not teacher.detector.model.backbone.training and not teacher.segmenter.vision_encoder.training
    assert teacher.detector.model.decoder.training and teacher.segmenter.mask_decoder.training


def test_parameter_groups_cover_every_parameter_exactly_once() -> None:
    teacher = make_teacher(trainable=("detector_backbone", "mask_decoder"))
    groups = teacher.parameter_groups()
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(teacher.parameters()))
    assert {id(p) for p in teacher.detector.model.backbone.parameters()} <= {id(p) for p in groups["encoder"]}
    trainable = teacher.parameter_groups(trainable_only=True)
    assert {id(p) for p in trainable["encoder"]} == {id(p) for p in teacher.detector.model.backbone.parameters()}
    assert {id(p) for p in trainable["decoder"]} == {id(p) for p in teacher.segmenter.mask_decoder.parameters()}


def test_unknown_trainable_parts_and_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown trainable parts"):
        TeacherConfig(class_names=CLASSES, trainable=("swin",))
    with pytest.raises(ValueError, match="box_threshold"):
        TeacherConfig(class_names=CLASSES, box_threshold=1.5)
    with pytest.raises(ValueError, match="'.'"):
        TeacherConfig(class_names=("car.", "person"))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        make_teacher()(torch.rand(3, 32, 32))


def test_select_boxes_keeps_the_top_scores_in_order() -> None:
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0]]])
    scores = torch.tensor([[[0.2, 0.1], [0.1, 0.9], [0.5, 0.0]]])
    selection = select_boxes(boxes, scores, num_queries=2, threshold=0.3)
    assert selection.query_index.tolist() == [[1, 2]] and selection.valid.tolist() == [[True, True]]
    torch.testing.assert_close(selection.boxes[0, 0], torch.tensor([0.0, 0.0, 0.3, 0.3]))  # clamped to the image
    assert select_boxes(boxes, scores, 3, 0.3).valid.tolist() == [[True, True, False]]


# ---- loading -------------------------------------------------------------------------------------


def test_save_pretrained_then_from_pretrained_reproduces_the_outputs(tmp_path: Path) -> None:
    teacher = make_teacher(box_threshold=0.0).eval()
    images = torch.rand(1, 3, 48, 80)
    expected = teacher(images)
    teacher.save_pretrained(tmp_path / "teacher")
    loaded = FoundationTeacher.from_pretrained(tmp_path / "teacher").eval()
    assert loaded.input_ids.tolist() == teacher.input_ids.tolist()
    out = loaded(images)
    for name in ("mask_logits", "class_logits", "pixel_embeddings"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name))


def test_a_folder_with_only_vocab_txt_loads_with_the_bert_ids(tmp_path: Path) -> None:
    vocabulary = tiny_vocabulary(["car"])
    (tmp_path / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer("car .")["input_ids"] == [101, vocabulary.index("car"), 1012, 102]
    saved = tmp_path / "saved"
    tiny_tokenizer(["car"]).save_pretrained(saved)
    assert load_tokenizer(saved)("car .")["input_ids"] == [101, vocabulary.index("car"), 1012, 102]


def test_missing_weights_give_a_message_saying_which_files_go_where(tmp_path: Path) -> None:
    config = TeacherConfig(
        class_names=CLASSES, detector_path=str(tmp_path / "gdino"), segmenter_path=str(tmp_path / "sam2")
    )
    with pytest.raises(FileNotFoundError) as error:
        FoundationTeacher.from_pretrained_dirs(config)
    message = str(error.value)
    assert str(tmp_path / "gdino") in message
    for needed in ("config.json", "model.safetensors", "tokenizer", "detector_path"):
        assert needed in message
    (tmp_path / "gdino").mkdir()
    make_teacher().detector.save_pretrained(tmp_path / "gdino")  # weights but no tokenizer
    with pytest.raises(FileNotFoundError, match="missing: tokenizer files"):
        FoundationTeacher.from_pretrained_dirs(config)
    tiny_tokenizer().save_pretrained(tmp_path / "gdino")
    with pytest.raises(FileNotFoundError, match=r"(?s)SAM2 segmenter weights not found.*sam2/config\.json"):
        FoundationTeacher.from_pretrained_dirs(config)


# ---- the library on the teacher's outputs --------------------------------------------------------


def test_instance_aware_pixel_contrast_runs_on_teacher_outputs() -> None:
    teacher = make_teacher(box_threshold=0.0)
    weak, strong = teacher(torch.rand(2, 3, 48, 80)), teacher(torch.rand(2, 3, 48, 80))
    criterion = InstanceAwarePixelContrast(num_negatives=8)
    result = criterion(weak.pixel_embeddings, strong.pixel_embeddings, weak.mask_logits, weak.class_logits)
    assert torch.isfinite(result.loss)
    result.loss.backward()
    assert teacher.projection[0].weight.grad is not None and teacher.projection[0].weight.grad.abs().sum() > 0


def test_image_embeddings_match_sam2s_own_get_image_embeddings() -> None:
    teacher = make_teacher().eval()
    with torch.no_grad():
        teacher.segmenter.no_memory_embedding.normal_()  # zero at init: make the term visible
    images = torch.rand(2, 3, 48, 80)
    pixels = F.interpolate(
        (images - teacher.pixel_mean) / teacher.pixel_std, size=(SAM_SIZE, SAM_SIZE), mode="bilinear"
    )
    expected = teacher.segmenter.get_image_embeddings(pixels)
    with torch.no_grad():
        ours = teacher.image_embeddings(images)
    assert [level.shape[-1] for level in ours] == [SAM_SIZE // 4, SAM_SIZE // 8, SAM_SIZE // 16]
    for level, reference in zip(ours, expected):
        torch.testing.assert_close(level, reference)


@pytest.mark.parametrize("detach_boxes", [True, False])
def test_mask_loss_reaches_the_box_head_only_when_boxes_are_not_detached(detach_boxes: bool) -> None:
    teacher = make_teacher(box_threshold=0.0, detach_boxes=detach_boxes)
    out = teacher(torch.rand(1, 3, 48, 80))
    out.mask_logits.sigmoid().mean().backward()
    box_head = teacher.detector.bbox_embed[-1].layers[-1].weight
    reached = box_head.grad is not None and bool(box_head.grad.abs().sum() > 0)
    assert reached is not detach_boxes


def test_detector_input_follows_the_processor_resize_rule() -> None:
    assert detector_input_size(48, 80, 96, 128) == (77, 128)  # the longer side caps the scale at 1.6
    assert detector_input_size(48, 80, 96, None) == (96, 160)
    assert detector_input_size(48, 80, None, 128) == (48, 80)
    teacher = make_teacher(detector_shortest_edge=96, detector_longest_edge=128).eval()
    seen: list[tuple[int, ...]] = []
    teacher.detector.model.backbone.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    teacher(torch.rand(1, 3, 48, 80))
    assert seen == [(1, 3, 77, 128)]


def test_too_small_detector_input_names_the_setting_to_change() -> None:
    teacher = make_teacher().eval()  # 20 two-stage queries; 16×16 gives 4 + 1 + 1 + 1 encoder tokens
    with pytest.raises(ValueError, match="detector_shortest_edge"):
        teacher(torch.rand(1, 3, 16, 16))
