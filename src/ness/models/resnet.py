"""Reduced ResNet-18 ("RESNET-S" of A-GEM, as ported by GPM) for 5-datasets and miniImageNet, METHODS_SPEC §1.3.

No biases, and every BatchNorm has `track_running_stats=False` (batch statistics in train and eval, no running
statistics). Widths nf·(1, 2, 4, 8) with nf = 20; no max-pool after the stem. Modules are registered in forward
order (within a block: conv1, bn1, conv2, bn2, then the shortcut), which NESS and the projection methods rely on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ness.models.heads import MultiHeadNet

STEM_STRIDES: dict[int, int] = {32: 1, 84: 2}
"""Input side → stem stride: stride 1 for 32×32 (5-datasets), stride 2 for 84×84 (miniImageNet)."""


def _conv3x3_out(size: int, stride: int) -> int:
    """Output side of a 3×3 convolution with padding 1."""
    return (size - 1) // stride + 1


class BasicBlock(nn.Module):
    """conv3×3(stride) → BN → ReLU → conv3×3 → BN, plus the shortcut, → ReLU.

    The shortcut is Conv1×1(stride) → BN when the block changes the stride or the width, the identity otherwise.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, track_running_stats=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, track_running_stats=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, track_running_stats=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """Two BasicBlocks; only the first may change the stride and the width."""
    return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))


class ReducedResNet18(nn.Module):
    """Stem conv3×3 → BN → ReLU, four stages of two BasicBlocks, avg-pool 2, flatten to `feature_dim` features."""

    def __init__(self, input_size: int = 32, nf: int = 20) -> None:
        super().__init__()
        if input_size not in STEM_STRIDES:
            raise ValueError(
                f"reduced_resnet18 supports input_size 32 (5-datasets, stride-1 stem) or 84 (miniImageNet, "
                f"stride-2 stem), got {input_size}: the reference network defines its stem stride, and so its "
                "head width, only for these two benchmarks"
            )
        if isinstance(nf, bool) or not isinstance(nf, int) or nf < 1:
            raise ValueError(f"nf (the first stage's width) must be a positive integer, got {nf!r}")
        self.input_size = input_size
        stride = STEM_STRIDES[input_size]
        self.conv1 = nn.Conv2d(3, nf, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf, track_running_stats=False)
        self.layer1 = _stage(nf, nf, 1)
        self.layer2 = _stage(nf, 2 * nf, 2)
        self.layer3 = _stage(2 * nf, 4 * nf, 2)
        self.layer4 = _stage(4 * nf, 8 * nf, 2)
        self.pool = nn.AvgPool2d(2)
        self.flatten = nn.Flatten()
        side = _conv3x3_out(input_size, stride)  # 32 → 32, 84 → 42
        for _ in range(3):  # the stride-2 first blocks of stages 2–4: 32 → 16 → 8 → 4, 42 → 21 → 11 → 6
            side = _conv3x3_out(side, 2)
        self.feature_dim = 8 * nf * (side // 2) ** 2  # after the 2×2 pool: 640 (32×32) or 1440 (84×84) for nf 20

    def forward(self, x: Tensor) -> Tensor:
        side = self.input_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, side, side):
            raise ValueError(f"this ResNet was built for inputs (B, 3, {side}, {side}), got {tuple(x.shape)}")
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.flatten(self.pool(out))  # (B, 8nf, p, p) → (B, 8nf·p²)


def reduced_resnet18(classes_per_task: Sequence[int], input_size: int = 32, nf: int = 20) -> MultiHeadNet:
    """Reduced ResNet-18 with one bias-free Linear(features, n_t) head per task (`task_heads`, `model(x, t)`).

    `input_size` is the side of the square 3-channel input: 32 (5-datasets) or 84 (miniImageNet).
    """
    backbone = ReducedResNet18(input_size, nf)
    return MultiHeadNet(backbone, backbone.feature_dim, classes_per_task, head_bias=False)
