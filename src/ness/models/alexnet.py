"""The 5-layer AlexNet of GPM and NESS for 3×32×32 inputs (CIFAR-100), METHODS_SPEC §1.3.

No biases anywhere, and every BatchNorm has `track_running_stats=False`: it normalises with the current batch's
statistics in train and eval mode alike and stores no running statistics. Each block runs
Conv → BN → ReLU → Dropout → MaxPool2 (dropout before pooling, as in the reference code).
Modules are registered in forward order, which NESS and the projection methods rely on when they walk layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from ness.models.heads import MultiHeadNet


def _conv_block(i: int, c_in: int, c_out: int, kernel: int, p: float) -> list[tuple[str, nn.Module]]:
    """conv{i} → bn{i} → relu{i} → drop{i} → pool{i}; stride 1 and no padding, then a 2×2 max-pool."""
    return [
        (f"conv{i}", nn.Conv2d(c_in, c_out, kernel, bias=False)),
        (f"bn{i}", nn.BatchNorm2d(c_out, track_running_stats=False)),
        (f"relu{i}", nn.ReLU()),
        (f"drop{i}", nn.Dropout(p)),
        (f"pool{i}", nn.MaxPool2d(2)),
    ]


def _fc_block(i: int, bn: int, d_in: int, d_out: int, p: float) -> list[tuple[str, nn.Module]]:
    """fc{i} → bn{bn} → relu{bn} → drop{bn} (BN numbering continues from the convolutions, as in the reference)."""
    return [
        (f"fc{i}", nn.Linear(d_in, d_out, bias=False)),
        (f"bn{bn}", nn.BatchNorm1d(d_out, track_running_stats=False)),
        (f"relu{bn}", nn.ReLU()),
        (f"drop{bn}", nn.Dropout(p)),
    ]


class AlexNetBackbone(nn.Sequential):
    """Three conv blocks (3→64→128→256 channels, maps 32→14→6→2) and two 2048-wide FC blocks."""

    input_shape: tuple[int, int, int] = (3, 32, 32)
    feature_dim: int = 2048

    def __init__(self, dropout: tuple[float, float] = (0.2, 0.5)) -> None:
        p_early, p_late = dropout  # conv1 and conv2 use the first; conv3, fc1 and fc2 the second
        super().__init__(
            OrderedDict(
                [
                    *_conv_block(1, 3, 64, 4, p_early),  # 32 → 29 → pool 14
                    *_conv_block(2, 64, 128, 3, p_early),  # 14 → 12 → pool 6
                    *_conv_block(3, 128, 256, 2, p_late),  # 6 → 5 → pool 2
                    ("flatten", nn.Flatten()),  # (B, 256, 2, 2) → (B, 1024)
                    *_fc_block(1, 4, 256 * 2 * 2, 2048, p_late),
                    *_fc_block(2, 5, 2048, self.feature_dim, p_late),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"AlexNet takes inputs of shape (B, 3, 32, 32), got {tuple(x.shape)}")
        return super().forward(x)


def alexnet(classes_per_task: Sequence[int], dropout: tuple[float, float] = (0.2, 0.5)) -> MultiHeadNet:
    """AlexNet-5 with one bias-free Linear(2048, n_t) head per task (`task_heads`, called as `model(x, t)`).

    `dropout` = (rate after conv1 and conv2, rate after conv3, fc1 and fc2); the reference uses (0.2, 0.5).
    """
    return MultiHeadNet(AlexNetBackbone(dropout), AlexNetBackbone.feature_dim, classes_per_task, head_bias=False)
