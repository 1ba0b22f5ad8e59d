r"""Functional core of the instance-aware pixel contrastive loss: pure, typed functions.

Notation: ``B`` batch, ``K`` instance queries, ``C`` foreground classes (+1 no-object, the last
column), ``h×w`` feature grid, ``N = h·w``, ``E`` width of the fused probability vector, ``D``
embedding width, ``A`` anchors, ``M`` pool candidates, ``R`` negatives per anchor, ``T``
temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._amp import without_autocast
from ._backend import Backend, resolve_backend
from ._checks import check_choice, check_positive, check_predictions
from ._types import SCORES, STRATEGIES, CandidateBlocks
from .ops.chunked import accumulation_dtype, block_scores, blocked_logsumexp_and_negative_sum, default_block_size
from .ops.normalize import l2_normalize
from .ops.rows import row_dot

__all__ = [
    "REDUCTIONS",
    "SCORES",
    "STRATEGIES",
    "debias_score",
    "empirical_margin",
    "false_negative_rate",
    "fused_probability",
    "pixel_hinge",
    "pixel_info_nce",
    "positive_similarity",
]

REDUCTIONS = ("mean", "sum", "none")


@without_autocast(0)
def fused_probability(
    mask_logits: Tensor,
    class_logits: Tensor,
    size: tuple[int, int] | None = None,
    strategy: str = "fusion",
) -> Tensor:
    r"""Per-pixel fused probability embedding :math:`\hat y` (Eq. 1–2 of the paper).

    .. math::
        P_m[b,k,p] = \mathrm{softmax}_k\, M[b,k,p],\quad
        P_c[b,k,c] = \mathrm{softmax}_c\, L[b,k,c],\quad
        F_c[b,p,c] = \sum_k P_m[b,k,p]\,P_c[b,k,c],

    .. math::
        y[b,p] = \big(P_m[b,:,p],\ F_c[b,p,:]\big),\qquad \hat y = y / \lVert y\rVert_2 .

    ``strategy="mask"`` keeps only :math:`P_m`, ``"class"`` only :math:`F_c`; ``"fusion"`` (and
    ``"uniform"``, for which the embedding is unused) keeps both. Every entry is non-negative and
    every vector has unit norm, so :math:`\langle \hat y_p, \hat y_q\rangle \in [0, 1]`.

    Args:
        mask_logits: per-query mask logits at any resolution; resized bilinearly to ``size``.
        class_logits: per-query class logits, no-object class last.
        size: the feature grid ``(h, w)``; defaults to the mask resolution.
        strategy: one of :data:`STRATEGIES`.

    Shape:
        - mask_logits: :math:`(B, K, H, W)`
        - class_logits: :math:`(B, K, C+1)`
        - output: :math:`(B, h\cdot w, E)` with :math:`E = K + C + 1` (fusion), :math:`K` (mask)
          or :math:`C + 1` (class); float32 (float64 for float64 inputs).

    Returns:
        The ℓ2-normalized fused probability vectors, row-major over the ``h×w`` grid.

    Raises:
        ValueError: on mismatched shapes or an unknown strategy.
    """
    check_choice("strategy", strategy, STRATEGIES)
    check_predictions(mask_logits, class_logits)
    work = accumulation_dtype(mask_logits.dtype, class_logits.dtype)
    mask_logits = mask_logits.to(work)
    if size is not None and tuple(size) != tuple(mask_logits.shape[-2:]):
        mask_logits = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    batch, queries = mask_logits.shape[:2]
    mask_probs = mask_logits.reshape(batch, queries, -1).softmax(dim=1)  # (B, K, N)
    if strategy == "mask":
        return F.normalize(mask_probs.transpose(1, 2), p=2.0, dim=-1)  # (B, N, K)
    class_probs = class_logits.to(work).softmax(dim=-1)  # (B, K, C+1)
    if strategy == "class":
        return F.normalize(torch.bmm(mask_probs.transpose(1, 2), class_probs), p=2.0, dim=-1)  # (B, N, C+1)
    # both parts written into one buffer and normalized in place: F.normalize(cat(...)) without two copies
    fused = torch.empty(batch, mask_probs.shape[2], queries + class_probs.shape[-1], dtype=work, device=mask_probs.device)
    if torch.is_grad_enabled() and (mask_probs.requires_grad or class_probs.requires_grad):
        fused[..., :queries] = mask_probs.transpose(1, 2)
        fused[..., queries:] = torch.bmm(mask_probs.transpose(1, 2), class_probs)  # (B, N, C+1)
    else:
        # per image, both parts as the columns of one (E, N) buffer (F_cᵀ = P_cᵀ P_m is a wide product,
        # unlike the skinny (N, K)(K, C+1) one), then a single 2-D transposing copy into the rows
        columns = mask_probs.new_empty(fused.shape[2], fused.shape[1])  # (E, N)
        for image in range(batch):
            columns[:queries] = mask_probs[image]
            torch.mm(class_probs[image].T, mask_probs[image], out=columns[queries:])  # (C+1, N)
            fused[image] = columns.T
    norm = torch.linalg.vector_norm(fused, dim=-1, keepdim=True).clamp_min(1e-12)  # (B, N, 1)
    return fused.div_(norm) if not fused.requires_grad else fused / norm  # (B, N, E)


def debias_score(anchor_probs: Tensor, candidate_probs: Tensor, score: str = "linear") -> Tensor:
    r"""Debias score: how likely two pixels belong to different instances.

    .. math::
        s(p, q) = \max\big(0,\ 1 - \langle \hat y_p, \hat y_q\rangle\big) \in [0, 1],

    with variants ``"squared"`` (:math:`s^2`) and ``"sqrt"`` (:math:`\sqrt{s}`). Note
    :math:`s(p, p) = 0`: an anchor never samples itself.

    Args:
        anchor_probs: fused probability vectors of the anchors (from :func:`fused_probability`).
        candidate_probs: fused probability vectors of the candidates; broadcast against anchors.
        score: one of :data:`SCORES`.

    Shape:
        - anchor_probs: :math:`(\ldots, E)`, candidate_probs: :math:`(\ldots, E)` (broadcastable)
        - output: :math:`(\ldots)`

    Returns:
        Scores in :math:`[0, 1]`.
    """
    check_choice("score", score, SCORES)
    if anchor_probs.shape[-1] != candidate_probs.shape[-1]:
        raise ValueError(
            f"anchor_probs (..., E) and candidate_probs (..., E) disagree on E: "
            f"{anchor_probs.shape[-1]} vs {candidate_probs.shape[-1]}"
        )
    similarity = (anchor_probs * candidate_probs).sum(dim=-1)
    return transform_score((1.0 - similarity).clamp(0.0, 1.0), score)


def transform_score(linear_score: Tensor, score: str) -> Tensor:
    """Apply the score variant (``"linear"``, ``"squared"``, ``"sqrt"``) to a linear score in ``[0, 1]``."""
    if score == "squared":
        return linear_score.square()
    if score == "sqrt":
        return linear_score.sqrt()
    return linear_score


def _resolve(backend: str | Backend | None) -> Backend:
    return backend if isinstance(backend, Backend) else resolve_backend(backend)


def _check_pairs(anchors: Tensor, positives: Tensor, pool: Tensor, negatives: Tensor | CandidateBlocks) -> None:
    if anchors.ndim != 2:
        raise ValueError(f"anchors must have shape (A, D), got {tuple(anchors.shape)}")
    if positives.shape != anchors.shape:
        raise ValueError(f"positives must have the anchors' shape (A, D) = {tuple(anchors.shape)}, got {tuple(positives.shape)}")
    if pool.ndim != 2 or pool.shape[1] != anchors.shape[1]:
        raise ValueError(f"pool must have shape (M, D) with D = {anchors.shape[1]}, got {tuple(pool.shape)}")
    if not isinstance(negatives, Tensor):
        if negatives.num_anchors != anchors.shape[0]:
            raise ValueError(f"negatives (candidate blocks) cover {negatives.num_anchors} anchors, expected A = {anchors.shape[0]}")
        return
    if negatives.ndim != 2 or negatives.shape[0] != anchors.shape[0]:
        raise ValueError(f"negatives must have shape (A, R) with A = {anchors.shape[0]}, got {tuple(negatives.shape)}")
    if negatives.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"negatives must be an int64 or int32 index, got {negatives.dtype}")


def _as_index(negatives: Tensor | CandidateBlocks) -> Tensor:
    return negatives if isinstance(negatives, Tensor) else negatives.to_index()


def _reduce(per_anchor: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    if per_anchor.numel() == 0:
        return per_anchor.sum()  # 0, still attached to the graph
    return per_anchor.mean()


def _normalized(x: Tensor) -> Tensor:
    """Unit rows in the accumulation dtype; max-abs scaled first, so no norm overflows, and a zero
    row stays zero with zero gradient (:func:`~instcontrast.ops.normalize.l2_normalize`)."""
    return l2_normalize(x, accumulation_dtype(x.dtype))


def positive_similarity(anchors: Tensor, positives: Tensor) -> Tensor:
    r"""Cosine similarity :math:`\cos^+_a = \langle \hat z^w_a, \hat z^s_a\rangle` of each positive pair, ``(A,)``."""
    return (_normalized(anchors) * _normalized(positives)).sum(dim=-1)


@without_autocast(0)
def pixel_info_nce(
    anchors: Tensor,
    positives: Tensor,
    pool: Tensor,
    negatives: Tensor | CandidateBlocks,
    temperature: float = 0.2,
    reduction: str = "mean",
    backend: str | Backend | None = None,
) -> Tensor:
    r"""Pixel InfoNCE (NT-Xent) over sampled negatives.

    With ℓ2-normalized embeddings, :math:`s^+_a = \langle z^w_a, z^s_a\rangle / T` and
    :math:`s^-_{a,r} = \langle z^w_a, m_{i_{a,r}}\rangle / T`,

    .. math::
        \ell_a = -\log \frac{e^{s^+_a}}{e^{s^+_a} + \sum_{r=1}^{R} e^{s^-_{a,r}}}
               = \operatorname{softplus}\Big(\log\sum_r e^{s^-_{a,r}} - s^+_a\Big) \ge 0 .

    Inputs are normalized here by :func:`~instcontrast.ops.normalize.l2_normalize`: each vector is
    divided by its largest absolute entry before its norm is taken, so any finite magnitude works
    (no overflow at :math:`10^{19}`, no underflow of tiny half-precision vectors); a zero vector
    stays zero and gets a zero gradient; a gradient too large for the input's dtype is scaled
    down to its largest finite value instead of becoming ``inf``. Similarities and the
    log-sum-exp are accumulated in float32 (float64 for float64 inputs), so half-precision inputs
    are safe. With no
    anchors (``A = 0``) the ``"mean"`` is 0, still attached to the graph.

    Args:
        anchors: weak-view embeddings of the anchors.
        positives: strong-view embeddings at the anchors' locations.
        pool: candidate negative embeddings (strong view, plus memory bank rows).
        negatives: for each anchor, ``R`` row indices into ``pool``, ``(A, R)``; or the sampler's
            :class:`~instcontrast.sampler.CandidateBlocks` (``NegativeSamples.blocks``), which the
            ``chunked`` path scores block by block with matrix products instead of gathering
            ``A·R`` rows (other backends expand it to the index).
        temperature: :math:`T > 0`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"triton"`` or a resolved backend.

    Shape:
        - anchors, positives: :math:`(A, D)`; pool: :math:`(M, D)`; negatives: :math:`(A, R)`
        - output: scalar, or :math:`(A,)` for ``reduction="none"``

    Returns:
        The loss.
    """
    return _info_nce_terms(anchors, positives, pool, negatives, temperature, reduction, backend)[0]


def _info_nce_terms(
    anchors: Tensor,
    positives: Tensor,
    pool: Tensor,
    negatives: Tensor | CandidateBlocks,
    temperature: float,
    reduction: str,
    backend: str | Backend | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r""":func:`pixel_info_nce` and, free of charge, its similarities for diagnostics (no gradient).

    Returns:
        ``(loss, positive_cos, negative_cos_sum)``: the loss; :math:`\cos^+_a`, ``(A,)``; and
        :math:`\sum_{a,r} \cos^-_{a,r}` where the path forms it anyway (the blocked ``chunked``
        path), else ``None``.
    """
    check_positive("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_pairs(anchors, positives, pool, negatives)
    anchors_n = _normalized(anchors)  # (A, D)
    scale = 1.0 / float(temperature)
    if anchors.shape[0] == 0:
        loss = _reduce(anchors_n.sum(dim=1) + positives.sum(dim=1) * 0 + pool.sum() * 0, reduction)
        return loss, anchors_n.new_zeros(0), None
    positives_n = _normalized(positives)  # (A, D)
    pool_n = positives_n if pool is positives else _normalized(pool)  # (M, D): often the same strong-view rows
    positive_cos = row_dot(anchors_n, positives_n)  # (A,)
    resolved = _resolve(backend)
    negative_sum = None
    if not isinstance(negatives, Tensor) and resolved.uses_blocks(anchors):
        negative_lse, negative_sum = blocked_logsumexp_and_negative_sum(anchors_n, pool_n, negatives, scale)  # (A,), ()
    else:
        negative_lse = resolved.op_for(anchors)(anchors_n, pool_n, _as_index(negatives), scale)  # (A,)
    per_anchor = F.softplus(negative_lse - positive_cos * scale)  # (A,)
    return _reduce(per_anchor, reduction), positive_cos.detach(), negative_sum


def _hinge_block(anchors_n: Tensor, positive_cos: Tensor, pool_n: Tensor, index: Tensor, margin: float) -> Tensor:
    negative_cos = torch.bmm(pool_n[index], anchors_n[:, :, None]).squeeze(-1)  # (c, R)
    return (margin - positive_cos[:, None] + negative_cos).clamp_min(0.0).mean(dim=1)  # (c,)


@without_autocast(0)
def pixel_hinge(
    anchors: Tensor,
    positives: Tensor,
    pool: Tensor,
    negatives: Tensor | CandidateBlocks,
    margin: float = 0.2,
    reduction: str = "mean",
    block_size: int | None = None,
) -> Tensor:
    r"""Hinge (margin) variant of the pixel contrastive loss over sampled negatives.

    .. math::
        \ell_a = \frac{1}{R}\sum_{r=1}^{R} \max\big(0,\ m - \cos^+_a + \cos^-_{a,r}\big),\qquad m = 0.2 .

    Computed block by block with activation checkpointing, so memory stays bounded in ``A·R·D``.

    Args:
        anchors: weak-view embeddings of the anchors.
        positives: strong-view embeddings at the anchors' locations.
        pool: candidate negative embeddings.
        negatives: for each anchor, ``R`` row indices into ``pool`` (or candidate blocks).
        margin: :math:`m \ge 0`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        block_size: anchors per block (default: about 2 MiB of gathered negatives).

    Shape:
        - anchors, positives: :math:`(A, D)`; pool: :math:`(M, D)`; negatives: :math:`(A, R)`
        - output: scalar, or :math:`(A,)` for ``reduction="none"``

    Returns:
        The loss, :math:`\ge 0`.
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (0 <= margin < float("inf")):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    _check_pairs(anchors, positives, pool, negatives)
    negative_index = _as_index(negatives)  # (A, R)
    anchors_n = _normalized(anchors)  # (A, D)
    positive_cos = (anchors_n * _normalized(positives)).sum(dim=-1)  # (A,)
    pool_n = _normalized(pool)  # (M, D)
    size = block_size or default_block_size(max(1, negative_index.shape[1]), anchors.shape[1])
    blocks = []
    for start in range(0, anchors.shape[0], size):
        stop = start + size
        args = (anchors_n[start:stop], positive_cos[start:stop], pool_n, negative_index[start:stop], float(margin))
        if torch.is_grad_enabled() and (anchors_n.requires_grad or pool_n.requires_grad or positive_cos.requires_grad):
            blocks.append(checkpoint(_hinge_block, *args, use_reentrant=False))
        else:
            blocks.append(_hinge_block(*args))
    per_anchor = torch.cat(blocks) if blocks else anchors_n.sum(dim=1) + positive_cos * 0 + pool_n.sum() * 0
    return _reduce(per_anchor, reduction)


