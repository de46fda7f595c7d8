"""Tests for napari_crossd.models.inflate: 2D -> 3D conversion and its invariants.

Volumes are built from real images bundled with scikit-image (the camera man; the
astronaut for RGB networks); MobileNetV2 uses torchvision's real ImageNet weights when the
offline weights package is installed.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from torch import nn

from napari_crossd.core import CrossDConv, rotate_kernels
from napari_crossd.models import build_model
from napari_crossd.models.inflate import STRATEGIES, inflate

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)


@pytest.fixture(scope="module")
def camera_volume() -> torch.Tensor:
    """(1, 1, 12, 40, 40): camera-man crops sliding 3 px down per slice (a tilted structure)."""
    image = skimage.data.camera().astype(np.float32)
    volume = np.stack([image[180 + 3 * z : 220 + 3 * z, 200:240] for z in range(12)])
    volume = (volume - volume.mean()) / volume.std()
    return torch.from_numpy(volume)[None, None]


@pytest.fixture(scope="module")
def astronaut_image() -> torch.Tensor:
    """(1, 3, 32, 32) ImageNet-normalised crop of the astronaut's face, 4x downsampled."""
    image = skimage.data.astronaut()[::4, ::4][8:40, 40:72].astype(np.float32) / 255
    image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return ((image - IMAGENET_MEAN) / IMAGENET_STD)[None]


@pytest.fixture(scope="module")
def mobilenet_imagenet(mobilenet_v2_imagenet_path) -> nn.Module:
    model = build_model("mobilenet_v2")
    model.load_state_dict(torch.load(mobilenet_v2_imagenet_path, map_location="cpu", weights_only=True))
    return model.eval()


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random but reproducible parameters and BatchNorm statistics, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.abs_().add_(0.5)
    return module.eval()


def per_slice(fn, volume: torch.Tensor):
    """Apply a 2D function to every depth slice of (B, C, D, H, W); outputs restacked on depth."""
    batch, channels, depth = volume.shape[:3]
    out = fn(volume.transpose(1, 2).reshape(batch * depth, channels, *volume.shape[3:]))

    def restack(t):
        return t.reshape(batch, depth, *t.shape[1:]).transpose(1, 2)

    return [restack(t) for t in out] if isinstance(out, list) else restack(out)


def repeat_depth(image: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, depth, H, W), constant along depth."""
    return image.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# Single convolutions: (kwargs for Conv2d) covering padding kinds, stride, dilation, groups.
CONV_CASES = {
    "k3_p1": dict(in_channels=1, out_channels=6, kernel_size=3, padding=1),
    "k5_s2_p2": dict(in_channels=1, out_channels=5, kernel_size=5, stride=2, padding=2),
    "k3_dil2": dict(in_channels=1, out_channels=4, kernel_size=3, padding=2, dilation=2),
    "same": dict(in_channels=1, out_channels=4, kernel_size=5, padding="same"),
    "valid": dict(in_channels=1, out_channels=4, kernel_size=3, padding="valid"),
    "nonsquare": dict(in_channels=1, out_channels=4, kernel_size=(3, 5), padding=(1, 2)),
    "no_bias": dict(in_channels=1, out_channels=4, kernel_size=3, padding=1, bias=False),
    "groups": dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
    "reflect": dict(in_channels=1, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate": dict(in_channels=1, out_channels=4, kernel_size=3, padding=1, padding_mode="replicate"),
    "circular": dict(in_channels=1, out_channels=4, kernel_size=3, padding=1, padding_mode="circular"),
}


def conv_input(volume: torch.Tensor, channels: int) -> torch.Tensor:
    """The camera volume with ``channels`` channels (shifted copies, so they differ)."""
    return torch.cat([volume.roll(i, dims=-1) for i in range(channels)], dim=1)


def depth_geometry(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(k, stride, low padding, dilation) along depth, which copies the h axis."""
    k, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if conv.padding == "same":
        low = dilation * (k - 1) // 2
    elif conv.padding == "valid":
        low = 0
    else:
        low = conv.padding[0]
    return k, stride, low, dilation


