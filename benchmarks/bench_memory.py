"""Peak memory of every stage at the paper's image size, before renting GPUs (issue 19).

Each configuration runs in a **fresh worker process** (forked from a forkserver that has only imported
torch, transformers and the pipeline), so peaks never mix. A worker builds the models with random
weights at their real shapes (Grounding-DINO Swin-L + SAM2 Hiera-L, DINOv2-S student; nothing is
downloaded), builds one batch with the pipeline's own data path (two views of 1024×2048 images at
``--image-size``, pseudo-labels as RLE), primes AdamW's state, then measures one step:

* CPU: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the step; glibc's mmap
  threshold fixed so freed buffers leave RSS) — reported as the step's peak minus the worker's RSS right
  after its imports, i.e. what the models, optimizer, data and activations take;
* CUDA: ``torch.cuda.max_memory_allocated`` (weights, optimizer state, activations).

Configurations (all at batch 1 per process; per-image and per-box slopes are fitted from 2–3 sizes):

* ``sam2_decoder``: SAM2 Hiera-L's mask decoder, forward + backward, on real-shape image embeddings of
  one image, for several box counts: ``transformers`` (``Sam2Model``'s own decoding, one copy of the
  image features per box), ``shared`` (:func:`reference_pipeline.models.sam2_boxes.decode_boxes`) and
  ``shared`` in checkpointed chunks of ``box_chunk`` (what the teacher runs);
* ``teacher_backbone``: the frozen teacher's forward on one image (Swin-L, BERT, fusion encoder, Hiera-L;
  one box), no gradient;
* ``pseudo_label``: the teacher's inference with K boxes at batch 1 and 2, plus pseudo-labelling at the
  native 1024×2048;
* ``teacher_finetune`` / ``teacher_self_train``: one training step of the teacher (default trainable
  parts) with the stage's objective, batch 1 (+ 1 pseudo-labeled image for self-training);
* ``student`` / ``distill`` / ``refine``: one training step of the paper's student; ``student`` is the
  distill step without ``L_pxl`` (so ``L_pxl`` = distill − student), at 1 + 1 and 2 + 2 images;
* ``pseudo_store``: the pseudo-labels of unlabeled images held in memory, dense (what ``PseudoInstances``
  held before issue 19) and RLE, to extrapolate to a whole split.

``--smoke`` runs tiny models at 64×128 in well under a minute (``tests/pipeline/test_bench_memory_smoke.py``).
Results: ``benchmarks/results/bench_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    _configure_worker_malloc,
    _read_proc_status,
    _reset_peak_rss,
    _trim_heap,
    environment_info,
    format_bytes,
    markdown_table,
    write_report,
)

NAME = "bench_memory"
GIB = 2**30
MIB = 2**20
#: Cityscapes' native size; the paper trains at 512×1024 (configs/cityscapes_10pct.yaml).
NATIVE = (1024, 2048)
PAPER_SIZE = (512, 1024)
#: Cityscapes train has 2 975 images; 10 % labeled leaves 2 678 unlabeled (the pseudo-labeled split).
UNLABELED_IMAGES = 2678
#: Per-GPU batch of the paper's runs: global batch 4 (teacher) / 8 (student) on 4 GPUs.
PAPER_GPUS = 4
INSTANCES = 20  # instances per image in the synthetic batch (Cityscapes averages ~20 things per image)


# ----------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Spec:
    """One measured configuration (run in its own process).

    Attributes:
        name: row label.
        kind: ``sam2_decoder``, ``teacher_forward``, ``train_step`` or ``pseudo_store``.
        model: ``teacher`` or ``student`` (``train_step`` / ``teacher_forward``).
        batch: labeled images per step (and pseudo-labeled ones when ``pseudo``).
        pseudo: whether the step has a pseudo-labeled part (self-training, distill).
        lambda_semi: weight of the pseudo-label term.
        lambda_pxl: weight of ``L_pxl`` (0: no contrastive term).
        boxes: box prompts per image (teacher).
        decoder: ``transformers`` or ``shared`` (``sam2_decoder``).
        box_chunk: boxes decoded at a time (``sam2_decoder`` with ``shared``; the teacher).
        pseudo_label: also pseudo-label the outputs at the native size (``teacher_forward``).
        images: images held (``pseudo_store``).
        group: the component or stage the row belongs to.
    """

    name: str
    kind: str
    model: str = "teacher"
    batch: int = 1
    pseudo: bool = False
    lambda_semi: float = 0.0
    lambda_pxl: float = 0.2
    boxes: int = 100
    decoder: str = "shared"
    box_chunk: int = 16
    pseudo_label: bool = False
    images: int = 0
    group: str = ""


@dataclass(frozen=True)
class Scale:
    """Model and image sizes of a run (paper or smoke)."""

    smoke: bool
    image_size: tuple[int, int]
    native_size: tuple[int, int]
    instances: int
    box_counts: tuple[int, ...]
    chunk_box_counts: tuple[int, ...]
    teacher_boxes: int
    store_images: int
    extra: dict[str, Any] = field(default_factory=dict)


def paper_scale(image_size: tuple[int, int]) -> Scale:
    return Scale(False, image_size, NATIVE, INSTANCES, (4, 8, 16), (16, 32, 64), 100, 100)


def smoke_scale() -> Scale:
    return Scale(True, (64, 128), (128, 256), 4, (2, 4), (2, 4), 4, 20)


def specs_for(scale: Scale, only: Sequence[str] = ()) -> list[Spec]:
    """Every configuration of a run (``only``: keep the groups named)."""
    specs: list[Spec] = []
    for count in scale.box_counts:
        for decoder in ("transformers", "shared"):
            specs.append(Spec(f"SAM2 decoder {decoder}, {count} boxes", "sam2_decoder", boxes=count, decoder=decoder,
                              box_chunk=1_000_000, group=f"sam2_{decoder}"))  # fmt: skip
    chunk = scale.chunk_box_counts[0]
    for count in scale.chunk_box_counts:
        specs.append(Spec(f"SAM2 decoder shared, box_chunk {chunk}, {count} boxes", "sam2_decoder", boxes=count,
                          box_chunk=chunk, group="sam2_chunked"))  # fmt: skip
    for images in (scale.store_images // 2, scale.store_images):
        for layout in ("dense", "rle"):
            specs.append(Spec(f"pseudo-labels of {images} images held {layout}", "pseudo_store", images=images,
                              decoder=layout, group=f"store_{layout}"))  # fmt: skip
    k = scale.teacher_boxes
    specs += [
        Spec("tiny-teacher self-train step, batch 1 + 1 (the issue's 17 GB run, without its pseudo-label store)",
             "train_step", model="tiny_teacher", boxes=k, pseudo=True, lambda_semi=1.0, group="tiny_self_train"),
        Spec("refine step, batch 1", "train_step", model="student", lambda_pxl=0.0, group="refine"),
        Spec("student step without L_pxl, batch 1 + 1", "train_step", model="student", pseudo=True, lambda_semi=1.0,
             lambda_pxl=0.0, group="student"),
        Spec("distill step, batch 1 + 1", "train_step", model="student", pseudo=True, lambda_semi=1.0,
             group="distill"),
        Spec("L_pxl alone (library loss, stride-4 grid), 1 + 1 images", "contrast", batch=2, group="lpxl"),
        Spec("L_pxl alone (library loss, stride-4 grid), 2 + 2 images", "contrast", batch=4, group="lpxl"),
        Spec("student forward without gradient (L_pxl target view), batch 1", "teacher_forward", model="student",
             group="student_target"),
        Spec("teacher backbone (frozen forward, 1 box)", "teacher_forward", boxes=1, group="teacher_backbone"),
        Spec(f"teacher fine-tune step, batch 1, {k} boxes", "train_step", boxes=k, group="teacher_finetune"),
        Spec(f"teacher self-train step, batch 1 + 1, {k} boxes", "train_step", boxes=k, pseudo=True, lambda_semi=1.0,
             group="teacher_self_train"),
        Spec(f"pseudo-label: teacher inference, {k} boxes, batch 1", "teacher_forward", boxes=k, pseudo_label=True,
             group="pseudo_label"),
        Spec(f"pseudo-label: teacher inference, {k} boxes, batch 2", "teacher_forward", batch=2, boxes=k,
             pseudo_label=True, group="pseudo_label"),
        Spec("refine step, batch 2", "train_step", model="student", batch=2, lambda_pxl=0.0, group="refine"),
        Spec("distill step, batch 2 + 2", "train_step", model="student", batch=2, pseudo=True, lambda_semi=1.0,
             group="distill"),
    ]  # fmt: skip
    if not only:
        return specs

    def rank(spec: Spec) -> int:  # the groups named run in the order named (batch 2 rows after all batch 1 rows)
        names = [name for name in only if spec.group == name or spec.group.split("_")[0] == name]
        return only.index(names[0]) if names else -1

    return sorted((s for s in specs if rank(s) >= 0), key=lambda s: (s.batch > 1, rank(s)))  # batch 2 last


# ------------------------------------------------------------------------------------------ builders
def _class_names() -> list[str]:
    from reference_pipeline.data.cityscapes import CITYSCAPES_THING_CLASSES

    return [name for name, _ in CITYSCAPES_THING_CLASSES]


def build_teacher(scale: Scale, boxes: int, box_chunk: int, *, detector: bool = True) -> Any:
    """The foundation teacher with random weights (real shapes; tiny ones in smoke), ``boxes`` prompts per image."""
    from reference_pipeline.models.teacher import (
        FoundationTeacher,
        TeacherConfig,
        grounding_dino_swin_large_config,
        sam2_hiera_large_config,
    )
    from reference_pipeline.models.tiny_configs import tiny_grounding_dino_config, tiny_sam2_config, tiny_tokenizer

    names = _class_names()
    tokenizer = tiny_tokenizer([word for name in names for word in name.split()])
    config = TeacherConfig(class_names=tuple(names), box_threshold=0.0, num_queries=boxes, box_chunk=box_chunk)
    if scale.smoke:
        config = replace(config, embedding_dim=16, detector_shortest_edge=None)
        detector_config, segmenter_config = tiny_grounding_dino_config(), tiny_sam2_config(64)
    else:
        detector_config = grounding_dino_swin_large_config() if detector else tiny_grounding_dino_config()
        segmenter_config = sam2_hiera_large_config()
    return FoundationTeacher.from_configs(config, detector_config, segmenter_config, tokenizer)


def build_student(scale: Scale) -> Any:
    from reference_pipeline.models.student import Student, StudentConfig

    if scale.smoke:
        from reference_pipeline.models.demo import demo_student_config

        return Student(demo_student_config(len(_class_names())))
    return Student(StudentConfig.paper(len(_class_names())))


class _Samples:
    """An in-memory ``InstanceDataset`` of synthetic images at the native size with ``instances`` rectangles."""

    def __init__(self, count: int, size: tuple[int, int], instances: int, seed: int) -> None:
        from reference_pipeline.data.structures import InstanceSample

        rng = np.random.default_rng(seed)
        height, width = size
        self.class_names = _class_names()
        self.image_ids = list(range(seed * 1000, seed * 1000 + count))
        self.samples = []
        for image_id in self.image_ids:
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            masks = np.zeros((instances, height, width), dtype=bool)
            for index in range(instances):
                h, w = int(rng.integers(height // 16, height // 4)), int(rng.integers(width // 32, width // 8))
                top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
                masks[index, top : top + h, left : left + w] = True
            for index in range(instances - 1, 0, -1):  # disjoint: later instances occlude earlier ones
                masks[:index] &= ~masks[index]
            classes = rng.integers(0, len(self.class_names), instances).astype(np.int64)
            self.samples.append(InstanceSample(image, masks, classes, np.zeros(instances, bool), image_id,
                                               f"{image_id}.png"))  # fmt: skip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.samples[index]


def build_batch(scale: Scale, batch: int, pseudo: bool) -> Any:
    """One :class:`~reference_pipeline.data.semi.SemiBatch` through the pipeline's data path (pseudo-labels as RLE)."""
    from reference_pipeline.data.augment import StrongViewConfig, TwoViewTransform, WeakViewConfig
    from reference_pipeline.data.semi import PseudoLabeledDataset, SemiSupervisedDataset, TwoViewDataset, collate_semi
    from reference_pipeline.pseudo_labels import PseudoInstances

    size = scale.image_size
    transform = TwoViewTransform(WeakViewConfig(output_size=size), StrongViewConfig(output_size=size))
    labeled = _Samples(batch, scale.native_size, scale.instances, seed=1)
    unlabeled = None
    if pseudo:
        images = _Samples(batch, scale.native_size, scale.instances, seed=2)
        labels = {s.image_id: PseudoInstances.from_masks(s.masks, s.class_ids, np.full(s.num_instances, 0.9))
                  for s in images.samples}  # fmt: skip
        unlabeled = TwoViewDataset(PseudoLabeledDataset(images, labels), transform, seed=1)  # type: ignore[arg-type]
    dataset = SemiSupervisedDataset(TwoViewDataset(labeled, transform, seed=0), unlabeled)  # type: ignore[arg-type]
    return collate_semi([dataset[i] for i in range(batch)])


