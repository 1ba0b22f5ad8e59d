"""Small generated scenes for the property tests: touching instances and noisy predictions."""

from __future__ import annotations

import torch


def make_instance_scene(
    batch: int = 2, height: int = 16, width: int = 16, columns: int = 4, rows: int = 2, num_classes: int = 3,
    same_class: bool = False, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Touching rectangular instances tiling the image (a row of cars, a crowd).

    Returns:
        ``instance_ids (B, H, W)`` in ``[0, rows·columns)`` and ``instance_class (B, rows·columns)``.
    """
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


def predictions_from_scene(
    instance_ids: torch.Tensor, instance_class: torch.Tensor, num_queries: int, num_classes: int,
    confidence: float, noise: float = 1.0, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask/class logits derived from ground truth: query k predicts instance k, plus noise.

    Returns:
        ``mask_logits (B, K, H, W)`` and ``class_logits (B, K, C+1)``; unused queries predict no-object.
    """
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
