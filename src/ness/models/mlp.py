"""Small MLPs for the CPU-sized benchmarks (Split Digits, Split MNIST, Permuted MNIST)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ness.models.heads import MultiHeadNet


def mlp_backbone(in_features: int, hidden: Sequence[int], bias: bool = False, batchnorm: bool = False) -> nn.Sequential:
    """Linear → ReLU blocks; no biases by default, as in the GPM-family networks. `batchnorm` puts a BatchNorm1d
    with running statistics after each Linear (not a network of the papers: it exercises NESS's BatchNorm options)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h, bias=bias), *([nn.BatchNorm1d(h)] if batchnorm else []), nn.ReLU()]
        width = h
    return nn.Sequential(*layers)


def multi_head_mlp(
    in_features: int,
    hidden: Sequence[int],
    classes_per_task: Sequence[int],
    bias: bool = False,
    batchnorm: bool = False,
) -> MultiHeadNet:
    """Task-incremental MLP: a shared backbone and one head per task."""
    backbone = mlp_backbone(in_features, hidden, bias, batchnorm)
    return MultiHeadNet(backbone, hidden[-1], classes_per_task, head_bias=bias)


def shared_head_mlp(
    in_features: int, hidden: Sequence[int], num_classes: int, bias: bool = False, batchnorm: bool = False
) -> nn.Sequential:
    """MLP with one output layer for every task (GPM's Permuted MNIST net: 784-100-100-10, no biases)."""
    backbone = mlp_backbone(in_features, hidden, bias, batchnorm)
    backbone.append(nn.Linear(hidden[-1], num_classes, bias=bias))
    return backbone