@pytest.mark.parametrize("case", CONV_CASES)
def test_centre_conv_is_slice_by_slice(case, camera_volume):
    conv = seeded(nn.Conv2d(**CONV_CASES[case]))
    volume = conv_input(camera_volume, conv.in_channels)
    out3d = inflate(conv, "centre")(volume)
    k, stride, low, dilation = depth_geometry(conv)
    # Output slice o reads only input slice o * stride - low + (k // 2) * dilation.
    sources = [o * stride - low + (k // 2) * dilation for o in range(out3d.shape[2])]
    assert all(0 <= s < volume.shape[2] for s in sources)
    expected = torch.stack([conv(volume[:, :, s]) for s in sources], dim=2)
    assert out3d.shape == expected.shape
    assert (out3d - expected).abs().max() < 1e-5


@pytest.mark.parametrize("case", CONV_CASES)
def test_i3d_conv_on_depth_constant_volume_is_2d(case, camera_volume):
    conv = seeded(nn.Conv2d(**CONV_CASES[case]))
    image = conv_input(camera_volume, conv.in_channels)[:, :, 5]
    volume = repeat_depth(image, 9)
    out3d = inflate(conv, "i3d")(volume)
    out2d = conv(image)
    k, stride, low, dilation = depth_geometry(conv)
    if conv.padding_mode == "zeros":
        # Away from the borders, where every depth tap reads the volume.
        depths = [
            o for o in range(out3d.shape[2]) if o * stride - low >= 0 and o * stride - low + dilation * (k - 1) < 9
        ]
    else:
        depths = list(range(out3d.shape[2]))  # reflect/replicate/circular keep a constant constant
    assert depths
    for o in depths:
        assert max_rel_diff(out3d[:, :, o], out2d) < 1e-5


def test_replicate_padded_network_i3d_is_exact_at_every_depth(camera_volume):
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, padding_mode="replicate"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="replicate"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    net = seeded(net)
    image = camera_volume[:, :, 4]
    out3d = inflate(net, "i3d")(repeat_depth(image, 8))
    assert max_rel_diff(out3d, net(image)) < 1e-5


def test_centre_stride_one_network_is_slice_by_slice(camera_volume):
    # No GroupNorm/InstanceNorm here: their statistics span the whole volume in 3D.
    net = seeded(
        nn.Sequential(
            nn.Conv2d(1, 8, 5, padding=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 4, 1),
        )
    )
    out3d = inflate(net, "centre")(camera_volume)
    assert (out3d - per_slice(net, camera_volume)).abs().max() < 1e-5


def test_all_depth_preserving_network_is_slice_by_slice_for_every_strategy(astronaut_image):
    """With every stage depth-preserving, each strategy uses W itself: a 2D net per slice."""
    net = seeded(build_model("resnet18", num_classes=10))
    volume = torch.cat([astronaut_image.roll(3 * z, dims=-1).unsqueeze(2) for z in range(4)], dim=2)
    expected = per_slice(net.forward_features, volume)
    for strategy in STRATEGIES:
        features = inflate(net, strategy, depth_preserving_stages=6).forward_features(volume)
        for got, want in zip(features, expected, strict=True):
            assert got.shape == want.shape
            assert max_rel_diff(got, want) < 1e-5


def test_mobilenet_imagenet_all_depth_preserving_is_slice_by_slice(mobilenet_imagenet, astronaut_image):
    volume = torch.cat([astronaut_image.roll(3 * z, dims=-2).unsqueeze(2) for z in range(3)], dim=2)
    features = inflate(mobilenet_imagenet, "centre", depth_preserving_stages=6).forward_features(volume)
    expected = per_slice(mobilenet_imagenet.forward_features, volume)
    for got, want in zip(features, expected, strict=True):
        assert max_rel_diff(got, want) < 1e-5


def replicate_padded(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose padded convolutions pad by replication."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and any(m.padding):
            m.padding_mode = "replicate"
    return model


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_i3d_backbone_on_depth_constant_volume_gives_2d_features_everywhere(arch, astronaut_image, request):
    """Replicate padding keeps a depth-constant volume constant up to the borders, so the
    i3d network must reproduce every 2D feature map at every depth, through every stride."""
    if arch == "mobilenet_v2":
        net = replicate_padded(request.getfixturevalue("mobilenet_imagenet"))  # real ImageNet weights
    else:
        net = replicate_padded(seeded(build_model(arch)))
    expected = net.forward_features(astronaut_image)
    features = inflate(net, "i3d").forward_features(repeat_depth(astronaut_image, 32))
    for got, want in zip(features, expected, strict=True):
        assert max_rel_diff(got, want.unsqueeze(2).expand_as(got)) < 1e-5


def test_i3d_resnet_zero_padding_matches_2d_in_the_interior(astronaut_image):
    net = seeded(build_model("resnet18"))
    expected = net.forward_features(astronaut_image)
    features = inflate(net, "i3d").forward_features(repeat_depth(astronaut_image, 64))
    # Zero padding reaches 2 slices into the stem output (depth 32) and 6 into layer1 (depth 16).
    for level, margin in ((0, 2), (1, 6)):
        got = features[level][:, :, margin:-margin]
        assert max_rel_diff(got, expected[level].unsqueeze(2).expand_as(got)) < 1e-5
    assert max_rel_diff(features[1][:, :, 0], expected[1]) > 1e-2  # the borders do differ


def plane_of(kernel: torch.Tensor) -> str:
    """Which plane through the centre of a (3, 3, 3) kernel holds all of it."""
    if kernel[[0, 2]].abs().sum() == 0:
        return "axial"
    if kernel[:, [0, 2]].abs().sum() == 0:
        return "coronal"
    assert kernel[:, :, [0, 2]].abs().sum() == 0
    return "sagittal"


def test_acs_split_follows_acsconv():
    for channels, split in ((9, (3, 3, 3)), (7, (3, 2, 2)), (8, (3, 3, 2))):
        weight = inflate(nn.Conv2d(1, channels, 3, padding=1), "acs").weight.detach()
        planes = [plane_of(weight[o, 0]) for o in range(channels)]
        assert planes == ["axial"] * split[0] + ["coronal"] * split[1] + ["sagittal"] * split[2]


@pytest.mark.parametrize(("groups", "stride"), [(1, 1), (2, 2)])
def test_acs_matches_its_definition_on_real_volume(groups, stride, camera_volume):
    """Each output channel is its 2D kernel run over axial (h, w), coronal (d, w) or sagittal
    (d, h) slices of the volume, as ACS convolutions define it."""
    conv = seeded(nn.Conv2d(2, 8, 3, stride=stride, padding=1, groups=groups))
    volume = conv_input(camera_volume, 2)  # (1, 2, 12, 40, 40)
    out3d = inflate(conv, "acs")(volume)
    planes = ["axial"] * 3 + ["coronal"] * 3 + ["sagittal"] * 2  # acsconv's split of 8
    inputs_per_group, outputs_per_group = 2 // groups, 8 // groups
    for o, plane in enumerate(planes):
        first = o // outputs_per_group * inputs_per_group
        x = volume[:, first : first + inputs_per_group]

        def conv2d(image, o=o):
            return F.conv2d(image, conv.weight[o : o + 1], conv.bias[o : o + 1], stride, 1)

        # With padding 1 = k // 2, output index i along the slicing axis reads slice i * stride.
        if plane == "axial":  # slices along d, each (h, w)
            want = torch.stack([conv2d(x[:, :, i]) for i in range(0, 12, stride)], dim=2)
        elif plane == "coronal":  # slices along h, each (d, w)
            want = torch.stack([conv2d(x[:, :, :, i]) for i in range(0, 40, stride)], dim=3)
        else:  # slices along w, each (d, h)
            want = torch.stack([conv2d(x[..., i]) for i in range(0, 40, stride)], dim=4)
        got = out3d[:, o : o + 1]
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-5, (o, plane)


def test_acs_conv_transpose_planes_follow_output_channels():
    deconv = nn.ConvTranspose2d(4, 6, 3, groups=2)  # outputs 0, 1 axial; 2, 3 coronal; 4, 5 sagittal
    weight = inflate(deconv, "acs").weight.detach()  # (4, 3, 3, 3, 3)
    for i in range(4):
        for j in range(3):
            output = (i // 2) * 3 + j  # weight[i, j] feeds this output channel
            assert plane_of(weight[i, j]) == ("axial", "coronal", "sagittal")[output // 2]


def test_crossd_kernel_definition_and_symmetry():
    conv = seeded(nn.Conv2d(3, 5, 3, padding=1))
    kernel = inflate(conv, "crossd").weight.detach()
    weight = conv.weight.detach()
    assert torch.isfinite(kernel).all()
    assert torch.equal(kernel[:, :, 1], weight)  # the central slice is W exactly
    assert (kernel - kernel.flip(-3)).abs().max() < 1e-6  # mirror-symmetric in depth
    assert kernel[:, :, 0].abs().max() > 0.05 * weight.abs().max()  # and not the centre kernel

    # The definition, with rotate_kernels instead of the cached operator.
    embedded = torch.zeros(5, 3, 3, 3, 3, dtype=torch.float64)
    embedded[:, :, 1] = weight.double()
    rotvecs = []
    for axis in (1, 2):
        for angle in (math.pi / 6, math.pi / 3, math.pi / 2):
            for sign in (1, -1):
                rotvec = [0.0, 0.0, 0.0]
                rotvec[axis] = sign * angle
                rotvecs.append(rotvec)
    expected = rotate_kernels(embedded, torch.tensor(rotvecs, dtype=torch.float64)).mean(dim=0)
    expected[:, :, 1] = weight.double()
    assert (kernel.double() - expected).abs().max() < 1e-6

    # A kernel symmetric in (h, w) gives one symmetric in (h, w): tilts about h and w agree
    # (to the rounding of the Fourier shears, which shear in a different order for each).
    conv.weight.data = (weight + weight.transpose(-1, -2)) / 2
    symmetric = inflate(conv, "crossd").weight.detach()
    assert (symmetric - symmetric.transpose(-1, -2)).abs().max() < 1e-3 * symmetric.abs().max()


def test_centre_and_i3d_kernels():
    conv = seeded(nn.Conv2d(2, 3, 5, padding=2))
    centre = inflate(conv, "centre").weight.detach()
    assert torch.equal(centre[:, :, 2], conv.weight.detach())
    assert centre[:, :, [0, 1, 3, 4]].abs().sum() == 0
    i3d = inflate(conv, "i3d").weight.detach()
    assert all(torch.equal(i3d[:, :, z], conv.weight.detach() / 5) for z in range(5))


def test_one_by_one_conv_is_the_same_for_every_strategy():
    conv = seeded(nn.Conv2d(1, 6, 1))
    for strategy in STRATEGIES:
        kernel = inflate(conv, strategy).weight
        assert kernel.shape == (6, 1, 1, 1, 1)
        assert torch.equal(kernel[:, :, 0], conv.weight)


@pytest.mark.parametrize("strategy", ["acs", "crossd"])
def test_acs_and_crossd_refuse_non_square_kernels(strategy):
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, (3, 7), padding=(1, 3))))
    with pytest.raises(ValueError, match=r"0\.0 \(Conv2d\).*square"):
        inflate(net, strategy)


def test_crossd_refuses_even_kernels():
    with pytest.raises(ValueError, match="odd kernel"):
        inflate(nn.Conv2d(1, 3, 4), "crossd")


def test_conv_transpose(camera_volume):
    deconv = seeded(nn.ConvTranspose2d(1, 3, 4, stride=2, padding=1))
    image = camera_volume[:, :, 5]
    out2d = deconv(image)
    # i3d: a depth-constant volume gives the 2D output wherever all k / s taps land.
    out3d = inflate(deconv, "i3d")(repeat_depth(image, 6))
    assert out3d.shape == (1, 3, 12, *out2d.shape[-2:])
    for o in range(1, 11):
        assert max_rel_diff(out3d[:, :, o], out2d) < 1e-5
    # Depth-preserving: slice by slice.
    flat = inflate(deconv, "centre", depth_preserving_stages=1)
    assert flat.kernel_size == (1, 4, 4) and flat.stride == (1, 2, 2)
    assert (flat(camera_volume) - per_slice(deconv, camera_volume)).abs().max() < 1e-5
    # output_padding and dilation carry to depth: size (n - 1) * 2 - 2 + 2 * 2 + 1 + 1.
    deconv = nn.ConvTranspose2d(1, 2, 3, stride=2, padding=1, output_padding=1, dilation=2)
    assert inflate(deconv, "centre")(camera_volume).shape == (1, 2, 26, 82, 82)


def test_batchnorm_statistics_and_settings_are_copied(camera_volume):
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)
    conv = nn.Conv2d(1, 4, 3)
    with torch.no_grad():
        for z in range(3):  # real statistics from three training batches
            bn(conv(camera_volume[:, :, z]))
    bn.weight.requires_grad_(False)
    bn3d = inflate(bn)
    assert isinstance(bn3d, nn.BatchNorm3d)
    assert (bn3d.eps, bn3d.momentum, bn3d.affine, bn3d.track_running_stats) == (1e-3, 0.3, True, True)
    assert int(bn3d.num_batches_tracked) == 3
    for name, tensor in bn.state_dict().items():
        assert torch.equal(bn3d.state_dict()[name], tensor), name
    assert bn3d.training and not bn3d.weight.requires_grad and bn3d.bias.requires_grad

    plain = inflate(nn.BatchNorm2d(4, affine=False, track_running_stats=False).eval())
    assert plain.weight is None and plain.running_mean is None and not plain.training
    instance = inflate(nn.InstanceNorm2d(4, affine=True))
    assert isinstance(instance, nn.InstanceNorm3d) and instance.affine


def test_pooling_and_upsampling(camera_volume):
    volume = camera_volume  # (1, 1, 12, 40, 40)
    image = volume[:, :, 5]
    constant = repeat_depth(image, 12)
    cases = [
        (nn.MaxPool2d(3, stride=2, padding=1), (1, 1, 6, 20, 20)),
        (nn.MaxPool2d(2, ceil_mode=True), (1, 1, 6, 20, 20)),
        (nn.MaxPool2d(3, stride=1, padding=1, dilation=2), (1, 1, 10, 38, 38)),
        (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 1, 6, 20, 20)),
        (nn.LPPool2d(2, 2), (1, 1, 6, 20, 20)),
        (nn.AdaptiveAvgPool2d(1), (1, 1, 1, 1, 1)),
        (nn.AdaptiveMaxPool2d((4, 5)), (1, 1, 4, 4, 5)),
        (nn.AdaptiveAvgPool2d((None, 5)), (1, 1, 12, 40, 5)),
        (nn.Upsample(scale_factor=2, mode="nearest"), (1, 1, 24, 80, 80)),
        (nn.Upsample(scale_factor=(2, 3), mode="bilinear"), (1, 1, 24, 80, 120)),
        (nn.UpsamplingBilinear2d(scale_factor=2), (1, 1, 24, 80, 80)),
        (nn.Upsample(size=16, mode="nearest"), (1, 1, 16, 16, 16)),
    ]
    for layer, shape in cases:
        layer3d = inflate(layer)
        assert layer3d(volume).shape == shape, layer
        if not isinstance(layer, nn.LPPool2d):  # an LP norm grows with the window's size
            # The 3D layer on a depth-constant volume is the 2D layer at every depth.
            out = layer3d(constant)
            want = layer(image)
            for o in range(out.shape[2]):
                assert (out[:, :, o] - want).abs().max() < 1e-5, layer  # the image is O(1)
    assert inflate(nn.UpsamplingBilinear2d(scale_factor=2)).mode == "trilinear"
    assert inflate(nn.UpsamplingBilinear2d(scale_factor=2)).align_corners

    pooled, indices = inflate(nn.MaxPool2d(2, return_indices=True))(volume)
    assert inflate(nn.MaxUnpool2d(2))(pooled, indices).shape == volume.shape
    assert inflate(nn.AvgPool2d(2, divisor_override=2))(torch.ones(1, 1, 2, 2, 2)).item() == 2.0


