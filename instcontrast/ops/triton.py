"""Fused Triton kernels for the sampled log-sum-exp: launchers and a ``torch.autograd.Function``.

Forward runs one program per block of ``BLOCK_A`` anchors. Each program walks the ``R`` sampled
negatives in tiles of ``BLOCK_R``, gathers the indexed pool rows straight from global memory
(``D`` in tiles of ``BLOCK_D``, the tail masked), forms the dot products and folds them into an
online (running-maximum) log-sum-exp kept in float32 (float64 for float64 inputs). Nothing of size
``(A, R)`` or ``(A, R, D)`` ever reaches global memory: forward saves the inputs, the ``(A, R)``
indices and the ``(A,)`` log-sum-exp. Backward walks the same tiles again, recomputes the
similarities, and forms

.. math::
    \\pi_{a,r} = \\exp(\\mathrm{scale}\\,\\langle x_a, m_{i_{a,r}}\\rangle - \\mathrm{lse}_a),\\qquad
    \\frac{\\partial L}{\\partial x_a} = g_a\\,\\mathrm{scale}\\sum_r \\pi_{a,r}\\, m_{i_{a,r}},\\qquad
    \\frac{\\partial L}{\\partial m_j} = \\mathrm{scale}\\sum_{(a,r):\\, i_{a,r}=j} g_a\\,\\pi_{a,r}\\, x_a,

the second scattered with ``tl.atomic_add`` so a pool row sampled many times (also by the same
anchor) gets every contribution. The order of those atomic additions is not fixed, so the pool
gradient is not bitwise deterministic from run to run on a GPU (it is equal up to float32
rounding). See ``docs/triton.rst`` for the design.

The kernels need CUDA tensors, or ``TRITON_INTERPRET=1`` in the environment, which runs them in
Triton's interpreter on CPU tensors (that is how the tests exercise them). Triton reads the variable
when it wraps a function with ``triton.jit``, which for its own library happens when ``triton`` is
imported: the variable must be set before the first ``import triton`` in the process.

Importing this module without Triton installed raises :class:`ImportError` naming the extra to
install.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .._extras import TRITON_INSTALL_HINT
from .chunked import accumulation_dtype

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised only without triton installed
    raise ImportError(
        f"instcontrast.ops.triton needs the triton package (and a CUDA GPU): {TRITON_INSTALL_HINT}"
    ) from error

__all__ = ["SUPPORTED_DTYPES", "sampled_logsumexp_triton"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Floating dtypes accepted for ``anchors`` and ``pool`` (float64 accumulates in float64)."""

_INDEX_DTYPES = (torch.int32, torch.int64)
_MAX_BLOCK_D = 256  # wider embeddings loop over D tiles
_GPU_TILE_ELEMENTS = 4096  # BLOCK_A * BLOCK_R * BLOCK_D for a compiled kernel (register budget)
_GPU_MAX_BLOCK_R = 32
_GPU_MAX_BLOCK_A = 16
_INTERPRETER_TILE_ELEMENTS = 1 << 20  # the interpreter runs each program in numpy: fewer, larger tiles
_MAX_TILE_ELEMENTS = 1 << 20  # Triton's limit on the elements of one block tensor
_INTERPRETER_MAX_BLOCK_R = 256
_INTERPRETER_MAX_BLOCK_A = 64


