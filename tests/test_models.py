"""Backbones: torchvision parameter layout, multi-scale features, Cross-D variants, registry."""

from __future__ import annotations

import pytest
import torch
from official_crossd import OFFICIAL_RESNETS, OfficialCrossDConv, official_crossd_resnet
from torch import nn

from napari_crossd.core import CrossDConv
from napari_crossd.models import ARCHITECTURES, build_model, convert_to_crossd, list_models
from napari_crossd.models.inflate import inflate

# Keys and shapes as in torchvision.models (resnet18/34/50, mobilenet_v2), written out
# by hand because torchvision does not import beside this torch build.
TORCHVISION_SHAPES = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer4.1.bn2.running_var": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet34": {
        "layer1.2.conv2.weight": (64, 64, 3, 3),
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.2.bn2.weight": (512,),
        "fc.weight": (1000, 512),
    },
    "resnet50": {
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer4.2.conv2.weight": (512, 512, 3, 3),
        "layer4.2.bn3.running_mean": (2048,),
        "fc.weight": (1000, 2048),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.weight": (1280,),
        "classifier.1.weight": (1000, 1280),
    },
}
# torchvision's documented parameter counts.
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
}


@pytest.mark.parametrize("arch", list(TORCHVISION_SHAPES))
def test_parameter_names_and_shapes_are_torchvisions(arch):
    model = build_model(arch)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in TORCHVISION_SHAPES[arch].items():
        assert shapes.get(key) == shape, key
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_NUM_PARAMS[arch]
    if arch in ("resnet18", "resnet34"):  # BasicBlocks keep the width in layer1: no projection
        assert "layer1.0.downsample.0.weight" not in shapes


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_state_dict_round_trips_strictly(arch):
    source = build_model(arch, num_classes=7).eval()
    target = build_model(arch, num_classes=7).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("arch", list(TORCHVISION_SHAPES))
