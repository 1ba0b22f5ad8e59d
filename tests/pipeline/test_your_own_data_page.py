"""``docs/your_own_data.rst`` as a user follows it: every command and snippet of the page, in page order.

The page's ``bash`` blocks are read as written: ``NAME=value`` lines set the variables, every
``python -m reference_pipeline ...`` command (with its ``\\`` continuations) runs through the CLI's ``main``
after the variables are filled in with what this test wrote — the user dataset of ``conftest.py`` (other
sizes, one class with id 7, grayscale, sparse ids, an unlabeled folder) as ``$DATA``, a COCO source sharing
its class name as ``$SOURCE``, a tiny ``transformers`` Mask2Former as ``$CHECKPOINT`` and tiny Grounding-DINO
+ SAM2 folders as ``$WEIGHTS``. Commands that train get tiny sizes appended (later ``--set`` wins), the only
change to what the page says. The page's Python block then runs on the trained student.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import textwrap
from pathlib import Path

import pytest

from reference_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "your_own_data.rst"

_TINY_MODEL = ("encoder=efficientnet_lite0", "encoder_weights=null", "neck=fpn", "neck_channels=16", "hidden_dim=16",
               "decoder_layers=1", "num_queries=4", "num_heads=2", "feedforward_dim=32", "projection_hidden_dim=8",
               "embedding_dim=8", "mask_stride=4")
#: What the test appends to the page's training commands: tiny models, 2-step stages, small evaluation.
TINY = [
    "data.image_size=[48,64]", "threads=1", "contrast.num_negatives=8", "eval.batch_size=2", "eval.latency_repeats=1",
    "eval.top_k=20", "transformers_teacher.embedding_dim=8", "transformers_teacher.projection_hidden_dim=16",
    *[f"{model}.{setting}" for model in ("student", "demo_teacher") for setting in _TINY_MODEL],
    *[f"{stage}.train.{key}" for stage in ("teacher_pretrain", "teacher_finetune", "teacher_self_train", "distill",
                                           "refine", "baseline")
      for key in ("steps=2", "batch_size=2", "num_workers=0", "device=cpu", "checkpoint_every=0")],
]


def bash_blocks(text: str) -> list[str]:
    """The bodies of the page's ``.. code-block:: bash`` directives, dedented, in page order."""
    blocks = []
    for match in re.finditer(r"^([ \t]*)\.\. code-block:: bash[ \t]*\n\n((?:\1[ \t]+\S.*\n|[ \t]*\n)+)", text, re.MULTILINE):
        blocks.append(textwrap.dedent(match.group(2)))
    return blocks


def commands(block: str, variables: dict[str, str]) -> list[list[str]]:
    """The ``python -m reference_pipeline`` commands of a block as argv lists (variables filled in)."""
    joined = block.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        line = line.strip()
        assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
        if assignment:
            continue  # the page's placeholder paths; the test's own values are in `variables`
        if line.startswith("python -m reference_pipeline "):
            words = shlex.split(re.sub(r"\$([A-Z_]+)", lambda m: variables[m.group(1)], line))
            found.append(words[3:])
    return found


def _foundation_weights(folder: Path) -> Path:
    from transformers import GroundingDinoForObjectDetection, Sam2Model

    from reference_pipeline.models.tiny_configs import tiny_teacher_components

    parts = tiny_teacher_components(["widget"])
    GroundingDinoForObjectDetection(parts.detector_config).save_pretrained(folder / "grounding-dino-large")
    parts.tokenizer.save_pretrained(folder / "grounding-dino-large")
    Sam2Model(parts.segmenter_config).save_pretrained(folder / "sam2-hiera-large")
    return folder


@pytest.fixture
def page_variables(user_coco, tiny_mask2former, tmp_path: Path) -> dict[str, str]:
    data = user_coco["train_annotations"].parent  # train/, train.json, val/, val.json, unlabeled/
    source = tmp_path / "coco"
    (source / "annotations").mkdir(parents=True)
    shutil.copy(user_coco["train_annotations"], source / "annotations" / "instances_train2017.json")
    (source / "train2017").symlink_to(user_coco["root"], target_is_directory=True)
    return {"DATA": str(data), "SOURCE": str(source), "CHECKPOINT": str(tiny_mask2former),
            "WEIGHTS": str(_foundation_weights(tmp_path / "weights"))}


def test_the_page_runs_as_written(page_variables, user_coco, tmp_path: Path, monkeypatch, capsys) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(workdir)
    text = PAGE.read_text()
    ran: list[str] = []
    for block in bash_blocks(text):
        for argv in commands(block, page_variables):
            command = argv[0]
            extra = [] if command in ("predict", "export") else [a for s in TINY for a in ("--set", s)]
            assert main([*argv, *extra, "--no-progress"] if command != "show-config" else [*argv, *extra]) == 0, argv
            ran.append(command if command != "run" else f"run {argv[argv.index('--run-dir') + 1]}")
    assert ran == ["show-config", "run runs/mine", "run runs/mine-cpu", "run runs/mine-coco-source",
                   "run runs/mine-mask2former", "run runs/mine-foundation", "predict", "export"]
    for run_dir in ("runs/mine", "runs/mine-cpu", "runs/mine-coco-source", "runs/mine-mask2former",
                    "runs/mine-foundation"):
        assert (workdir / run_dir / "report.md").is_file(), run_dir
    results = json.loads((workdir / "runs/mine/predictions/results.json").read_text())
    assert all(r["category_id"] == 7 and r["image_id"] in (9001, 9002) for r in results)
    assert (workdir / "runs/mine/student.onnx").stat().st_size > 0

    # the Python block, on an image of the user's
    shutil.copy(next(Path(user_coco["val_images"]).glob("*.png")), workdir / "my_image.png")
    (python_block,) = re.findall(r"^\.\. code-block:: python\n\n((?:[ \t]+\S.*\n|[ \t]*\n)+)", text, re.MULTILINE)
    namespace: dict = {}
    exec(compile(textwrap.dedent(python_block), str(PAGE), "exec"), namespace)  # noqa: S102 - the page's snippet
    assert namespace["categories"] == [7] * len(namespace["instances"].class_ids)
