"""Learnability of the demo models: mask AP vs steps and vs wall time, per decoder layer, per setting.

Each setting trains one freshly initialised model (the pipeline's :class:`~reference_pipeline.models.student.Student`
with the pipeline's :class:`~reference_pipeline.losses.SetCriterion`) with plain supervision on the synthetic
``source_train`` images, and scores COCO mask AP at fixed steps on held-out source images and on the shifted
``target_val`` split — for the final prediction *and* for every intermediate one (``q`` = from the learned
queries before any decoder layer, ``L1`` … = after each layer). The resolution ceiling of each image size / object
scale / mask stride (:func:`~reference_pipeline.evaluate.resolution_ceiling`) is reported beside it.

The loop is the engine's recipe reduced to what matters here (AdamW with an encoder and a decoder learning rate,
linear warm-up then poly decay, global gradient clipping, random horizontal flips) so that one process can train
many settings in turn; the stages of the demo use :func:`reference_pipeline.engine.train` with the same pieces.

Run: ``PYTHONPATH=. python benchmarks/bench_learning.py [--settings a b ...] [--steps 1200] [--smoke]``.
Writes ``benchmarks/results/bench_learning.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_RESULTS_DIR, environment_info, markdown_table
from reference_pipeline.data.structures import InstanceSample
from reference_pipeline.data.synthetic import THING_CLASSES, SyntheticConfig, synthetic_sample
from reference_pipeline.evaluate import CocoMaskEvaluator, resolution_ceiling
from reference_pipeline.losses import CriterionConfig, SetCriterion
from reference_pipeline.models.demo import demo_student_config, demo_teacher_config
from reference_pipeline.models.outputs import InstanceTargets, SegmentationOutput
from reference_pipeline.models.student import Student


@dataclass
class Setting:
    """One learnability run: data scale, model and optimisation.

    Attributes:
        name: label in the tables and plot.
        model: ``"student"`` or ``"teacher"`` (the demo configurations of :mod:`reference_pipeline.models.demo`), or
            ``"transformers"`` (:class:`TransformersMask2Former`, the reference).
        model_overrides: :class:`~reference_pipeline.models.student.StudentConfig` fields changed.
        image_size: square image side.
        object_scale: :attr:`~reference_pipeline.data.synthetic.SyntheticConfig.object_scale`.
        lr_encoder: encoder learning rate.
        lr_decoder: learning rate of everything else.
        warmup_steps: linear warm-up from 1 % of the rates.
        grad_clip: global gradient-norm clip (``None``: off).
        weight_decay: AdamW weight decay.
        batch_size: images per step.
    """

    name: str
    model: str = "student"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int = 128
    object_scale: float = 1.0
    lr_encoder: float = 4e-4
    lr_decoder: float = 2e-3
    warmup_steps: int = 20
    grad_clip: float | None = None
    weight_decay: float = 0.05
    batch_size: int = 8


#: The demo student as it was before this study (32 queries, dropout 0.1, stride-4 masks).
OLD_STUDENT: dict[str, Any] = {"num_queries": 32, "dropout": 0.1, "mask_stride": 4, "neck_norm": "none",
                               "decoder_init": "torch"}
#: The demo's optimisation after the study: decoder 1e-3, encoder 2e-4, gradient norm clipped at 1.
NEW_RATES: dict[str, Any] = {"lr_encoder": 2e-4, "lr_decoder": 1e-3, "grad_clip": 1.0, "object_scale": 1.5}

#: The settings of the study; ``--settings`` picks some by name (the first two are the smoke run's).
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("demo-student", **NEW_RATES),  # the demo student as shipped (configs/demo.yaml)
        Setting("demo-old", model_overrides=OLD_STUDENT),  # the demo student and rates before the study
        # transformers' own Mask2FormerForUniversalSegmentation at the old settings: the reference
        Setting("hf-demo-old", model="transformers", model_overrides={"num_queries": 32, "dropout": 0.1}),
        Setting("demo-teacher", model="teacher", **NEW_RATES),  # the demo teacher as shipped
        Setting("demo-student-stride4", model_overrides={"mask_stride": 4}, **NEW_RATES),
        Setting("demo-student-lr2e-3", **{**NEW_RATES, "lr_encoder": 4e-4, "lr_decoder": 2e-3}),
        Setting("query-selection", model_overrides={"query_init": "selected"}, **NEW_RATES),
        Setting("fine-levels", model_overrides={"decoder_levels": "fine"}, **NEW_RATES),
        # the old settings with the two fixes found by comparing with transformers' own model
        Setting("demo-old-norm", model_overrides={**OLD_STUDENT, "neck_norm": "group", "decoder_init": "transformers"}),
        Setting("demo-old-init", model_overrides={**OLD_STUDENT, "decoder_init": "transformers"}),
        Setting("old-rates-new-model", model_overrides={}, object_scale=1.5),  # new model, old rates (no clip)
    ]
}


# --------------------------------------------------------------------------------------------- data


def render(config: SyntheticConfig, split: str, indices: range) -> list[InstanceSample]:
    """Render images of one split in memory."""
    return [synthetic_sample(config, split, i) for i in indices]


def to_targets(samples: list[InstanceSample], flips: list[bool]) -> tuple[torch.Tensor, list[InstanceTargets]]:
    """A training batch: images ``(B, 3, H, W)`` in ``[0, 1]`` and per-image targets, flipped where asked."""
    images, targets = [], []
    for sample, flip in zip(samples, flips):
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        masks = torch.from_numpy(sample.masks[~sample.is_crowd])  # (M, H, W)
        if flip:
            image, masks = image.flip(-1), masks.flip(-1)
        images.append(image)
        targets.append(InstanceTargets(masks=masks.float(), class_ids=torch.from_numpy(sample.class_ids[~sample.is_crowd])))
    return torch.stack(images), targets


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def per_layer_ap(model: Student, samples: list[InstanceSample], batch_size: int = 20) -> dict[str, float]:
    """Mask AP of every prediction stage: ``q`` (queries before any layer), ``L1`` … ``Ln`` (``Ln`` = final)."""
    model.eval()
    evaluators: dict[str, CocoMaskEvaluator] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images, _ = to_targets(chunk, [False] * len(chunk))
        out = model(images)
        stages = [(a["masks_queries_logits"], a["class_queries_logits"]) for a in out.aux_outputs]
        stages.append((out.mask_logits, out.class_logits))
        for index, (masks, classes) in enumerate(stages):
            name = "q" if index == 0 else f"L{index}"
            evaluator = evaluators.setdefault(name, CocoMaskEvaluator(THING_CLASSES))
            for i, sample in enumerate(chunk):
                evaluator.add_model_output(sample, masks[i], classes[i])
    model.train()
    return {name: round(evaluator.compute()["AP"], 2) for name, evaluator in evaluators.items()}


# --------------------------------------------------------------------------------------------- training


class TransformersMask2Former(torch.nn.Module):
    """``transformers``' own ``Mask2FormerForUniversalSegmentation``, sized like the demo student, as a reference.

    Same ImageNet EfficientNet-Lite0 encoder (a timm backbone), ``transformers``' multi-scale deformable-attention
    pixel decoder instead of our FPN, and the same masked-attention decoder module, fed the way ``transformers``
    feeds it. Outputs are converted to :class:`~reference_pipeline.models.outputs.SegmentationOutput` so the
    same criterion and evaluation apply.
    """

    mask_stride = 4

    def __init__(self, num_classes: int, **overrides: Any) -> None:
        super().__init__()
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, TimmBackboneConfig

        from reference_pipeline.models.student import load_efficientnet_lite_weights

        backbone = TimmBackboneConfig(backbone="tf_efficientnet_lite0", out_indices=(1, 2, 3, 4),
                                      use_pretrained_backbone=False)
        sizes = {"feature_size": 64, "mask_feature_size": 64, "hidden_dim": 64, "encoder_layers": 2,
                 "decoder_layers": 4, "num_queries": 12, "num_attention_heads": 4, "dim_feedforward": 256,
                 "encoder_feedforward_dim": 256, **overrides}
        config = Mask2FormerConfig(backbone_config=backbone, num_labels=num_classes, **sizes)
        self.model = Mask2FormerForUniversalSegmentation(config)
        # transformers reuses `dropout` as the decoder's layer-drop probability, and a dropped layer leaves the next
        # one an attention mask sized for the wrong level (a shape error at dropout > 0): no layer drop, as ours.
        self.model.model.transformer_module.decoder.layerdrop = 0.0
        load_efficientnet_lite_weights(self.model.model.pixel_level_module.encoder._backbone, 0)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        encoder = list(self.model.model.pixel_level_module.encoder.parameters())
        ids = {id(p) for p in encoder}
        return {"encoder": encoder, "decoder": [p for p in self.parameters() if id(p) not in ids]}

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        out = self.model(pixel_values=(images - self.mean) / self.std, output_auxiliary_logits=True)
        masks = out.masks_queries_logits  # (B, K, H/4, W/4)
        return SegmentationOutput(mask_logits=masks, class_logits=out.class_queries_logits,
                                  pixel_embeddings=masks[:, :0], aux_outputs=list(out.auxiliary_logits))


def build_model(setting: Setting) -> torch.nn.Module:
    """The demo student or teacher with the setting's overrides (ImageNet encoder weights), or the reference."""
    if setting.model == "transformers":
        return TransformersMask2Former(len(THING_CLASSES), **setting.model_overrides)
    make = demo_student_config if setting.model == "student" else demo_teacher_config
    return Student(make(len(THING_CLASSES), **setting.model_overrides))


