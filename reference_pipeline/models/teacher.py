"""The foundation teacher: Grounding-DINO boxes prompt SAM2 masks (the paper's fused ensemble).

:class:`FoundationTeacher` wraps two ``transformers`` models behind the pipeline's one interface
(:class:`~reference_pipeline.models.outputs.SegmentationOutput`), so every stage treats it like the
student:

1. **Text.** The class names become one prompt ``"car . person . traffic light ."``, tokenized once.
   Each token is mapped to the class whose characters it covers (from the tokenizer's offsets), so
   multi-token names (``traffic light``) are one phrase.
2. **Boxes.** Grounding-DINO (``GroundingDinoForObjectDetection`` or
   ``MMGroundingDinoForObjectDetection``) scores each of its queries against every token; a phrase's
   score is the maximum over its tokens of the sigmoid token scores,

   .. math:: p_{q,c} = \\max_{t \\in \\mathrm{phrase}(c)} \\sigma(\\ell_{q,t}).

   The ``K`` queries with the largest :math:`\\max_c p_{q,c}` are kept; those with a score below the
   threshold (0.3) are *padded* queries.
3. **Masks.** SAM2 (``Sam2Model``) embeds each image once; the kept boxes of an image are its box
   prompts, decoded against that one embedding (:func:`~reference_pipeline.models.sam2_boxes.decode_boxes`,
   ``box_chunk`` boxes at a time). SAM2's low-resolution masks (stride 4 of its square input)
   are resampled bilinearly to ``(ceil(H/4), ceil(W/4))``; padded queries get :data:`PADDED_MASK_LOGIT`.
4. **Classes.** The no-object class is last:

   .. math:: \\mathrm{class\\_logits}_{q} = \\log \\max\\big(\\epsilon,\\ [p_{q,1}, \\dots, p_{q,C},\\ 1 - \\max_c p_{q,c}]\\big),

   so the softmax over ``C + 1`` classes is the phrase scores and the no-object score renormalized.
   Padded queries are no-object: ``[log ε, …, log ε, 0]`` with ``ε =`` :data:`PROBABILITY_FLOOR`.
5. **Pixel embeddings.** SAM2's three image-embedding levels (strides 4, 8 and 16 of its input) are
   resampled to the stride-4 output grid, concatenated and passed through a 2-layer MLP projection head
   (1×1 convolutions), the contrastive embeddings.

Which parts train during adaptation is configurable (:data:`TEACHER_PARTS`); by default the detection
head (Grounding-DINO's decoder with its class/box heads and two-stage proposal heads), SAM2's mask
decoder and the projection head train, and the backbones and fusion encoder are frozen. Frozen parts
stay in eval mode.

Known pitfalls handled here: Grounding-DINO hard-codes the BERT ids ``[CLS]`` = 101, ``[SEP]`` = 102,
``.`` = 1012 and ``?`` = 1029 (a tokenizer with other ids is rejected); ``BertTokenizerFast(vocab_file=…)``
silently ignores the file in ``transformers`` 5 (``vocab=`` is used instead); and a folder holding only
``vocab.txt`` does not load with ``AutoTokenizer`` (it is read directly).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
    PreTrainedTokenizerBase,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2Model,
    Sam2VisionConfig,
    SwinConfig,
)

from ..errors import UserError
from .outputs import SegmentationOutput
from .sam2_boxes import decode_boxes

__all__ = [
    "BERT_SPECIAL_TOKEN_IDS",
    "DEFAULT_TRAINABLE",
    "ENCODER_PARTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PADDED_MASK_LOGIT",
    "PROBABILITY_FLOOR",
    "TEACHER_PARTS",
    "BoxSelection",
    "DetectorKind",
    "FoundationTeacher",
    "PromptEncoding",
    "TeacherConfig",
    "build_prompt",
    "check_tokenizer",
    "check_weights",
    "class_logits_from_phrase_scores",
    "detector_input_size",
    "encode_prompt",
    "grounding_dino_swin_large_config",
    "load_tokenizer",
    "phrase_scores",
    "sam2_hiera_large_config",
    "select_boxes",
]

DetectorKind = Literal["grounding-dino", "mm-grounding-dino"]

#: The BERT ids Grounding-DINO hard-codes: ``[CLS]``, ``[SEP]``, ``.`` and ``?``.
BERT_SPECIAL_TOKEN_IDS: dict[str, int] = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}

#: Mask logit of padded (no box) queries: sigmoid 0, finite so BCE and softmax stay finite (also in fp16).
PADDED_MASK_LOGIT = -1.0e4
#: ``ε`` of the class-logit mapping: probabilities are clamped to it before the log.
PROBABILITY_FLOOR = 1.0e-6

#: Both models' processors normalize with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Parts of the teacher whose training can be switched on or off.
TEACHER_PARTS = (
    "detector_backbone",  # Swin image backbone of Grounding-DINO
    "text_backbone",  # BERT text backbone
    "detector_encoder",  # input projections, text projection, feature-enhancer (fusion) encoder
    "detection_head",  # query decoder, class/box heads, two-stage proposal heads
    "segmenter_backbone",  # SAM2 Hiera image encoder and its FPN neck
    "prompt_encoder",  # SAM2 prompt encoder
    "mask_decoder",  # SAM2 mask decoder
    "projection_head",  # contrastive projection head (ours)
)
#: The parts :meth:`FoundationTeacher.parameter_groups` calls ``"encoder"``: the three backbones.
ENCODER_PARTS = ("detector_backbone", "text_backbone", "segmenter_backbone")
#: Trained by default during adaptation (fits one GPU): the heads, SAM2's mask decoder, the projection.
DEFAULT_TRAINABLE = ("detection_head", "mask_decoder", "projection_head")

_DETECTOR_CLASSES: dict[str, type[nn.Module]] = {
    "grounding-dino": GroundingDinoForObjectDetection,
    "mm-grounding-dino": MMGroundingDinoForObjectDetection,
}
_DETECTOR_CONFIGS: dict[str, type] = {"grounding-dino": GroundingDinoConfig, "mm-grounding-dino": MMGroundingDinoConfig}

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
#: What a weights folder must hold (for the missing-weights message).
_SEGMENTER_LAYOUT = ("config.json", "model.safetensors (or pytorch_model.bin, or shards + index)")
_DETECTOR_LAYOUT = (*_SEGMENTER_LAYOUT, "tokenizer.json + tokenizer_config.json (or only vocab.txt)")
_DETECTOR_DIR, _SEGMENTER_DIR = "detector", "segmenter"
_PROJECTION_FILE, _CONFIG_FILE = "projection_head.safetensors", "teacher_config.json"


# --------------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    """Settings of the Grounding-DINO + SAM2 teacher.

    Attributes:
        class_names: one name per foreground class, in class-index order (the text prompt).
        detector_path: local directory of the Grounding-DINO weights and tokenizer (``from_pretrained``),
            or a hub id already in the local hub cache (nothing is downloaded).
        segmenter_path: local directory of the SAM2 weights, or a cached hub id.
        detector_kind: ``"grounding-dino"`` or ``"mm-grounding-dino"``.
        box_threshold: queries whose best phrase score is below it become padded (no-object) queries.
        num_queries: ``K``, the number of output queries (the top-``K`` boxes).
        trainable: the parts trained during adaptation, a subset of :data:`TEACHER_PARTS`.
        embedding_dim: ``D``, the width of the contrastive pixel embeddings.
        projection_hidden_dim: hidden width of the 2-layer projection head.
        detector_shortest_edge: resize images before the detector so that the shorter side has this many
            pixels, unless the longer side would exceed ``detector_longest_edge`` (aspect ratio kept; the
            defaults are Grounding-DINO's processor's, 800 / 1333); ``None`` feeds the input size. The
            detector's two-stage query selection needs at least ``Q`` (900) encoder tokens, so small
            images (the 128×128 demo size) must be enlarged.
        detector_longest_edge: upper bound of the longer side after the resize (``None``: no bound).
        detach_boxes: stop the mask loss's gradient from flowing into the box head through SAM2's
            box prompts (box selection is discrete either way).
        box_chunk: box prompts SAM2 decodes at a time; with gradients each chunk is checkpointed, so
            training memory grows with this, not with ``num_queries`` (see :meth:`FoundationTeacher.segment`).
    """

    class_names: tuple[str, ...]
    detector_path: str = "weights/grounding-dino-large"
    segmenter_path: str = "weights/sam2-hiera-large"
    detector_kind: DetectorKind = "grounding-dino"
    box_threshold: float = 0.3
    num_queries: int = 100
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE
    embedding_dim: int = 128
    projection_hidden_dim: int = 256
    detector_shortest_edge: int | None = 800
    detector_longest_edge: int | None = 1333
    detach_boxes: bool = True
    box_chunk: int = 16

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        self.trainable = tuple(self.trainable)
        if not self.class_names:
            raise ValueError("TeacherConfig.class_names must name at least one class, got an empty list")
        for name in self.class_names:
            if not isinstance(name, str) or not name.strip() or "." in name:
                raise ValueError(f"class name {name!r} must be a non-empty string without '.' (the phrase separator)")
        if len({name.strip().lower() for name in self.class_names}) != len(self.class_names):
            raise ValueError(f"class names must be distinct (case-insensitive), got {self.class_names}")
        if self.detector_kind not in _DETECTOR_CLASSES:
            raise ValueError(f"detector_kind must be one of {tuple(_DETECTOR_CLASSES)}, got {self.detector_kind!r}")
        if not 0.0 <= self.box_threshold <= 1.0:
            raise ValueError(f"box_threshold must be in [0, 1], got {self.box_threshold}")
        for name in ("num_queries", "embedding_dim", "projection_hidden_dim", "box_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("detector_shortest_edge", "detector_longest_edge"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 32):
                raise ValueError(f"{name} must be None or an int of at least 32, got {value!r}")
        unknown = sorted(set(self.trainable) - set(TEACHER_PARTS))
        if unknown:
            raise ValueError(f"unknown trainable parts {unknown}; valid parts: {TEACHER_PARTS}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable fields."""
        data = dataclasses.asdict(self)
        data["class_names"], data["trainable"] = list(self.class_names), list(self.trainable)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TeacherConfig keys {unknown}")
        return cls(**data)


