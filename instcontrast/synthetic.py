"""Small generated scenes: touching instances and predictions derived from them with noise.

Used by the property tests, the benchmarks and the example; handy for checking a trainer's wiring
(e.g. that the false-negative rate falls as its predictions sharpen) without any dataset.
"""

from __future__ import annotations

import torch

__all__ = ["noisy_predictions", "touching_instances"]


def touching_instances(
    batch: int = 2, height: int = 16, width: int = 16, columns: int = 4, rows: int = 2, num_classes: int = 3,
    same_class: bool = False, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Touching rectangular instances tiling the image (a row of cars, a crowd).

    Args:
        batch: images.
        height: image height ``H``.
        width: image width ``W``.
        columns: instances per row.
        rows: rows of instances.
        num_classes: foreground classes ``C`` to draw instance classes from.
        same_class: give every instance class 0 (touching same-class instances only).
        seed: seed of the cut-line jitter and the classes.

    Returns:
        ``instance_ids (B, H, W)`` in ``[0, rows·columns)`` and ``instance_class (B, rows·columns)``.
    """
    if columns < 1 or rows < 1 or height < rows or width < columns:
        raise ValueError(f"need 1 <= rows <= height and 1 <= columns <= width, got {rows=}, {columns=}, {height=}, {width=}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(batch, height, width, dtype=torch.long)
    for b in range(batch):
        # jitter the cut lines per image so instances have different sizes
        xs = torch.linspace(0, width, columns + 1).round().long()
        ys = torch.linspace(0, height, rows + 1).round().long()
        xs[1:-1] += torch.randint(-1, 2, (columns - 1,), generator=generator)
        ys[1:-1] += torch.randint(-1, 2, (rows - 1,), generator=generator)
        for r in range(rows):
            for c in range(columns):
                ids[b, ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = r * columns + c
    if same_class:
        classes = torch.zeros(batch, rows * columns, dtype=torch.long)
    else:
        classes = torch.randint(0, num_classes, (batch, rows * columns), generator=generator)
    return ids, classes


def noisy_predictions(
    instance_ids: torch.Tensor, instance_class: torch.Tensor, num_queries: int, num_classes: int,
    confidence: float, noise: float = 1.0, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask/class logits derived from ground truth: query k predicts instance k, plus noise.

    Args:
        instance_ids: ground-truth instance map ``(B, H, W)`` with ids in ``[0, K)``.
        instance_class: class of each instance ``(B, I)``, ``I <= K``.
        num_queries: ``K``.
        num_classes: ``C`` (the no-object class is appended last).
        confidence: logit added for the true query/class; 0 gives pure noise.
        noise: standard deviation of the Gaussian logit noise.
        seed: seed of the noise.

    Returns:
        ``mask_logits (B, K, H, W)`` and ``class_logits (B, K, C+1)``; unused queries predict no-object.
    """
    if instance_class.shape[1] > num_queries or int(instance_ids.max()) >= num_queries:
        raise ValueError(f"num_queries={num_queries} is smaller than the number of instances {instance_class.shape[1]}")
    generator = torch.Generator().manual_seed(seed)
    batch, height, width = instance_ids.shape
    num_instances = instance_class.shape[1]
    one_hot = torch.nn.functional.one_hot(instance_ids, num_queries).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    mask_logits = confidence * one_hot + noise * torch.randn(batch, num_queries, height, width, generator=generator)
    targets = torch.full((batch, num_queries), num_classes, dtype=torch.long)  # no-object by default
    targets[:, :num_instances] = instance_class
    class_one_hot = torch.nn.functional.one_hot(targets, num_classes + 1).float()
    class_logits = confidence * class_one_hot + noise * torch.randn(batch, num_queries, num_classes + 1, generator=generator)
    return mask_logits, class_logits
