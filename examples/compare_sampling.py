"""Where do negatives come from? Sampling strategies compared on the built-in dataset.

The main job of this repository until the full distillation pipeline lands. It

1. generates (once; cached) the built-in synthetic instance-segmentation dataset in COCO format
   and reads its target-domain validation images back through the COCO reader — street-like
   scenes with rows of touching same-class instances;
2. derives mask/class predictions from the ground truth plus noise (a stand-in for a segmentation
   head at a given confidence), and for each strategy — uniform, class, mask, fusion — samples
   negatives for every pixel with :class:`instcontrast.InstanceAwarePixelContrast`, reporting the
   false-negative rate (FNR), ``p = 1 − FNR``, the sampler's acceptance rate and the time per
   step; the sweep over confidence shows FNR(fusion) falling as predictions sharpen;
3. trains free pixel embeddings (instance centroids + noise) for a few SGD steps with each
   strategy and tracks the ground-truth inter-instance margin (Proposition 3.1);
4. draws, for one anchor pixel on a car in a row of cars, each strategy's exact sampling
   distribution over the image.

Outputs ``outputs/compare_sampling.png`` and ``outputs/compare_sampling.json``.

Usage: ``python examples/compare_sampling.py [--images 8] [--steps 25] [--data data/synthetic]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instcontrast import InstanceAwarePixelContrast
from instcontrast.functional import debias_score, fused_probability
from instcontrast.synthetic import noisy_predictions
from reference_pipeline.data.synthetic import THING_CLASSES, SyntheticConfig, generate_dataset, load_synthetic_split

STRATEGIES = ("uniform", "class", "mask", "fusion")
FEATURE_STRIDE, DIM, NUM_NEGATIVES, NOISE = 2, 32, 64, 0.5


def load_scenes(root: Path, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Images, instance maps (background = -1) and per-query classes of ``count`` validation images.

    Returns:
        images ``(B, H, W, 3)`` uint8, instance_ids ``(B, H, W)``, query_class ``(B, Q)`` (query 0 is
        the background with the no-object class; query ``k`` is instance ``k - 1``), masks list.
    """
    dataset = load_synthetic_split(root, "target_val")
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    num_classes = len(THING_CLASSES)
    queries = 1 + max(s.num_instances for s in samples)
    ids = torch.stack([torch.from_numpy(s.instance_id_map()) for s in samples])  # (B, H, W), -1 = background
    query_class = torch.full((len(samples), queries), num_classes, dtype=torch.long)  # no-object by default
    for b, sample in enumerate(samples):
        query_class[b, 1 : 1 + sample.num_instances] = torch.from_numpy(sample.class_ids)
    images = np.stack([s.image for s in samples])
    return torch.from_numpy(images), ids, query_class, samples


def predictions(ids: torch.Tensor, query_class: torch.Tensor, confidence: float, seed: int = 0):
    """Noisy Mask2Former-style logits: query 0 predicts the background, query k instance k-1."""
    return noisy_predictions(
        ids + 1, query_class, query_class.shape[1], len(THING_CLASSES), confidence, noise=NOISE, seed=seed
    )