def false_negative_rate(anchor_ids: Tensor, negative_ids: Tensor, ignore_index: int = -1) -> Tensor:
    r"""Fraction of sampled negatives that belong to the anchor's own instance.

    .. math::
        \mathrm{FNR} = \frac{\#\{(a, r): \mathrm{id}(i_{a,r}) = \mathrm{id}(a)\}}{\#\{(a, r)\}},
        \qquad p = 1 - \mathrm{FNR},

    counting only pairs where neither id is ``ignore_index``. Ids must already be unique across
    images (e.g. ``image_index · (max_id + 1) + id``).

    Args:
        anchor_ids: instance id of each anchor.
        negative_ids: instance id of each sampled negative.
        ignore_index: id that is not counted.

    Shape:
        - anchor_ids: :math:`(A,)`; negative_ids: :math:`(A, R)`; output: scalar float

    Returns:
        The rate in :math:`[0, 1]`; ``nan`` when no pair is countable (the rate is undefined).
    """
    if anchor_ids.ndim != 1 or negative_ids.ndim != 2 or negative_ids.shape[0] != anchor_ids.shape[0]:
        raise ValueError(
            f"anchor_ids must be (A,) and negative_ids (A, R); got {tuple(anchor_ids.shape)} and {tuple(negative_ids.shape)}"
        )
    same, total = _false_negative_counts(anchor_ids, negative_ids, ignore_index)
    if int(total) == 0:
        return torch.tensor(float("nan"), device=anchor_ids.device)
    return same.double().div(total).float()