def grounding_dino_swin_large_config(kind: DetectorKind = "grounding-dino") -> GroundingDinoConfig:
    """The full-size Grounding-DINO: Swin-L (window 12, 384 pretraining) + BERT-base, ≈ 342M parameters.

    Args:
        kind: ``"grounding-dino"`` or ``"mm-grounding-dino"`` (same sizes).

    Returns:
        The detector configuration (``GroundingDinoConfig`` or ``MMGroundingDinoConfig``).
    """
    swin = SwinConfig(
        image_size=384,
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=12,
        out_indices=[2, 3, 4],
    )
    return _DETECTOR_CONFIGS[kind](backbone_config=swin, text_config=BertConfig())


def sam2_hiera_large_config() -> Sam2Config:
    """The full-size SAM2 (Hiera-L image encoder, 1024×1024 input), ≈ 217M parameters."""
    hiera = Sam2HieraDetConfig(
        hidden_size=144,
        num_attention_heads=2,
        blocks_per_stage=[2, 6, 36, 4],
        embed_dim_per_stage=[144, 288, 576, 1152],
        num_attention_heads_per_stage=[2, 4, 8, 16],
        window_size_per_stage=[8, 4, 16, 8],
        global_attention_blocks=[23, 33, 43],
        window_positional_embedding_background_size=[7, 7],
    )
    return Sam2Config(
        vision_config=Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[1152, 576, 288, 144])
    )


