"""instcontrast.views: strong-view features land on the weak grid; outside the crop is invalid."""

from __future__ import annotations

import pytest
import torch

from instcontrast.views import ViewGeometry, align_views, image_to_view, view_to_image


def _coordinate_image(size: int) -> torch.Tensor:
    """(1, 2, size, size): channel 0 holds x, channel 1 holds y of each pixel centre (normalized)."""
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return torch.stack([centres.expand(size, size), centres[:, None].expand(size, size)])[None]


def _crop(image: torch.Tensor, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    x0, y0, x1, y1 = box
    view = image[..., y0:y1, x0:x1]
    return view.flip(-1) if flip else view


@pytest.mark.parametrize("flip_strong", [False, True])
@pytest.mark.parametrize("flip_weak", [False, True])
def test_aligned_strong_view_matches_the_weak_view_inside_the_crop(flip_strong: bool, flip_weak: bool) -> None:
    size = 16
    image = _coordinate_image(size)
    weak = _crop(image, (0, 0, 16, 16), flip_weak)  # the whole image
    strong = _crop(image, (4, 2, 12, 10), flip_strong)  # an 8×8 crop, same pixel scale
    strong = torch.nn.functional.interpolate(strong, size=(16, 16), mode="nearest")  # resized to the grid
    weak_geometry = ViewGeometry(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([flip_weak]))
    strong_geometry = ViewGeometry(torch.tensor([[4 / 16, 2 / 16, 12 / 16, 10 / 16]]), torch.tensor([flip_strong]))
    aligned, valid = align_views(strong, strong_geometry, weak_geometry, output_size=(16, 16), mode="nearest")
    expected_valid = torch.zeros(16, 16, dtype=torch.bool)
    expected_valid[2:10, 4:12] = True
    if flip_weak:
        expected_valid = expected_valid.flip(-1)
    assert torch.equal(valid[0], expected_valid)
    torch.testing.assert_close(aligned[..., valid[0]], weak[..., valid[0]])


def test_identity_geometry_is_a_no_op() -> None:
    features = torch.randn(2, 5, 6, 7)
    identity = ViewGeometry.identity(2)
    aligned, valid = align_views(features, identity, identity)
    torch.testing.assert_close(aligned, features)
    assert valid.all()


def test_coordinate_maps_are_inverse() -> None:
    geometry = ViewGeometry(torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.5, 0.5, 1.0]]), torch.tensor([True, False]))
    u, v = torch.rand(2, 10), torch.rand(2, 10)
    x, y = view_to_image(u, v, geometry)
    u_back, v_back = image_to_view(x, y, geometry)
    torch.testing.assert_close(u_back, u)
    torch.testing.assert_close(v_back, v)


def test_gradients_flow_through_alignment() -> None:
    features = torch.randn(1, 3, 8, 8, requires_grad=True)
    geometry = ViewGeometry(torch.tensor([[0.25, 0.25, 0.75, 0.75]]), torch.tensor([False]))
    aligned, valid = align_views(features, geometry, ViewGeometry.identity(1))
    aligned[..., valid[0]].sum().backward()
    assert features.grad.abs().sum() > 0


def test_bad_geometry_raises() -> None:
    with pytest.raises(ValueError, match=r"boxes must have shape \(B, 4\)"):
        ViewGeometry(torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="x1 > x0"):
        ViewGeometry(torch.tensor([[0.5, 0.0, 0.5, 1.0]]), torch.zeros(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch sizes"):
        align_views(torch.randn(2, 3, 4, 4), ViewGeometry.identity(1), ViewGeometry.identity(2))
    with pytest.raises(ValueError, match="mode"):
        align_views(torch.randn(1, 3, 4, 4), ViewGeometry.identity(1), ViewGeometry.identity(1), mode="cubic")