def lr_factor(step: int, steps: int, warmup: int) -> float:
    r"""Linear warm-up from 1 % then poly decay: :math:`w_t (1 - t/T)^{0.9}`."""
    warm = 0.01 + 0.99 * step / warmup if step < warmup else 1.0
    return warm * (1.0 - step / steps) ** 0.9


def run_setting(
    setting: Setting, steps: int, eval_at: list[int], num_train: int, num_eval: int, seed: int = 0,
    log: Any = print, eval_split: str = "heldout",
) -> dict[str, Any]:
    """Train one setting from scratch; AP per layer on source and target images at ``eval_at``.

    ``eval_split="heldout"`` scores source images the model never trains on; ``"train"`` scores the first
    ``num_eval`` training images (how well it fits, for tiny smoke runs).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = SyntheticConfig(image_size=(setting.image_size, setting.image_size), object_scale=setting.object_scale)
    train = render(data, "source_train", range(num_train))
    first = 0 if eval_split == "train" else num_train
    source_val = render(data, "source_train", range(first, first + num_eval))
    target_val = render(data, "target_val", range(num_eval))
    model = build_model(setting)
    model.train()
    stride = getattr(model, "mask_stride", 4)
    criterion = SetCriterion(len(THING_CLASSES), CriterionConfig(train_num_points=1024, mask_stride=stride))
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW(
        [{"params": groups["encoder"], "lr": setting.lr_encoder}, {"params": groups["decoder"], "lr": setting.lr_decoder}],
        weight_decay=setting.weight_decay,
    )
    base = [g["lr"] for g in optimizer.param_groups]
    curve: list[dict[str, Any]] = []
    train_seconds = 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * lr_factor(step - 1, steps, setting.warmup_steps)
        picks = rng.integers(0, len(train), setting.batch_size)
        images, targets = to_targets([train[i] for i in picks], list(rng.random(setting.batch_size) < 0.5))
        losses = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if setting.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), setting.grad_clip)
        optimizer.step()
        train_seconds += time.perf_counter() - start
        if step in eval_at:
            record = {
                "step": step, "train_seconds": round(train_seconds, 1), "loss": round(float(losses["total"].detach()), 3),
                "source": per_layer_ap(model, source_val), "target": per_layer_ap(model, target_val),
            }
            curve.append(record)
            log(f"[{setting.name}] step {step}: {record}")
    ceiling = {
        split: round(resolution_ceiling(samples, THING_CLASSES, image_size=(setting.image_size,) * 2, stride=stride)["AP"], 1)
        for split, samples in (("source", source_val), ("target", target_val))
    }
    return {"setting": dataclasses.asdict(setting), "curve": curve, "ceiling": ceiling,
            "seconds_per_step": round(train_seconds / steps, 3)}


# --------------------------------------------------------------------------------------------- ceilings

#: (image side, object scale, mask stride) combinations whose resolution ceiling is tabulated.
CEILING_GRID: tuple[tuple[int, float, int], ...] = (
    (128, 1.0, 4), (128, 1.5, 4), (128, 2.0, 4), (192, 1.5, 4), (256, 1.0, 4), (256, 1.5, 4),
    (128, 1.0, 2), (128, 1.5, 2), (160, 1.5, 2),
)


def ceiling_table(grid: tuple[tuple[int, float, int], ...], num_images: int) -> list[dict[str, Any]]:
    """Resolution ceiling (AP of perfect stride-``s`` masks) and instance statistics per grid point and domain."""
    rows = []
    for side, scale, stride in grid:
        data = SyntheticConfig(image_size=(side, side), object_scale=scale)
        row: dict[str, Any] = {"image_size": side, "object_scale": scale, "mask_stride": stride}
        for domain, split in (("source", "source_train"), ("target", "target_val")):
            samples = render(data, split, range(num_images))
            areas = [int(m.sum()) for sample in samples for m in sample.masks]
            ceiling = resolution_ceiling(samples, THING_CLASSES, image_size=(side, side), stride=stride)
            row[domain] = {"AP": round(ceiling["AP"], 1), "AP50": round(ceiling["AP50"], 1),
                           "instances_per_image": round(len(areas) / max(len(samples), 1), 1),
                           "median_area": float(np.median(areas)) if areas else 0.0}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- report


def final_layer(record: dict[str, float]) -> float:
    """AP of the final prediction (the highest layer index)."""
    return record[max((k for k in record if k.startswith("L")), key=lambda k: int(k[1:]), default="q")]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """AP of the final layer vs steps and vs training seconds, source (solid) and target (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        name = result["setting"]["name"]
        steps = [r["step"] for r in result["curve"]]
        seconds = [r["train_seconds"] / 60 for r in result["curve"]]
        for split, style in (("source", "-"), ("target", "--")):
            values = [final_layer(r[split]) for r in result["curve"]]
            label = f"{name} ({split})"
            line = axes[0].plot(steps, values, style, marker="o", markersize=3, label=label)[0]
            axes[1].plot(seconds, values, style, marker="o", markersize=3, color=line.get_color())
    axes[0].set(xlabel="step", ylabel="mask AP (final layer)", title="AP vs steps")
    axes[1].set(xlabel="training minutes (1 thread)", ylabel="mask AP (final layer)", title="AP vs wall time")
    axes[0].legend(fontsize=6)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per setting × evaluation step, every layer's AP."""
    rows = []
    for result in results:
        s = result["setting"]
        for record in result["curve"]:
            layers = " / ".join(f"{k} {v:.1f}" for k, v in record["source"].items())
            target = " / ".join(f"{k} {v:.1f}" for k, v in record["target"].items())
            rows.append([s["name"], record["step"], f"{record['train_seconds'] / 60:.1f}", layers, target,
                         f"{result['ceiling']['source']:.0f} / {result['ceiling']['target']:.0f}"])
    return markdown_table(["setting", "step", "train min", "source AP per layer", "target AP per layer",
                           "ceiling src / tgt"], rows)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen settings one after another and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-eval", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2 settings × 4 steps on 8 images (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--tag", default="bench_learning", help="file name stem of the results")
    parser.add_argument("--ceiling-images", type=int, default=60, help="images per domain for the ceiling table")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="no training: combine the results of earlier runs (their JSON files) into one report")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        payloads = [json.loads(path.read_text()) for path in args.merge]
        write_outputs(args.out, args.tag, {"environment": payloads[0]["environment"], "steps": payloads[0]["steps"],
                                           "ceilings": payloads[0].get("ceilings", []),
                                           "results": [r for p in payloads for r in p["results"]],
                                           "merged_from": [str(path) for path in args.merge]},
                      num_train=args.num_train, num_eval=args.num_eval, threads=args.threads,
                      ceiling_images=args.ceiling_images)
        return
    grid = CEILING_GRID
    if args.smoke:
        args.settings, args.steps, args.eval_every, args.num_train, args.num_eval = args.settings[:2], 4, 2, 8, 4
        grid, args.ceiling_images = grid[:2], 4
    ceilings = ceiling_table(grid, args.ceiling_images)
    eval_at = sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})
    results = [
        run_setting(SETTINGS[name], args.steps, eval_at, args.num_train, args.num_eval, args.seed)
        for name in args.settings
    ]
    payload = {"environment": environment_info(torch.device("cpu")), "steps": args.steps, "ceilings": ceilings,
               "results": results}
    write_outputs(args.out, args.tag, payload, num_train=args.num_train, num_eval=args.num_eval,
                  threads=args.threads, ceiling_images=args.ceiling_images)