def test_other_layers(camera_volume):
    volume = conv_input(camera_volume, 3)
    softmax = inflate(nn.Softmax2d())
    assert (softmax(volume) - per_slice(nn.Softmax2d(), volume)).abs().max() < 1e-6
    assert isinstance(inflate(nn.Dropout2d(0.3)), nn.Dropout3d) and inflate(nn.Dropout2d(0.3)).p == 0.3
    pad = inflate(nn.ReflectionPad2d((1, 2, 3, 4)))
    assert isinstance(pad, nn.ReflectionPad3d) and pad.padding == (1, 2, 3, 4, 3, 4)
    assert inflate(nn.ConstantPad2d(1, 2.5)).value == 2.5
    assert isinstance(inflate(nn.ZeroPad2d(1)), nn.ZeroPad3d)
    for keep in (nn.GroupNorm(1, 3), nn.LayerNorm(3), nn.ReLU(), nn.Linear(3, 2), nn.Identity(), nn.Dropout()):
        assert type(inflate(keep)) is type(keep)
    assert inflate(nn.GroupNorm(1, 3))(volume).shape == volume.shape


def test_unconvertible_layers_are_named():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.ReLU(), nn.PixelShuffle(2)))
    with pytest.raises(ValueError, match=r"1\.1 \(PixelShuffle\)"):
        inflate(net)

    class Blur2d(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 3)

    with pytest.raises(ValueError, match=r"head \(.*Blur2d\)"):
        inflate(nn.ModuleDict({"head": Blur2d()}))

    class StdConv2d(nn.Conv2d):
        def forward(self, x):
            weight = (self.weight - self.weight.mean()) / self.weight.std()
            return F.conv2d(x, weight, self.bias)

    with pytest.raises(ValueError, match="subclass of Conv2d with its own forward"):
        inflate(nn.Sequential(StdConv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="lazy"):
        inflate(nn.LazyConv2d(4, 3))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        inflate(nn.LayerNorm((2, 3, 4)))
    with pytest.raises(ValueError, match="bicubic"):
        inflate(nn.Upsample(scale_factor=2, mode="bicubic"))
    with pytest.raises(ValueError, match="scale_factor"):
        inflate(nn.Upsample(size=(8, 8)))


def test_bad_options():
    conv = nn.Conv2d(1, 1, 3)
    with pytest.raises(ValueError, match="'centre', 'i3d', 'acs', 'crossd'"):
        inflate(conv, "center")
    with pytest.raises(ValueError, match="'keep', 'undo'"):
        inflate(conv, official_shift="redo")
    for stages in (-1, 1.5, True):
        with pytest.raises(ValueError, match="depth_preserving_stages"):
            inflate(conv, depth_preserving_stages=stages)


def test_input_untouched_modes_sharing_and_metadata():
    model = build_model("resnet18", num_classes=5)
    model.layer1.eval()
    model.conv1.weight.requires_grad_(False)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    meta_before = model.crossd_meta
    types_before = [type(m) for m in model.modules()]

    inflated = inflate(model, "crossd", depth_preserving_stages=2)

    assert all(torch.equal(model.state_dict()[name], t) for name, t in before.items())
    assert [type(m) for m in model.modules()] == types_before
    assert model.crossd_meta == meta_before
    assert inflated.crossd_meta.to_dict() == {
        **meta_before.to_dict(),
        "strategy": "crossd",
        "official_shift": "keep",
        "depth_preserving_stages": 2,
        "spatial_dims": 3,
    }
    assert model.training and not model.layer1.training
    assert inflated.training and not inflated.layer1.training and not inflated.layer1[0].bn1.training
    assert not inflated.conv1.weight.requires_grad and inflated.layer1[0].conv1.weight.requires_grad
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)) for m in inflated.modules())

    shared = nn.Conv2d(2, 2, 3, padding=1)
    twice = inflate(nn.Sequential(shared, nn.ReLU(), shared))
    assert twice[0] is twice[2] and isinstance(twice[0], nn.Conv3d)
    assert inflate(nn.Conv2d(1, 1, 1)).crossd_meta.spatial_dims == 3


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("stages", [0, 2, 3])
def test_depth_preserving_stages_keep_feature_depth(arch, stages):
    net = seeded(build_model(arch))
    features = inflate(net, "i3d", depth_preserving_stages=stages).forward_features(torch.zeros(1, 3, 8, 32, 32))
    # forward_features returns stages 1..5 (strides 2..32); stages <= N keep the depth 8.
    depths = [f.shape[2] for f in features]
    assert depths == [max(8 // 2 ** max(level - stages, 0), 1) for level in range(1, 6)]
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2, 1]


def test_depth_preserving_stage_assignment_for_resnet():
    inflated = inflate(build_model("resnet50"), "centre", depth_preserving_stages=3)
    assert inflated.conv1.kernel_size == (1, 7, 7) and inflated.conv1.padding == (0, 3, 3)
    assert inflated.maxpool.kernel_size == (1, 3, 3) and inflated.maxpool.stride == (1, 2, 2)
    assert inflated.layer1[0].conv2.kernel_size == (1, 3, 3)
    block = inflated.layer2[0]  # strided entry of stage 3: its input is at stage 2
    assert block.conv1.kernel_size == (1, 1, 1)
    assert block.conv2.kernel_size == (1, 3, 3) and block.conv2.stride == (1, 2, 2)
    assert block.downsample[0].stride == (1, 2, 2)  # the shortcut, registered after conv2
    assert block.conv3.kernel_size == (1, 1, 1)  # a 1x1 either way
    assert inflated.layer2[1].conv2.kernel_size == (3, 3, 3)
    assert inflated.layer3[0].conv2.stride == (2, 2, 2)


def test_depth_preserving_encoder_decoder_keeps_skip_shapes(camera_volume):
    class TinyUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(1, 4, 3, padding=1)
            self.down = nn.MaxPool2d(2)
            self.mid = nn.Conv2d(4, 4, 3, padding=1)
            self.down2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.up2 = nn.ConvTranspose2d(4, 4, 2, stride=2)
            self.up = nn.Upsample(scale_factor=2, mode="bilinear")
            self.dec = nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x):
            skip = self.enc(x)
            mid = self.mid(self.down(skip))
            mid = mid + self.up2(self.down2(mid))
            return self.dec(torch.cat([skip, self.up(mid)], dim=1))

    net = seeded(TinyUNet())
    for stages in (0, 1, 2, 3):
        inflated = inflate(net, "i3d", depth_preserving_stages=stages)
        assert inflated(camera_volume[:, :, :8]).shape == (1, 2, 8, 40, 40)
    inflated = inflate(net, "i3d", depth_preserving_stages=1)
    # The upsampling back to stage 0 is depth-preserving like the pooling that left it.
    assert inflated.down.stride == (1, 2, 2) and inflated.up.scale_factor == (1.0, 2.0, 2.0)
    assert inflated.down2.stride == (2, 2, 2) and inflated.up2.stride == (2, 2, 2)


