"""The Triton backend: the fused kernel against the reference (value and gradient) and the gating rules.

How the kernels are tested without a GPU: Triton's interpreter runs them on CPU tensors when
``TRITON_INTERPRET=1`` is set *before Triton is first imported* (Triton builds its own jit'd library
functions at import time, so setting the variable later does not work, and setting it at the top of
this module would change Triton for every other test in the session). Hence:

- when this process already runs Triton in interpreter mode (``TRITON_INTERPRET=1 pytest ...``), the
  ``test_kernel_*`` tests run here directly;
- otherwise they are skipped here, and ``test_interpreter_subprocess_runs_kernel_tests`` runs them in
  a fresh ``python -m pytest`` subprocess started with ``TRITON_INTERPRET=1``, failing with the
  child's output if any of them fails.

The gating tests need no Triton at all; everything that needs Triton is skipped without it.
Shapes are kept small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import instcontrast._backend as backend_module
from instcontrast import InstanceAwarePixelContrast
from instcontrast._backend import TRITON_INSTALL_HINT, resolve_backend
from instcontrast.ops.chunked import sampled_logsumexp_chunked
from instcontrast.ops.reference import sampled_logsumexp_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_in_process() -> bool:
    """Whether Triton runs in interpreter mode in this process (only imports Triton if asked for it)."""
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    import triton.language.standard

    return type(triton.language.standard.sum).__name__ == "InterpretedFunction"


INTERPRETER_IN_PROCESS = _interpreter_in_process()
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
kernel_test = pytest.mark.skipif(
    not INTERPRETER_IN_PROCESS,
    reason="needs TRITON_INTERPRET=1 before triton is imported; run by test_interpreter_subprocess_runs_kernel_tests",
)

# Per-dtype tolerances on (value, gradient). Both paths accumulate half inputs in float32 on the
# same upcast values, so values agree to float32 rounding; half gradients may round differently by
# about one unit in the last place of their dtype.
TOLERANCES: dict[torch.dtype, dict[str, dict[str, float]]] = {
    torch.float64: {"value": {"rtol": 1e-12, "atol": 1e-12}, "grad": {"rtol": 1e-12, "atol": 1e-12}},
    torch.float32: {"value": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1e-5, "atol": 1e-5}},
    torch.float16: {"value": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 2e-3, "atol": 1e-4}},
    torch.bfloat16: {"value": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1.6e-2, "atol": 1e-3}},
}


@pytest.fixture
def triton_op() -> Callable[..., Tensor]:
    """The Triton op (the module imports Triton, so only kernel tests use this fixture)."""
    from instcontrast.ops.triton import sampled_logsumexp_triton

    return sampled_logsumexp_triton


def make_inputs(
    num_anchors: int,
    pool_size: int,
    dim: int,
    num_negatives: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random anchors ``(A, D)``, pool ``(M, D)`` (unit rows unless ``normalize=False``), indices ``(A, R)``."""
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(num_anchors, dim, generator=generator, dtype=torch.float64)
    pool = torch.randn(pool_size, dim, generator=generator, dtype=torch.float64)
    if normalize:
        anchors = torch.nn.functional.normalize(anchors, dim=1)
        pool = torch.nn.functional.normalize(pool, dim=1)
    index = torch.randint(0, pool_size, (num_anchors, num_negatives), generator=generator)
    return anchors.to(dtype), pool.to(dtype), index


