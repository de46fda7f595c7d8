"""MobileNetV2 with torchvision-compatible parameter names.

Module names and parameter shapes follow ``torchvision.models.mobilenetv2`` (width
multiplier 1.0), so torchvision's ImageNet state dict (``mobilenet_v2-b0353104.pth``)
loads with ``strict=True``. Global pooling is an ``nn.AdaptiveAvgPool2d`` module rather
than ``F.adaptive_avg_pool2d`` so that inflation can swap it for the 3D version.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, stride of the first repeat s), from the paper.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """Convolution, BatchNorm, ReLU6 (torchvision's ``Conv2dNormActivation``: keys ``0``, ``1``).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size; padding keeps the size for stride 1.
        stride: convolution stride.
        groups: convolution groups (``in_channels`` for a depthwise convolution).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1, linear); residual when shapes allow.

    Args:
        inp: input channels.
        oup: output channels.
        stride: stride of the depthwise convolution (1 or 2).
        expand_ratio: hidden width as a multiple of ``inp``; 1 drops the expansion conv.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier (Sandler et al., 2018) laid out like torchvision's.

    Args:
        num_classes: size of the linear head.
        dropout: dropout probability before the head (torchvision default 0.2).

    Attributes:
        feature_info: one dict per tensor returned by :meth:`forward_features`, with
            ``num_chs``, ``reduction`` (stride w.r.t. the input) and ``module``, as in timm.
        num_features: channels entering the head (1280).
    """

    # Indices into ``features`` whose outputs are the last ones at each stride 2..32.
    _feature_taps = (1, 3, 6, 13, 18)

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        input_channel, self.num_features = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(input_channel, c, s if i == 0 else 1, t))
                input_channel = c
        features.append(ConvBNReLU6(input_channel, self.num_features, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.num_features, num_classes))

        channels = (16, 24, 32, 96, self.num_features)
        self.feature_info = [
            {"num_chs": ch, "reduction": 2 ** (i + 1), "module": f"features.{tap}"}
            for i, (ch, tap) in enumerate(zip(channels, self._feature_taps, strict=True))
        ]

        # torchvision's initialisation, so that training from scratch behaves the same.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features, finest first.

        Args:
            x: images ``(B, 3, H, W)``, or volumes ``(B, 3, D, H, W)`` after inflation.

        Returns:
            Five tensors at strides 2, 4, 8, 16, 32 with 16, 24, 32, 96 and 1280
            channels: the outputs of ``features.1`` (the first block after the stem
            convolution), ``features.3``, ``features.6``, ``features.13`` and
            ``features.18`` (the final 1x1 convolution).
        """
        features = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._feature_taps:
                features.append(x)
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and classifier: ``(B, 1280, *spatial)`` -> ``(B, num_classes)``."""
        return self.classifier(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` for ``(B, 3, *spatial)`` input."""
        return self.forward_head(self.forward_features(x)[-1])


def mobilenet_v2(num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 (width 1.0); ``kwargs`` go to :class:`MobileNetV2`."""
    return MobileNetV2(num_classes=num_classes, **kwargs)
