"""``InstanceAwarePixelContrast``: the module that routes tensors through the functional core."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._amp import autocast_off
from ._backend import resolve_backend
from ._checks import (
    check_choice,
    check_embeddings,
    check_finite,
    check_instance_ids,
    check_positive,
    check_predictions,
    check_valid_mask,
    extract_predictions,
)
from ._types import CandidateBlocks
from .distributed import all_gather_rows, all_gather_rows_with_grad, all_reduce_count, gathered_offset, world_info
from .functional import (
    SCORES,
    STRATEGIES,
    _false_negative_counts,
    _info_nce_terms,
    empirical_margin,
    fused_probability,
    pixel_hinge,
    positive_similarity,
)
from .memory_bank import PixelMemoryBank
from .ops.rows import pixel_rows, take_rows
from .sampler import InstanceAwareSampler, NegativeSamples

__all__ = ["ANCHOR_MEANS", "LOSSES", "ContrastOutput", "ContrastStats", "InstanceAwarePixelContrast"]

LOSSES = ("infonce", "hinge")
ANCHOR_MEANS = ("global", "rank")
_RANK_SHIFT = 20  # false-negative keys: image = rank·2^20 + b, key = image·2^32 + id + 1


@dataclass
class ContrastStats:
    """Diagnostics of one call (plain Python numbers, ready to log).

    Attributes:
        num_anchors: anchors that contributed to the loss on this rank.
        total_anchors: anchors the loss is averaged over: ``num_anchors``, or under
            ``gather_distributed`` with ``anchor_mean="global"`` the sum over all ranks.
        pool_size: candidates negatives were drawn from (batch, other ranks, bank).
        bank_candidates: how many of those came from the memory bank.
        acceptance: accepted / proposed pairs of this call's rejection sampler (a cost measure,
            about 0.3–0.8 whatever the confidence; ``uniform``: its thinning rate).
        mean_score: exact mean debias score ``1 - <ŷ_p, c>`` over anchors
            (``c`` the pool mean); ``nan`` for ``strategy="uniform"``.
        fallbacks: negatives drawn by the uniform fallback (0 means the sample is exact).
        fallback_anchors: anchors with at least one fallback negative.
        zero_pool_anchors: anchors whose whole pool scores 0 (every candidate looks like their own
            instance); they get uniform negatives, counted in ``fallbacks``.
        rounds: proposal rounds the sampler ran.
        positive_cosine: mean cosine of positive pairs.
        negative_cosine: mean cosine of sampled negative pairs.
        margin: ``positive_cosine - negative_cosine`` (the empirical margin Δ).
        fnr: false-negative rate (only when ``instance_ids`` were given and countable).
    """

    num_anchors: int = 0
    total_anchors: int = 0
    pool_size: int = 0
    bank_candidates: int = 0
    acceptance: float = 1.0
    mean_score: float = float("nan")
    fallbacks: int = 0
    fallback_anchors: int = 0
    zero_pool_anchors: int = 0
    rounds: int = 0
    positive_cosine: float = float("nan")
    negative_cosine: float = float("nan")
    margin: float = float("nan")
    fnr: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """The fields as a dict."""
        return dict(self.__dict__)


@dataclass
class ContrastOutput:
    """What :class:`InstanceAwarePixelContrast` returns.

    Attributes:
        loss: the scalar loss (differentiable).
        stats: diagnostics, :class:`ContrastStats`.
        samples: the sampler's output (``None`` when no anchor was sampled).
        anchor_index: the anchors' flat positions ``b·h·w + p`` in the local batch, ``(A,)``.
    """

    loss: Tensor
    stats: ContrastStats = field(default_factory=ContrastStats)
    samples: NegativeSamples | None = None
    anchor_index: Tensor | None = None

    @property
    def negative_index(self) -> Tensor | None:
        """Sampled negatives ``(A, R)``, indices into the pool (batch rows first, then bank rows)."""
        return self.samples.index if self.samples is not None else None


class InstanceAwarePixelContrast(nn.Module):
    r"""Instance-aware pixel contrastive loss with debiased negative sampling.

    For every valid anchor pixel :math:`(b, p)` the positive is the strong view at the same
    location and ``R`` negatives are drawn from the pool with probability :math:`\propto s(p, q)`,
    :math:`s = \max(0, 1 - \langle\hat y_p, \hat y_q\rangle)` of the fused mask/class
    probabilities (see :mod:`instcontrast.functional`). Then

    .. math::
        \ell = -\log\frac{e^{s^+}}{e^{s^+} + \sum_r e^{s^-_r}}, \qquad
        s^+ = \langle z^w_{b,p}, z^s_{b,p}\rangle/T,\quad s^-_r = \langle z^w_{b,p}, z^s_{b'_r,q_r}\rangle/T,

    averaged over anchors (``loss="hinge"``: :math:`\frac1R\sum_r\max(0, m-\cos^++\cos^-_r)`).

    Args:
        temperature: :math:`T` (paper: 0.2).
        num_negatives: :math:`R` (paper: 256).
        strategy: ``"fusion"`` (default), ``"mask"``, ``"class"`` or ``"uniform"``.
        score: ``"linear"``, ``"squared"`` or ``"sqrt"``.
        loss: ``"infonce"`` or ``"hinge"``.
        margin: hinge margin :math:`m` (paper: 0.2).
        memory_bank: a :class:`~instcontrast.memory_bank.PixelMemoryBank` adding candidates;
            updated after each training-mode call.
        backend: ``"auto"``, ``"reference"``, ``"chunked"`` or ``"triton"``; decided once here. ``None``
            (default): the environment variable ``INSTCONTRAST_BACKEND`` if set, else ``"auto"``; an
            explicit name wins over the variable.
        detach_strong: stop gradients through the strong (target) branch (default, asymmetric).
        max_anchors: keep at most this many randomly chosen valid anchors per call (whole batch,
            this rank); ``None`` uses all.
        gather_distributed: under ``torch.distributed``, draw negatives from every rank's pixels
            (autograd-aware all-gather when the strong branch is not detached). Every rank must
            then call the module, with the same configuration and with ``instance_ids`` given on
            all ranks or on none; a rank without valid pixels is fine.
        anchor_mean: with ``gather_distributed`` and more than one rank: ``"global"`` (default)
            divides each rank's summed loss by the anchor count all-reduced over ranks and
            multiplies by the world size ``W``, :math:`L_r = W \sum_{a \in r} \ell_a / A_{\text{all}}`,
            so DDP's gradient averaging :math:`\frac1W\sum_r \nabla L_r` is exactly the gradient of
            the single-process mean over the concatenated batch, whatever the per-rank counts
            (the value :math:`L_r` is then not this rank's own mean: average it over ranks to log
            the global loss). ``"rank"`` returns this rank's own mean; DDP then optimizes the mean
            of per-rank means, which weights an anchor on a rank with few anchors more and differs
            from the single-process step unless every rank has the same number of anchors.
            Without a process group (or ``gather_distributed=False``) both are the plain mean.
        ignore_index: instance id skipped when computing the false-negative rate.
        max_rounds: rejection-sampling rounds before the uniform fallback (rarely more than 2 are used).
        compute_stats: compute the margin/cosine diagnostics (one extra no-grad pass).

    Shape:
        - z_weak, z_strong: :math:`(B, D, h, w)` (any memory layout, any float dtype)
        - mask_logits: :math:`(B, K, H, W)` at any resolution (resized bilinearly to ``h×w``)
        - class_logits: :math:`(B, K, C+1)`, no-object class last
        - valid: :math:`(B, h, w)` bool, optional
        - instance_ids: :math:`(B, H', W')` integer, optional (resized nearest)

    Edge cases (documented, finite): fewer than two valid candidates, or no valid anchor,
    gives a zero loss that is still attached to the graph and ``stats.num_anchors == 0``.
    ``R`` larger than the pool is fine (sampling is with replacement). An anchor whose pool
    scores are all zero (one instance everywhere) gets uniform negatives, counted in
    ``stats.zero_pool_anchors`` and ``stats.fallbacks``. NaN/Inf inputs raise ``ValueError``.
    float64 embeddings and logits stay float64. Embeddings of any finite magnitude work (max-abs
    scaled before normalizing); an all-zero embedding pixel gets a zero gradient.

    Example:
        >>> crit = InstanceAwarePixelContrast(num_negatives=8)
        >>> z_w, z_s = torch.randn(2, 16, 8, 8, requires_grad=True), torch.randn(2, 16, 8, 8)
        >>> out = crit(z_w, z_s, torch.randn(2, 5, 32, 32), torch.randn(2, 5, 4))
        >>> out.loss.backward()
    """

    def __init__(
        self,
        temperature: float = 0.2,
        num_negatives: int = 256,
        strategy: str = "fusion",
        score: str = "linear",
        loss: str = "infonce",
        margin: float = 0.2,
        memory_bank: PixelMemoryBank | None = None,
        backend: str | None = None,
        detach_strong: bool = True,
        max_anchors: int | None = None,
        gather_distributed: bool = False,
        anchor_mean: str = "global",
        ignore_index: int = -1,
        max_rounds: int = 8,
        compute_stats: bool = True,
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        if max_anchors is not None:
            check_positive("max_anchors", max_anchors, integer=True)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise ValueError(f"margin must be a number >= 0, got {margin!r}")
        if memory_bank is not None and not isinstance(memory_bank, PixelMemoryBank):
            raise TypeError(f"memory_bank must be a PixelMemoryBank or None, got {type(memory_bank).__name__}")
        self.temperature = float(temperature)
        self.loss_type = check_choice("loss", loss, LOSSES)
        self.margin = float(margin)
        self.sampler = InstanceAwareSampler(
            num_negatives=num_negatives,
            strategy=check_choice("strategy", strategy, STRATEGIES),
            score=check_choice("score", score, SCORES),
            max_rounds=max_rounds,
        )
        self.memory_bank = memory_bank
        self.backend = resolve_backend(backend)
        self.detach_strong = bool(detach_strong)
        self.max_anchors = max_anchors
        self.gather_distributed = bool(gather_distributed)
        self.anchor_mean = check_choice("anchor_mean", anchor_mean, ANCHOR_MEANS)
        self.ignore_index = int(ignore_index)
        self.compute_stats = bool(compute_stats)

    @property
    def num_negatives(self) -> int:
        """``R``."""
        return self.sampler.num_negatives

    @property
    def strategy(self) -> str:
        """The sampling strategy."""
        return self.sampler.strategy

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, num_negatives={self.num_negatives}, strategy={self.strategy!r}, "
            f"score={self.sampler.score!r}, loss={self.loss_type!r}, backend={self.backend.name!r}, "
            f"detach_strong={self.detach_strong}, max_anchors={self.max_anchors}"
        )

    def forward(
        self,
        z_weak: Tensor,
        z_strong: Tensor,
        mask_logits: Any = None,
        class_logits: Tensor | None = None,
        valid: Tensor | None = None,
        instance_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ContrastOutput:
        """Compute the loss and its diagnostics.

        Args:
            z_weak: weak-view (anchor) embeddings.
            z_strong: strong-view embeddings aligned to the weak grid.
            mask_logits: mask logits, or a dict with ``pred_masks``/``pred_logits``, or a
                ``transformers`` Mask2Former output (then leave ``class_logits`` as ``None``).
                Optional only for ``strategy="uniform"``.
            class_logits: class logits (with raw ``mask_logits``).
            valid: pixels allowed as anchors and as negatives.
            instance_ids: ground-truth instance ids for the false-negative rate.
            generator: random generator for anchor subsampling and negative sampling.

        Returns:
            :class:`ContrastOutput`.
        """
        check_embeddings(z_weak, z_strong)
        with autocast_off(z_weak):  # similarities and log-sum-exp accumulate in float32 under AMP
            return self._forward(z_weak, z_strong, mask_logits, class_logits, valid, instance_ids, generator)

    def _forward(
        self,
        z_weak: Tensor,
        z_strong: Tensor,
        mask_logits: Any,
        class_logits: Tensor | None,
        valid: Tensor | None,
        instance_ids: Tensor | None,
        generator: torch.Generator | None,
    ) -> ContrastOutput:
        batch, dim, height, width = z_weak.shape
        check_finite("z_weak", z_weak)
        check_finite("z_strong", z_strong)
        mask_logits, class_logits = extract_predictions(mask_logits, class_logits)
        device = z_weak.device
        probs = None  # (B·N, E)
        if self.strategy != "uniform" or self.memory_bank is not None:
            if mask_logits is None or class_logits is None:
                needed_by = "the memory bank (it stores fused probabilities)" if self.strategy == "uniform" else f"strategy={self.strategy!r}"
                raise ValueError(f"{needed_by} needs mask_logits (B, K, H, W) and class_logits (B, K, C+1)")
            check_predictions(mask_logits, class_logits, batch)
            check_finite("mask_logits", mask_logits)
            check_finite("class_logits", class_logits)
            with torch.no_grad():
                probs = fused_probability(
                    mask_logits.detach().to(device), class_logits.detach().to(device), (height, width),
                    "fusion" if self.strategy == "uniform" else self.strategy,
                ).reshape(batch * height * width, -1)  # (B·N, E)
        valid_flat = check_valid_mask(valid, batch, height, width, device).reshape(-1)  # (B·N,)

        z_weak_flat = pixel_rows(z_weak)  # (B·N, D)
        z_strong_flat = pixel_rows(z_strong.detach() if self.detach_strong else z_strong)  # (B·N, D)

        local_pool = valid_flat.nonzero(as_tuple=True)[0]  # (M_local,) flat positions of valid pixels
        anchor_in_local = self._choose_anchors(local_pool.numel(), device, generator)  # (A,)
        anchor_flat = local_pool[anchor_in_local]  # (A,)

        # Under torch.distributed every rank runs the same collectives in the same order, whatever
        # its anchors (none included): pool gather, anchor-count all-reduce, FNR key gather, bank
        # enqueue, and (detach_strong=False) the all-reduce in the gather's backward.
        distributed = self.gather_distributed and world_info()[1] > 1
        every_pixel = local_pool.numel() == valid_flat.numel()  # local_pool is then arange: no copies
        local_strong = z_strong_flat if every_pixel else take_rows(z_strong_flat, local_pool)  # (M_local, D)
        local_probs = probs if probs is None or every_pixel else take_rows(probs, local_pool)  # (M_local, E)
        pool_z, pool_probs = local_strong, local_probs  # extended below by other ranks' rows and the bank
        offset = 0
        if distributed:
            offset = gathered_offset(local_pool.numel(), device)
            pool_z = all_gather_rows(pool_z) if self.detach_strong else all_gather_rows_with_grad(pool_z)
            pool_probs = all_gather_rows(pool_probs) if pool_probs is not None else None
        batch_pool_size = pool_z.shape[0]
        bank_z, bank_probs = self._bank_candidates(dim, probs, device)
        pool_size = batch_pool_size + bank_z.shape[0]
        sampled = pool_size >= 2 and anchor_flat.numel() > 0
        total_anchors = anchor_flat.numel() if sampled else 0
        if distributed and self.anchor_mean == "global":
            total_anchors = all_reduce_count(total_anchors, device)
        if bank_z.shape[0] > 0:
            pool_z = torch.cat([pool_z, bank_z.to(pool_z.dtype)], dim=0)  # (M, D)
            if pool_probs is not None:
                pool_probs = torch.cat([pool_probs, bank_probs.to(pool_probs.dtype)], dim=0)  # (M, E)

        samples = None
        if sampled:
            anchor_pool_index = anchor_in_local + offset  # (A,) each anchor's own row in the pool
            samples = self.sampler(
                None,  # the anchors are pool rows anchor_pool_index: their vectors are read from pool_probs
                pool_probs,
                anchor_pool_index,
                pool_size=pool_size,
                generator=generator,
            )
            every_anchor = every_pixel and anchor_flat.numel() == valid_flat.numel()  # anchor_flat is arange
            every_valid_anchor = anchor_flat.numel() == local_pool.numel()  # anchor_flat is local_pool
            anchors = z_weak_flat if every_anchor else take_rows(z_weak_flat, anchor_flat)  # (A, D)
            # the pool's own rows when the anchors are every valid pixel (normalised once, not twice)
            positives = local_strong if every_valid_anchor else take_rows(z_strong_flat, anchor_flat)  # (A, D)
            similarities = None  # (cos⁺ per anchor, Σ cos⁻) when the loss formed them anyway
            if self.loss_type == "infonce":
                loss_sum, positive_cos, negative_sum = _info_nce_terms(
                    anchors, positives, pool_z, samples.blocks, self.temperature, "sum", self.backend
                )
                similarities = (positive_cos, negative_sum) if negative_sum is not None else None
            else:
                loss_sum = pixel_hinge(anchors, positives, pool_z, samples.blocks, self.margin, reduction="sum")
            stats = self._stats(samples, anchors, positives, pool_z, pool_size, bank_z.shape[0], similarities)
        else:
            # no anchor here (or no pool anywhere): a zero still attached to every input of the graph,
            # the gathered pool included, so backward reaches the gather's all-reduce on this rank too
            loss_sum = z_weak.sum() * 0.0 + (pool_z.sum() * 0.0 if pool_z.requires_grad else 0.0)
            stats = ContrastStats(pool_size=pool_size, bank_candidates=bank_z.shape[0])
        loss = self._normalize(loss_sum, total_anchors, distributed)
        stats.total_anchors = total_anchors

        if instance_ids is not None:
            stats.fnr = self._false_negative_rate(
                instance_ids,
                batch,
                height,
                width,
                local_pool,
                anchor_flat if sampled else anchor_flat[:0],
                samples.blocks if samples is not None else None,
                bank_z.shape[0],
                distributed,
            )
        if self.memory_bank is not None and self.training and probs is not None:
            self.memory_bank.enqueue(local_strong.detach(), local_probs, generator=generator)
        return ContrastOutput(loss=loss, stats=stats, samples=samples, anchor_index=anchor_flat if sampled else None)

    def _normalize(self, loss_sum: Tensor, total_anchors: int, distributed: bool) -> Tensor:
        """Turn this rank's summed per-anchor loss into what it returns (see the class docstring)."""
        loss_sum = loss_sum.float() if loss_sum.dtype != torch.float64 else loss_sum
        if total_anchors == 0:
            return loss_sum * 0.0
        if distributed and self.anchor_mean == "global":
            return loss_sum * (world_info()[1] / total_anchors)
        return loss_sum / total_anchors

    def _choose_anchors(self, num_valid: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        if self.max_anchors is None or num_valid <= self.max_anchors:
            return torch.arange(num_valid, device=device)
        return torch.randperm(num_valid, generator=generator, device=device)[: self.max_anchors]

    def _bank_candidates(self, dim: int, probs: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.memory_bank is None:
            return torch.empty(0, dim, device=device), torch.empty(0, 0, device=device)
        self.memory_bank.check_dims(dim, probs.shape[1] if probs is not None else None)
        bank_z, bank_probs = self.memory_bank.candidates()
        return bank_z.to(device), bank_probs.to(device)

    def _stats(
        self,
        samples: NegativeSamples,
        anchors: Tensor,
        positives: Tensor,
        pool_z: Tensor,
        pool_size: int,
        bank: int,
        similarities: tuple[Tensor, Tensor] | None = None,
    ) -> ContrastStats:
        stats = ContrastStats(
            num_anchors=anchors.shape[0],
            pool_size=pool_size,
            bank_candidates=bank,
            acceptance=samples.acceptance_rate,
            mean_score=samples.mean_score,
            fallbacks=samples.fallbacks,
            fallback_anchors=samples.fallback_anchors,
            zero_pool_anchors=samples.zero_pool_anchors,
            rounds=samples.rounds,
        )
        if self.compute_stats:
            with torch.no_grad():
                if similarities is not None:  # the loss's own similarities: no second scoring pass
                    positive_cos = similarities[0].mean()
                    margin = positive_cos - similarities[1] / (anchors.shape[0] * samples.blocks.num_negatives)
                else:
                    positive_cos = positive_similarity(anchors.detach(), positives.detach()).mean()
                    margin = empirical_margin(anchors.detach(), positives.detach(), pool_z.detach(), samples.blocks)
            stats.positive_cosine = float(positive_cos)
            stats.margin = float(margin)
            stats.negative_cosine = stats.positive_cosine - stats.margin
        return stats

    @torch.no_grad()
    def _false_negative_rate(
        self,
        instance_ids: Tensor,
        batch: int,
        height: int,
        width: int,
        local_pool: Tensor,
        anchor_flat: Tensor,
        blocks: CandidateBlocks | None,
        num_bank: int,
        distributed: bool,
    ) -> float | None:
        instance_ids = check_instance_ids(instance_ids, batch).to(anchor_flat.device)
        ids = F.interpolate(instance_ids[:, None].double(), size=(height, width), mode="nearest")
        ids = ids[:, 0].long().reshape(-1)  # (B·N,)
        rank, _ = world_info()
        # an image is (rank, b): ranks may hold different batch sizes, so no rank·B arithmetic
        image = torch.arange(batch, device=ids.device).repeat_interleave(height * width) + (rank << _RANK_SHIFT)
        # keys unique across images and ranks: (image, id); -1 marks ignored pixels
        keys = torch.where(ids == self.ignore_index, torch.full_like(ids, -1), (image << 32) + ids + 1)
        pool_keys = keys[local_pool]  # (M_local,)
        if distributed:  # every rank gathers, with or without anchors of its own
            pool_keys = all_gather_rows(pool_keys)
        if num_bank > 0:  # bank rows come from earlier images: never the anchor's instance
            bank_keys = -2 - torch.arange(num_bank, device=ids.device)
            pool_keys = torch.cat([pool_keys, bank_keys])
        if blocks is None:
            return None
        # block by block from the candidate lists (no (A, R) index is assembled): the counts of
        # false_negative_rate(keys[anchor_flat], pool_keys[samples.index], ignore_index=-1)
        anchor_keys = keys[anchor_flat]  # (A,)
        same = countable = 0  # summed as tensors: one host sync for the call, not two per block
        for block, (candidates, columns) in enumerate(zip(blocks.candidates, blocks.columns, strict=True)):
            negative_keys = pool_keys[candidates][columns.long()]  # (c, R)
            block_same, block_countable = _false_negative_counts(anchor_keys[blocks.block_rows(block)], negative_keys, -1)
            same, countable = same + block_same, countable + block_countable
        same, countable = int(same), int(countable)
        return same / countable if countable else None