def feature_grid(ids: torch.Tensor) -> torch.Tensor:
    """Instance map at the feature resolution (nearest), ``(B, h, w)``."""
    size = (ids.shape[1] // FEATURE_STRIDE, ids.shape[2] // FEATURE_STRIDE)
    return F.interpolate(ids[:, None].double(), size=size, mode="nearest")[:, 0].long()


def ground_truth_margin(z_weak: torch.Tensor, z_strong: torch.Tensor, ids: torch.Tensor, pairs: int = 40000) -> float:
    """Mean positive cosine minus mean cosine over random inter-instance pixel pairs."""
    batch, dim = z_weak.shape[:2]
    weak = F.normalize(z_weak.permute(0, 2, 3, 1).reshape(-1, dim), dim=1)
    strong = F.normalize(z_strong.permute(0, 2, 3, 1).reshape(-1, dim), dim=1)
    keys = torch.arange(batch).repeat_interleave(ids[0].numel()) * 10_000 + ids.reshape(-1) + 1
    instance = ids.reshape(-1) >= 0
    generator = torch.Generator().manual_seed(123)
    first = torch.randint(0, keys.numel(), (pairs,), generator=generator)
    second = torch.randint(0, keys.numel(), (pairs,), generator=generator)
    inter = (keys[first] != keys[second]) & instance[first] & instance[second]
    negative = (weak[first[inter]] * strong[second[inter]]).sum(1).mean()
    return float((weak * strong).sum(1)[instance].mean() - negative)


def same_class_other_instance(out, grid: torch.Tensor, query_class: torch.Tensor) -> float:
    """Fraction of an instance anchor's negatives that lie on *another instance of its class*:
    the hard negatives (touching cars) that instance-aware sampling must keep."""
    batch = grid.shape[0]
    image = torch.arange(batch).repeat_interleave(grid[0].numel())  # (P,)
    instance = grid.reshape(-1)  # (P,), -1 = background
    cls = query_class[image, instance + 1]  # (P,), no-object for background
    anchors = out.anchor_index  # (A,) flat positions; the pool is every pixel, so pool index = flat position
    keep = instance[anchors] >= 0
    anchors, negatives = anchors[keep], out.negative_index[keep]  # (A', R)
    same_class = cls[negatives] == cls[anchors][:, None]
    other_instance = (image[negatives] != image[anchors][:, None]) | (instance[negatives] != instance[anchors][:, None])
    return float((same_class & other_instance).double().mean())


def sampling_statistics(ids: torch.Tensor, query_class: torch.Tensor, confidence: float) -> dict[str, dict]:
    """FNR, p, hard-negative share, acceptance and seconds per call of every strategy."""
    mask_logits, class_logits = predictions(ids, query_class, confidence)
    grid = feature_grid(ids)
    z = torch.randn(ids.shape[0], DIM, *grid.shape[1:])
    results = {}
    for strategy in STRATEGIES:
        crit = InstanceAwarePixelContrast(num_negatives=NUM_NEGATIVES, strategy=strategy, compute_stats=False)
        start = time.perf_counter()
        out = crit(z, z, mask_logits, class_logits, instance_ids=ids, generator=torch.Generator().manual_seed(0))
        results[strategy] = {
            "fnr": out.stats.fnr,
            "p": 1.0 - out.stats.fnr,
            "same_class_other_instance": same_class_other_instance(out, grid, query_class),
            "acceptance": out.stats.acceptance,
            "fallbacks": out.stats.fallbacks,
            "seconds": time.perf_counter() - start,
        }
    return results


def margin_curves(ids: torch.Tensor, query_class: torch.Tensor, confidence: float, steps: int) -> dict[str, list[float]]:
    """Ground-truth margin after each SGD step on free embeddings, per strategy."""
    mask_logits, class_logits = predictions(ids, query_class, confidence)
    grid = feature_grid(ids)  # (B, h, w)
    generator = torch.Generator().manual_seed(0)
    batch, queries = query_class.shape
    # same-class instances start close: a class centroid plus a small per-instance offset
    class_centroids = torch.randn(len(THING_CLASSES) + 1, DIM, generator=generator)
    centroids = class_centroids[query_class] + 0.5 * torch.randn(batch, queries, DIM, generator=generator)
    z_init = centroids[torch.arange(batch)[:, None, None], grid + 1]  # (B, h, w, D)
    z_init = z_init + 1.0 * torch.randn(z_init.shape, generator=generator)
    z_strong = (z_init + 0.3 * torch.randn(z_init.shape, generator=generator)).permute(0, 3, 1, 2).contiguous()
    curves = {}
    for strategy in STRATEGIES:
        z_weak = z_init.permute(0, 3, 1, 2).contiguous().requires_grad_()
        crit = InstanceAwarePixelContrast(num_negatives=NUM_NEGATIVES, strategy=strategy, compute_stats=False)
        optimizer = torch.optim.SGD([z_weak], lr=float(z_weak.shape[0] * grid[0].numel()))  # per-pixel step 1
        curve = [ground_truth_margin(z_weak.detach(), z_strong, grid)]
        for step in range(steps):
            out = crit(z_weak, z_strong, mask_logits, class_logits, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            curve.append(ground_truth_margin(z_weak.detach(), z_strong, grid))
        curves[strategy] = curve
    return curves


def anchor_distributions(ids: torch.Tensor, query_class: torch.Tensor, confidence: float) -> tuple[tuple[int, int], dict]:
    """Each strategy's exact sampling distribution s/Σs for one anchor on the first image."""
    mask_logits, class_logits = predictions(ids[:1], query_class[:1], confidence)
    grid = feature_grid(ids[:1])[0]  # (h, w)
    classes = query_class[0, 1:]
    # the anchor: centre of the largest instance that shares its class with another instance
    shared = [k for k in range(len(classes)) if (classes == classes[k]).sum() > 1 and (grid == k).any()]
    candidates = shared or [k for k in range(len(classes)) if (grid == k).any()]
    target = max(candidates, key=lambda k: int((grid == k).sum()))
    ys, xs = (grid == target).nonzero(as_tuple=True)
    pick = ((ys - ys.float().mean()) ** 2 + (xs - xs.float().mean()) ** 2).argmin()
    anchor = (int(ys[pick]), int(xs[pick]))
    flat = anchor[0] * grid.shape[1] + anchor[1]
    maps = {}
    for strategy in STRATEGIES:
        if strategy == "uniform":
            weights = torch.ones(grid.numel(), dtype=torch.float64)
        else:
            probs = fused_probability(mask_logits, class_logits, tuple(grid.shape), strategy)[0].double()  # (N, E)
            weights = debias_score(probs[flat][None], probs)
        weights[flat] = 0.0
        maps[strategy] = (weights / weights.sum()).reshape(grid.shape)
    return anchor, maps


def plot(path: Path, image: np.ndarray, grid: torch.Tensor, anchor, maps, sweep, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(16, 7.5))
    top = figure.subplots(1, 5, gridspec_kw={"bottom": 0.52, "top": 0.93})
    boundaries = np.zeros(grid.shape, dtype=bool)
    g = grid.numpy()
    boundaries[:-1] |= g[:-1] != g[1:]
    boundaries[:, :-1] |= g[:, :-1] != g[:, 1:]
    top[0].imshow(image)
    top[0].set_title("target-domain image")
    scale = image.shape[0] / grid.shape[0]
    top[0].plot((anchor[1] + 0.5) * scale, (anchor[0] + 0.5) * scale, "w*", markersize=14, markeredgecolor="k")
    for axis, strategy in zip(top[1:], STRATEGIES):
        heat = maps[strategy].numpy()
        axis.imshow(heat, cmap="magma")
        axis.imshow(np.ma.masked_where(~boundaries, boundaries), cmap="winter", alpha=0.6)
        axis.plot(anchor[1], anchor[0], "c*", markersize=12, markeredgecolor="k")
        own = maps[strategy][grid == grid[anchor]].sum().item()
        axis.set_title(f"{strategy}\nP(own instance) = {own:.3f}")
    for axis in top:
        axis.set_xticks([])
        axis.set_yticks([])
    bottom = figure.subplots(1, 2, gridspec_kw={"bottom": 0.08, "top": 0.43, "wspace": 0.25})
    confidences = sorted(sweep)
    for strategy in STRATEGIES:
        bottom[0].plot(confidences, [sweep[c][strategy]["fnr"] for c in confidences], "o-", label=strategy)
        bottom[1].plot(curves[strategy], label=strategy)
    bottom[0].set_xlabel("prediction confidence (logit of the true query / class)")
    bottom[0].set_ylabel("false-negative rate")
    bottom[0].set_title("Negatives drawn from the anchor's own instance")
    bottom[0].legend()
    bottom[1].set_xlabel("SGD step")
    bottom[1].set_ylabel("ground-truth margin")
    bottom[1].set_title("Inter-instance margin while training (Proposition 3.1)")
    bottom[1].legend()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="where the built-in dataset is generated")
    parser.add_argument("--images", type=int, default=8, help="validation images in the batch")
    parser.add_argument("--steps", type=int, default=20, help="SGD steps per strategy for the margin curves")
    parser.add_argument("--confidence", type=float, default=2.0, help="prediction confidence for the margin run and the picture")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="where the PNG and JSON go")
    args = parser.parse_args()
    torch.manual_seed(0)

    generate_dataset(args.data, SyntheticConfig())
    images, ids, query_class, _ = load_scenes(args.data, args.images)
    sweep = {c: sampling_statistics(ids, query_class, c) for c in (0.5, 1.0, 2.0, 4.0)}
    curves = margin_curves(ids, query_class, args.confidence, args.steps)
    anchor, maps = anchor_distributions(ids, query_class, args.confidence)

    stats = sweep[args.confidence] if args.confidence in sweep else sampling_statistics(ids, query_class, args.confidence)
    print(f"{args.images} target-domain images, {images.shape[1]}x{images.shape[2]} px, features at 1/{FEATURE_STRIDE}, R={NUM_NEGATIVES}")
    print("FNR: negatives from the anchor's own instance; hard: negatives on another instance of the anchor's class")
    print(f"{'strategy':>8} | {'FNR':>6} | {'p':>6} | {'hard':>6} | {'accept':>6} | {'fallbk':>6} | {'s/call':>6} | margin start -> end")
    for strategy in STRATEGIES:
        r = stats[strategy]
        curve = curves[strategy]
        print(
            f"{strategy:>8} | {r['fnr']:6.3f} | {r['p']:6.3f} | {r['same_class_other_instance']:6.3f} | "
            f"{r['acceptance']:6.3f} | {r['fallbacks']:6d} | {r['seconds']:6.3f} | {curve[0]:.3f} -> {curve[-1]:.3f}"
        )
    print("FNR of fusion by confidence:", {c: round(sweep[c]["fusion"]["fnr"], 4) for c in sorted(sweep)})

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"confidence": args.confidence, "sweep": sweep, "margin_curves": curves, "anchor": anchor}
    (args.out / "compare_sampling.json").write_text(json.dumps(summary, indent=2))
    plot(args.out / "compare_sampling.png", images[0].numpy(), feature_grid(ids[:1])[0], anchor, maps, sweep, curves)
    print(f"wrote {args.out / 'compare_sampling.png'} and {args.out / 'compare_sampling.json'}")


if __name__ == "__main__":
    main()
