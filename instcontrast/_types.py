"""Constants and plain data types shared by :mod:`instcontrast.functional` and :mod:`instcontrast.sampler`.

They live here, below both modules, so that neither has to import the other for them. The public
homes stay :mod:`instcontrast.functional` (``SCORES``, ``STRATEGIES``) and
:mod:`instcontrast.sampler` (``CandidateBlocks``), which re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SCORES", "STRATEGIES", "CandidateBlocks"]

STRATEGIES = ("uniform", "mask", "class", "fusion")
SCORES = ("linear", "squared", "sqrt")


@dataclass(frozen=True)
class CandidateBlocks:
    """Negatives stored per block of anchors as columns into a shared candidate list.

    Anchors ``[starts[b], starts[b] + columns[b].shape[0])`` draw their negatives from
    ``candidates[b]`` (pool indices, ``(m_b,)``); ``columns[b]`` (``(c_b, R)``) holds each anchor's
    chosen positions in that list. This is how the sampler produces them, and it lets the
    ``chunked`` backend score a whole block with one matrix product instead of gathering
    ``c_b · R`` embedding rows.

    A block's candidate list is the concatenation of its proposal rounds. Later rounds serve only
    the anchors still short, and within a round a row stops at its last accepted candidate, so
    ``segments[b]`` lists ``(rows, lo, hi)`` pieces: the block's local rows that may point into
    ``candidates[b][lo:hi]`` (``None`` = every row, a ``slice`` = those rows, a tensor = those row
    indices, distinct). Scoring only those (row, column) ranges gives the same values for every
    chosen column at less cost. The sampler sorts a block's rows by the last candidate they use,
    so its segments are prefix slices ``0:k``: views, no gathers.

    The sampler groups anchors whose proposal fits best into the same block, so a block's rows
    need not be consecutive anchors: with ``order`` given, local row ``i`` of block ``b`` is anchor
    ``order[starts[b] + i]`` (``order`` is a permutation of ``range(A)``); without it, anchor
    ``starts[b] + i``. :meth:`block_rows` gives either form.

    Attributes:
        starts: first anchor of each block.
        candidates: per block, the candidate pool indices.
        columns: per block, each anchor's negatives as positions in ``candidates[b]`` (int32 or int64).
        num_negatives: ``R``.
        segments: per block, the ``(rows, lo, hi)`` ranges above; empty = one segment covering all.
        order: the anchor of each block row, ``(A,)`` int64 permutation, or ``None`` (identity).
    """

    starts: tuple[int, ...]
    candidates: tuple[Tensor, ...]
    columns: tuple[Tensor, ...]
    num_negatives: int = 0
    segments: tuple[tuple[tuple[Tensor | slice | None, int, int], ...], ...] = ()
    order: Tensor | None = None

    def block_rows(self, block: int) -> slice | Tensor:
        """The anchors of one block's rows, in row order: a ``slice``, or ``(c_b,)`` int64 with ``order``."""
        start = self.starts[block]
        stop = start + self.columns[block].shape[0]
        return slice(start, stop) if self.order is None else self.order[start:stop]

    def anchor_rows(self, block: int, rows: Tensor | slice | None) -> slice | Tensor:
        """The anchors of local ``rows`` of a block (a segment's rows: ``None`` = all of them, a
        ``slice`` or an index tensor), for indexing ``(A, ...)`` tensors."""
        block_rows = self.block_rows(block)
        if rows is None or isinstance(block_rows, Tensor):
            return block_rows if rows is None else block_rows[rows]
        if isinstance(rows, slice):
            local = range(self.columns[block].shape[0])[rows]
            return slice(block_rows.start + local.start, block_rows.start + local.stop, local.step)
        return rows + block_rows.start

    def block_segments(self, block: int) -> tuple[tuple[Tensor | slice | None, int, int], ...]:
        """The ``(rows, lo, hi)`` segments of one block."""
        if self.segments:
            return self.segments[block]
        return ((None, 0, self.candidates[block].numel()),)

    @property
    def scored_pairs(self) -> int:
        """Anchor × candidate pairs the segments cover, ``Σ_b Σ_segments rows·(hi - lo)``."""
        total = 0
        for block, columns in enumerate(self.columns):
            for rows, lo, hi in self.block_segments(block):
                count = columns.shape[0] if rows is None else (rows.numel() if isinstance(rows, Tensor) else len(range(columns.shape[0])[rows]))
                total += count * (hi - lo)
        return total

    @property
    def num_anchors(self) -> int:
        """``A``, the rows of all blocks together."""
        return sum(cols.shape[0] for cols in self.columns)

    def to_index(self) -> Tensor:
        """The negatives as pool indices, ``(A, R)``."""
        if not self.columns:
            return torch.empty(0, self.num_negatives, dtype=torch.long)
        by_row = torch.cat([cand[cols] for cand, cols in zip(self.candidates, self.columns)], dim=0)  # (A, R)
        if self.order is None:
            return by_row
        index = torch.empty_like(by_row)  # (A, R)
        index[self.order] = by_row
        return index
