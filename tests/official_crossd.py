"""The official Cross-D ResNet, transcribed line by line for tests (not part of the package).

Source: github.com/convergedmachine/Cross-D-Conv, ``CrossDConv.py`` (the layer) and
``_models/replace_conv_layers.py`` (the conversion), applied to torchvision's
``resnet18()`` / ``resnet34()`` / ``resnet50()`` as the official training script does.
Our :mod:`napari_crossd.models.resnet` has torchvision's module names and shapes, so it
stands in for torchvision here. Two facts of the official code matter for loading:

- ``replace_conv_layers`` recurses into every child and replaces *every* ``nn.Conv2d``,
  1x1 shortcut projections included (a ResNet-18 gets 20 Cross-D layers, 302 tensors);
- each official layer owns a ``rotation_params`` head (1x1 conv, BatchNorm, ReLU, 1x1 conv
  to 4 channels) and no bias (``bias`` is accepted and ignored).

The forward is kept as written, except that the stored ``get_rotation_params`` refers to a
batch size ``B`` it never defines: here ``B = x.size(0)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_crossd.models.resnet import resnet18, resnet34, resnet50

OFFICIAL_RESNETS = {"crossd_resnet18": resnet18, "crossd_resnet34": resnet34, "crossd_resnet50": resnet50}
# The official evaluation (_eval/_weak_probing/weak_training_mri.py) drops checkpoint keys
# containing these words before loading: older official variants wrote such tensors.
OFFICIAL_DROPPED_WORDS = ("rotation", "angle", "dilated_conv", "bn_dilated")


class OfficialCrossDConv(nn.Module):
    """``CrossDConv`` of the official repository: same parameters, same computation."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=1, dilation=1, groups=1,
                 bias=True, padding_mode="zeros"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.weights_3d = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size, kernel_size)
        )
        nn.init.kaiming_normal_(self.weights_3d, mode="fan_out", nonlinearity="relu")
        self.rotation_params = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 4, kernel_size=1),
        )

    def get_rotation_params(self, x):
        rot_map = self.rotation_params(x)
        B = x.size(0)  # undefined in the stored official code
        spatial_weights = F.softmax(rot_map.view(B, 4, -1), dim=-1)
        rot_vec = (rot_map.view(B, 4, -1) * spatial_weights).sum(dim=-1)
        k = rot_vec[:, 0:3]
        angle = rot_vec[:, 3:4]
        k = k / (k.norm(dim=1, keepdim=True) + 1e-8)
        angle = torch.tanh(angle) * (torch.pi / 4)
        return k, angle

    def approximate_rotation_matrix(self, k, angle):
        batch_size = k.size(0)
        kx, ky, kz = k[:, 0], k[:, 1], k[:, 2]
        K = torch.zeros(batch_size, 3, 3, device=k.device)
        K[:, 0, 1] = -kz
        K[:, 0, 2] = ky
        K[:, 1, 0] = kz
        K[:, 1, 2] = -kx
        K[:, 2, 0] = -ky
        K[:, 2, 1] = kx
        I = torch.eye(3, device=k.device).unsqueeze(0).expand(batch_size, 3, 3)  # noqa: E741
        return I + angle.view(batch_size, 1, 1) * K

    def rotate_weights_fft(self, k, angle):
        batch_size = k.size(0)
        out_ch, in_ch_per_group, ksize, _, _ = self.weights_3d.size()
        weights_fft = torch.fft.fftn(self.weights_3d, dim=(-3, -2, -1))
        freq = torch.fft.fftfreq(ksize, d=1.0).to(self.weights_3d.device)
        fx, fy, fz = torch.meshgrid(freq, freq, freq, indexing="ij")
        fx = fx.unsqueeze(0).expand(batch_size, -1, -1, -1)
        fy = fy.unsqueeze(0).expand(batch_size, -1, -1, -1)
        fz = fz.unsqueeze(0).expand(batch_size, -1, -1, -1)
        R = self.approximate_rotation_matrix(k, angle)
        r = [[R[:, i, j].view(batch_size, 1, 1, 1) for j in range(3)] for i in range(3)]
        f_prime_x = fx * r[0][0] + fy * r[0][1] + fz * r[0][2]
        f_prime_y = fx * r[1][0] + fy * r[1][1] + fz * r[1][2]
        f_prime_z = fx * r[2][0] + fy * r[2][1] + fz * r[2][2]
        phase_shift = torch.exp(-2j * torch.pi * (f_prime_x + f_prime_y + f_prime_z)).unsqueeze(1).unsqueeze(2)
        weights_fft_batched = weights_fft.unsqueeze(0).expand(batch_size, out_ch, in_ch_per_group, ksize, ksize, ksize)
        return torch.fft.ifftn(weights_fft_batched * phase_shift, dim=(-3, -2, -1)).real

    def forward(self, x):
        batch_size = x.size(0)
        k, angle = self.get_rotation_params(x)
        rotated_weights = self.rotate_weights_fft(k, angle)
        mid_slice = self.kernel_size // 2
        twod_kernels = rotated_weights[:, :, :, mid_slice, :, :]
        grouped_weights = twod_kernels.reshape(
            batch_size * self.out_channels, self.in_channels // self.groups, self.kernel_size, self.kernel_size
        )
        x_grouped = x.reshape(1, batch_size * self.in_channels, x.size(2), x.size(3))
        conv_output = F.conv2d(x_grouped, grouped_weights, bias=None, stride=self.stride, padding=self.padding,
                               groups=batch_size)
        return conv_output.view(batch_size, self.out_channels, conv_output.size(2), conv_output.size(3))


def replace_conv_layers(model: nn.Module) -> None:
    """The official conversion: every ``nn.Conv2d`` (any kernel size) becomes a Cross-D layer."""
    for name, module in model.named_children():
        if isinstance(module, nn.Conv2d):
            custom_conv = OfficialCrossDConv(
                module.in_channels,
                module.out_channels,
                module.kernel_size[0],
                module.stride[0],
                module.padding[0],
                module.dilation[0],
                module.groups,
                module.bias,
                module.padding_mode,
            )
            setattr(model, name, custom_conv)
        else:
            replace_conv_layers(module)


def official_crossd_resnet(arch: str = "crossd_resnet18", num_classes: int = 1000) -> nn.Module:
    """An official Cross-D ResNet (``torchvision.models.resnetN()`` + ``replace_conv_layers``)."""
    model = OFFICIAL_RESNETS[arch](num_classes=num_classes)
    replace_conv_layers(model)
    return model


def official_checkpoint(state: dict[str, torch.Tensor], extras: dict[str, torch.Tensor] | None = None) -> dict:
    """What the official training script saves: ``{"model": state_dict, "epoch": ...}``.

    Args:
        state: the state dict of an :func:`official_crossd_resnet`.
        extras: tensors of older official variants to add to it (names that the official
            evaluation drops, e.g. ``layer1.0.dilated_conv.weight``).
    """
    return {"model": {**state, **(extras or {})}, "epoch": 89}