def test_forward_features_finest_first_as_feature_info_says(arch):
    model = build_model(arch, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert [f.shape[1] for f in features] == [i["num_chs"] for i in model.feature_info]
    assert [64 // f.shape[-1] for f in features] == [i["reduction"] for i in model.feature_info]
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    assert logits.shape == (2, 5)
    torch.testing.assert_close(model.forward_head(features[-1]), logits)


def test_build_model_metadata():
    assert list_models() == list(ARCHITECTURES)
    assert build_model("resnet18").crossd_meta.to_dict() == {
        "arch": "resnet18",
        "format": "torchvision",
        "num_classes": 1000,
        "normalization": {
            "name": "imagenet",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    }
    meta = build_model("crossd_resnet18", num_classes=3).crossd_meta
    assert (meta.format, meta.rotation, meta.rotation_mode) == ("crossd", "dynamic", "fourier")


def test_build_model_rejects_unknown_names_and_misplaced_options():
    with pytest.raises(ValueError, match=r"Unknown architecture 'resnet101'.*crossd_resnet18"):
        build_model("resnet101")
    with pytest.raises(ValueError, match="use 'crossd_resnet18'"):
        build_model("resnet18", rotation="dynamic")


def test_crossd_resnet18_layers_have_official_names_and_its_1x1_shortcuts_stay_plain():
    model = build_model("crossd_resnet18", rotation_mode="reference")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["conv1.weights_3d"] == (64, 3, 7, 7, 7)
    assert shapes["conv1.rotation_params.0.weight"] == (16, 3, 1, 1)
    assert shapes["conv1.rotation_params.1.running_var"] == (16,)
    assert shapes["conv1.rotation_params.3.weight"] == (4, 16, 1, 1)
    assert shapes["layer3.1.conv2.weights_3d"] == (256, 256, 3, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)  # 1x1 stays Conv2d
    assert shapes["fc.weight"] == (1000, 512)
    assert not any(k.endswith(("conv1.weight", "conv2.weight", "conv1.bias")) for k in shapes)


@pytest.mark.parametrize(
    ("arch", "num_crossd"),
    [("crossd_resnet18", 17), ("crossd_resnet50", 17), ("crossd_mobilenet_v2", 18)],
)
def test_only_convolutions_larger_than_1x1_become_crossd(arch, num_crossd):
    model = build_model(arch, rotation="none")
    crossd = [m for m in model.modules() if isinstance(m, CrossDConv)]
    plain = [m for m in model.modules() if type(m) is nn.Conv2d]  # CrossDConv is an nn.Conv2d too
    assert len(crossd) == num_crossd
    assert all(m.kernel_size == (1, 1) for m in plain)
    if arch == "crossd_mobilenet_v2":  # depthwise convolutions keep their groups
        depthwise = model.features[2].conv[1][0]
        assert isinstance(depthwise, CrossDConv) and depthwise.groups == 96
        assert tuple(depthwise.weights_3d.shape) == (96, 1, 3, 3, 3)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", list(OFFICIAL_RESNETS))
def test_pointwise_conversion_builds_the_official_layout(arch):
    with torch.device("meta"):
        official = official_crossd_resnet(arch)
        ours = convert_to_crossd(build_model(arch, rotation_mode="reference"), "dynamic", "reference", pointwise=True)
    assert _shapes(ours) == _shapes(official)
    assert sum(isinstance(m, CrossDConv) for m in ours.modules()) == sum(
        isinstance(m, OfficialCrossDConv) for m in official.modules()
    )


def test_official_1x1_layer_computes_a_1x1_convolution_and_inflates_to_a_1x1x1_conv3d():
    torch.manual_seed(0)
    official = OfficialCrossDConv(64, 128, 1, 2, 0, 1, 1, None).eval()
    layer = CrossDConv(64, 128, 1, stride=2, bias=False, rotation="dynamic", rotation_mode="reference").eval()
    layer.load_state_dict(official.state_dict())
    x = torch.randn(2, 64, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), official(x))
        torch.testing.assert_close(layer(x), nn.functional.conv2d(x, official.weights_3d[:, :, 0], stride=2))
    for flat in (0, 1):  # fully 3D, and depth-preserving
        conv3d = inflate(nn.Sequential(layer), "centre", depth_preserving_stages=flat)[0]
        assert type(conv3d) is nn.Conv3d and conv3d.kernel_size == (1, 1, 1) and conv3d.bias is None
        assert torch.equal(conv3d.weight, official.weights_3d)
        assert conv3d.stride == ((1 if flat else 2), 2, 2) and conv3d.padding == (0, 0, 0)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_crossd_variant_with_centre_slice_kernels_computes_the_2d_network(arch):
    # Without rotation a CrossDConv applies the centre slice of U, so a Cross-D network
    # whose U holds W in that slice must reproduce the 2D network: this pins that the
    # conversion kept every stride, padding and group.
    plain = build_model(arch, num_classes=10).eval()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    crossd = build_model(f"crossd_{arch}", num_classes=10, rotation="none").eval()
    expected = crossd.state_dict()
    state = {}
    for key, value in plain.state_dict().items():
        key_3d = key.removesuffix("weight") + "weights_3d"
        if key_3d in expected:
            kernel = torch.zeros(expected[key_3d].shape)
            kernel[:, :, value.shape[-1] // 2] = value
            state[key_3d] = kernel
        else:
            state[key] = value
    crossd.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(crossd(x), plain(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rotation_mode", ["fourier", "reference"])
def test_dynamic_crossd_resnet18_trains_in_2d(rotation_mode):
    model = build_model("crossd_resnet18", num_classes=4, rotation_mode=rotation_mode)
    logits = model(torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (2, 4)
    assert model.conv1.weights_3d.grad.abs().sum() > 0
    assert model.layer1[0].conv1.rotation_params[3].weight.grad.abs().sum() > 0


def test_convert_to_crossd_refuses_non_square_kernels():
    with pytest.raises(ValueError, match="cubic"):
        convert_to_crossd(nn.Sequential(nn.Conv2d(3, 4, (3, 5))))