def _false_negative_counts(anchor_ids: Tensor, negative_ids: Tensor, ignore_index: int = -1) -> tuple[Tensor, Tensor]:
    """``(same, countable)``: the numerator and denominator of :func:`false_negative_rate`, scalar
    int64 tensors, for summing over blocks of anchors (``anchor_ids`` ``(c,)``, ``negative_ids`` ``(c, R)``)."""
    countable = (anchor_ids != ignore_index)[:, None] & (negative_ids != ignore_index)  # (A, R)
    same = (negative_ids == anchor_ids[:, None]) & countable  # (A, R)
    return same.sum(), countable.sum()


def _sum_negative_cosine(anchors_n: Tensor, pool_n: Tensor, negatives: Tensor | CandidateBlocks) -> Tensor:
    total = anchors_n.new_zeros(())
    if not isinstance(negatives, Tensor):
        for block, columns in enumerate(negatives.columns):
            scores = block_scores(anchors_n[negatives.block_rows(block)], pool_n, negatives, block)  # (c, m)
            total += scores.gather(1, columns.long()).sum()
        return total
    size = default_block_size(max(1, negatives.shape[1]), anchors_n.shape[1])
    for start in range(0, anchors_n.shape[0], size):
        block = negatives[start : start + size]  # (c, R)
        total += torch.bmm(pool_n[block], anchors_n[start : start + size, :, None]).sum()
    return total