def _objective(model: Any, spec: Spec, embedding_dim: int) -> Any:
    from reference_pipeline.config import PipelineConfig
    from reference_pipeline.losses import Objective, SetCriterion
    from reference_pipeline.stages import build_contrast

    cfg = PipelineConfig()
    criterion = SetCriterion(len(_class_names()), replace(cfg.criterion, mask_stride=getattr(model, "mask_stride", 4)))
    contrast = build_contrast(cfg.contrast) if spec.lambda_pxl > 0 else None
    return Objective(criterion, contrast, spec.lambda_semi, spec.lambda_pxl)


def _primed_optimizer(model: Any) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with its state allocated (zero-gradient step), as from step 2 on."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


# ------------------------------------------------------------------------------------------- workers
def _prepare(spec: Spec, scale: Scale, device: torch.device) -> tuple[Callable[[], Any], dict[str, Any]]:
    """Build everything a configuration needs; return its measured step and facts about it."""
    info: dict[str, Any] = {}
    if spec.kind == "sam2_decoder":
        teacher = build_teacher(scale, spec.boxes, spec.box_chunk, detector=False).to(device).train()
        size, width = teacher.segmenter_size, teacher.segmenter.config.vision_config.fpn_hidden_size
        embeddings = [torch.randn(1, width // 8, size // 4, size // 4, device=device),
                      torch.randn(1, width // 4, size // 8, size // 8, device=device),
                      torch.randn(1, width, size // 16, size // 16, device=device)]  # real shapes; no Hiera pass needed
        generator = torch.Generator().manual_seed(0)
        corner = torch.rand(1, spec.boxes, 2, generator=generator) * 0.6
        boxes = torch.cat([corner, corner + 0.05 + 0.3 * torch.rand(1, spec.boxes, 2, generator=generator)], -1).to(device)
        if spec.decoder == "transformers":  # Sam2Model's own decoding: the image features repeated per box
            def decode(prompts: torch.Tensor, *levels: torch.Tensor) -> torch.Tensor:
                out = teacher.segmenter(image_embeddings=list(levels), input_boxes=prompts, multimask_output=False)
                return out.pred_masks[:, :, 0]

            teacher._decode = decode
        info["trainable_parameters"] = sum(p.numel() for p in teacher.segmenter.mask_decoder.parameters())

        def step() -> None:
            masks = teacher.segment(embeddings, boxes)  # (1, n, S/4, S/4)
            masks.square().mean().backward()
            teacher.zero_grad(set_to_none=True)

        return step, info
    if spec.kind == "contrast":  # L_pxl alone: the library loss on the stride-4 grid of `batch` anchor images
        from reference_pipeline.config import PipelineConfig
        from reference_pipeline.stages import build_contrast

        contrast = build_contrast(PipelineConfig().contrast)
        grid = (scale.image_size[0] // 4, scale.image_size[1] // 4)
        weak = torch.randn(spec.batch, 128, *grid, device=device, requires_grad=True)  # (B, D, h, w)
        strong = torch.randn(spec.batch, 128, *grid, device=device)  # (B, D, h, w) detached target view
        masks = torch.randn(spec.batch, 100, *grid, device=device)  # (B, K, h, w)
        classes = torch.randn(spec.batch, 100, len(_class_names()) + 1, device=device)  # (B, K, C+1)

        def step() -> None:
            contrast(weak, strong, masks, classes).loss.backward()
            weak.grad = None

        return step, info
    if spec.kind == "pseudo_store":
        from reference_pipeline.pseudo_labels import PseudoInstances

        source = _Samples(1, scale.native_size, scale.instances, seed=3).samples[0]
        labels = PseudoInstances.from_masks(source.masks, source.class_ids, np.full(source.num_instances, 0.9))
        held: list[Any] = []
        info["rle_bytes_per_image"] = labels.nbytes
        info["dense_bytes_per_image"] = int(source.masks.size)

        def step() -> None:
            tracemalloc.start()  # exact bytes held (numpy buffers, RLE strings, Python objects)
            for _ in range(spec.images):  # what the split's pseudo-labels cost in the training process
                held.append(labels.decode_masks() if spec.decoder == "dense" else
                            PseudoInstances(labels.size, tuple({"size": list(r["size"]), "counts": bytes(r["counts"])}
                                                               for r in labels.rles), labels.class_ids.copy(),
                                            labels.scores.copy()))  # fmt: skip
            info["held_bytes"] = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()

        return step, info
    if spec.model == "tiny_teacher":  # the offline stand-in of tests/pipeline/paper_standins.py
        model = build_teacher(replace(scale, smoke=True), spec.boxes, spec.box_chunk)
    elif spec.model == "teacher":
        model = build_teacher(scale, spec.boxes, spec.box_chunk)
    else:
        model = build_student(scale)
    model = model.to(device)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    if spec.kind == "teacher_forward":
        from reference_pipeline.pseudo_labels import PseudoLabelConfig, pseudo_label

        model.requires_grad_(False).eval()
        images = torch.rand(spec.batch, 3, *scale.image_size, device=device)

        def step() -> None:
            with torch.no_grad():
                output = model(images)
                if spec.pseudo_label:
                    for b in range(spec.batch):
                        pseudo_label(output.mask_logits[b], output.class_logits[b], scale.native_size,
                                     PseudoLabelConfig(score_threshold=0.0), input_size=scale.image_size)  # fmt: skip

        return step, info
    model.train()
    info["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = build_batch(scale, spec.batch, spec.pseudo)
    objective = _objective(model, spec, model.config.embedding_dim)
    optimizer = _primed_optimizer(model)

    def step() -> None:
        loss, _logs = objective(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, info


def run_spec(spec: Spec, scale: Scale, device_name: str, threads: int, limit_bytes: int | None) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    _configure_worker_malloc()
    base = _read_proc_status()["VmRSS"] if device.type == "cpu" else 0
    if limit_bytes is not None and device.type == "cpu":
        data = _read_proc_status()["VmData"]  # over-budget allocations fail instead of waking the OOM killer
        resource.setrlimit(resource.RLIMIT_DATA, (data + limit_bytes, resource.RLIM_INFINITY))
    step, info = _prepare(spec, scale, device)
    gc.collect()
    _trim_heap()
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before = _read_proc_status()["VmRSS"] - base
        _reset_peak_rss()
        step()
        peak = _read_proc_status()["VmHWM"] - base
    return {"peak_bytes": peak, "before_step_bytes": before, "step_bytes": peak - before,
            "seconds": time.perf_counter() - start, **info}  # fmt: skip


def _worker_entry(spec: Spec, scale: Scale, device: str, threads: int, limit: int | None, connection: Any) -> None:
    try:
        connection.send(("ok", run_spec(spec, scale, device, threads, limit)))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, never hidden
        oom = isinstance(error, MemoryError) or "DefaultCPUAllocator" in str(error) or "out of memory" in str(error)
        message = f"OOM (over the {limit / GIB:.0f} GiB limit)" if oom and limit else f"{type(error).__name__}: {error}"
        connection.send(("error", message + "\n" + traceback.format_exc()[-4000:]))
    finally:
        connection.close()


#: Imported once by the forkserver, so that workers neither pay for them nor count them in their peaks.
_PRELOAD = [
    "torch", "transformers", "timm", "scipy.optimize", "PIL.ImageChops", "logging.handlers", "pycocotools.mask",
    "reference_pipeline.models.teacher", "reference_pipeline.models.student", "reference_pipeline.models.demo",
    "reference_pipeline.models.tiny_configs", "reference_pipeline.losses", "reference_pipeline.data.semi",
    "reference_pipeline.pseudo_labels", "reference_pipeline.stages", "benchmarks.bench_memory",
]  # fmt: skip


def _context() -> multiprocessing.context.BaseContext:
    if platform.system() != "Linux":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def measure(spec: Spec, scale: Scale, device: str, threads: int, limit: int | None, timeout_s: float) -> dict[str, Any]:
    """Run ``spec`` in a fresh process (forked from the forkserver) and return its record."""
    context = _context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_worker_entry, args=(spec, scale, device, threads, limit, send))
    process.start()
    send.close()
    record: dict[str, Any] = {"spec": spec.__dict__}
    if receive.poll(timeout_s):
        try:
            status, payload = receive.recv()
        except EOFError:
            status, payload = "error", "worker died without a result"
    else:
        status, payload = "error", f"timed out after {timeout_s:.0f} s"
        process.kill()
    process.join(30)
    if status == "ok":
        record.update(payload)
    else:
        record["error"] = payload if process.exitcode in (0, None) or status == "error" else f"killed ({process.exitcode})"
    print(f"  {spec.name}: " + (format_bytes(record.get("peak_bytes")) if status == "ok" else record["error"].splitlines()[0]),
          flush=True)  # fmt: skip
    return record


# ------------------------------------------------------------------------------------------ analysis
def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``y = a + b·x`` (``None`` with fewer than two distinct ``x``)."""
    if len({x for x, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit([x for x, _ in points], [y for _, y in points], 1)
    return float(intercept), float(slope)


def _peaks(records: Sequence[dict[str, Any]], group: str, key: str, value: str = "peak_bytes") -> list[tuple[float, float]]:
    return [(float(r["spec"][key]), float(r[value])) for r in records
            if r["spec"]["group"] == group and value in r]  # fmt: skip


def record_of(records: Sequence[dict[str, Any]], group: str, batch: int) -> dict[str, Any] | None:
    """The measured row of ``group`` at ``batch`` (``None`` if it did not run or failed)."""
    found = [r for r in records if "peak_bytes" in r and r["spec"]["group"] == group and r["spec"]["batch"] == batch]
    return found[0] if found else None


def analyse(records: Sequence[dict[str, Any]], scale: Scale) -> dict[str, Any]:
    """Per-box and per-image slopes, components, and the stages extrapolated to the paper's per-GPU batches."""
    out: dict[str, Any] = {"slopes": {}, "components": {}, "stages": {}}
    for group in ("sam2_transformers", "sam2_shared", "sam2_chunked"):
        line = fit(_peaks(records, group, "boxes"))
        if line:
            out["slopes"][f"{group}_per_box"] = line[1]
            out["slopes"][f"{group}_intercept"] = line[0]
    for group, key in (("pseudo_label", "batch"), ("distill", "batch"), ("refine", "batch")):
        line = fit(_peaks(records, group, key))
        if line:
            out["slopes"][f"{group}_per_image"] = line[1]
            out["slopes"][f"{group}_intercept"] = line[0]
    by_group = {r["spec"]["group"]: r for r in records if "peak_bytes" in r and r["spec"]["batch"] == 1}
    for group in ("store_dense", "store_rle"):
        line = fit(_peaks(records, group, "images", "held_bytes"))
        if line:
            out["slopes"][f"{group}_per_image"] = line[1]

    def peak(group: str) -> float | None:
        record = by_group.get(group)
        return None if record is None else float(record["peak_bytes"])

    components = out["components"]
    components["teacher_backbone"] = peak("teacher_backbone")
    components["tiny_teacher_self_train_step"] = peak("tiny_self_train")
    components["sam2_decoder_per_box_before"] = out["slopes"].get("sam2_transformers_per_box")
    components["sam2_decoder_per_box_after"] = out["slopes"].get("sam2_shared_per_box")
    components["sam2_decoder_per_box_chunked"] = out["slopes"].get("sam2_chunked_per_box")
    student, distill = peak("student"), peak("distill")
    components["student"] = student
    lpxl = record_of(records, "lpxl", 2)
    components["l_pxl"] = (distill - student if student is not None and distill is not None
                           else None if lpxl is None else float(lpxl["peak_bytes"]))  # fmt: skip
    target = record_of(records, "student_target", 1)
    components["student_target_view"] = None if target is None else float(target["step_bytes"])
    refine = record_of(records, "refine", 1)
    components["student_anchor_image"] = None if refine is None else float(refine["step_bytes"])
    components["pseudo_store_dense_per_image"] = out["slopes"].get("store_dense_per_image")
    components["pseudo_store_rle_per_image"] = out["slopes"].get("store_rle_per_image")
    dense = components["pseudo_store_dense_per_image"]
    rle = components["pseudo_store_rle_per_image"]
    components["pseudo_store_dense_split"] = None if dense is None else dense * UNLABELED_IMAGES
    components["pseudo_store_rle_split"] = None if rle is None else rle * UNLABELED_IMAGES

    stages = out["stages"]
    records_ok = [r for r in records if "peak_bytes" in r]

    def record(group: str, batch: int) -> dict[str, Any] | None:
        found = [r for r in records_ok if r["spec"]["group"] == group and r["spec"]["batch"] == batch]
        return found[0] if found else None

    def stage(name: str, batch: str, group: str, per_gpu: int, fallback: Callable[[], tuple[float, str] | None]) -> None:
        """Measured at the per-GPU batch when that row ran; else the fit over measured batches; else ``fallback``."""
        measured = record(group, per_gpu)
        line = fit(_peaks(records, group, "batch"))
        if measured is not None:
            stages[name] = {"batch": batch, "bytes": float(measured["peak_bytes"]), "how": "measured"}
        elif line is not None:
            stages[name] = {"batch": batch, "bytes": line[0] + per_gpu * line[1], "how": "fit over batch 1 and 2"}
        else:
            estimate = fallback()
            stages[name] = {"batch": batch, "bytes": None if estimate is None else estimate[0],
                            "how": "not measured" if estimate is None else estimate[1]}  # fmt: skip

    def per_image(group: str) -> tuple[float, float] | None:
        """(state before the step, the step's extra bytes) of the batch-1 row of ``group``."""
        row = record(group, 1)
        return None if row is None else (float(row["before_step_bytes"]), float(row["step_bytes"]))

    def self_train() -> tuple[float, str] | None:
        finetune = per_image("teacher_finetune")
        if finetune is None:
            return None
        return finetune[0] + 2 * finetune[1], "fine-tune step at batch 1, its step bytes × 2 images (upper bound)"

    def distill() -> tuple[float, str] | None:
        refine, lpxl = per_image("refine"), record("lpxl", 2 * student_batch)
        target = record("student_target", 1)
        if refine is None or lpxl is None or target is None:
            return None
        anchors = 2 * student_batch  # labeled weak views + pseudo-labeled strong views, with gradients
        total = refine[0] + anchors * (refine[1] + float(target["step_bytes"])) + float(lpxl["peak_bytes"])
        return total, (f"refine step at batch 1 × {anchors} anchor images + {anchors} no-grad target views "
                       f"+ L_pxl of {anchors} images (upper bound)")  # fmt: skip

    def refine_extrapolated() -> tuple[float, str] | None:
        refine = per_image("refine")
        if refine is None:
            return None
        return refine[0] + student_batch * refine[1], f"refine step at batch 1, its step bytes × {student_batch}"

    def pseudo_label() -> tuple[float, str] | None:
        row = record("pseudo_label", 1)
        if row is None:
            return None
        return float(row["before_step_bytes"]) + eval_batch * float(row["step_bytes"]), f"batch 1 × {eval_batch}"

    teacher_batch, student_batch, eval_batch = 4 // PAPER_GPUS, 8 // PAPER_GPUS, 8  # per GPU; eval.batch_size
    stage("teacher_finetune", f"{teacher_batch} labeled", "teacher_finetune", teacher_batch, lambda: None)
    stage("teacher_self_train", f"{teacher_batch} + {teacher_batch} pseudo", "teacher_self_train", teacher_batch,
          self_train)  # fmt: skip
    stage("pseudo_label", f"eval.batch_size={eval_batch} (rank 0)", "pseudo_label", eval_batch, pseudo_label)
    stage("distill", f"{student_batch} + {student_batch} pseudo", "distill", student_batch, distill)
    stage("refine", f"{student_batch} labeled", "refine", student_batch, refine_extrapolated)
    return out


def render(records: Sequence[dict[str, Any]], analysis: dict[str, Any], scale: Scale, device: str) -> str:
    """The Markdown report."""
    size = "×".join(map(str, scale.image_size))
    unit = "peak RSS above the worker's imports" if device == "cpu" else "torch.cuda.max_memory_allocated"
    lines = [f"# Peak memory per stage at {size}" + (" (smoke: tiny models)" if scale.smoke else ""), "",
             f"Device: {device}; {unit}; one fresh process per row; random weights at the real shapes; one step after "
             + "AdamW's state is allocated. fp32, no AMP.", "", "## Stages at the paper's per-GPU batch", ""]  # fmt: skip
    rows = [[name, stage["batch"], format_bytes(stage["bytes"]), stage["how"]] for name, stage in analysis["stages"].items()]
    lines += [markdown_table(["stage", "per-GPU batch", "peak", "how"], rows), "", "## Components", ""]
    comp = analysis["components"]
    rows = [
        ["teacher backbone (frozen forward, 1 image)", format_bytes(comp["teacher_backbone"])],
        ["SAM2 decoder per box, training pass, `Sam2Model` (before)", format_bytes(comp["sam2_decoder_per_box_before"])],
        ["SAM2 decoder per box, training pass, shared embedding (after)", format_bytes(comp["sam2_decoder_per_box_after"])],
        ["SAM2 decoder per box beyond the chunk, shared + box_chunk checkpointing",
         format_bytes(comp["sam2_decoder_per_box_chunked"])],
        ["tiny-teacher self-train step (1 + 1 images, without the pseudo-label store)",
         format_bytes(comp["tiny_teacher_self_train_step"])],
        ["student step without L_pxl (1 + 1 images)", format_bytes(comp["student"])],
        ["student: one anchor image, forward + backward (refine step at batch 1, above its state)",
         format_bytes(comp["student_anchor_image"])],
        ["student: one no-grad target view (L_pxl's other view)", format_bytes(comp["student_target_view"])],
        ["L_pxl (1 + 1 images)", format_bytes(comp["l_pxl"])],
        ["pseudo-labels per image held dense (before)", format_bytes(comp["pseudo_store_dense_per_image"])],
        ["pseudo-labels per image held as RLE (after)", format_bytes(comp["pseudo_store_rle_per_image"])],
        [f"pseudo-labels of {UNLABELED_IMAGES} images, dense (before)", format_bytes(comp["pseudo_store_dense_split"])],
        [f"pseudo-labels of {UNLABELED_IMAGES} images, RLE (after)", format_bytes(comp["pseudo_store_rle_split"])],
    ]  # fmt: skip
    lines += [markdown_table(["component", "memory"], rows), "", "## Every configuration", ""]
    rows = [[r["spec"]["name"], format_bytes(r.get("peak_bytes")), format_bytes(r.get("before_step_bytes")),
             f"{r['seconds']:.1f} s" if "seconds" in r else "—", (r.get("error") or "").splitlines()[0] if "error" in r else ""]
            for r in records]  # fmt: skip
    lines += [markdown_table(["configuration", "peak", "before the step", "step time", "error"], rows)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models at 64×128 (< 60 s)")
    parser.add_argument("--image-size", type=int, nargs=2, default=list(PAPER_SIZE))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-gib", type=float, default=8.0, help="CPU: a worker's allocation limit (RLIMIT_DATA)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--only", nargs="*", default=[], help="groups to run, in this order (e.g. sam2 store distill)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--tag", default=NAME)
    parser.add_argument("--note", action="append", default=[], help="a line for the report's Notes section")
    parser.add_argument("--merge", nargs="*", type=Path, default=[],
                        help="no measurement: one report from the records of earlier runs' JSON files (later files win)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    scale = smoke_scale() if args.smoke else paper_scale(tuple(args.image_size))
    limit = None if device != "cpu" else int(args.limit_gib * GIB)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.merge:
        merged: dict[str, dict[str, Any]] = {}
        for path in args.merge:
            for row in json.loads(path.read_text(encoding="utf-8"))["records"]:
                if "peak_bytes" in row or row["spec"]["name"] not in merged:
                    merged[row["spec"]["name"]] = row
        order = {spec.name: index for index, spec in enumerate(specs_for(scale))}
        rows = sorted(merged.values(), key=lambda row: order.get(row["spec"]["name"], len(order)))
        analysis = analyse(rows, scale)
        payload = {"environment": environment_info(torch.device(device)), "scale": scale.__dict__, "records": rows,
                   "analysis": analysis, "merged_from": [str(p) for p in args.merge]}  # fmt: skip
        notes = "".join(f"- {note}\n" for note in args.note)
        payload["notes"] = args.note
        write_report(args.tag, args.out, payload, render(rows, analysis, scale, device) + (f"\n## Notes\n\n{notes}" if notes else ""))
        return payload
    records: list[dict[str, Any]] = []
    payload: dict[str, Any] = {}
    for spec in specs_for(scale, args.only):
        records.append(measure(spec, scale, device, args.threads, limit, args.timeout))
        analysis = analyse(records, scale)  # written after every row: a long run leaves its partial results
        payload = {"environment": environment_info(torch.device(device)), "scale": scale.__dict__,
                   "records": records, "analysis": analysis}  # fmt: skip
        markdown = render(records, analysis, scale, device)
        if spec is not specs_for(scale, args.only)[-1]:
            args.out.mkdir(parents=True, exist_ok=True)
            write_quietly(args.out, args.tag, payload, markdown)
    write_report(args.tag, args.out, payload, markdown)
    return payload


def write_quietly(out: Path, tag: str, payload: dict[str, Any], markdown: str) -> None:
    """:func:`~benchmarks.common.write_report` without printing (partial results)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        write_report(tag, out, payload, markdown)


if __name__ == "__main__":
    main()
