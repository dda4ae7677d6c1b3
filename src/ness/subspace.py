"""Subspace machinery shared by NESS and the projection baselines.

Pure functions: the rows a layer's weight multiplies (im2col for convolutions), their covariance,
its spectrum, and the approximate null basis of paper Eq. 5. Nothing here holds state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ThresholdRule = Literal["frobenius", "nuclear"]
THRESHOLD_RULES: tuple[str, ...] = ("frobenius", "nuclear")


class UnsupportedLayerError(TypeError):
    """A layer NESS cannot adapt exactly (grouped convolution, uninitialised lazy layer, ...)."""


def check_supported(name: str, module: nn.Module) -> None:
    """Raise a clear error when `module` cannot be adapted as W + ΔW with ΔW = (U V)ᵀ."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise UnsupportedLayerError(
            f"layer '{name}' ({type(module).__name__}) is not initialised yet: run one forward pass "
            "before wrapping the model, or exclude it."
        )
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise UnsupportedLayerError(
            f"layer '{name}' is a Conv2d with groups={module.groups}: each group sees its own input "
            f"subspace, which NESS does not model. Exclude it with exclude=['{name}']."
        )
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise UnsupportedLayerError(
            f"layer '{name}' is a {type(module).__name__}; NESS adapts nn.Linear and nn.Conv2d only."
        )


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) padding of `conv`, as F.pad takes it ('same' may be uneven)."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        pads: list[int] = []
        for k, dil in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = conv.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def pad_conv_input(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Pad `x` exactly as `conv` does before sliding its kernel (any padding and padding_mode)."""
    pads = conv_padding(conv)
    if not any(pads):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


def conv_with_weight(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`conv`'s operation (stride, padding, dilation) with another kernel `weight`."""
    return F.conv2d(pad_conv_input(conv, x), weight, bias, conv.stride, 0, conv.dilation, 1)


def layer_input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The rows that multiply the layer's flattened weight, shape (N, d).

    Linear: every leading dimension is flattened. Conv2d: the im2col patches, one row per (sample, output
    position), each flattened in the weight's (C_in, k_h, k_w) order, so `rows @ W.view(o, -1).T` is the conv.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        patches = F.unfold(
            pad_conv_input(module, x), module.kernel_size, dilation=module.dilation, stride=module.stride
        )  # (B, C_in·k_h·k_w, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B·L, d)
    raise UnsupportedLayerError(f"no layer-input rows for {type(module).__name__}")


def input_dim(module: nn.Module) -> int:
    """d, the length of one layer-input row (in_features, or C_in·k_h·k_w)."""
    return module.weight[0].numel()  # type: ignore[index]


def input_covariance(rows: Tensor) -> Tensor:
    """C = Σ x xᵀ over the rows (paper Eq. 7), accumulated in float64 so sums over tasks stay exact."""
    rows64 = rows.detach().to(torch.float64)
    return rows64.T @ rows64


@dataclass(frozen=True)
class Spectrum:
    """Eigen-decomposition of a layer-input covariance: σᵢ = sqrt(λᵢ) are the singular values of I_t."""

    eigenvalues: Tensor  # (d,) ascending, clamped at 0, float64
    eigenvectors: Tensor  # (d, d) columns, float64
    fallback: bool  # True when eigh failed and the SVD was used instead

    @property
    def singular_values(self) -> Tensor:
        return self.eigenvalues.sqrt()


def covariance_spectrum(covariance: Tensor, name: str = "layer") -> Spectrum:
    """float64 eigh of a symmetric PSD matrix, eigenvalues clamped at 0.

    Round-off makes tiny eigenvalues of a rank-deficient covariance negative; unclamped, sqrt gives NaN and
    the official code's threshold becomes NaN, silently freezing the layer. Here they become exact zeros.
    """
    if covariance.dim() != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"{name}: covariance must be a square matrix, got shape {tuple(covariance.shape)}")
    if not torch.isfinite(covariance).all():
        raise ValueError(
            f"{name}: the input covariance holds NaN or Inf: the layer's inputs were not finite. "
            "Check the task's data and the model's earlier layers."
        )
    cov = covariance.to(torch.float64)
    cov = (cov + cov.T) / 2
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        fallback = False
    except RuntimeError:  # eigh did not converge: the SVD of a symmetric PSD matrix gives the same basis
        u, s, _ = torch.linalg.svd(cov)
        eigenvalues, eigenvectors = s.flip(0), u.flip(1)
        fallback = True
    return Spectrum(eigenvalues.clamp(min=0.0), eigenvectors, fallback)


def null_threshold(singular_values: Tensor, eps1: float, rule: ThresholdRule) -> float:
    """τ: paper Eq. 5 uses ε₁·‖I_t‖_F = ε₁·sqrt(Σσᵢ²); the official code uses ε₁·Σσᵢ (the nuclear norm)."""
    if rule == "frobenius":
        return eps1 * math.sqrt(float((singular_values**2).sum()))
    if rule == "nuclear":
        return eps1 * float(singular_values.sum())
    raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")


@dataclass(frozen=True)
class NullBasis:
    """U of paper Eq. 6: eigenvectors whose singular values σᵢ ≤ τ (Eq. 5), smallest first."""

    basis: Tensor  # (d, r) float64, orthonormal columns
    singular_values: Tensor  # (d,) all σᵢ, ascending
    threshold: float  # τ
    fallback: bool

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def kept_singular_values(self) -> Tensor:
        """σᵢ of the kept directions; their max is σ_max(U) of the Eq. 8 bound."""
        return self.singular_values[: self.rank]


def null_basis(covariance: Tensor, eps1: float, rule: ThresholdRule = "frobenius", name: str = "layer") -> NullBasis:
    """The approximate null space of the inputs summarised by `covariance` (d×d)."""
    spectrum = covariance_spectrum(covariance, name)
    sigma = spectrum.singular_values
    tau = null_threshold(sigma, eps1, rule)
    rank = int((sigma <= tau).sum())  # σ ascending, so the kept directions are the first `rank`
    return NullBasis(spectrum.eigenvectors[:, :rank], sigma, tau, spectrum.fallback)