@torch.no_grad()
@without_autocast(0)
def empirical_margin(anchors: Tensor, positives: Tensor, pool: Tensor, negatives: Tensor | CandidateBlocks) -> Tensor:
    r"""Empirical margin between positive and negative cosine similarity.

    .. math::
        \Delta = \operatorname{mean}_a \cos^+_a - \operatorname{mean}_{a,r} \cos^-_{a,r},

    the paper's NegMean − PosMean in cosine-distance units. Larger is better separated.

    Args:
        anchors: weak-view embeddings of the anchors.
        positives: strong-view embeddings at the anchors' locations.
        pool: candidate negative embeddings.
        negatives: sampled negatives, indices into ``pool`` ``(A, R)``, or candidate blocks (faster).

    Shape:
        - anchors, positives: :math:`(A, D)`; pool: :math:`(M, D)`; negatives: :math:`(A, R)`
        - output: scalar float

    Returns:
        :math:`\Delta \in [-2, 2]`; ``nan`` when there are no anchors or no negatives.
    """
    _check_pairs(anchors, positives, pool, negatives)
    count = negatives.numel() if isinstance(negatives, Tensor) else negatives.num_anchors * negatives.num_negatives
    if count == 0:
        return torch.tensor(float("nan"), device=anchors.device)
    anchors_n = _normalized(anchors)
    mean_positive = (anchors_n * _normalized(positives)).sum(dim=-1).mean()
    total_negative = _sum_negative_cosine(anchors_n, _normalized(pool), negatives)
    return (mean_positive - total_negative / count).float()
