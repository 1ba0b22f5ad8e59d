"""``predict``: a trained model on a folder of images → overlay PNGs and a COCO-format results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_write_json
from .data.structures import InstanceSample, load_rgb_image
from .errors import UserError
from .evaluate import postprocess_mask2former, predictions_to_coco_results
from .inference import predict_dataset
from .trained import load_trained
from .visualize import panel_from_predictions, save_overlay_grid

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "image_ids_from_coco", "predict_folder"]

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


def image_ids_from_coco(annotations: Path, files: list[Path]) -> list[int]:
    """The ``id`` of each file in a COCO JSON's ``images`` (matched by ``file_name``, or by its base name).

    Raises:
        FileNotFoundError: if the JSON is missing.
        UserError: if a file is not listed in it (the message names a few).
    """
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotations not found: {annotations}")
    images = json.loads(annotations.read_text()).get("images", [])
    by_name: dict[str, int] = {}
    for image in images:
        by_name.setdefault(str(image["file_name"]), int(image["id"]))
        by_name.setdefault(Path(str(image["file_name"])).name, int(image["id"]))
    missing = [f.name for f in files if f.name not in by_name]
    if missing:
        raise UserError(f"{len(missing)} image(s) are not in {annotations}: {missing[:5]}")
    return [by_name[f.name] for f in files]


def predict_folder(
    model_folder: Path, images: Path, out: Path, *, annotations: Path | None = None, score_threshold: float = 0.5,
    progress: bool = True,
) -> Path:
    """Run the trained model of ``model_folder`` on every image of ``images``; write ``out/results.json`` + overlays.

    Needs no config and no dataset: the model folder describes itself
    (:mod:`reference_pipeline.trained`). Results carry the dataset's ``category_id`` and each image's
    ``file_name``; ``image_id`` is the image's id in ``annotations`` (a COCO JSON listing these images)
    when given, else its position in the sorted folder. Unreadable images raise naming the file before
    anything is written.

    Returns:
        The results JSON path (COCO results format: ``image_id``, ``category_id``, RLE ``segmentation``,
        ``score``, plus ``file_name``), loadable with ``pycocotools``' ``COCO.loadRes``.
    """
    model, card = load_trained(model_folder)
    folder = ImageFolder(images, card.class_names)
    image_ids = image_ids_from_coco(annotations, folder.files) if annotations is not None else folder.image_ids
    for index in range(len(folder)):  # fail early on a corrupt file, before writing anything
        folder[index]
    out.mkdir(parents=True, exist_ok=True)
    results = []
    bar = tqdm(total=len(folder), desc="predict", disable=not progress)
    predictions = predict_dataset(model, folder, image_size=tuple(card.image_size), progress=False)
    for index, prediction in enumerate(predictions):
        sample = prediction.sample
        instances = postprocess_mask2former(
            prediction.mask_logits, prediction.class_logits, (sample.height, sample.width), card.top_k
        )
        for record in predictions_to_coco_results(image_ids[index], instances, card.category_ids):
            results.append({**record, "file_name": sample.file_name})
        save_overlay_grid(
            out / f"{Path(sample.file_name).stem}_overlay.png",
            [[panel_from_predictions(sample.image, instances, f"{sample.file_name} (score ≥ {score_threshold})",
                                     score_threshold=score_threshold)]],
            class_names=card.class_names,
        )
        bar.update(1)
    bar.close()
    atomic_write_json(out / "images.json", [{"id": i, "file_name": f.name} for i, f in zip(image_ids, folder.files)])
    return atomic_write_json(out / "results.json", results)
