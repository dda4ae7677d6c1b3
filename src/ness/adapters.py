"""The NESS adapter: a Linear or Conv2d layer whose weight is W + ΔW, ΔW = U·V (paper Eq. 6).

U (d×r) is a fixed buffer, the approximate null basis of earlier inputs; V (r×o) is the only trainable
tensor and starts at zero. In the paper's layout xᵀΔW is the change of a layer's output for input row x;
in PyTorch's weight layout (o×d) the same change is (U V)ᵀ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.subspace import check_supported, conv_padding, conv_with_weight, input_dim


def output_rows(module: nn.Module, x: Tensor) -> int:
    """N, the number of layer-input rows one forward pass multiplies (batch × output positions)."""
    if isinstance(module, nn.Linear):
        return x.numel() // x.shape[-1]
    batch = x.shape[0] if x.dim() == 4 else 1
    positions = 1
    for size, pad, k, s, dil in zip(
        x.shape[-2:], _padding_pairs(module), module.kernel_size, module.stride, module.dilation, strict=True
    ):
        positions *= (size + pad - dil * (k - 1) - 1) // s + 1
    return batch * positions


def _padding_pairs(conv: nn.Conv2d) -> tuple[int, int]:
    left, right, top, bottom = conv_padding(conv)
    return (top + bottom, left + right)


class NullSpaceAdapter(nn.Module):
    """A base layer plus ΔW = U·V; `merged()` folds ΔW into a copy of the base layer."""

    def __init__(self, base: nn.Module, null_basis: Tensor, name: str = "layer") -> None:
        super().__init__()
        check_supported(name, base)
        d = input_dim(base)
        if null_basis.dim() != 2 or null_basis.shape[0] != d or null_basis.shape[1] == 0:
            raise ValueError(f"{name}: null basis must be (d={d}, r>0), got {tuple(null_basis.shape)}")
        weight = base.weight  # type: ignore[union-attr]
        self.base = base
        self.register_buffer("U", null_basis.to(device=weight.device, dtype=weight.dtype).contiguous())
        self.V = nn.Parameter(
            torch.zeros(null_basis.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        )

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def delta_weight(self) -> Tensor:
        """ΔW in the base weight's layout: (U V)ᵀ reshaped to (o, d) or (o, C_in, k_h, k_w)."""
        return (self.U @ self.V).T.reshape(self.base.weight.shape)

    def _merged_path_is_cheaper(self, x: Tensor) -> bool:
        # Extra FLOPs over the frozen base op. Forming ΔW costs d·r·o, and in training the weight
        # gradient of W + ΔW costs N·d·o more; the low-rank path costs N·r·(d + o) forward and about
        # twice that backward. Pick whichever is smaller.
        n, d, o, r = output_rows(self.base, x), self.U.shape[0], self.V.shape[1], self.rank
        if torch.is_grad_enabled() and self.V.requires_grad:
            return n * d * o + 2 * d * r * o < 3 * n * r * (d + o)
        return d * r * o < n * r * (d + o)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        if self._merged_path_is_cheaper(x):
            weight = base.weight + self.delta_weight()
            if isinstance(base, nn.Linear):
                return F.linear(x, weight, base.bias)
            return conv_with_weight(base, x, weight, base.bias)
        if isinstance(base, nn.Linear):
            return base(x) + (x @ self.U) @ self.V
        # Conv: the r basis directions act as an r-channel kernel, then V mixes them into the o outputs.
        basis_kernel = self.U.T.reshape(self.rank, *base.weight.shape[1:])  # (r, C_in, k_h, k_w)
        z = conv_with_weight(base, x, basis_kernel, None)  # (B, r, H', W')
        return base(x) + torch.einsum("...rhw,ro->...ohw", z, self.V)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with W ← W + ΔW (in place); refuses to write a non-finite weight."""
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise FloatingPointError("ΔW holds NaN or Inf; training diverged, refusing to merge it into W")
        self.base.weight.add_(delta)
        return self.base
