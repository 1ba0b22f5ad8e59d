"""``predict``: a trained model on a folder of images → overlay PNGs and a COCO-format results JSON."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_write_json
from .data.unlabeled import ImageFolderDataset
from .errors import UserError
from .evaluate import postprocess_mask2former, predictions_to_coco_results
from .inference import predict_dataset
from .trained import load_trained
from .visualize import panel_from_predictions, save_overlay_grid

__all__ = ["image_ids_from_coco", "predict_folder"]

def image_ids_from_coco(annotations: Path, files: list[str]) -> list[int]:
    """The ``id`` of each file (relative path) in a COCO JSON's ``images``, matched by ``file_name`` or base name.

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
    def lookup(name: str) -> int | None:
        return by_name.get(name, by_name.get(Path(name).name))

    missing = [name for name in files if lookup(name) is None]
    if missing:
        raise UserError(f"{len(missing)} image(s) are not in {annotations}: {missing[:5]}")
    return [int(lookup(name)) for name in files]  # type: ignore[arg-type]


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
    folder = ImageFolderDataset(images, card.class_names)
    image_ids = image_ids_from_coco(annotations, folder.file_names) if annotations is not None else folder.image_ids
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
            out / f"{Path(sample.file_name).with_suffix('').as_posix().replace('/', '__')}_overlay.png",
            [[panel_from_predictions(sample.image, instances, f"{sample.file_name} (score ≥ {score_threshold})",
                                     score_threshold=score_threshold)]],
            class_names=card.class_names,
        )
        bar.update(1)
    bar.close()
    atomic_write_json(out / "images.json", [{"id": i, "file_name": f} for i, f in zip(image_ids, folder.file_names)])
    return atomic_write_json(out / "results.json", results)