# --------------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _sampled_lse_forward_kernel(
    anchors_ptr,  # (A, D), contiguous
    pool_ptr,  # (M, D), contiguous
    index_ptr,  # (A, R), contiguous, int32 or int64
    lse_ptr,  # (A,), ACC_DTYPE
    num_anchors,
    num_negatives,
    dim,
    scale_hi,  # scale = scale_hi + scale_lo; scale_lo is 0 unless ACC_DTYPE is float64
    scale_lo,
    ACC_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_a = (pid * BLOCK_A + tl.arange(0, BLOCK_A)).to(tl.int64)  # (BA,)
    a_mask = offs_a < num_anchors
    m_i = tl.full([BLOCK_A], float("-inf"), ACC_DTYPE)  # running maximum
    l_i = tl.zeros([BLOCK_A], ACC_DTYPE)  # running sum of exp(s - m_i)
    for r_start in range(0, num_negatives, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)  # (BR,)
        r_mask = offs_r < num_negatives
        ar_mask = a_mask[:, None] & r_mask[None, :]  # (BA, BR)
        rows = tl.load(index_ptr + offs_a[:, None] * num_negatives + offs_r[None, :], mask=ar_mask, other=0)
        rows = rows.to(tl.int64)  # (BA, BR)
        dots = tl.zeros([BLOCK_A, BLOCK_R], ACC_DTYPE)
        for d_start in range(0, dim, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)  # (BD,)
            d_mask = offs_d < dim
            x = tl.load(
                anchors_ptr + offs_a[:, None] * dim + offs_d[None, :],
                mask=a_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(ACC_DTYPE)  # (BA, BD)
            negatives = tl.load(
                pool_ptr + rows[:, :, None] * dim + offs_d[None, None, :],
                mask=ar_mask[:, :, None] & d_mask[None, None, :],
                other=0.0,
            ).to(ACC_DTYPE)  # (BA, BR, BD)
            dots += tl.sum(x[:, None, :] * negatives, axis=2)
        # Only the R tail is masked to -inf: the first tile always holds r = 0, so every row of the
        # block (padding rows included, whose dots are 0) has a finite maximum after it.
        sims = tl.where(r_mask[None, :], dots * scale_hi + dots * scale_lo, float("-inf"))  # (BA, BR)
        m_new = tl.maximum(m_i, tl.max(sims, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(sims - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + offs_a, m_i + tl.log(l_i), mask=a_mask)


@triton.jit
def _sampled_lse_backward_kernel(
    anchors_ptr,  # (A, D), contiguous
    pool_ptr,  # (M, D), contiguous
    index_ptr,  # (A, R), contiguous
    lse_ptr,  # (A,), ACC_DTYPE
    grad_lse_ptr,  # (A,), ACC_DTYPE
    grad_anchors_ptr,  # (A, D), ACC_DTYPE, zero-initialized (unused unless ANCHOR_GRAD)
    grad_pool_ptr,  # (M, D), ACC_DTYPE, zero-initialized (unused unless POOL_GRAD)
    num_anchors,
    num_negatives,
    dim,
    scale_hi,
    scale_lo,
    ANCHOR_GRAD: tl.constexpr,
    POOL_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_a = (pid * BLOCK_A + tl.arange(0, BLOCK_A)).to(tl.int64)  # (BA,)
    a_mask = offs_a < num_anchors
    lse = tl.load(lse_ptr + offs_a, mask=a_mask, other=0.0).to(ACC_DTYPE)  # (BA,)
    upstream = tl.load(grad_lse_ptr + offs_a, mask=a_mask, other=0.0).to(ACC_DTYPE)  # (BA,)
    upstream = upstream * scale_hi + upstream * scale_lo  # g_a * scale
    for r_start in range(0, num_negatives, BLOCK_R):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        r_mask = offs_r < num_negatives
        ar_mask = a_mask[:, None] & r_mask[None, :]  # (BA, BR)
        rows = tl.load(index_ptr + offs_a[:, None] * num_negatives + offs_r[None, :], mask=ar_mask, other=0)
        rows = rows.to(tl.int64)  # (BA, BR)
        # Recompute the similarities exactly as forward did.
        dots = tl.zeros([BLOCK_A, BLOCK_R], ACC_DTYPE)
        for d_start in range(0, dim, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)
            d_mask = offs_d < dim
            x = tl.load(
                anchors_ptr + offs_a[:, None] * dim + offs_d[None, :],
                mask=a_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(ACC_DTYPE)
            negatives = tl.load(
                pool_ptr + rows[:, :, None] * dim + offs_d[None, None, :],
                mask=ar_mask[:, :, None] & d_mask[None, None, :],
                other=0.0,
            ).to(ACC_DTYPE)
            dots += tl.sum(x[:, None, :] * negatives, axis=2)
        sims = dots * scale_hi + dots * scale_lo
        probs = tl.where(ar_mask, tl.exp(sims - lse[:, None]), 0.0)  # (BA, BR), softmax over R
        weights = probs * upstream[:, None]  # (BA, BR)
        for d_start in range(0, dim, BLOCK_D):
            offs_d = d_start + tl.arange(0, BLOCK_D)
            d_mask = offs_d < dim
            ad_mask = a_mask[:, None] & d_mask[None, :]  # (BA, BD)
            ard_mask = ar_mask[:, :, None] & d_mask[None, None, :]  # (BA, BR, BD)
            if ANCHOR_GRAD:
                negatives = tl.load(
                    pool_ptr + rows[:, :, None] * dim + offs_d[None, None, :], mask=ard_mask, other=0.0
                ).to(ACC_DTYPE)
                partial = tl.sum(weights[:, :, None] * negatives, axis=1)  # (BA, BD)
                # These rows belong to this program alone: the adds are uncontended and run in
                # program order, so the anchor gradient stays deterministic.
                tl.atomic_add(
                    grad_anchors_ptr + offs_a[:, None] * dim + offs_d[None, :], partial, mask=ad_mask, sem="relaxed"
                )
            if POOL_GRAD:
                x = tl.load(anchors_ptr + offs_a[:, None] * dim + offs_d[None, :], mask=ad_mask, other=0.0)
                contributions = weights[:, :, None] * x.to(ACC_DTYPE)[:, None, :]  # (BA, BR, BD)
                tl.atomic_add(
                    grad_pool_ptr + rows[:, :, None] * dim + offs_d[None, None, :],
                    contributions,
                    mask=ard_mask,
                    sem="relaxed",
                )


def _is_interpreted(function: Any) -> bool:
    return type(function).__name__ == "InterpretedFunction"


def _interpreter_mode() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when they were built).

    Raises:
        RuntimeError: when Triton's own library and these kernels were built in different modes
            (the variable changed between ``import triton`` and the import of this module).
    """
    interpreted = _is_interpreted(_sampled_lse_forward_kernel)
    library_function = getattr(getattr(tl, "standard", None), "sum", None)  # a jit'd function of Triton's
    if library_function is not None and interpreted != _is_interpreted(library_function):
        raise RuntimeError(
            "TRITON_INTERPRET changed between `import triton` and `import instcontrast.ops.triton`; set it "
            "before triton is first imported in the process"
        )
    return interpreted


# --------------------------------------------------------------------------------------------------
# Launch configuration.
# --------------------------------------------------------------------------------------------------


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1 or value & (value - 1)):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")


def _launch_config(
    num_anchors: int,
    num_negatives: int,
    dim: int,
    interpreted: bool,
    block_a: int | None,
    block_r: int | None,
    block_d: int | None,
) -> tuple[int, int, int, int]:
    """``(BLOCK_A, BLOCK_R, BLOCK_D, num_warps)``: ``BLOCK_D`` covers ``D`` up to 256 (wider
    embeddings loop over ``D`` tiles); ``BLOCK_R`` and then ``BLOCK_A`` fill a fixed budget of
    ``BLOCK_A * BLOCK_R * BLOCK_D`` elements for the gathered tile. Heuristics, not autotuned."""
    budget = _INTERPRETER_TILE_ELEMENTS if interpreted else _GPU_TILE_ELEMENTS
    max_block_r = _INTERPRETER_MAX_BLOCK_R if interpreted else _GPU_MAX_BLOCK_R
    max_block_a = _INTERPRETER_MAX_BLOCK_A if interpreted else _GPU_MAX_BLOCK_A
    if block_d is None:
        block_d = min(_next_power_of_two(dim), _MAX_BLOCK_D)
    if block_r is None:
        block_r = max(1, min(_next_power_of_two(num_negatives), max_block_r, budget // block_d))
    if block_a is None:
        block_a = max(1, min(_next_power_of_two(num_anchors), max_block_a, budget // (block_r * block_d)))
    if block_a * block_r * block_d > _MAX_TILE_ELEMENTS:
        raise ValueError(
            f"block_a * block_r * block_d must be at most {_MAX_TILE_ELEMENTS} (Triton's block limit), got "
            f"{block_a} * {block_r} * {block_d}"
        )
    # About 16 tile elements per thread: a full 4096-element GPU tile gets 8 warps, which keeps the
    # backward kernel at 128 registers per thread without spilling (ptxas, sm_90).
    num_warps = max(1, min(8, (block_a * block_r * block_d) // 512))
    return block_a, block_r, block_d, num_warps


def _split_scale(scale: float, accumulate: torch.dtype) -> tuple[float, float]:
    """Triton passes Python floats as float32; for float64 accumulation the scale travels as the sum
    of two float32 numbers so that it keeps (nearly) float64 precision."""
    if accumulate != torch.float64:
        return scale, 0.0
    high = float(torch.tensor(scale, dtype=torch.float32))
    return high, float(torch.tensor(scale - high, dtype=torch.float32))


def _triton_dtype(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


# --------------------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------------------


class _SampledLogSumExpTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        anchors: Tensor,
        pool: Tensor,
        negative_index: Tensor,
        scale: float,
        blocks: tuple[int | None, int | None, int | None],
    ) -> Tensor:
        accumulate = accumulation_dtype(anchors.dtype, pool.dtype)
        anchors_c = anchors.detach().contiguous()  # (A, D)
        pool_c = pool.detach().contiguous()  # (M, D)
        index = negative_index.detach().contiguous()  # (A, R)
        num_anchors, num_negatives = index.shape
        dim = anchors_c.shape[1]
        block_a, block_r, block_d, num_warps = _launch_config(
            num_anchors, num_negatives, dim, _interpreter_mode(), *blocks
        )
        scale_hi, scale_lo = _split_scale(scale, accumulate)
        if num_negatives == 0:
            lse = torch.full((num_anchors,), float("-inf"), dtype=accumulate, device=anchors.device)
        else:
            lse = torch.empty(num_anchors, dtype=accumulate, device=anchors.device)  # (A,)
            if num_anchors > 0:
                grid = (triton.cdiv(num_anchors, block_a),)
                _sampled_lse_forward_kernel[grid](
                    anchors_c, pool_c, index, lse, num_anchors, num_negatives, dim, scale_hi, scale_lo,
                    ACC_DTYPE=_triton_dtype(accumulate), BLOCK_A=block_a, BLOCK_R=block_r, BLOCK_D=block_d,
                    num_warps=num_warps,
                )  # fmt: skip
        ctx.save_for_backward(anchors_c, pool_c, index, lse)
        ctx.input_dtypes = (anchors.dtype, pool.dtype)
        ctx.scale_parts = (scale_hi, scale_lo)
        ctx.config = (block_a, block_r, block_d, num_warps)
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        anchors, pool, index, lse = ctx.saved_tensors
        need_anchor_grad, need_pool_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_anchor_grad or need_pool_grad):
            return None, None, None, None, None
        accumulate = lse.dtype
        anchor_dtype, pool_dtype = ctx.input_dtypes
        scale_hi, scale_lo = ctx.scale_parts
        block_a, block_r, block_d, num_warps = ctx.config
        grad_lse = grad_lse.to(accumulate).contiguous()  # (A,); may arrive expanded (stride 0)
        # Unused gradients get ``lse`` as a placeholder pointer; the kernel never touches it.
        grad_anchors = torch.zeros(anchors.shape, dtype=accumulate, device=anchors.device) if need_anchor_grad else lse
        grad_pool = torch.zeros(pool.shape, dtype=accumulate, device=pool.device) if need_pool_grad else lse
        num_anchors, num_negatives = index.shape
        if num_anchors > 0 and num_negatives > 0:
            grid = (triton.cdiv(num_anchors, block_a),)
            _sampled_lse_backward_kernel[grid](
                anchors, pool, index, lse, grad_lse, grad_anchors, grad_pool,
                num_anchors, num_negatives, anchors.shape[1], scale_hi, scale_lo,
                ANCHOR_GRAD=bool(need_anchor_grad), POOL_GRAD=bool(need_pool_grad),
                ACC_DTYPE=_triton_dtype(accumulate), BLOCK_A=block_a, BLOCK_R=block_r, BLOCK_D=block_d,
                num_warps=num_warps,
            )  # fmt: skip
        return (
            grad_anchors.to(anchor_dtype) if need_anchor_grad else None,
            grad_pool.to(pool_dtype) if need_pool_grad else None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------


def _validate(anchors: Tensor, pool: Tensor, negative_index: Tensor, interpreted: bool) -> None:
    for name, tensor in (("anchors", anchors), ("pool", pool), ("negative_index", negative_index)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            expected = "(A, R)" if name == "negative_index" else ("(A, D)" if name == "anchors" else "(M, D)")
            raise ValueError(f"{name} must have shape {expected}, got shape {tuple(tensor.shape)}")
    for name, tensor in (("anchors", anchors), ("pool", pool)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have a dtype in {SUPPORTED_DTYPES}, got {tensor.dtype}")
    if negative_index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"negative_index must be int64 (or int32), got {negative_index.dtype}")
    if pool.shape[1] != anchors.shape[1]:
        raise ValueError(
            f"pool must have shape (M, D) with D = {anchors.shape[1]} (from anchors), got {tuple(pool.shape)}"
        )
    if negative_index.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"negative_index must have shape (A, R) with A = {anchors.shape[0]} (from anchors), "
            f"got {tuple(negative_index.shape)}"
        )
    devices = {anchors.device, pool.device, negative_index.device}
    if len(devices) != 1:
        raise ValueError(f"anchors, pool and negative_index must be on one device, got {sorted(map(str, devices))}")
    if not anchors.is_cuda and not interpreted:
        raise ValueError(
            f"the Triton kernel needs CUDA tensors, got tensors on {anchors.device}; use the 'chunked' backend on "
            "CPU, or set TRITON_INTERPRET=1 before triton is first imported to run the kernel in the Triton "
            "interpreter (for testing)"
        )
    if negative_index.numel() > 0:
        low, high = torch.stack(torch.aminmax(negative_index)).tolist()  # one synchronization
        if low < 0 or high >= pool.shape[0]:
            raise ValueError(
                f"negative_index must lie in [0, {pool.shape[0]}) (rows of pool), got values in [{low}, {high}]"
            )


def _check_determinism(pool: Tensor, on_gpu: bool) -> None:
    """Follow ``torch.use_deterministic_algorithms``: the pool gradient's atomic scatter is not
    bitwise reproducible on a GPU, so refuse it there (or warn, with ``warn_only=True``)."""
    if not (on_gpu and pool.requires_grad and torch.is_grad_enabled()):
        return
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        "sampled_logsumexp_triton accumulates the pool gradient with atomic adds, which is not deterministic, "
        "but torch.use_deterministic_algorithms(True) is set; use backend='chunked' (or detach the pool)"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def sampled_logsumexp_triton(
    anchors: Tensor,
    pool: Tensor,
    negative_index: Tensor,
    scale: float,
    *,
    block_a: int | None = None,
    block_r: int | None = None,
    block_d: int | None = None,
) -> Tensor:
    r"""Fused-kernel equivalent of :func:`~instcontrast.ops.reference.sampled_logsumexp_reference`.

    .. math::
        \mathrm{lse}_a = \log \sum_{r=1}^{R} \exp\big(\mathrm{scale}\cdot\langle x_a, m_{i_{a,r}}\rangle\big)

    One Triton program per block of anchors gathers the indexed pool rows, forms the dot products
    and keeps an online log-sum-exp; backward recomputes the similarities and scatters the pool
    gradient with atomic adds (not bitwise deterministic across runs). float16, bfloat16 and
    float32 inputs accumulate in float32; float64 inputs are supported and accumulate in float64.
    Inputs may be non-contiguous (they are made contiguous once). Unlike the reference, negative
    indices are not wrapped around: every index must lie in ``[0, M)``.

    Args:
        anchors: anchor embeddings.
        pool: candidate embeddings that the indices point into.
        negative_index: for each anchor, ``R`` row indices into ``pool`` (repeats allowed).
        scale: multiplier of the dot products (``1 / temperature``).
        block_a: anchors per program (a power of two); default from a tile budget.
        block_r: negatives per tile (a power of two); default from a tile budget.
        block_d: embedding columns per tile (a power of two); default ``next_pow2(D)``, at most 256.

    Shape:
        - anchors: :math:`(A, D)`; pool: :math:`(M, D)`; negative_index: :math:`(A, R)`, int64 or int32
        - output: :math:`(A,)`, float32 (float64 for float64 inputs)

    Returns:
        The per-anchor log-sum-exp, differentiable with respect to ``anchors`` and ``pool``; the
        gradients come back in the dtypes of ``anchors`` and ``pool``.

    Raises:
        TypeError: for a non-floating (or unsupported) embedding dtype or a non-integer index.
        ValueError: for mismatched shapes or devices, indices outside ``[0, M)``, a block size that
            is not a power of two (or blocks over :math:`2^{20}` elements together), or CPU tensors
            without ``TRITON_INTERPRET=1``.
        RuntimeError: when ``TRITON_INTERPRET`` was set after ``triton`` had been imported, or
            when ``torch.use_deterministic_algorithms(True)`` is on and the pool of CUDA inputs
            requires a gradient (its atomic accumulation is not deterministic).
    """
    for name, value in (("block_a", block_a), ("block_r", block_r), ("block_d", block_d)):
        _check_block(name, value)
    interpreted = _interpreter_mode()
    _validate(anchors, pool, negative_index, interpreted)
    _check_determinism(pool, on_gpu=pool.is_cuda and not interpreted)
    return _SampledLogSumExpTriton.apply(anchors, pool, negative_index, float(scale), (block_a, block_r, block_d))