def test_depth_preserving_probe_tolerates_a_fixed_size_head_but_not_a_failing_body():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(2 * 16 * 16, 3))
    assert inflate(net, depth_preserving_stages=1)[0].stride == (1, 2, 2)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x, y):
            return self.conv(x) + y

    with pytest.raises(ValueError, match=r"probe forward pass.*'conv'"):
        inflate(TwoInputs(), depth_preserving_stages=1)


CROSSD_CASES = {
    "none": dict(padding=1),
    "static": dict(padding=1, rotation="static"),
    "static_per_channel": dict(padding=1, rotation="static", rotation_per_channel=True),
    "dynamic": dict(padding=1, rotation="dynamic"),
    "support": dict(padding=1, kernel_support=5),
    "same_groups_reflect": dict(padding="same", groups=3, padding_mode="reflect", dilation=2),
    "reference": dict(padding=1, rotation_mode="reference", bias=False),
    "reference_strided": dict(padding=1, stride=2, rotation_mode="reference", bias=False),
}


@pytest.mark.parametrize("case", CROSSD_CASES)
@pytest.mark.parametrize("strategy", ["i3d", "acs"])
def test_crossd_layer_becomes_the_conv3d_it_applies_to_volumes(case, strategy, camera_volume):
    torch.manual_seed(0)
    layer = CrossDConv(3, 6, 3, **CROSSD_CASES[case])
    if layer.rotation == "static":
        nn.init.normal_(layer.rotation_vector, std=0.4)
    layer.eval()
    volume = conv_input(camera_volume, 3)
    conv = inflate(nn.Sequential(layer), strategy)[0]
    assert type(conv) is nn.Conv3d
    with torch.no_grad():
        assert (conv(volume) - layer(volume)).abs().max() < 1e-5


