"""The NESS adapter: a Linear or Conv1d/Conv2d layer whose weight is W + ΔW, ΔW = U·V (paper Eq. 6).

U (d×r) is a fixed buffer, the approximate null basis of earlier inputs; V (r×o) is the only trainable
tensor and starts at zero. In the paper's layout xᵀΔW is the change of a layer's output for input row x;
in PyTorch's weight layout (o×d) the same change is (U V)ᵀ. With `adapt_bias` the rows are x̃ = [x; 1] and U is
(d+1)×r: the first d rows of U·V are ΔW and the last is the bias change Δb, so x̃ᵀ(U V) = xᵀΔW + Δb.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.subspace import check_supported, conv_padding, conv_with_weight, input_dim


def output_rows(module: nn.Module, x: Tensor) -> int:
    """N, the number of layer-input rows one forward pass multiplies (batch × output positions)."""
    if isinstance(module, nn.Linear):
        return x.numel() // x.shape[-1]
    spatial = len(module.kernel_size)  # type: ignore[arg-type]
    batch = x.shape[0] if x.dim() == spatial + 2 else 1
    pads = conv_padding(module)  # type: ignore[arg-type]
    totals = [pads[2 * i] + pads[2 * i + 1] for i in reversed(range(spatial))]  # per dimension, first to last
    return batch * math.prod(
        (size + pad - dil * (k - 1) - 1) // s + 1
        for size, pad, k, s, dil in zip(
            x.shape[-spatial:], totals, module.kernel_size, module.stride, module.dilation, strict=True
        )
    )


class NullSpaceAdapter(nn.Module):
    """A base layer plus ΔW = U·V (and Δb with `adapt_bias`); `merged()` folds them into the base layer."""

    def __init__(self, base: nn.Module, null_basis: Tensor, name: str = "layer", adapt_bias: bool = False) -> None:
        super().__init__()
        check_supported(name, base)
        if adapt_bias and base.bias is None:  # type: ignore[union-attr]
            raise ValueError(f"{name}: adapt_bias needs a layer with a bias; this {type(base).__name__} has none")
        d = input_dim(base) + int(adapt_bias)
        if null_basis.dim() != 2 or null_basis.shape[0] != d or null_basis.shape[1] == 0:
            what = "d+1 with the bias row" if adapt_bias else "d"
            raise ValueError(f"{name}: null basis must be ({what}={d}, r>0), got {tuple(null_basis.shape)}")
        weight = base.weight  # type: ignore[union-attr]
        self.base = base
        self.adapt_bias = adapt_bias
        self.register_buffer("U", null_basis.to(device=weight.device, dtype=weight.dtype).contiguous())
        self.V = nn.Parameter(
            torch.zeros(null_basis.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        )

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def weight_basis(self) -> Tensor:
        """The rows of U that multiply x (all of U without `adapt_bias`)."""
        return self.U[:-1] if self.adapt_bias else self.U

    def delta_weight(self) -> Tensor:
        """ΔW in the base weight's layout: (U V)ᵀ reshaped to (o, d), (o, C_in, k) or (o, C_in, k_h, k_w)."""
        return (self.weight_basis @ self.V).T.reshape(self.base.weight.shape)

    def delta_bias(self) -> Tensor | None:
        """Δb = u_{d+1}ᵀ V, the bias row of U times V (None without `adapt_bias`)."""
        return self.U[-1] @ self.V if self.adapt_bias else None

    def _bias(self) -> Tensor | None:
        delta = self.delta_bias()
        return self.base.bias if delta is None else self.base.bias + delta

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
                return F.linear(x, weight, self._bias())
            return conv_with_weight(base, x, weight, self._bias())
        delta_bias = self.delta_bias()
        if isinstance(base, nn.Linear):
            out = base(x) + (x @ self.weight_basis) @ self.V
            return out if delta_bias is None else out + delta_bias
        # Conv: the r basis directions act as an r-channel kernel, then V mixes them into the o outputs.
        basis_kernel = self.weight_basis.T.reshape(self.rank, *base.weight.shape[1:])  # (r, C_in, k...)
        z = conv_with_weight(base, x, basis_kernel, None)  # (B, r, *positions)
        shift = (z.movedim(-base.weight.dim() + 1, -1) @ self.V).movedim(-1, -base.weight.dim() + 1)
        if delta_bias is not None:
            shift = shift + delta_bias.reshape(-1, *[1] * (base.weight.dim() - 2))
        return base(x) + shift

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with W ← W + ΔW and b ← b + Δb (in place); refuses to write a non-finite value."""
        delta, delta_bias = self.delta_weight(), self.delta_bias()
        if not torch.isfinite(delta).all() or (delta_bias is not None and not torch.isfinite(delta_bias).all()):
            raise FloatingPointError("ΔW holds NaN or Inf; training diverged, refusing to merge it into W")
        self.base.weight.add_(delta)
        if delta_bias is not None:
            self.base.bias.add_(delta_bias)
        return self.base
