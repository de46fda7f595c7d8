"""The inspector's numerics (no Qt): kernel grids, rotations, phase shifts, feature maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_crossd.core import CrossDConv
from napari_crossd.engine.normalize import network_volume
from napari_crossd.models.inspect import (
    conv_layers,
    dynamic_rotations,
    feature_maps,
    kernel_grid,
    layer_kernels,
    learned_rotation,
    phase_shift,
    rotate_bank,
)


@pytest.fixture(scope="module")
def mobilenet3d(mobilenet_v2_imagenet_path):
    from napari_crossd.engine import prepare_model

    return prepare_model(str(mobilenet_v2_imagenet_path), strategy="i3d")


def test_first_layer_rgb_grid_of_real_imagenet_kernels(mobilenet3d):
    layers = conv_layers(mobilenet3d)
    assert next(iter(layers)) == "features.0.0"
    assert len(layers) == 1 + 17  # the stem and each block's 3x3 depthwise conv (1x1 convs left out)
    bank = layer_kernels(layers["features.0.0"])
    assert bank.shape == (32, 3, 3, 3, 3)
    grid = kernel_grid(bank)
    assert grid.rgb and grid.layout == "tiles" and (grid.rows, grid.cols) == (6, 6)
    assert grid.data.shape == (3, 6 * 4 - 1, 6 * 4 - 1, 3)
    assert grid.data.min() >= 0 and grid.data.max() <= 1
    # i3d: every depth slice is W / 3, and a tile holds kernel o's RGB weights at 0.5 + 0.5 w / peak.
    y, x = grid.tile_origin(1, 2)  # kernel 8
    expected = 0.5 + 0.5 * bank[8, :, 1].permute(1, 2, 0).numpy() / grid.peak
    np.testing.assert_allclose(grid.data[1, y : y + 3, x : x + 3], expected, atol=1e-6)
    np.testing.assert_allclose(grid.data[0], grid.data[2], atol=1e-6)
    assert grid.peak == pytest.approx(float(bank.abs().max()))


def test_out_by_in_grid_and_depthwise_tiles():
    bank = torch.arange(4 * 5 * 27, dtype=torch.float32).reshape(4, 5, 3, 3, 3)
    grid = kernel_grid(bank, gap=1)
    assert grid.layout == "out_x_in" and (grid.rows, grid.cols) == (4, 5)
    assert grid.data.shape == (3, 4 * 4 - 1, 5 * 4 - 1)
    y, x = grid.tile_origin(2, 3)
    np.testing.assert_allclose(grid.data[:, y : y + 3, x : x + 3], (bank[2, 3] / bank.abs().max()).numpy())
    assert grid.data[0, 3].max() == 0  # a gap row
    capped = kernel_grid(bank, max_out=2, max_in=3)
    assert capped.shown == (2, 3) and capped.data.shape == (3, 7, 11)
    depthwise = kernel_grid(torch.randn(10, 1, 3, 3, 3))
    assert depthwise.layout == "tiles" and (depthwise.rows, depthwise.cols) == (3, 4)
    with pytest.raises(ValueError, match="3 input channels"):
        kernel_grid(bank, rgb=True)
    with pytest.raises(ValueError, match=r"\(C_out, C_in, k_d, k_h, k_w\)"):
        kernel_grid(torch.zeros(3, 3, 3))


def test_rotation_is_exact_and_phase_shift_of_quarter_turn(mobilenet3d):
    bank = layer_kernels(conv_layers(mobilenet3d)["features.0.0"])
    quarter = rotate_bank(bank, "d", math.pi / 2)
    torch.testing.assert_close(quarter, torch.rot90(bank, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    back = rotate_bank(rotate_bank(bank, "h", 0.4), "h", -0.4)
    torch.testing.assert_close(back, bank, atol=1e-5, rtol=0)
    turned = rotate_bank(bank, (0.0, 1.0, 1.0), 0.7)
    assert float(turned.norm()) == pytest.approx(float(bank.norm()), rel=1e-5)
    # No rotation: no phase shift. A pure translation by one voxel along w: phase ramp -2 pi nu.
    assert np.abs(phase_shift(bank, bank)).max() == 0
    # (i3d kernels are constant along d: most of their spectrum is 0, so use a generic bank.)
    generic = torch.randn(4, 2, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    phase = phase_shift(generic, torch.roll(generic, 1, dims=-1))
    nu = np.fft.fftshift(np.fft.fftfreq(3))
    np.testing.assert_allclose(phase, np.broadcast_to(np.angle(np.exp(-2j * np.pi * nu)), phase.shape), atol=1e-5)
    # The quarter turn about d moves frequency (h, w) to (w, -h): its phase change is 0 on the
    # d axis of the spectrum's centre line (nu_h = nu_w = 0), where the turn maps nu to itself.
    quarter_phase = phase_shift(bank, quarter)
    assert quarter_phase.shape == (32, 3, 3, 3, 3)
    np.testing.assert_allclose(quarter_phase[..., 1, 1], 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="cubic"):
        rotate_bank(torch.zeros(2, 2, 1, 3, 3), "d", 0.3)


def test_learned_static_rotation_read_back():
    conv = CrossDConv(4, 6, 3, padding=1, rotation="static")
    with torch.no_grad():
        conv.rotation_vector.copy_(torch.tensor([[0.0, 0.3, 0.4]]))
    learned = learned_rotation(conv)
    assert learned.kind == "static"
    np.testing.assert_allclose(learned.angle, [0.5])
    np.testing.assert_allclose(learned.axis, [[0.0, 0.6, 0.8]])
    assert "28.65 deg" in learned.describe()
    # The layer's synthesised 3D kernel is U rotated by that rotation.
    torch.testing.assert_close(layer_kernels(conv), rotate_bank(conv.weights_3d.detach(), (0, 0.6, 0.8), 0.5),
                               atol=1e-5, rtol=0)
    assert learned_rotation(torch.nn.Conv3d(2, 2, 3)).kind == "none"


def test_dynamic_rotations_per_slice_match_the_layer(crossd_mobilenet_checkpoint, mni_t1):
    from napari_crossd import load_model

    model2d = load_model(crossd_mobilenet_checkpoint)
    layer = "features.2.conv.1.0"  # a depthwise Cross-D layer (24 x 24 input at stride 2 here)
    module = model2d.get_submodule(layer)
    assert isinstance(module, CrossDConv) and module.rotation == "dynamic"
    slices = network_volume(mni_t1.numpy(), model2d).transpose(0, 1)  # (Z, 3, Y, X)
    assert slices.shape == (16, 3, 40, 42)
    axes, angles = dynamic_rotations(model2d, layer, slices, batch=5)
    assert axes.shape == (16, 3) and angles.shape == (16,)
    np.testing.assert_allclose(np.linalg.norm(axes, axis=1), 1.0, atol=1e-6)
    assert np.abs(angles).max() <= math.pi / 4
    assert np.ptp(angles) > 0  # slices differ, so do their rotations
    # Independently: the layer's own prediction from its input during a full 2D forward of slice 7.
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(m.predict_rotation(args[0])))
    with torch.no_grad():
        model2d(slices[7:8])
    handle.remove()
    axis, angle = seen[0]
    np.testing.assert_allclose(axes[7], axis[0].double().numpy(), atol=1e-5)
    np.testing.assert_allclose(angles[7], float(angle[0]), atol=1e-6)
    with pytest.raises(ValueError, match="no dynamic rotation"):
        dynamic_rotations(model2d, "features.1.conv.1", slices)


def test_feature_maps_level_and_zoom(mobilenet3d, mni_t1):
    net_input = network_volume(mni_t1.numpy(), mobilenet3d)
    assert net_input.shape == (3, 16, 40, 42)
    maps, zoom = feature_maps(mobilenet3d, net_input, 0)
    assert maps.shape == (16, 8, 20, 21)
    np.testing.assert_allclose(zoom, (2.0, 2.0, 2.0))
    full = mobilenet3d.forward_features(net_input[None])[0][0]
    np.testing.assert_allclose(maps, full.detach().numpy(), atol=1e-5)
    maps1, zoom1 = feature_maps(mobilenet3d, net_input, 1)
    assert maps1.shape == (24, 4, 10, 11) and tuple(zoom1) == (4.0, 4.0, 42 / 11)
    with pytest.raises(ValueError, match=r"level must be in 0\.\.4"):
        feature_maps(mobilenet3d, net_input, 5)


def test_filter_overview_sorts_by_norm_and_scales_each_filter_to_its_peak():
    from napari_crossd.models.inspect import filter_overview, norm_order

    bank = torch.zeros(4, 2, 3, 3, 3)
    for o, size in enumerate((1.0, 4.0, 2.0, 3.0)):
        bank[o, 0, 1, 1, 1] = size
        bank[o, 1, 0, 0, 0] = -size / 2
    grid, order = filter_overview(bank)
    assert list(order) == [1, 3, 2, 0] and list(norm_order(bank)) == [1, 3, 2, 0]
    assert grid.layout == "out_x_in" and grid.data.shape == (3, 4 * 4 - 1, 2 * 4 - 1)
    for row in range(4):  # every filter at its own peak: 1 at the centre, -0.5 at the corner
        y, x = grid.tile_origin(row, 0)
        assert grid.data[1, y + 1, x + 1] == pytest.approx(1.0)
        y, x = grid.tile_origin(row, 1)
        assert grid.data[0, y, x] == pytest.approx(-0.5)


def test_pick_filter_strip_and_spectrum_mask(mobilenet3d):
    from napari_crossd.models.inspect import (
        PHASE_FLOOR,
        depth_strip,
        filter_spectrum,
        pick_filter,
        rotate_filter,
        symmetric_limit,
    )

    bank = layer_kernels(mobilenet3d.get_submodule("features.0.0"))  # i3d: three equal slices W / 3
    kernel = pick_filter(bank, 3, 2)
    np.testing.assert_array_equal(kernel, bank[3, 2].numpy())
    np.testing.assert_allclose(pick_filter(bank, 3), bank[3].mean(0).numpy())
    strip = depth_strip(kernel)
    assert strip.shape == (3, 11) and np.isnan(strip[:, [3, 7]]).all()
    np.testing.assert_array_equal(strip[:, 8:], kernel[2])
    assert symmetric_limit(strip) == pytest.approx(float(np.abs(kernel).max()))
    # An i3d kernel is constant along d: its spectrum lives on the d = 0 frequency plane only,
    # so the other two planes (18 of 27 bins) are masked; the phase of a zero rotation is 0.
    still = rotate_filter(kernel, (0.0, 0.0, 0.0))
    np.testing.assert_allclose(still.rotated, kernel, atol=1e-6)
    phase, amplitude = filter_spectrum(still.u, still.rotated)
    assert np.isnan(phase).sum() >= 18 and np.isnan(phase[[0, 2]]).all()
    np.testing.assert_allclose(phase[~np.isnan(phase)], 0.0, atol=1e-3)
    assert amplitude.max() == pytest.approx(1.0)
    # A quarter turn about w is torch.rot90 in the (d, h) plane; its applied 2D kernel is the central slice.
    turned = rotate_filter(kernel, (0.0, 0.0, math.pi / 2))
    errors = [np.abs(turned.rotated - np.rot90(kernel, k, axes=(0, 1))).max() for k in (1, -1)]
    assert min(errors) < 1e-5, errors
    np.testing.assert_allclose(turned.applied, turned.rotated[1])
    phase, amplitude = filter_spectrum(turned.u, turned.rotated)
    spectrum = np.abs(np.fft.fftshift(np.fft.fftn(kernel)))
    assert np.isnan(phase[spectrum <= PHASE_FLOOR * spectrum.max()]).all()
    assert np.nanmax(np.abs(phase)) <= 180.0


def test_inspector_job_shows_a_static_layers_learned_rotation():
    """The Inspector's worker job on a static Cross-D layer: U, U rotated by the learned rotation,
    the 2D kernel the layer's own 2D forward applies (its ``weight``)."""
    from napari_crossd._widgets._inspector_views import FilterRequest, kernel_view_job
    from napari_crossd.engine import run_job

    torch.manual_seed(0)
    conv = CrossDConv(4, 6, 3, padding=1, rotation="static")
    with torch.no_grad():
        conv.rotation_vector.copy_(torch.tensor([[0.0, 0.3, 0.4]]))
    conv.eval()
    view, shown = run_job(kernel_view_job(conv, "conv", FilterRequest(2, 1, "h", 0.0, learned=True)))
    assert shown.what == "learned static rotation"
    np.testing.assert_allclose(shown.rotation.rotvec, [0.0, 0.3, 0.4])
    assert shown.rotation.describe() == "28.65 deg about (d, h, w) = (0.000, 0.600, 0.800)"
    np.testing.assert_array_equal(shown.rotation.u, conv.weights_3d.detach()[2, 1].numpy())
    np.testing.assert_array_equal(shown.values, layer_kernels(conv)[2, 1].numpy())  # the 3D forward's kernel
    with torch.no_grad():
        np.testing.assert_allclose(shown.rotation.applied, conv.weight[2, 1].numpy(), atol=1e-5)
    # The display rotation instead: the sliders' axis and angle.
    _, shown = run_job(kernel_view_job(conv, "conv", FilterRequest(2, None, "d", math.radians(20.0)), view))
    assert shown.what == "display rotation"
    np.testing.assert_allclose(shown.rotation.rotvec, [math.radians(20.0), 0.0, 0.0])
