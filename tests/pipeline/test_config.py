"""Config machinery: YAML + overrides into nested dataclasses, with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from reference_pipeline.config import (
    ConfigError,
    PipelineConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


@dataclass
class ModelSection:
    width: int = 8
    dropout: float = 0.1
    backbone: str = "dinov2-s"
    weights: Path | None = None


@dataclass
class StageSection:
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelSection = field(default_factory=ModelSection)
    mode: Literal["fusion", "uniform"] = "fusion"
    fractions: tuple[float, ...] = (0.05, 0.1)
    names: list[str] = field(default_factory=lambda: ["a"])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_overrides():
    assert load_config(StageSection) == StageSection()


def test_yaml_then_overrides_set_nested_keys(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 50\n  lr_encoder: 1e-4\nmodel:\n  width: 4\n")
    cfg = load_config(StageSection, path, ["train.steps=70", "model.dropout=0.0", "fractions=[0.3]"])
    assert cfg.train.steps == 70  # the override wins over the file
    assert cfg.train.lr_encoder == 1e-4  # YAML 1.1 reads 1e-4 as a string: coerced to float
    assert cfg.model.width == 4 and cfg.model.dropout == 0.0
    assert cfg.fractions == (0.3,)
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched keys keep their defaults


def test_typo_in_a_nested_key_lists_the_valid_keys_and_suggests_one(tmp_path):
    path = _write(tmp_path, "train:\n  stpes: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(StageSection, path)
    message = str(caught.value)
    assert "'train.stpes'" in message and "Did you mean 'steps'" in message
    assert "batch_size" in message and "lr_encoder" in message  # the valid keys at that level
    assert str(path) in message


def test_typo_in_an_override_is_rejected_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.widht'.*width.*Did you mean 'width'"):
        load_config(StageSection, None, ["model.widht=3"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.steps=abc", "train.steps", "int"),
        ("train.steps=2.5", "train.steps", "int"),
        ("train.amp=fp32", "train.amp", "one of"),
        ("train.betas=[0.9]", "train.betas", "tuple"),
        ("model.dropout=true", "model.dropout", "float"),
        ("train.grad_clip=[1]", "train.grad_clip", "float | None"),
    ],
)
def test_bad_value_names_key_value_and_expected_type(override, key, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(StageSection, None, [override])
    message = str(caught.value)
    assert repr(key) in message and expected in message
    assert override.split("=", 1)[1].strip("[]").lower() in message.lower()  # the value


def test_a_value_the_dataclass_rejects_names_the_section():
    with pytest.raises(ConfigError, match=r"train: steps must be >= 1, got 0"):
        load_config(StageSection, None, ["train.steps=0"])


def test_string_fields_take_the_override_text_as_written():
    cfg = load_config(StageSection, None, ["model.backbone=001", "model.weights=/w/model.safetensors"])
    assert cfg.model.backbone == "001"
    assert cfg.model.weights == Path("/w/model.safetensors")
    assert load_config(StageSection, None, ["model.weights=null"]).model.weights is None


def test_a_section_replaced_by_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="'train'.*mapping"):
        config_from_dict(StageSection, {"train": 3})


def test_malformed_override_and_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(StageSection, None, ["train.steps"])
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(StageSection, tmp_path / "nowhere.yaml")
    with pytest.raises(ConfigError, match="(?s)invalid YAML.*line 2"):
        load_config(StageSection, _write(tmp_path, "train:\n  steps: [1\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(StageSection, _write(tmp_path, "- 1\n- 2\n"))


def test_yaml_round_trip_gives_an_equal_config(tmp_path):
    cfg = load_config(
        StageSection,
        None,
        ["train.milestones=[0.5,0.8]", "model.weights=/x", "names=[b,c]", "train.grad_clip=0.1", "mode=uniform"],
    )
    path = save_config(cfg, tmp_path / "sub" / "saved.yaml")
    assert load_config(StageSection, path) == cfg
    assert config_to_dict(cfg)["train"]["milestones"] == [0.5, 0.8]
    assert not list(path.parent.glob(".*.tmp"))


def test_pipeline_defaults_hold_the_table_7_values():
    cfg = PipelineConfig()
    teacher, student = cfg.teacher_self_train.train, cfg.distill.train
    assert (teacher.lr_encoder, teacher.lr_decoder, teacher.batch_size, teacher.weight_decay) == (5e-5, 5e-5, 4, 0.01)
    assert teacher.scheduler == "multistep" and teacher.milestones == (0.9, 0.95) and teacher.grad_clip is None
    assert (student.lr_encoder, student.lr_decoder, student.batch_size, student.weight_decay) == (5e-5, 5e-4, 8, 0.05)
    assert student.scheduler == "poly" and student.poly_power == 0.9 and student.grad_clip == 0.1
    assert student.betas == teacher.betas == (0.9, 0.999)
