"""``predict``: a trained model on a folder of images → overlay PNGs and a COCO-format results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import PipelineConfig
from .data.structures import InstanceSample, load_rgb_image
from .evaluate import postprocess_mask2former, predictions_to_coco_results
from .inference import predict_dataset
from .visualize import panel_from_predictions, save_overlay_grid

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "predict_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageFolder:
    """The images of a folder (sorted by name) as un-annotated samples; ids are positions.

    Raises:
        NotADirectoryError: if ``root`` is not a folder.
        FileNotFoundError: if it holds no image.
    """

    def __init__(self, root: Path, class_names: list[str]) -> None:
        if not root.is_dir():
            raise NotADirectoryError(f"image folder not found: {root}")
        self.files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
        self.class_names = class_names
        self.image_ids = list(range(len(self.files)))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> InstanceSample:
        image = load_rgb_image(self.files[index])
        return InstanceSample(
            image=image, masks=np.zeros((0, *image.shape[:2]), dtype=bool), class_ids=np.zeros(0, dtype=np.int64),
            is_crowd=np.zeros(0, dtype=bool), image_id=index, file_name=self.files[index].name,
        )


def predict_folder(
    cfg: PipelineConfig, images: Path, out: Path, *, stage: str = "refine", score_threshold: float = 0.5,
    progress: bool = True,
) -> Path:
    """Run ``stage``'s trained model on every image of ``images``; write ``out/results.json`` and overlays.

    Unreadable images raise ``ValueError`` naming the file before anything is written.

    Returns:
        The results JSON path (COCO results format: ``image_id``, ``category_id``, RLE ``segmentation``,
        ``score``; ``images.json`` maps ids to file names).
    """
    from . import stages

    datasets = stages.load_datasets(cfg, progress=False)
    model = stages.load_stage_model(cfg, datasets, stage)
    folder = ImageFolder(images, datasets.class_names)
    for index in range(len(folder)):  # fail early on a corrupt file, before writing anything
        folder[index]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    bar = tqdm(total=len(folder), desc="predict", disable=not progress)
    for prediction in predict_dataset(model, folder, image_size=tuple(cfg.data.image_size), progress=False):
        sample = prediction.sample
        instances = postprocess_mask2former(
            prediction.mask_logits, prediction.class_logits, (sample.height, sample.width), cfg.eval.top_k
        )
        results.extend(predictions_to_coco_results(sample.image_id, instances))
        save_overlay_grid(
            out / f"{Path(sample.file_name).stem}_overlay.png",
            [[panel_from_predictions(sample.image, instances, f"{sample.file_name} (score ≥ {score_threshold})",
                                     score_threshold=score_threshold)]],
            class_names=datasets.class_names,
        )
        bar.update(1)
    bar.close()
    (out / "images.json").write_text(json.dumps([{"id": i, "file_name": f.name} for i, f in enumerate(folder.files)]))
    path = out / "results.json"
    path.write_text(json.dumps(results))
    return path
