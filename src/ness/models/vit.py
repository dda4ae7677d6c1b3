"""A small vision transformer made only of layers NESS can adapt: a Conv2d patch embedding and separate nn.Linear
q, k, v and output projections (nn.MultiheadAttention packs q, k, v into one `in_proj_weight` that is not an
nn.Linear, so no subspace method could see it), with pre-norm blocks, a class token and learned positions.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.models.heads import MultiHeadNet


class SelfAttention(nn.Module):
    """Multi-head self-attention with q, k, v and the output projection as four nn.Linear layers."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(z: Tensor) -> Tensor:  # (B, T, d) → (B, heads, T, d / heads)
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(mixed.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Images (B, C, H, W), or the same images flattened to (B, C·H·W), to the class token's features (B, dim)."""

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 28, 28),
        patch: int = 7,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        check_vit_arguments(image_shape, patch, dim, depth, heads, mlp_ratio)
        channels, height, width = (int(n) for n in image_shape)
        self.image_shape = (channels, height, width)
        self.feature_dim = dim
        tokens = (height // patch) * (width // patch)
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, round(dim * mlp_ratio)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.as_images(x)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, dim, H/p, W/p) → (B, T, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        z = torch.cat([cls, patches], dim=1) + self.pos_embed  # (B, T + 1, dim)
        for block in self.blocks:
            z = block(z)
        return self.norm(z[:, 0])

    def as_images(self, x: Tensor) -> Tensor:
        """(B, C·H·W) rows, as the MNIST and digits benchmarks give them, reshaped to (B, C, H, W)."""
        c, h, w = self.image_shape
        if x.dim() == 2 and x.shape[1] == c * h * w:
            return x.view(x.shape[0], c, h, w)
        if x.dim() == 4 and tuple(x.shape[1:]) == self.image_shape:
            return x
        raise ValueError(
            f"VisionTransformer expects (batch, {c}, {h}, {w}) images or (batch, {c * h * w}) flattened images, "
            f"got shape {tuple(x.shape)}"
        )


def check_vit_arguments(
    image_shape: Sequence[int], patch: int, dim: int, depth: int, heads: int, mlp_ratio: float
) -> None:
    """Raise ValueError naming the argument when the ViT's geometry cannot be built."""
    if len(image_shape) != 3 or any(not isinstance(n, int) or n < 1 for n in image_shape):
        raise ValueError(f"image_shape must be (channels, height, width) of positive ints, got {tuple(image_shape)}")
    for name, value in (("patch", patch), ("dim", dim), ("depth", depth), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    _, height, width = image_shape
    if height % patch or width % patch:
        raise ValueError(
            f"image size {height}×{width} is not divisible by patch {patch}: the patches must tile the image "
            "(for 28×28 use 4, 7, 14; for 8×8 use 2 or 4)"
        )
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}: each head takes dim / heads features")
    if not (isinstance(mlp_ratio, (int, float)) and math.isfinite(mlp_ratio) and round(dim * mlp_ratio) >= 1):
        raise ValueError(f"mlp_ratio must be a positive number with dim·mlp_ratio ≥ 1, got {mlp_ratio!r}")


def vision_transformer(
    classes_per_task: Sequence[int],
    image_shape: Sequence[int] = (1, 28, 28),
    patch: int = 7,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> MultiHeadNet:
    """Task-incremental ViT: the class token's features into one bias-free head per task (`model(x, t)`).

    The defaults (16 patches of 7×7, width 32, 2 blocks, about 20k parameters) train on MNIST on one CPU core.
    """
    backbone = VisionTransformer(image_shape, patch, dim, depth, heads, mlp_ratio)
    return MultiHeadNet(backbone, dim, classes_per_task)
