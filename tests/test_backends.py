"""Every fast path equals ops/reference.py in value and gradient, on cloned inputs and odd shapes."""

from __future__ import annotations

import pytest
import torch
from blocked_checks import assert_blocked_matches_reference

from instcontrast import InstanceAwarePixelContrast
from instcontrast._backend import resolve_backend
from instcontrast.ops.chunked import sampled_logsumexp_chunked
from instcontrast.ops.reference import sampled_logsumexp_reference

SHAPES = [  # (A, M, D, R)
    (1, 2, 3, 1),
    (7, 5, 3, 11),
    (13, 17, 130, 257),
    (97, 31, 16, 4),
]


def _inputs(num_anchors: int, pool_size: int, dim: int, negatives: int, dtype: torch.dtype = torch.float32):
    # unit vectors, as the loss feeds them (raw large dot products are covered separately)
    anchors = torch.nn.functional.normalize(torch.randn(num_anchors, dim, dtype=dtype), dim=1)
    pool = torch.nn.functional.normalize(torch.randn(pool_size, dim, dtype=dtype), dim=1)
    index = torch.randint(0, pool_size, (num_anchors, negatives))
    return anchors, pool, index


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [1, 3, None])
def test_chunked_matches_reference_values_and_gradients(shape, block_size) -> None:
    anchors, pool, index = _inputs(*shape)
    a_ref, p_ref = anchors.clone().requires_grad_(), pool.clone().requires_grad_()
    a_chk, p_chk = anchors.clone().requires_grad_(), pool.clone().requires_grad_()
    upstream = torch.randn(shape[0])
    ref = sampled_logsumexp_reference(a_ref, p_ref, index, 3.0)
    chk = sampled_logsumexp_chunked(a_chk, p_chk, index, 3.0, block_size=block_size)
    torch.testing.assert_close(chk, ref)
    (ref * upstream).sum().backward()
    (chk * upstream).sum().backward()
    torch.testing.assert_close(a_chk.grad, a_ref.grad)
    torch.testing.assert_close(p_chk.grad, p_ref.grad)


def test_chunked_accumulates_repeated_indices() -> None:
    anchors, pool, _ = _inputs(9, 4, 5, 6)
    index = torch.zeros(9, 6, dtype=torch.long)  # every negative is pool row 0
    p_ref, p_chk = pool.clone().requires_grad_(), pool.clone().requires_grad_()
    sampled_logsumexp_reference(anchors, p_ref, index, 2.0).sum().backward()
    sampled_logsumexp_chunked(anchors, p_chk, index, 2.0, block_size=2).sum().backward()
    torch.testing.assert_close(p_chk.grad, p_ref.grad)
    assert p_chk.grad[1:].abs().max() == 0