def run_with_grad(
    op: Callable[..., Tensor], anchors: Tensor, pool: Tensor, index: Tensor, scale: float, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Value and gradients (w.r.t. anchors and pool, under a fixed varied upstream) on cloned inputs."""
    anchors = anchors.detach().clone().requires_grad_(True)
    pool = pool.detach().clone().requires_grad_(True)
    lse = op(anchors, pool, index, scale, **kwargs)
    upstream = torch.linspace(-1.0, 2.0, lse.numel(), dtype=lse.dtype)  # varied, includes negatives
    grad_anchors, grad_pool = torch.autograd.grad(lse, (anchors, pool), upstream)
    return lse.detach(), grad_anchors, grad_pool


def assert_matches_reference(
    op: Callable[..., Tensor], anchors: Tensor, pool: Tensor, index: Tensor, scale: float, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Compare the op with the reference in value and gradient; return the op's results."""
    tolerance = TOLERANCES[anchors.dtype]
    lse, grad_anchors, grad_pool = run_with_grad(op, anchors, pool, index, scale, **kwargs)
    ref_lse, ref_grad_anchors, ref_grad_pool = run_with_grad(sampled_logsumexp_reference, anchors, pool, index, scale)
    assert lse.dtype == ref_lse.dtype
    assert grad_anchors.dtype == anchors.dtype and grad_pool.dtype == pool.dtype
    assert torch.isfinite(lse).all() and torch.isfinite(grad_anchors).all() and torch.isfinite(grad_pool).all()
    torch.testing.assert_close(lse, ref_lse, **tolerance["value"])
    torch.testing.assert_close(grad_anchors, ref_grad_anchors, **tolerance["grad"])
    torch.testing.assert_close(grad_pool, ref_grad_pool, **tolerance["grad"])
    return lse, grad_anchors, grad_pool


# ------------------------------------------------------------------------------------------------
# Kernel against the reference (Triton interpreter on CPU).
# ------------------------------------------------------------------------------------------------


@requires_triton
@pytest.mark.skipif(INTERPRETER_IN_PROCESS, reason="the kernel tests run in this process")
def test_interpreter_subprocess_runs_kernel_tests() -> None:
    """Run every ``test_kernel_*`` test in a child process that imports Triton in interpreter mode."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(backend_module.ENV_VARIABLE, None)
    command = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-k", "test_kernel_"]
    command += ["-p", "no:cacheprovider", "-o", "addopts="]
    result = subprocess.run(
        command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout[-12000:] + result.stderr[-4000:]
    assert result.returncode == 0, f"kernel tests failed under TRITON_INTERPRET=1:\n{output}"
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, output


@kernel_test
@pytest.mark.parametrize(
    ("num_anchors", "pool_size", "dim", "num_negatives"),
    [
        (1, 1, 1, 1),  # A = R = D = M = 1
        (1, 5, 8, 1),  # A = 1, R = 1
        (7, 11, 3, 5),  # D = 3
        (13, 40, 130, 9),  # D = 130, partial anchor block
        (5, 30, 16, 257),  # R = 257
        (64, 50, 130, 257),  # all of the above at once, A = 64
    ],
)
def test_kernel_float32_matches_reference(
    triton_op: Callable[..., Tensor], num_anchors: int, pool_size: int, dim: int, num_negatives: int
) -> None:
    anchors, pool, index = make_inputs(num_anchors, pool_size, dim, num_negatives)
    assert_matches_reference(triton_op, anchors, pool, index, 5.0)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("dim", "num_negatives"), [(3, 5), (130, 33)])
def test_kernel_other_dtypes_match_reference(
    triton_op: Callable[..., Tensor], dtype: torch.dtype, dim: int, num_negatives: int
) -> None:
    anchors, pool, index = make_inputs(9, 17, dim, num_negatives, dtype=dtype, seed=1)
    scale = 1.0 / 0.07  # not a float32 number: float64 must keep it exact
    assert_matches_reference(triton_op, anchors, pool, index, scale)


@kernel_test
def test_kernel_mixed_input_dtypes(triton_op: Callable[..., Tensor]) -> None:
    anchors, pool, index = make_inputs(6, 9, 10, 7, seed=2)
    anchors_bf16 = anchors.to(torch.bfloat16)
    lse, grad_anchors, grad_pool = run_with_grad(triton_op, anchors_bf16, pool, index, 5.0)
    reference = run_with_grad(sampled_logsumexp_reference, anchors_bf16, pool, index, 5.0)
    ref_lse, ref_grad_anchors, ref_grad_pool = reference
    assert lse.dtype == torch.float32 and grad_anchors.dtype == torch.bfloat16 and grad_pool.dtype == torch.float32
    torch.testing.assert_close(lse, ref_lse, **TOLERANCES[torch.float32]["value"])
    torch.testing.assert_close(grad_anchors, ref_grad_anchors, **TOLERANCES[torch.bfloat16]["grad"])
    torch.testing.assert_close(grad_pool, ref_grad_pool, **TOLERANCES[torch.float32]["grad"])


@kernel_test
@pytest.mark.parametrize(
    ("block_a", "block_r", "block_d"),
    [
        (1, 1, 1),  # one anchor, one negative, one column per step
        (4, 16, 32),  # several R tiles (tail of 1) and D tiles (tail of 2)
        (2, 8, 128),  # D tail in the second tile
    ],
)
def test_kernel_explicit_tilings_match_reference(
    triton_op: Callable[..., Tensor], block_a: int, block_r: int, block_d: int
) -> None:
    dim, num_negatives = (5, 6) if block_d == 1 else (130, 33)
    anchors, pool, index = make_inputs(7, 12, dim, num_negatives, seed=3)
    assert_matches_reference(triton_op, anchors, pool, index, 5.0, block_a=block_a, block_r=block_r, block_d=block_d)


@kernel_test
def test_kernel_gpu_launch_configuration_matches_reference(triton_op: Callable[..., Tensor]) -> None:
    """The interpreter defaults to large tiles; also run the (smaller) tiles a GPU launch would use."""
    from instcontrast.ops.triton import _launch_config

    anchors, pool, index = make_inputs(9, 20, 130, 40, seed=4)
    block_a, block_r, block_d, _ = _launch_config(9, 40, 130, False, None, None, None)
    assert block_a * block_r * block_d <= 4096
    assert_matches_reference(triton_op, anchors, pool, index, 5.0, block_a=block_a, block_r=block_r, block_d=block_d)


@kernel_test
def test_kernel_all_indices_equal(triton_op: Callable[..., Tensor]) -> None:
    """Every anchor samples pool row 3, R times: the pool gradient piles up in that row."""
    anchors, pool, _ = make_inputs(10, 6, 7, 1, seed=5)
    index = torch.full((10, 37), 3, dtype=torch.int64)
    scale = 5.0
    lse, grad_anchors, grad_pool = assert_matches_reference(triton_op, anchors, pool, index, scale)
    similarity = scale * anchors @ pool[3]  # (A,)
    torch.testing.assert_close(lse, similarity + torch.log(torch.tensor(37.0)), rtol=1e-6, atol=1e-5)
    upstream = torch.linspace(-1.0, 2.0, 10)
    expected_pool = torch.zeros_like(pool)
    expected_pool[3] = scale * (upstream[:, None] * anchors).sum(0)
    torch.testing.assert_close(grad_pool, expected_pool, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_anchors, scale * upstream[:, None] * pool[3].expand(10, 7), rtol=1e-5, atol=1e-5)


@kernel_test
def test_kernel_heavy_repeats_within_and_across_anchors(triton_op: Callable[..., Tensor]) -> None:
    """A pool of 2 rows and R = 64: every row is hit many times by every anchor."""
    anchors, pool, index = make_inputs(12, 2, 9, 64, seed=6)
    assert_matches_reference(triton_op, anchors, pool, index, 5.0)


@kernel_test
def test_kernel_all_equal_similarities(triton_op: Callable[..., Tensor]) -> None:
    """Identical pool rows: every similarity of an anchor is s, so lse = log R + s."""
    anchors, _, index = make_inputs(8, 10, 12, 50, seed=7)
    pool = torch.nn.functional.normalize(torch.ones(10, 12), dim=1)
    lse, _, _ = assert_matches_reference(triton_op, anchors, pool, index, 5.0)
    expected = torch.log(torch.tensor(50.0)) + 5.0 * anchors @ pool[0]
    torch.testing.assert_close(lse, expected, rtol=1e-6, atol=1e-5)


@kernel_test
def test_kernel_large_magnitudes_stay_finite(triton_op: Callable[..., Tensor]) -> None:
    """Embeddings x100 with scale 5: similarities near 5e4, far past exp overflow (~88)."""
    anchors, pool, index = make_inputs(16, 20, 24, 40, seed=8)
    anchors, pool = anchors * 100, pool * 100
    lse, grad_anchors, grad_pool = run_with_grad(triton_op, anchors, pool, index, 5.0)
    assert torch.isfinite(lse).all() and torch.isfinite(grad_anchors).all() and torch.isfinite(grad_pool).all()
    # Truth in float64; float32 rounding of lse (~1e4 in size) moves softmax weights by ~1e-3.
    ref_lse, ref_grad_anchors, ref_grad_pool = run_with_grad(
        sampled_logsumexp_reference, anchors.double(), pool.double(), index, 5.0
    )
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad_anchors.double(), ref_grad_anchors, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_pool.double(), ref_grad_pool, rtol=1e-2, atol=1e-2)


@kernel_test
def test_kernel_non_contiguous_inputs(triton_op: Callable[..., Tensor]) -> None:
    anchors, pool, index = make_inputs(9, 14, 20, 11, seed=9)
    anchors_view = anchors.t().contiguous().t()  # column-major
    pool_view = torch.stack([pool, -pool], dim=2)[:, :, 0]  # column stride 2, same values
    index_view = index.t().contiguous().t()
    assert not (anchors_view.is_contiguous() or pool_view.is_contiguous() or index_view.is_contiguous())
    lse, grad_anchors, grad_pool = run_with_grad(triton_op, anchors_view, pool_view, index_view, 5.0)
    ref_lse, ref_grad_anchors, ref_grad_pool = run_with_grad(sampled_logsumexp_reference, anchors, pool, index, 5.0)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_anchors, ref_grad_anchors, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_pool, ref_grad_pool, rtol=1e-5, atol=1e-5)


@kernel_test
def test_kernel_int32_index(triton_op: Callable[..., Tensor]) -> None:
    anchors, pool, index = make_inputs(5, 8, 6, 10, seed=10)
    assert_matches_reference(triton_op, anchors, pool, index.to(torch.int32), 5.0)


@kernel_test
@pytest.mark.parametrize("which", ["anchors", "pool"])
def test_kernel_gradient_for_one_input_only(triton_op: Callable[..., Tensor], which: str) -> None:
    anchors, pool, index = make_inputs(6, 9, 10, 7, seed=11)
    leaf = (anchors if which == "anchors" else pool).clone().requires_grad_(True)
    inputs = (leaf, pool) if which == "anchors" else (anchors, leaf)
    (grad,) = torch.autograd.grad(triton_op(*inputs, index, 5.0).sum(), leaf)  # sum: expanded upstream
    ref_leaf = leaf.detach().clone().requires_grad_(True)
    ref_inputs = (ref_leaf, pool) if which == "anchors" else (anchors, ref_leaf)
    (ref_grad,) = torch.autograd.grad(sampled_logsumexp_reference(*ref_inputs, index, 5.0).sum(), ref_leaf)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@kernel_test
def test_kernel_float64_gradcheck(triton_op: Callable[..., Tensor]) -> None:
    anchors, pool, index = make_inputs(3, 4, 5, 6, dtype=torch.float64, seed=12)
    anchors.requires_grad_(True)
    pool.requires_grad_(True)
    index[0] = 2  # a repeated row
    assert torch.autograd.gradcheck(lambda x, m: triton_op(x, m, index, 2.5), (anchors, pool))


@kernel_test
def test_kernel_empty_shapes(triton_op: Callable[..., Tensor]) -> None:
    anchors, pool, _ = make_inputs(4, 5, 3, 1)
    no_negatives = torch.empty(4, 0, dtype=torch.int64)
    lse, grad_anchors, grad_pool = run_with_grad(triton_op, anchors, pool, no_negatives, 5.0)
    assert torch.equal(lse, sampled_logsumexp_reference(anchors, pool, no_negatives, 5.0))  # all -inf
    assert not grad_anchors.any() and not grad_pool.any()
    no_anchors = triton_op(anchors[:0], pool, torch.empty(0, 7, dtype=torch.int64), 5.0)
    assert no_anchors.shape == (0,) and no_anchors.dtype == torch.float32


@kernel_test
def test_kernel_invalid_inputs_raise(triton_op: Callable[..., Tensor]) -> None:
    anchors, pool, index = make_inputs(4, 5, 3, 2)
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        triton_op(anchors, pool[:, :2], index, 5.0)
    with pytest.raises(ValueError, match=r"\(A, R\)"):
        triton_op(anchors, pool, index[:3], 5.0)
    with pytest.raises(ValueError, match=r"\(A, D\)"):
        triton_op(anchors[0], pool, index, 5.0)
    with pytest.raises(TypeError, match="int64"):
        triton_op(anchors, pool, index.float(), 5.0)
    with pytest.raises(TypeError, match="dtype"):
        triton_op(anchors.to(torch.int64), pool, index, 5.0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        triton_op(anchors, pool, index + 5, 5.0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        triton_op(anchors, pool, torch.where(index == index[0, 0], -1, index), 5.0)  # no wrap-around
    with pytest.raises(ValueError, match="power of two"):
        triton_op(anchors, pool, index, 5.0, block_r=3)
    with pytest.raises(ValueError, match="at most"):
        triton_op(anchors, pool, index, 5.0, block_a=64, block_r=256, block_d=256)


@kernel_test
def test_kernel_explicit_triton_backend_runs_in_interpreter(
    triton_op: Callable[..., Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(backend_module.ENV_VARIABLE, raising=False)
    anchors, pool, index = make_inputs(3, 4, 5, 6)
    op = resolve_backend("triton").op_for(anchors)
    assert op is triton_op
    assert_matches_reference(op, anchors, pool, index, 5.0)


# ------------------------------------------------------------------------------------------------
# Gating rules (no Triton needed).
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_backend_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(backend_module.ENV_VARIABLE, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_triton_request_without_triton_raises_with_hint(clean_backend_env: pytest.MonkeyPatch) -> None:
    clean_backend_env.setattr(backend_module, "triton_is_available", lambda: False)
    with pytest.raises(ImportError, match=re.escape(TRITON_INSTALL_HINT)):
        resolve_backend("triton")
    # auto never raises: it falls back to chunked everywhere
    assert resolve_backend("auto").op_for(torch.zeros(1)) is sampled_logsumexp_chunked


def test_find_spec_none_means_unavailable(clean_backend_env: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "triton" else real_find_spec(name, *args, **kwargs)

    clean_backend_env.setattr(importlib.util, "find_spec", fake_find_spec)
    assert not backend_module.triton_is_available()
    with pytest.raises(ImportError, match=re.escape(TRITON_INSTALL_HINT)):
        resolve_backend("triton")


def test_importing_the_triton_module_without_triton_raises_with_hint(
    clean_backend_env: pytest.MonkeyPatch,
) -> None:
    clean_backend_env.setitem(sys.modules, "triton", None)  # makes ``import triton`` fail
    clean_backend_env.delitem(sys.modules, "instcontrast.ops.triton", raising=False)
    with pytest.raises(ImportError, match=re.escape(TRITON_INSTALL_HINT)):
        importlib.import_module("instcontrast.ops.triton")


def test_environment_variable_chooses_only_where_the_code_does_not(clean_backend_env: pytest.MonkeyPatch) -> None:
    clean_backend_env.setenv(backend_module.ENV_VARIABLE, "reference")
    backend = resolve_backend(None)
    assert backend.name == "reference"
    assert backend.op_for(torch.zeros(1)) is sampled_logsumexp_reference
    assert resolve_backend("chunked").name == "chunked"  # an explicit argument wins
    clean_backend_env.setenv(backend_module.ENV_VARIABLE, "chunked")
    assert resolve_backend(None).op_for(torch.zeros(1)) is sampled_logsumexp_chunked
    assert resolve_backend("reference").op_for(torch.zeros(1)) is sampled_logsumexp_reference
    clean_backend_env.setenv(backend_module.ENV_VARIABLE, "triton")
    clean_backend_env.setattr(backend_module, "triton_is_available", lambda: False)
    with pytest.raises(ImportError, match=re.escape(TRITON_INSTALL_HINT)):
        resolve_backend(None)
    clean_backend_env.setenv(backend_module.ENV_VARIABLE, "fastest")
    with pytest.raises(ValueError, match=backend_module.ENV_VARIABLE):
        resolve_backend(None)


def test_auto_without_cuda_or_with_broken_kernels_resolves_to_chunked(clean_backend_env: pytest.MonkeyPatch) -> None:
    clean_backend_env.setattr(backend_module, "triton_is_available", lambda: True)
    clean_backend_env.setattr(torch.cuda, "is_available", lambda: False)
    assert not resolve_backend("auto").use_triton_on_cuda
    clean_backend_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_backend_env.setattr(backend_module, "_triton_kernels_import", lambda: False)
    assert not resolve_backend("auto").use_triton_on_cuda


@pytest.mark.parametrize("value", ["false", "off", "no", "0", ""])
def test_triton_interpret_is_read_like_triton_reads_it(clean_backend_env: pytest.MonkeyPatch, value: str) -> None:
    clean_backend_env.setenv("TRITON_INTERPRET", value)
    assert not backend_module.triton_interpret_enabled()
    clean_backend_env.setenv("TRITON_INTERPRET", "True")
    assert backend_module.triton_interpret_enabled()


@pytest.mark.parametrize("interpreter", [False, True])
def test_auto_never_picks_triton_for_cpu_tensors(
    clean_backend_env: pytest.MonkeyPatch, interpreter: bool
) -> None:
    clean_backend_env.setattr(backend_module, "triton_is_available", lambda: True)
    clean_backend_env.setattr(backend_module, "_triton_kernels_import", lambda: True)
    clean_backend_env.setattr(torch.cuda, "is_available", lambda: True)  # pretend a GPU machine
    if interpreter:
        clean_backend_env.setenv("TRITON_INTERPRET", "1")
    backend = resolve_backend("auto")
    assert backend.use_triton_on_cuda
    assert backend.op_for(torch.zeros(2, 3)) is sampled_logsumexp_chunked


@requires_triton
def test_triton_op_rejects_cpu_tensors_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    import instcontrast.ops.triton as triton_ops

    monkeypatch.setattr(triton_ops, "_interpreter_mode", lambda: False)
    anchors, pool, index = make_inputs(2, 3, 4, 2)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_ops.sampled_logsumexp_triton(anchors, pool, index, 5.0)


@requires_triton
def test_deterministic_mode_refuses_the_atomic_pool_gradient_on_gpu() -> None:
    from instcontrast.ops.triton import _check_determinism

    pool = torch.zeros(3, 2, requires_grad=True)
    previous, previous_warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="chunked"):
            _check_determinism(pool, on_gpu=True)
        _check_determinism(pool.detach(), on_gpu=True)  # no pool gradient: nothing nondeterministic
        _check_determinism(pool, on_gpu=False)  # the interpreter adds sequentially
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            _check_determinism(pool, on_gpu=True)
        torch.use_deterministic_algorithms(False)
        _check_determinism(pool, on_gpu=True)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def test_explicit_triton_without_cuda_raises_at_construction(clean_backend_env: pytest.MonkeyPatch) -> None:
    clean_backend_env.setattr(backend_module, "triton_is_available", lambda: True)
    clean_backend_env.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("triton")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        InstanceAwarePixelContrast(backend="triton")


def test_explicit_triton_on_cpu_tensors_without_interpreter_raises(clean_backend_env: pytest.MonkeyPatch) -> None:
    clean_backend_env.setattr(backend_module, "triton_is_available", lambda: True)
    clean_backend_env.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, CPU inputs
    backend = resolve_backend("triton")
    with pytest.raises(ValueError, match="CUDA"):
        backend.op_for(torch.zeros(2, 3))
