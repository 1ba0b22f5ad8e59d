"""A fixed-size FIFO ring of detached pixel embeddings and their fused probability vectors.

The bank is just more pool: the loss samples negatives from ``batch ∪ bank`` with the same exact
score-proportional sampler. Entries are written under ``no_grad`` after the loss, only in training
mode; under ``torch.distributed`` every rank's new entries are all-gathered first, so every rank's
bank holds the same rows in the same order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_positive
from .distributed import all_gather_rows
from .ops.normalize import l2_normalize

__all__ = ["PixelMemoryBank"]

WARMUPS = ("immediate", "full")


class PixelMemoryBank(nn.Module):
    """FIFO memory of ``(z, ŷ)`` pairs used as extra negative candidates.

    Args:
        embedding_dim: ``D`` of the (normalized) embeddings it stores; ``None`` (the default) takes it
            from the first batch the loss shows the bank.
        prob_dim: ``E`` of the fused probability vectors (``K + C + 1`` for ``"fusion"``, also stored
            for ``"uniform"``; ``K`` for ``"mask"``, ``C + 1`` for ``"class"``); ``None`` (the default)
            takes it from the first batch, so no caller has to work it out.
        size: capacity in pixels (default 10 000, as in the paper).
        pixels_per_step: how many pixels (a random subset) one :meth:`enqueue` writes per rank;
            ``None`` writes all it is given.
        warmup: ``"immediate"`` offers bank rows as candidates from the first step;
            ``"full"`` only once the ring is full.

    Buffers (saved in ``state_dict``): ``embeddings (size, D)``, ``probs (size, E)``,
    ``pointer`` (next row to write) and ``filled`` (rows holding data).
    """

    embeddings: Tensor
    probs: Tensor
    pointer: Tensor
    filled: Tensor

    def __init__(
        self,
        embedding_dim: int | None = None,
        prob_dim: int | None = None,
        size: int = 10_000,
        pixels_per_step: int | None = 1024,
        warmup: str = "immediate",
    ) -> None:
        super().__init__()
        if embedding_dim is not None:
            check_positive("embedding_dim", embedding_dim, integer=True)
        if prob_dim is not None:
            check_positive("prob_dim", prob_dim, integer=True)
        check_positive("size", size, integer=True)
        if pixels_per_step is not None:
            check_positive("pixels_per_step", pixels_per_step, integer=True)
        self.size = size
        self.pixels_per_step = pixels_per_step
        self.warmup = check_choice("warmup", warmup, WARMUPS)
        self._fixed_dims = (embedding_dim, prob_dim)  # None: sized by the first batch (or a loaded state)
        self.register_buffer("embeddings", torch.zeros(size, embedding_dim or 0))
        self.register_buffer("probs", torch.zeros(size, prob_dim or 0))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def embedding_dim(self) -> int:
        """``D``."""
        return self.embeddings.shape[1]

    @property
    def prob_dim(self) -> int:
        """``E``."""
        return self.probs.shape[1]

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, embedding_dim={self.embedding_dim}, prob_dim={self.prob_dim}, "
            f"pixels_per_step={self.pixels_per_step}, warmup={self.warmup!r}"
        )

    @property
    def is_sized(self) -> bool:
        """Whether ``(D, E)`` are known (given, or taken from a first batch or a loaded state)."""
        return self.embeddings.shape[1] > 0 and self.probs.shape[1] > 0

    def _size(self, embedding_dim: int, prob_dim: int) -> None:
        """Allocate the ring for ``(D, E)`` (an empty bank only), keeping device and dtype."""
        self.embeddings = torch.zeros(self.size, embedding_dim, device=self.embeddings.device, dtype=self.embeddings.dtype)
        self.probs = torch.zeros(self.size, prob_dim, device=self.probs.device, dtype=self.probs.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        """A bank built without dims takes them from the state it loads (resuming a run)."""
        stored_z, stored_p = state_dict.get(prefix + "embeddings"), state_dict.get(prefix + "probs")
        if not self.is_sized and stored_z is not None and stored_p is not None and stored_z.ndim == stored_p.ndim == 2:
            dims = (stored_z.shape[1], stored_p.shape[1])
            if all(fixed is None or fixed == dim for fixed, dim in zip(self._fixed_dims, dims)):
                self._size(*dims)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def check_dims(self, embedding_dim: int, prob_dim: int | None) -> None:
        """Raise ``ValueError`` unless inputs match the bank's ``(D, E)``; a bank without dims takes these."""
        if not self.is_sized and prob_dim is not None:
            fixed_z, fixed_p = self._fixed_dims
            self._size(fixed_z or embedding_dim, fixed_p or prob_dim)
        if embedding_dim != self.embedding_dim or (prob_dim is not None and prob_dim != self.prob_dim):
            raise ValueError(
                f"this memory bank stores (D, E) = ({self.embedding_dim}, {self.prob_dim}) but got embeddings "
                f"with D = {embedding_dim} and probabilities with E = {prob_dim}; build the bank with "
                "PixelMemoryBank(embedding_dim=D, prob_dim=K + C + 1) for the 'fusion' strategy "
                "(K for 'mask', C + 1 for 'class')"
            )

    def candidates(self) -> tuple[Tensor, Tensor]:
        """The rows offered as negatives now: ``(z (F, D), ŷ (F, E))``, empty during warm-up."""
        filled = int(self.filled)
        if self.warmup == "full" and filled < self.size:
            filled = 0
        return self.embeddings[:filled], self.probs[:filled]

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, probs: Tensor, generator: torch.Generator | None = None) -> int:
        """Write new rows (oldest overwritten first); return how many rows were written.

        Under an initialized ``torch.distributed`` process group every rank's rows are
        all-gathered (in rank order) before writing, so banks stay identical across ranks.

        Args:
            embeddings: pixel embeddings; stored ℓ2-normalized and detached.
            probs: their fused probability vectors.
            generator: random generator for the ``pixels_per_step`` subset.

        Shape:
            - embeddings: :math:`(n, D)`; probs: :math:`(n, E)`
        """
        if embeddings.ndim != 2 or probs.ndim != 2 or embeddings.shape[0] != probs.shape[0]:
            raise ValueError(
                f"enqueue needs embeddings (n, D) and probs (n, E) with the same n, got "
                f"{tuple(embeddings.shape)} and {tuple(probs.shape)}"
            )
        self.check_dims(embeddings.shape[1], probs.shape[1])
        embeddings = embeddings.detach()
        probs = probs.detach()
        if self.pixels_per_step is not None and embeddings.shape[0] > self.pixels_per_step:
            keep = torch.randperm(embeddings.shape[0], generator=generator, device=embeddings.device)
            keep = keep[: self.pixels_per_step]
            embeddings, probs = embeddings[keep], probs[keep]
        rows = torch.cat([l2_normalize(embeddings, torch.float32), probs.float()], dim=1)  # (n, D + E)
        rows = all_gather_rows(rows)  # (n_total, D + E), identical on every rank
        rows = rows[-self.size :]  # a batch larger than the bank keeps its newest rows
        count = rows.shape[0]
        if count == 0:
            return 0
        rows = rows.to(self.embeddings.device)
        positions = (int(self.pointer) + torch.arange(count, device=self.embeddings.device)) % self.size
        self.embeddings[positions] = rows[:, : self.embedding_dim].to(self.embeddings.dtype)
        self.probs[positions] = rows[:, self.embedding_dim :].to(self.probs.dtype)
        self.pointer.fill_((int(self.pointer) + count) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + count))
        return count