def test_chunked_gradcheck_float64() -> None:
    anchors, pool, index = _inputs(11, 7, 3, 5, torch.float64)
    anchors.requires_grad_()
    pool.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, p: sampled_logsumexp_chunked(a, p, index, 2.5, block_size=4), (anchors, pool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype: torch.dtype) -> None:
    anchors, pool, index = _inputs(20, 9, 8, 33)
    expected = sampled_logsumexp_reference(anchors.to(dtype).float(), pool.to(dtype).float(), index, 5.0)
    got = sampled_logsumexp_chunked(anchors.to(dtype), pool.to(dtype), index, 5.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_large_magnitudes_stay_finite() -> None:
    anchors, pool, index = _inputs(10, 6, 4, 9)
    anchors, pool = anchors * 1e3, pool * 1e3
    anchors.requires_grad_()
    value = sampled_logsumexp_chunked(anchors, pool, index, 5.0)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(anchors.grad).all()


def test_non_contiguous_inputs() -> None:
    anchors = torch.randn(8, 12)[:, ::2]  # (8, 6), strided
    pool = torch.randn(6, 5).T  # (5, 6), transposed
    index = torch.randint(0, 5, (4, 8)).T  # (8, 4), transposed
    torch.testing.assert_close(
        sampled_logsumexp_chunked(anchors, pool, index, 2.0), sampled_logsumexp_reference(anchors, pool, index, 2.0)
    )


def test_backend_resolution_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTCONTRAST_BACKEND", raising=False)
    cpu = torch.zeros(1)
    assert resolve_backend("auto").op_for(cpu) is sampled_logsumexp_chunked
    assert resolve_backend("chunked").op_for(cpu) is sampled_logsumexp_chunked
    assert resolve_backend("reference").op_for(cpu) is sampled_logsumexp_reference
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("fast")
    assert resolve_backend(None).name == "auto"
    monkeypatch.setenv("INSTCONTRAST_BACKEND", "reference")
    assert resolve_backend(None).name == "reference"  # the variable chooses where the code does not
    assert resolve_backend("chunked").name == "chunked"  # an explicit argument wins over it
    assert InstanceAwarePixelContrast(backend="chunked").backend.name == "chunked"
    assert InstanceAwarePixelContrast().backend.name == "reference"
    monkeypatch.setenv("INSTCONTRAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="INSTCONTRAST_BACKEND"):
        resolve_backend(None)


def _blocked_samples(num_anchors: int, pool_size: int, negatives: int, dtype=torch.float32, strategy="fusion"):
    from instcontrast.sampler import InstanceAwareSampler

    probs = torch.nn.functional.normalize(torch.rand(pool_size, 6, dtype=dtype), dim=1)
    # at most one proposal per missing slot and round forces several rounds (later ones serve a subset
    # of rows); max_rounds=4 leaves some slots to the fallback too
    sampler = InstanceAwareSampler(num_negatives=negatives, strategy=strategy, max_rounds=4, max_proposals_per_slot=1)
    own = torch.arange(num_anchors) % pool_size
    return sampler(probs[own], probs, own, generator=torch.Generator().manual_seed(num_anchors))


@pytest.mark.parametrize(("num_anchors", "pool_size", "dim", "negatives"), [(1, 2, 3, 1), (37, 5, 3, 11), (300, 64, 130, 257)])
@pytest.mark.parametrize("strategy", ["fusion", "uniform"])
def test_blocked_matches_reference_values_and_gradients(num_anchors, pool_size, dim, negatives, strategy, monkeypatch) -> None:
    from instcontrast import sampler as sampler_module
    from instcontrast.ops.chunked import sampled_logsumexp_blocked

    monkeypatch.setattr(sampler_module, "_SEGMENT_COST", 0)  # cut wherever a cut saves a pair, even on tiny blocks
    samples = _blocked_samples(num_anchors, pool_size, negatives, strategy=strategy)
    if num_anchors > 1:  # later rounds / fallbacks: segments serving a prefix of the rows
        assert any(isinstance(rows, slice) for segments in samples.blocks.segments for rows, _, _ in segments)
    anchors, pool, _ = _inputs(num_anchors, pool_size, dim, negatives)
    a_ref, p_ref = anchors.clone().requires_grad_(), pool.clone().requires_grad_()
    a_blk, p_blk = anchors.clone().requires_grad_(), pool.clone().requires_grad_()
    upstream = torch.randn(num_anchors)
    ref = sampled_logsumexp_reference(a_ref, p_ref, samples.index, 4.0)
    blk = sampled_logsumexp_blocked(a_blk, p_blk, samples.blocks, 4.0)
    torch.testing.assert_close(blk, ref)
    (ref * upstream).sum().backward()
    (blk * upstream).sum().backward()
    torch.testing.assert_close(a_blk.grad, a_ref.grad)
    torch.testing.assert_close(p_blk.grad, p_ref.grad)


def test_blocked_gradcheck_float64() -> None:
    from instcontrast.ops.chunked import sampled_logsumexp_blocked

    samples = _blocked_samples(13, 6, 5)
    anchors = torch.randn(13, 3, dtype=torch.float64, requires_grad=True)
    pool = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p: sampled_logsumexp_blocked(a, p, samples.blocks, 1.5), (anchors, pool))


def test_blocked_backward_over_several_blocks_with_repeated_columns_matches_reference(hand_blocks) -> None:
    # repeats add up: a column chosen twice by an anchor (and a candidate listed twice) counts twice
    blocks = hand_blocks  # three blocks, repeated candidates and columns, per-round segments (conftest)
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(8, 4, generator=generator)
    pool = torch.randn(6, 4, generator=generator)
    upstream = torch.randn(8, generator=generator)
    assert_blocked_matches_reference(anchors, pool, blocks, 2.0, upstream)


def test_blocked_gradcheck_float64_over_several_blocks(hand_blocks) -> None:
    from instcontrast.ops.chunked import sampled_logsumexp_blocked

    blocks = hand_blocks  # three blocks, repeated candidates and columns, per-round segments (conftest)
    anchors = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    pool = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p: sampled_logsumexp_blocked(a, p, blocks, 1.5), (anchors, pool))


def test_chunked_backward_over_several_anchor_blocks_with_an_uneven_tail() -> None:
    anchors, pool, index = _inputs(11, 6, 5, 4)
    upstream = torch.linspace(-1.0, 2.0, 11)  # distinct per anchor, so a misplaced block shows
    a_ref, p_ref = anchors.clone().requires_grad_(), pool.clone().requires_grad_()
    (sampled_logsumexp_reference(a_ref, p_ref, index, 3.0) * upstream).sum().backward()
    for block_size in (2, 4, 5):
        a_chk, p_chk = anchors.clone().requires_grad_(), pool.clone().requires_grad_()
        (sampled_logsumexp_chunked(a_chk, p_chk, index, 3.0, block_size=block_size) * upstream).sum().backward()
        torch.testing.assert_close(a_chk.grad, a_ref.grad)
        torch.testing.assert_close(p_chk.grad, p_ref.grad)


def test_the_triton_install_hint_has_one_home_below_backend_and_kernels() -> None:
    import ast
    from pathlib import Path

    import instcontrast

    package = Path(instcontrast.__file__).parent

    def imported_modules(relative: str) -> set[str]:
        tree = ast.parse((package / relative).read_text())
        return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0}

    assert imported_modules("_extras.py") == set()  # imports nothing from the package
    assert "_backend" not in imported_modules("ops/triton.py")  # no _backend <-> ops.triton circle
    assert "_extras" in imported_modules("ops/triton.py") and "_extras" in imported_modules("_backend.py")