# --------------------------------------------------------------------------------------------------
# Text: prompt, tokenizer, phrase scores, class logits (pure functions).
# --------------------------------------------------------------------------------------------------


def build_prompt(class_names: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The Grounding-DINO prompt ``"car . person . traffic light ."`` and each name's character span.

    Args:
        class_names: one name per class; lower-cased and stripped.

    Returns:
        ``(prompt, spans)`` with ``prompt[start:end]`` equal to class ``c``'s name for ``spans[c]``.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for name in class_names:
        text = " ".join(name.strip().lower().split())
        spans.append((position, position + len(text)))
        parts.append(text + " .")
        position += len(text) + 3  # the name, " ." and the joining space
    return " ".join(parts), spans


@dataclass
class PromptEncoding:
    """The tokenized prompt, shared by every image.

    Attributes:
        prompt: the prompt text.
        input_ids: ``(1, T)`` token ids.
        attention_mask: ``(1, T)`` ones.
        token_to_phrase: ``(C, T)`` bool, ``True`` where token ``t`` belongs to class ``c``'s name.
    """

    prompt: str
    input_ids: Tensor
    attention_mask: Tensor
    token_to_phrase: Tensor


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Reject a tokenizer whose special ids differ from the BERT ids Grounding-DINO hard-codes.

    Raises:
        ValueError: naming the tokens whose ids differ.
    """
    ids = tokenizer.convert_tokens_to_ids(list(BERT_SPECIAL_TOKEN_IDS))
    wrong = {token: got for (token, want), got in zip(BERT_SPECIAL_TOKEN_IDS.items(), ids) if got != want}
    if wrong:
        raise UserError(
            f"Grounding-DINO hard-codes the BERT ids {BERT_SPECIAL_TOKEN_IDS}, but the tokenizer maps {wrong}; "
            "use the detector's own (bert-base-uncased) vocabulary"
        )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, class_names: Sequence[str], max_text_len: int) -> PromptEncoding:
    """Tokenize the class prompt and map each token to its phrase from the tokenizer's character offsets.

    Args:
        tokenizer: a fast tokenizer (offsets needed) with the BERT special ids.
        class_names: the ``C`` class names.
        max_text_len: the detector's ``config.max_text_len``.

    Returns:
        :class:`PromptEncoding`.

    Raises:
        ValueError: if the tokenizer has other special ids, the prompt is longer than ``max_text_len``
            tokens, or a class name yields no token.
    """
    check_tokenizer(tokenizer)
    prompt, spans = build_prompt(class_names)
    encoded = tokenizer(prompt, return_offsets_mapping=True, return_tensors="pt")
    input_ids = encoded["input_ids"]  # (1, T)
    length = input_ids.shape[1]
    if length > max_text_len:
        raise UserError(
            f"the prompt of {len(class_names)} class names has {length} tokens, more than the detector's "
            f"max_text_len={max_text_len}; use fewer or shorter class names"
        )
    offsets = encoded["offset_mapping"][0]  # (T, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    span_tensor = torch.tensor(spans)  # (C, 2)
    is_content = ends > starts  # (T,) special tokens have empty offsets
    token_to_phrase = (
        is_content[None, :] & (starts[None, :] >= span_tensor[:, :1]) & (ends[None, :] <= span_tensor[:, 1:])
    )  # (C, T)
    empty = [name for name, row in zip(class_names, token_to_phrase) if not bool(row.any())]
    if empty:
        raise UserError(f"class names {empty} produced no tokens")
    return PromptEncoding(prompt, input_ids, torch.ones_like(input_ids), token_to_phrase)


def load_tokenizer(directory: str | Path, local_files_only: bool = True) -> PreTrainedTokenizerBase:
    """Load the detector's tokenizer from a directory (or a cached hub id).

    A folder holding only ``vocab.txt`` (which ``AutoTokenizer`` cannot load in ``transformers`` 5, and
    which ``BertTokenizerFast(vocab_file=...)`` silently ignores) is read as a BERT word-piece
    vocabulary with ``BertTokenizerFast(vocab=...)``.

    Args:
        directory: the folder (or hub id).
        local_files_only: never download.

    Returns:
        The tokenizer, checked against the BERT special ids.

    Raises:
        ValueError: if the tokenizer has other special ids.
    """
    path = Path(directory)
    if path.is_dir() and not any((path / name).exists() for name in _TOKENIZER_FILES[:2]):
        words = (path / "vocab.txt").read_text(encoding="utf-8").splitlines()
        tokenizer: PreTrainedTokenizerBase = BertTokenizerFast(vocab={word: index for index, word in enumerate(words)})
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=local_files_only)
    check_tokenizer(tokenizer)
    return tokenizer


def phrase_scores(token_logits: Tensor, token_to_phrase: Tensor) -> Tensor:
    """Per-class scores of each detector query: the maximum sigmoid score over the phrase's tokens.

    .. math:: p_{b,q,c} = \\max_{t:\\ M_{c,t}} \\sigma(\\ell_{b,q,t})

    Args:
        token_logits: detector logits per token (padding positions may be ``-inf``).
        token_to_phrase: which tokens belong to which class.

    Shape:
        - token_logits: ``(B, Q, L)`` with ``L ≥ T``
        - token_to_phrase: ``(C, T)``
        - output: ``(B, Q, C)``

    Returns:
        Scores in ``[0, 1]``.
    """
    num_tokens = token_to_phrase.shape[1]
    probabilities = token_logits[..., :num_tokens].sigmoid()  # (B, Q, T)
    masked = probabilities[:, :, None, :].masked_fill(~token_to_phrase[None, None], 0.0)  # (B, Q, C, T)
    return masked.amax(dim=-1)  # (B, Q, C)


@dataclass
class BoxSelection:
    """The top-``K`` detector queries of each image.

    Attributes:
        boxes: ``(B, K, 4)`` normalized ``(x0, y0, x1, y1)`` in ``[0, 1]``.
        scores: ``(B, K, C)`` phrase scores of the kept queries (differentiable).
        valid: ``(B, K)`` bool, score ≥ threshold; valid queries come first, by decreasing score.
        query_index: ``(B, K)`` index of the detector query (``-1`` where ``K`` exceeds the queries).
    """

    boxes: Tensor
    scores: Tensor
    valid: Tensor
    query_index: Tensor


def select_boxes(boxes_cxcywh: Tensor, scores: Tensor, num_queries: int, threshold: float) -> BoxSelection:
    """Keep the ``K`` queries with the best phrase score; those below the threshold are padded.

    Args:
        boxes_cxcywh: detector boxes, normalized ``(cx, cy, w, h)``.
        scores: phrase scores :func:`phrase_scores`.
        num_queries: ``K`` (padded with empty boxes when the detector has fewer queries).
        threshold: minimum best phrase score of a kept query.

    Shape:
        - boxes_cxcywh: ``(B, Q, 4)``
        - scores: ``(B, Q, C)``

    Returns:
        :class:`BoxSelection`.
    """
    _batch, detector_queries, num_classes = scores.shape
    best = scores.detach().amax(dim=-1)  # (B, Q)
    kept = min(num_queries, detector_queries)
    top_scores, top_index = best.topk(kept, dim=1)  # (B, k) sorted, decreasing
    center, size = boxes_cxcywh[..., :2], boxes_cxcywh[..., 2:]
    boxes_xyxy = torch.cat([center - size / 2, center + size / 2], dim=-1).clamp(0.0, 1.0)  # (B, Q, 4)
    boxes = boxes_xyxy.gather(1, top_index[..., None].expand(-1, -1, 4))  # (B, k, 4)
    kept_scores = scores.gather(1, top_index[..., None].expand(-1, -1, num_classes))  # (B, k, C)
    valid = top_scores >= threshold  # (B, k)
    missing = num_queries - kept
    if missing:
        boxes = F.pad(boxes, (0, 0, 0, missing))
        kept_scores = F.pad(kept_scores, (0, 0, 0, missing))
        valid = F.pad(valid, (0, missing), value=False)
        top_index = F.pad(top_index, (0, missing), value=-1)
    return BoxSelection(boxes=boxes, scores=kept_scores, valid=valid, query_index=top_index)


def class_logits_from_phrase_scores(scores: Tensor, valid: Tensor) -> Tensor:
    """Class logits with the no-object class last from phrase scores.

    .. math::
        z_{q} = \\log \\max\\big(\\epsilon, [p_{q,1}, \\dots, p_{q,C}, 1 - \\max_c p_{q,c}]\\big),
        \\qquad z_q = [\\log\\epsilon, \\dots, \\log\\epsilon, 0] \\text{ for padded queries}

    so ``softmax(z_q)`` is the vector of phrase scores and no-object score, renormalized.

    Args:
        scores: phrase scores in ``[0, 1]``.
        valid: ``False`` for padded queries.

    Shape:
        - scores: ``(B, K, C)``
        - valid: ``(B, K)``
        - output: ``(B, K, C + 1)``

    Returns:
        The class logits.
    """
    no_object = 1.0 - scores.amax(dim=-1, keepdim=True)  # (B, K, 1)
    probabilities = torch.cat([scores, no_object], dim=-1)  # (B, K, C+1)
    padded = torch.zeros_like(probabilities)
    padded[..., -1] = 1.0
    probabilities = torch.where(valid[..., None], probabilities, padded)  # (B, K, C+1)
    return probabilities.clamp_min(PROBABILITY_FLOOR).log()


def detector_input_size(
    height: int, width: int, shortest_edge: int | None, longest_edge: int | None
) -> tuple[int, int]:
    """The detector's input size: the shorter side scaled to ``shortest_edge``, the longer side capped.

    .. math::
        s = \\min\\Big(\\frac{e_{\\min}}{\\min(H, W)}, \\frac{e_{\\max}}{\\max(H, W)}\\Big),
        \\qquad (H', W') = (\\mathrm{round}(sH), \\mathrm{round}(sW))

    (the rule of Grounding-DINO's image processor). ``shortest_edge=None`` keeps the size.

    Args:
        height: ``H``.
        width: ``W``.
        shortest_edge: ``e_min`` or ``None``.
        longest_edge: ``e_max`` or ``None`` (no cap).

    Returns:
        ``(H', W')``.
    """
    if shortest_edge is None:
        return height, width
    scale = shortest_edge / min(height, width)
    if longest_edge is not None:
        scale = min(scale, longest_edge / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


# --------------------------------------------------------------------------------------------------
# The teacher module.
# --------------------------------------------------------------------------------------------------


class FoundationTeacher(nn.Module):
    """Grounding-DINO + SAM2 fused ensemble with the student's interface.

    Build it from local weights with :meth:`from_pretrained_dirs` (or :meth:`from_pretrained` for a
    directory written by :meth:`save_pretrained`), or from configurations with random weights with
    :meth:`from_configs` (benchmarks, tests).

    Args:
        config: the :class:`TeacherConfig`.
        detector: a ``GroundingDinoForObjectDetection`` or ``MMGroundingDinoForObjectDetection``.
        segmenter: a ``Sam2Model``.
        tokenizer: the detector's (fast, BERT) tokenizer.

    Raises:
        TypeError: if the detector or segmenter has the wrong class.
        ValueError: if the tokenizer does not fit the detector (special ids, prompt length).
    """

    def __init__(
        self, config: TeacherConfig, detector: nn.Module, segmenter: nn.Module, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        super().__init__()
        detector_class = _DETECTOR_CLASSES[config.detector_kind]
        if not isinstance(detector, detector_class):
            raise TypeError(
                f"detector_kind {config.detector_kind!r} needs a {detector_class.__name__}, got {type(detector).__name__}"
            )
        if not isinstance(segmenter, Sam2Model):
            raise TypeError(f"segmenter must be a transformers Sam2Model, got {type(segmenter).__name__}")
        self.config = config
        self.detector = detector
        self.segmenter = segmenter
        self.tokenizer = tokenizer
        with torch.device("cpu"):  # the prompt's tensors are read on the host, also under a meta-device context
            encoding = encode_prompt(tokenizer, config.class_names, detector.config.max_text_len)
        self.prompt = encoding.prompt
        self.register_buffer("input_ids", encoding.input_ids, persistent=False)  # (1, T)
        self.register_buffer("text_attention_mask", encoding.attention_mask, persistent=False)  # (1, T)
        self.register_buffer("token_to_phrase", encoding.token_to_phrase, persistent=False)  # (C, T)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.segmenter_size = int(segmenter.config.prompt_encoder_config.image_size)
        fpn = segmenter.config.vision_config.fpn_hidden_size
        embedding_channels = fpn + fpn // 4 + fpn // 8  # levels at strides 16, 8, 4 (after conv_s1 / conv_s0)
        self.projection = nn.Sequential(
            nn.Conv2d(embedding_channels, config.projection_hidden_dim, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(config.projection_hidden_dim, config.embedding_dim, kernel_size=1),
        )
        self.set_trainable(config.trainable)

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_configs(
        cls,
        config: TeacherConfig,
        detector_config: GroundingDinoConfig,
        segmenter_config: Sam2Config,
        tokenizer: PreTrainedTokenizerBase,
    ) -> FoundationTeacher:
        """A teacher with random weights from model configurations (benchmarks, tests, the meta device).

        Args:
            config: the teacher settings (paths unused).
            detector_config: Grounding-DINO (or MM-Grounding-DINO) configuration.
            segmenter_config: SAM2 configuration.
            tokenizer: the detector's tokenizer.

        Returns:
            The teacher.
        """
        detector = _DETECTOR_CLASSES[config.detector_kind](detector_config)
        return cls(config, detector, Sam2Model(segmenter_config), tokenizer)

    @classmethod
    def from_pretrained_dirs(cls, config: TeacherConfig) -> FoundationTeacher:
        """Load Grounding-DINO (with its tokenizer) and SAM2 from ``config.detector_path`` / ``segmenter_path``.

        Each path is a local directory in ``save_pretrained`` layout or a hub id already present in
        the local hub cache; nothing is downloaded. The projection head starts from random weights.

        Args:
            config: the teacher settings.

        Returns:
            The teacher.

        Raises:
            FileNotFoundError: naming the missing files and where to place them.
        """
        detector_class = _DETECTOR_CLASSES[config.detector_kind]
        check_weights(config)
        detector = _load_model(detector_class, config.detector_path, "Grounding-DINO detector", "detector_path")
        segmenter = _load_model(Sam2Model, config.segmenter_path, "SAM2 segmenter", "segmenter_path")
        tokenizer = load_tokenizer(config.detector_path)
        return cls(config, detector, segmenter, tokenizer)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the whole teacher: ``detector/`` (with tokenizer), ``segmenter/``, projection head, config.

        Args:
            directory: target folder (created).

        Returns:
            The folder, loadable with :meth:`from_pretrained`.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.detector.save_pretrained(root / _DETECTOR_DIR)
        self.tokenizer.save_pretrained(root / _DETECTOR_DIR)
        self.segmenter.save_pretrained(root / _SEGMENTER_DIR)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.projection.state_dict().items()}
        save_file(state, root / _PROJECTION_FILE)
        config = self.config.to_dict() | {"detector_path": _DETECTOR_DIR, "segmenter_path": _SEGMENTER_DIR}
        (root / _CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
        return root

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> FoundationTeacher:
        """Load a teacher written by :meth:`save_pretrained` (projection head included).

        Args:
            directory: the folder.
            **overrides: :class:`TeacherConfig` fields to change (for example ``trainable``).

        Returns:
            The teacher.

        Raises:
            FileNotFoundError: if the folder or its files are missing.
        """
        root = Path(directory)
        config_file = root / _CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no saved teacher at {str(root)!r}: expected {_CONFIG_FILE}, {_PROJECTION_FILE}, {_DETECTOR_DIR}/ and "
                f"{_SEGMENTER_DIR}/ as written by FoundationTeacher.save_pretrained"
            )
        data = json.loads(config_file.read_text(encoding="utf-8"))
        data["detector_path"] = str(root / data["detector_path"])
        data["segmenter_path"] = str(root / data["segmenter_path"])
        teacher = cls.from_pretrained_dirs(TeacherConfig.from_dict(data | overrides))
        teacher.projection.load_state_dict(load_file(root / _PROJECTION_FILE))
        return teacher

    # ---- trainable parts ---------------------------------------------------------------------------

    def part_modules(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """The modules (and loose parameters) of each part of :data:`TEACHER_PARTS`."""
        model, sam = self.detector.model, self.segmenter
        optional = [getattr(model, name, None) for name in ("query_position_embeddings", "reference_points")]
        return {
            "detector_backbone": [model.backbone],
            "text_backbone": [model.text_backbone],
            "detector_encoder": [model.input_proj_vision, model.text_projection, model.encoder, model.level_embed],
            "detection_head": [
                model.decoder, self.detector.bbox_embed, self.detector.class_embed,
                *[getattr(model, name) for name in ("enc_output", "enc_output_norm", "encoder_output_bbox_embed",
                                                    "encoder_output_class_embed") if hasattr(model, name)],
                *[module for module in optional if module is not None],
            ],
            "segmenter_backbone": [sam.vision_encoder, sam.no_memory_embedding],
            "prompt_encoder": [sam.prompt_encoder, sam.shared_image_embedding],
            "mask_decoder": [sam.mask_decoder],
            "projection_head": [self.projection],
        }  # fmt: skip

    def part_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter exactly once, by part.

        Raises:
            RuntimeError: if a parameter belongs to no part (an unexpected model layout).
        """
        seen: set[int] = set()
        parts: dict[str, list[nn.Parameter]] = {}
        for part, members in self.part_modules().items():
            parts[part] = []
            for member in members:
                params = [member] if isinstance(member, nn.Parameter) else list(member.parameters())
                for param in params:
                    if id(param) not in seen:
                        seen.add(id(param))
                        parts[part].append(param)
        orphans = [name for name, param in self.named_parameters() if id(param) not in seen]
        if orphans:
            raise RuntimeError(f"teacher parameters assigned to no part: {orphans[:5]} (of {len(orphans)})")
        return parts

    def set_trainable(self, trainable: Sequence[str]) -> None:
        """Train exactly the given parts (``requires_grad``); the others are frozen and kept in eval mode.

        Args:
            trainable: a subset of :data:`TEACHER_PARTS`.

        Raises:
            ValueError: naming unknown parts.
        """
        unknown = sorted(set(trainable) - set(TEACHER_PARTS))
        if unknown:
            raise ValueError(f"unknown trainable parts {unknown}; valid parts: {TEACHER_PARTS}")
        self.config = dataclasses.replace(self.config, trainable=tuple(trainable))
        for part, params in self.part_parameters().items():
            for param in params:
                param.requires_grad_(part in self.config.trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> FoundationTeacher:
        """Set train/eval mode; frozen parts always stay in eval mode (no dropout, fixed statistics)."""
        super().train(mode)
        for part, members in self.part_modules().items():
            if part not in self.config.trainable:
                for member in members:
                    if isinstance(member, nn.Module):
                        member.eval()
        return self

    def parameter_groups(self, trainable_only: bool = False) -> dict[str, list[nn.Parameter]]:
        """Parameters for the engine's two learning rates: ``"encoder"`` (the backbones) and ``"decoder"``.

        Args:
            trainable_only: drop parameters that do not require grad.

        Returns:
            ``{"encoder": [...], "decoder": [...]}``; together every parameter exactly once (when not filtered).
        """
        groups: dict[str, list[nn.Parameter]] = {"encoder": [], "decoder": []}
        for part, params in self.part_parameters().items():
            group = groups["encoder" if part in ENCODER_PARTS else "decoder"]
            group.extend(param for param in params if param.requires_grad or not trainable_only)
        return groups

    # ---- forward -----------------------------------------------------------------------------------

    def _normalize(self, images: Tensor) -> Tensor:
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)  # (B, 3, H, W)

    def detect(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Run Grounding-DINO on the class prompt.

        Args:
            images: RGB in ``[0, 1]``.

        Shape:
            - images: ``(B, 3, H, W)``
            - output: boxes ``(B, Q, 4)`` normalized ``(cx, cy, w, h)``; phrase scores ``(B, Q, C)``

        Returns:
            ``(boxes, phrase_scores)``.
        """
        pixels = self._normalize(images)  # (B, 3, H, W)
        height, width = images.shape[-2:]
        size = detector_input_size(height, width, self.config.detector_shortest_edge, self.config.detector_longest_edge)
        if size != (height, width):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)  # (B, 3, H', W')
        detector_config = self.detector.config
        proposals = sum(
            math.ceil(size[0] / 2**level) * math.ceil(size[1] / 2**level)
            for level in range(3, 3 + detector_config.num_feature_levels)
        )  # encoder tokens at strides 8, 16, 32, 64
        if detector_config.two_stage and proposals < detector_config.num_queries:
            raise ValueError(
                f"the detector input {size[0]}×{size[1]} gives {proposals} encoder tokens, fewer than the detector's "
                f"{detector_config.num_queries} queries; enlarge it with TeacherConfig.detector_shortest_edge "
                "(Grounding-DINO's processor uses 800)"
            )
        batch = images.shape[0]
        outputs = self.detector(
            pixel_values=pixels,
            input_ids=self.input_ids.expand(batch, -1),
            attention_mask=self.text_attention_mask.expand(batch, -1),
        )
        return outputs.pred_boxes, phrase_scores(outputs.logits, self.token_to_phrase)  # (B, Q, 4), (B, Q, C)

    def image_embeddings(self, images: Tensor) -> list[Tensor]:
        """SAM2's image embeddings, computed once per image (as ``Sam2Model.get_image_embeddings``, with grad).

        Shape:
            - images: ``(B, 3, H, W)`` in ``[0, 1]``, resized to SAM2's square input ``S × S``
            - output: ``[(B, F/8, S/4, S/4), (B, F/4, S/8, S/8), (B, F, S/16, S/16)]`` with ``F`` the FPN width

        Returns:
            The three levels, high resolution first.
        """
        size = self.segmenter_size
        pixels = F.interpolate(self._normalize(images), size=(size, size), mode="bilinear", align_corners=False)
        features = self.segmenter.get_image_features(pixels, return_dict=True).fpn_hidden_states  # [(HW, B, c)]
        features = list(features)
        features[-1] = features[-1] + self.segmenter.no_memory_embedding
        batch = images.shape[0]
        return [
            level.permute(1, 2, 0).reshape(batch, -1, *level_size)
            for level, level_size in zip(features, self.segmenter.config.vision_config.backbone_feature_sizes)
        ]  # [(B, c, h_l, w_l)]

    def segment(self, embeddings: list[Tensor], boxes: Tensor) -> Tensor:
        """SAM2 masks of box prompts, decoded against each image's one embedding, ``box_chunk`` boxes at a time.

        The boxes of an image share its image embedding, positional encoding and high-resolution
        features (:func:`~reference_pipeline.models.sam2_boxes.decode_boxes`: broadcast, not copied per
        box as ``Sam2Model`` does). What remains per box is inherent to SAM2: its two-way transformer
        updates the image embedding once per prompt, and each box's updated embedding is upscaled to its
        own stride-4 features: about 80 MiB per box at SAM2's 1024 input in a training pass (106 MiB with
        ``Sam2Model``'s per-box copies; ``benchmarks/results/bench_memory.md``). So with gradients on, each chunk of boxes is decoded
        under activation checkpointing: only the chunk being decoded (or, in the backward pass,
        recomputed) holds those tensors, and memory grows with ``box_chunk``, not with the number of
        boxes. Without gradients the chunks are decoded one after the other.

        Args:
            embeddings: :meth:`image_embeddings`.
            boxes: normalized ``(x0, y0, x1, y1)``.

        Shape:
            - boxes: ``(B, N, 4)``
            - output: ``(B, N, S/4, S/4)`` low-resolution mask logits

        Returns:
            Mask logits.
        """
        prompts = boxes * self.segmenter_size  # (B, N, 4) in SAM2 input pixels
        chunk = self.config.box_chunk
        if prompts.shape[1] <= chunk:
            return self._decode(prompts, *embeddings)
        parts = []
        for start in range(0, prompts.shape[1], chunk):
            part = prompts[:, start : start + chunk]  # (B, n, 4)
            if self._checkpoint_boxes(embeddings, part):
                parts.append(checkpoint(self._decode, part, *embeddings, use_reentrant=False))
            else:
                parts.append(self._decode(part, *embeddings))
        return torch.cat(parts, dim=1)  # (B, N, S/4, S/4)

    def _checkpoint_boxes(self, embeddings: list[Tensor], prompts: Tensor) -> bool:
        """Whether decoding builds an autograd graph (then a chunk's activations are recomputed in backward)."""
        needs_grad = torch.is_grad_enabled() and (
            any(level.requires_grad for level in embeddings) or prompts.requires_grad
            or any(param.requires_grad for param in self.segmenter.mask_decoder.parameters())
        )  # fmt: skip
        return needs_grad

    def _decode(self, prompts: Tensor, *embeddings: Tensor) -> Tensor:
        return decode_boxes(self.segmenter, prompts, embeddings)  # (B, n, S/4, S/4)

    def forward(self, images: Tensor) -> SegmentationOutput:
        """Text → boxes → masks → the pipeline's interface.

        Args:
            images: RGB in ``[0, 1]``.

        Shape:
            - images: ``(B, 3, H, W)``
            - mask_logits: ``(B, K, ceil(H/4), ceil(W/4))``
            - class_logits: ``(B, K, C + 1)``
            - pixel_embeddings: ``(B, D, ceil(H/4), ceil(W/4))``

        Returns:
            :class:`~reference_pipeline.models.outputs.SegmentationOutput` (no auxiliary outputs).

        Raises:
            ValueError: if ``images`` is not a float ``(B, 3, H, W)`` tensor.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float (B, 3, H, W) tensor in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        height, width = images.shape[-2:]
        grid = (math.ceil(height / 4), math.ceil(width / 4))
        boxes_cxcywh, scores = self.detect(images)  # (B, Q, 4), (B, Q, C)
        selection = select_boxes(boxes_cxcywh, scores, self.config.num_queries, self.config.box_threshold)
        boxes = selection.boxes.detach() if self.config.detach_boxes else selection.boxes  # (B, K, 4)
        embeddings = self.image_embeddings(images)
        prompted = max(1, int(selection.valid.sum(dim=1).max()))  # valid queries come first
        low_res = self.segment(embeddings, boxes[:, :prompted])  # (B, n, S/4, S/4)
        masks = F.interpolate(low_res, size=grid, mode="bilinear", align_corners=False)  # (B, n, h, w)
        masks = F.pad(masks, (0, 0, 0, 0, 0, self.config.num_queries - prompted), value=PADDED_MASK_LOGIT)
        mask_logits = masks.masked_fill(~selection.valid[..., None, None], PADDED_MASK_LOGIT)  # (B, K, h, w)
        class_logits = class_logits_from_phrase_scores(selection.scores, selection.valid)  # (B, K, C+1)
        levels = [F.interpolate(level, size=grid, mode="bilinear", align_corners=False) for level in embeddings]
        pixel_embeddings = self.projection(torch.cat(levels, dim=1))  # (B, D, h, w)
        return SegmentationOutput(mask_logits=mask_logits, class_logits=class_logits, pixel_embeddings=pixel_embeddings)


# --------------------------------------------------------------------------------------------------
# Loading helpers.
# --------------------------------------------------------------------------------------------------


def _expected_layout(path: str, files: Sequence[str]) -> str:
    return "\n".join(f"    {path}/{name}" for name in files)


def _is_hub_id(path: str) -> bool:
    """A path that is not on disk but names a repository in the local hub cache (``org/name``).

    ``weights/grounding-dino-large`` (the configs' default folder) has the shape of a hub id too: only an
    entry in the hub cache makes it one, so a missing folder gets the message naming its files.
    """
    if Path(path).exists() or path.count("/") != 1 or path.startswith((".", "/", "~")):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(path, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def missing_checkpoint_files(path: str | Path, *, tokenizer: bool = False) -> list[str]:
    """What a ``save_pretrained`` folder lacks: the folder itself, ``config.json``, weights, tokenizer files."""
    folder = Path(path)
    if not folder.is_dir():
        return ["the folder itself"]
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        missing.append("model.safetensors")
    if tokenizer and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer files")
    return missing


def _check_weights_dir(path: str, what: str, option: str, files: Sequence[str], tokenizer: bool) -> None:
    """Raise a ``FileNotFoundError`` saying which files to place where when a local weights folder is incomplete."""
    if _is_hub_id(path):
        return  # resolved in the hub cache by from_pretrained(local_files_only=True)
    missing = missing_checkpoint_files(path, tokenizer=tokenizer)
    if missing:
        hint = (
            "e.g. `huggingface-cli download IDEA-Research/grounding-dino-base --local-dir " + path + "` on a machine "
            "with network access (any Grounding-DINO / MM-Grounding-DINO checkpoint in transformers format; the "
            "paper's teacher is Swin-L)"
            if tokenizer
            else "e.g. `huggingface-cli download facebook/sam2.1-hiera-large --local-dir " + path + "` on a machine "
            "with network access"
        )
        raise FileNotFoundError(
            f"{what} weights not found at {path!r} (missing: {', '.join(missing)}). Nothing is downloaded: place "
            f"the checkpoint in transformers `save_pretrained` format there, or set TeacherConfig.{option}:\n"
            f"{_expected_layout(path, files)}\n{hint}, or pass a hub id already in the local hub cache."
        )


def check_weights(config: TeacherConfig) -> None:
    """Check that both weights folders (or cached hub ids) of ``config`` exist and hold their files.

    Cheap (no weights are read): the stages call it before any long work.

    Raises:
        FileNotFoundError: naming the folder, the files expected in it and how to get them.
    """
    _check_weights_dir(
        config.detector_path, "Grounding-DINO detector", "detector_path", _DETECTOR_LAYOUT, tokenizer=True
    )
    _check_weights_dir(config.segmenter_path, "SAM2 segmenter", "segmenter_path", _SEGMENTER_LAYOUT, tokenizer=False)


def _load_model(model_class: type, path: str, what: str, option: str) -> nn.Module:
    try:
        return model_class.from_pretrained(path, local_files_only=True)
    except OSError as error:  # a hub id missing from the cache
        raise FileNotFoundError(
            f"{what} weights {path!r} are neither a local folder nor in the local hub cache ({error}); place the "
            f"checkpoint in a folder and set TeacherConfig.{option} to it"
        ) from error
