"""Tiny random configurations of the teacher's model classes, built offline (tests, benchmark smoke runs).

The tiny models are the real ``transformers`` classes at toy sizes: Grounding-DINO with ``d_model`` 32,
a 4-stage Swin of width 8 and a 1-layer BERT over a vocabulary written here so that ``[CLS]`` = 101,
``[SEP]`` = 102, ``.`` = 1012 and ``?`` = 1029 (the ids Grounding-DINO hard-codes); SAM2 with a
4-stage Hiera whose three feature levels are ``image/4``, ``image/8`` and ``image/16``. They exercise
every code path of :class:`~reference_pipeline.models.teacher.FoundationTeacher` in milliseconds.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import (
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    MMGroundingDinoConfig,
    PreTrainedTokenizerBase,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2MaskDecoderConfig,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
    SwinConfig,
)

from .teacher import BERT_SPECIAL_TOKEN_IDS, DetectorKind

__all__ = [
    "TINY_VOCAB_SIZE",
    "TeacherComponents",
    "tiny_grounding_dino_config",
    "tiny_sam2_config",
    "tiny_teacher_components",
    "tiny_tokenizer",
    "tiny_vocabulary",
]

#: Size of the tiny word-piece vocabulary: just past ``?`` = 1029.
TINY_VOCAB_SIZE = 1030


def tiny_vocabulary(words: Sequence[str] = ()) -> list[str]:
    """A BERT-style word-piece vocabulary with the special tokens at BERT's ids.

    ``[PAD]`` = 0, ``[UNK]`` = 100, ``[CLS]`` = 101, ``[SEP]`` = 102, ``[MASK]`` = 103, ``.`` = 1012,
    ``?`` = 1029; then the given whole words and the letters ``a``–``z`` with their ``##`` continuations
    (so every lower-case word tokenizes); the remaining slots are ``[unusedN]``.

    Args:
        words: whole words to add (lower case, at most ~800).

    Returns:
        The tokens, index = id.

    Raises:
        ValueError: if the words do not fit below id 1012.
    """
    vocabulary = ["[PAD]"] + [f"[unused{index}]" for index in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list(string.ascii_lowercase) + ["##" + letter for letter in string.ascii_lowercase]
    extra = [word for word in dict.fromkeys(word.lower() for word in words) if word not in pieces]
    vocabulary += pieces + extra
    if len(vocabulary) > BERT_SPECIAL_TOKEN_IDS["."]:
        raise ValueError(f"{len(words)} words do not fit the tiny vocabulary (at most {1012 - 156})")
    vocabulary += [f"[unused{index}]" for index in range(len(vocabulary), BERT_SPECIAL_TOKEN_IDS["."])] + ["."]
    vocabulary += [f"[unused{index}]" for index in range(len(vocabulary), BERT_SPECIAL_TOKEN_IDS["?"])] + ["?"]
    return vocabulary


def tiny_tokenizer(words: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """A fast BERT tokenizer over :func:`tiny_vocabulary` (built with ``vocab=``: ``vocab_file=`` is ignored).

    Args:
        words: whole words to add, e.g. the words of the class names.

    Returns:
        The tokenizer.
    """
    vocabulary = tiny_vocabulary(words)
    return BertTokenizerFast(vocab={token: index for index, token in enumerate(vocabulary)})


def tiny_grounding_dino_config(kind: DetectorKind = "grounding-dino", num_queries: int = 20) -> GroundingDinoConfig:
    """Grounding-DINO at toy size: ``d_model`` 32, Swin width 8 (1 block per stage), 1-layer BERT.

    Args:
        kind: ``"grounding-dino"`` or ``"mm-grounding-dino"``.
        num_queries: detector queries ``Q``.

    Returns:
        The configuration. Inputs need one side longer than 64 pixels: the extra stride-64 feature level
        goes through ``GroupNorm(32, 32)`` (one channel per group), which needs more than one pixel.
    """
    swin = SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
        out_indices=[2, 3, 4],
    )  # fmt: skip
    bert = BertConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    config_class = MMGroundingDinoConfig if kind == "mm-grounding-dino" else GroundingDinoConfig
    return config_class(
        backbone_config=swin, text_config=bert, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=num_queries,
        max_text_len=32, encoder_n_points=2, decoder_n_points=2,
    )  # fmt: skip


def tiny_sam2_config(image_size: int = 64) -> Sam2Config:
    """SAM2 at toy size: Hiera width 8 with feature levels at ``image/4``, ``/8``, ``/16``; FPN width 32.

    Args:
        image_size: SAM2's square input ``S`` (a multiple of 32).

    Returns:
        The configuration.

    Raises:
        ValueError: if ``image_size`` is not a positive multiple of 32.
    """
    if image_size < 32 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
    hiera = Sam2HieraDetConfig(
        hidden_size=8, num_attention_heads=1, image_size=[image_size, image_size], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 2, 2], global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )  # fmt: skip
    sizes = [[image_size // stride] * 2 for stride in (4, 8, 16)]
    vision = Sam2VisionConfig(
        backbone_config=hiera, backbone_channel_list=[64, 32, 16, 8], backbone_feature_sizes=sizes, fpn_hidden_size=32
    )
    return Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=16),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=32, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )


@dataclass
class TeacherComponents:
    """Configurations and tokenizer of a teacher (build with ``FoundationTeacher.from_configs``).

    Attributes:
        detector_config: Grounding-DINO configuration.
        segmenter_config: SAM2 configuration.
        tokenizer: the detector's tokenizer.
    """

    detector_config: GroundingDinoConfig
    segmenter_config: Sam2Config
    tokenizer: PreTrainedTokenizerBase


def tiny_teacher_components(
    class_names: Sequence[str],
    kind: DetectorKind = "grounding-dino",
    segmenter_image_size: int = 64,
    detector_queries: int = 20,
) -> TeacherComponents:
    """Tiny random Grounding-DINO + SAM2 configurations and a tokenizer knowing the class names' words.

    Args:
        class_names: the classes (their words enter the vocabulary as whole words).
        kind: ``"grounding-dino"`` or ``"mm-grounding-dino"``.
        segmenter_image_size: SAM2's square input size.
        detector_queries: Grounding-DINO's queries ``Q``.

    Returns:
        :class:`TeacherComponents`.
    """
    words = [word for name in class_names for word in name.lower().split()]
    return TeacherComponents(
        detector_config=tiny_grounding_dino_config(kind, detector_queries),
        segmenter_config=tiny_sam2_config(segmenter_image_size),
        tokenizer=tiny_tokenizer(words),
    )
