"""ResNet-18/34/50 with torchvision-compatible parameter names.

torchvision does not import beside the CPU torch build on the machines this project
targets, so the backbones live here. Module names and parameter shapes follow
``torchvision.models.resnet`` exactly, so a torchvision (or timm ``tv_in1k``) state dict
loads with ``strict=True``.

The forward pass never assumes two spatial dimensions: pooling is done by modules
(which :func:`napari_crossd.models.inflate.inflate` swaps for their 3D versions) and the
head flattens with ``torch.flatten(x, 1)``. The same network therefore runs on
``(B, C, H, W)`` and, once inflated, on ``(B, C, D, H, W)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first convolution.
        downsample: projection applied to the shortcut when shape changes, else None.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with the stride on the 3x3 (ResNet v1.5).

    Args:
        inplanes: input channels.
        planes: bottleneck width; the block outputs ``planes * 4`` channels.
        stride: stride of the 3x3 convolution.
        downsample: projection applied to the shortcut when shape changes, else None.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet classifier (He et al., 2016) laid out like ``torchvision.models.ResNet``.

    Args:
        block: :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50).
        layers: number of blocks in each of the four stages.
        num_classes: size of the linear head.
        zero_init_residual: start the last BatchNorm of every block at zero so that each
            residual branch begins as the identity (torchvision's option of that name).

    Attributes:
        feature_info: one dict per tensor returned by :meth:`forward_features`, with
            ``num_chs`` (channels), ``reduction`` (stride w.r.t. the input) and ``module``
            (the name of the module producing it), as in timm.
        num_features: channels entering the head.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)

        self.feature_info = [
            {"num_chs": 64, "reduction": 2, "module": "relu"},
            *(
                {"num_chs": width * block.expansion, "reduction": 4 * 2**i, "module": f"layer{i + 1}"}
                for i, width in enumerate((64, 128, 256, 512))
            ),
        ]

        # torchvision's initialisation, so that training from scratch behaves the same.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features, finest first.

        Args:
            x: images ``(B, 3, H, W)``, or volumes ``(B, 3, D, H, W)`` after inflation.

        Returns:
            Five tensors: the stem output (after ``conv1``/``bn1``/``relu``, stride 2,
            64 channels) and the outputs of ``layer1``..``layer4`` (strides 4, 8, 16, 32);
            see :attr:`feature_info` for their channel counts.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and linear head: ``(B, C, *spatial)`` -> ``(B, num_classes)``."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` for ``(B, 3, *spatial)`` input."""
        return self.forward_head(self.forward_features(x)[-1])


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); ``kwargs`` go to :class:`ResNet`."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); ``kwargs`` go to :class:`ResNet`."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); ``kwargs`` go to :class:`ResNet`."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)