def test_official_shift(camera_volume):
    torch.manual_seed(0)
    layer = CrossDConv(1, 4, 3, padding=1, rotation_mode="reference", bias=False).eval()
    weights = layer.weights_3d.detach()
    assert torch.equal(inflate(layer, official_shift="keep").weight, weights)
    undone = inflate(layer, official_shift="undo").weight
    assert torch.equal(undone, torch.roll(weights, (1, 1, 1), dims=(-3, -2, -1)))
    # Its central slice is the kernel the 2D network used at zero angle: depth-preserving,
    # the undone layer is the 2D layer slice by slice; the kept one is not.
    expected = per_slice(layer, camera_volume)
    undone_flat = inflate(layer, official_shift="undo", depth_preserving_stages=1)
    kept_flat = inflate(layer, official_shift="keep", depth_preserving_stages=1)
    assert undone_flat.kernel_size == (1, 3, 3)
    assert (undone_flat(camera_volume) - expected).abs().max() < 1e-5
    assert (kept_flat(camera_volume) - expected).abs().max() > 0.1
    # The Fourier layer has no shift to undo.
    fourier = CrossDConv(1, 4, 3, padding=1)
    assert torch.equal(inflate(fourier, official_shift="undo").weight, fourier.weights_3d)


def test_crossd_backbone_inflates_its_learned_kernels(astronaut_image):
    model = build_model("crossd_resnet18", num_classes=4).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, CrossDConv)}
    inflated = inflate(model, "centre")
    assert layers and not any(isinstance(m, (CrossDConv, nn.Conv2d)) for m in inflated.modules())
    for name, layer in layers.items():
        assert torch.equal(inflated.get_submodule(name).weight, layer.weights_3d)
    assert inflated(repeat_depth(astronaut_image, 4)).shape == (1, 4)
    # The probe runs the Cross-D layers' 2D forward, rotation network included.
    flat = inflate(model, "centre", depth_preserving_stages=2)
    assert flat.conv1.kernel_size == (1, 7, 7) and flat.layer1[0].conv1.kernel_size == (3, 3, 3)


def test_centre_imagenet_mobilenet_on_real_mri_is_2d_on_the_strided_slices(mobilenet_imagenet, mni_t1):
    """Centre kernels touch only their own slice, so with the network's full depth strides the
    feature at depth j of a stride-S stage is the 2D feature of slice S * j: a real MRI volume."""
    slices = (mni_t1[:, :, :40] - IMAGENET_MEAN.mean()) / IMAGENET_STD.mean()
    volume = slices.float().expand(3, -1, -1, -1).unsqueeze(0)  # (1, 3, 16, 40, 40)
    with torch.no_grad():
        features = inflate(mobilenet_imagenet, "centre").forward_features(volume)
        for stage, got in enumerate(features):
            strided_slices = volume[0, :, :: 2 ** (stage + 1)].transpose(0, 1)  # (D / S, 3, H, W)
            want = mobilenet_imagenet.forward_features(strided_slices)[stage]
            assert max_rel_diff(got, want.transpose(0, 1).unsqueeze(0)) < 1e-5
    assert [f.shape[2] for f in features] == [8, 4, 2, 1, 1]