def write_outputs(out: Path, tag: str, payload: dict[str, Any], *, num_train: int, num_eval: int, threads: int,
                  ceiling_images: int) -> None:
    """``<tag>.json``, ``<tag>.md`` and ``<tag>.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results, ceilings = payload["results"], payload["ceilings"]
    (out / f"{tag}.json").write_text(json.dumps(payload, indent=1))
    plot(results, out / f"{tag}.png")
    ceiling_rows = [[c["image_size"], c["object_scale"], c["mask_stride"],
                     f"{c['source']['AP']:.1f} / {c['source']['AP50']:.1f}",
                     f"{c['target']['AP']:.1f} / {c['target']['AP50']:.1f}",
                     f"{c['source']['median_area']:.0f} / {c['target']['median_area']:.0f}"] for c in ceilings]
    steps = sorted({r["curve"][-1]["step"] for r in results if r["curve"]})
    text = (f"# Learnability of the demo models\n\n## Resolution ceilings\n\nAP / AP50 of perfect masks on the "
            f"stride-s grid ({ceiling_images} images per domain):\n\n"
            + markdown_table(["image", "object scale", "mask stride", "source", "target", "median area src / tgt"],
                             ceiling_rows)
            + f"\n\n## Learning curves\n\n{'/'.join(map(str, steps))} steps, {num_train} source training images, "
            f"{num_eval} held-out source and target images, {threads} thread(s); `q` is the prediction from the "
            f"queries before any decoder layer, `L1`… after each layer (the last is the model's output).\n\n"
            f"{report(results)}\n")
    (out / f"{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
