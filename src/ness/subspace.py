"""Subspace machinery shared by NESS and the projection baselines.

Pure functions: the rows a layer's weight multiplies (im2col for convolutions), their covariance,
its spectrum, and the approximate null basis of paper Eq. 5. Nothing here holds state.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ThresholdRule = Literal["frobenius", "nuclear", "energy", "rank"]
THRESHOLD_RULES: tuple[str, ...] = ("frobenius", "nuclear", "energy", "rank")


class UnsupportedLayerError(TypeError):
    """A layer NESS cannot adapt exactly (grouped convolution, uninitialised lazy layer, ...)."""


ConvLayer = nn.Conv1d | nn.Conv2d
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""The torch layers the subspace machinery models; `supported_layers()` adds transformers' Conv1D when loaded."""


def transformers_conv1d() -> type[nn.Module] | None:
    """transformers' Conv1D (GPT-2's layers: x·W + b with W stored d×o) when transformers is loaded, else None.
    Looked up, never imported: the core needs no transformers, and a model holding a Conv1D has loaded it."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def supported_layers() -> tuple[type[nn.Module], ...]:
    """`SUPPORTED_LAYERS`, plus transformers' Conv1D when transformers is loaded."""
    conv1d = transformers_conv1d()
    return SUPPORTED_LAYERS if conv1d is None else (*SUPPORTED_LAYERS, conv1d)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether `module` is transformers' Conv1D: a Linear layer whose weight is stored transposed, (d, o)."""
    conv1d = transformers_conv1d()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """Whether `module` multiplies each input row by its weight alone (nn.Linear or transformers' Conv1D), so that
    its input rows are the last dimension of its input, with no patches."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def check_supported(name: str, module: nn.Module) -> None:
    """Raise a clear error when `module` is not a layer whose input subspace we can model (NESS's adapters,
    the projection methods' bases): an initialised nn.Linear or transformers Conv1D, or an nn.Conv1d / nn.Conv2d
    with groups=1."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise UnsupportedLayerError(
            f"layer '{name}' ({type(module).__name__}) is not initialised yet: run one forward pass "
            "before wrapping the model, or exclude it."
        )
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        raise UnsupportedLayerError(
            f"layer '{name}' is a {type(module).__name__} with groups={module.groups}: each group sees its own "
            f"input subspace, which the subspace methods do not model. Exclude it with exclude=['{name}']."
        )
    if not isinstance(module, supported_layers()):
        raise UnsupportedLayerError(
            f"layer '{name}' is a {type(module).__name__}; the subspace methods handle nn.Linear, nn.Conv1d, "
            "nn.Conv2d and transformers' Conv1D only."
        )


def conv_padding(conv: ConvLayer) -> tuple[int, ...]:
    """Explicit padding of `conv` as F.pad takes it, last dimension first: (left, right) for Conv1d,
    (left, right, top, bottom) for Conv2d ('same' may be uneven)."""
    if conv.padding == "valid":
        return (0,) * (2 * len(conv.kernel_size))
    if conv.padding == "same":
        pads: list[int] = []
        for k, dil in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    return tuple(p for pad in reversed(conv.padding) for p in (pad, pad))  # type: ignore[arg-type]


def pad_conv_input(conv: ConvLayer, x: Tensor) -> Tensor:
    """Pad `x` exactly as `conv` does before sliding its kernel (any padding and padding_mode)."""
    pads = conv_padding(conv)
    if not any(pads):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


def conv_with_weight(conv: ConvLayer, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`conv`'s operation (stride, padding, dilation) with another kernel `weight`."""
    operation = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
    return operation(pad_conv_input(conv, x), weight, bias, conv.stride, 0, conv.dilation, 1)


def layer_input_rows(module: nn.Module, x: Tensor, geometry: tuple[int, int] | None = None) -> Tensor:
    """The rows that multiply the layer's flattened weight, shape (N, d).

    Linear: every leading dimension is flattened (a sequence model's (B, T, d) gives B·T rows). Conv1d / Conv2d: the
    im2col patches, one row per (sample, output position), each flattened in the weight's (C_in, k_h, k_w) or
    (C_in, k) order, so `rows @ W.view(o, -1).T` is the convolution.
    `geometry` = (stride, map size m) replaces the conv's own grid by the one a script assumed: s = ⌊(m + 2p − k)/
    stride⌋ + 1 positions per side from the top-left of the padded input (only to reproduce official code, §3.3).
    """
    if is_linear(module):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        if geometry is not None:
            raise ValueError("a patch geometry applies to Conv2d layers only")
        padded = pad_conv_input(module, x if x.dim() == 3 else x.unsqueeze(0)).unsqueeze(2)  # (B, C_in, 1, L)
        patches = F.unfold(
            padded, (1, module.kernel_size[0]), dilation=(1, module.dilation[0]), stride=(1, module.stride[0])
        )
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B·L', C_in·k)
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        padded, stride = pad_conv_input(module, x), module.stride
        if geometry is not None:
            stride_, size = geometry
            left, right, top, bottom = conv_padding(module)
            extent = []
            for k, pad, have in (
                (module.kernel_size[0], top + bottom, padded.shape[2]),
                (module.kernel_size[1], left + right, padded.shape[3]),
            ):
                span = ((size + pad - k) // stride_) * stride_ + k  # (s − 1)·stride + k
                if span > have:
                    raise ValueError(
                        f"patch geometry (stride {stride_}, map {size}) needs {span} padded input rows/columns "
                        f"but the layer's input has {have}: it assumes a larger input than the model receives"
                    )
                extent.append(span)
            padded, stride = padded[:, :, : extent[0], : extent[1]], (stride_, stride_)
        patches = F.unfold(padded, module.kernel_size, dilation=module.dilation, stride=stride)  # (B, C_in·k_h·k_w, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B·L, d)
    raise UnsupportedLayerError(f"no layer-input rows for {type(module).__name__}")


def largest_keys(keys: Tensor, k: int, *rows: Tensor) -> tuple[Tensor, ...]:
    """(keys, *rows) cut to the entries with the k largest keys, largest first: with one i.i.d. uniform key per
    entry, a uniform sample without replacement whose every prefix is one too. The top k of a union of pools is the
    top k of their own top k, so a stream can be sampled pool by pool."""
    top = keys.topk(min(k, keys.numel())).indices
    return (keys[top], *(r[top.to(r.device)] for r in rows))


def sample_positions(rows: Tensor, keys: Tensor, per_sample: int, kept: int) -> tuple[Tensor, float]:
    """`kept` of each sample's `per_sample` rows (a convolution's output positions), uniformly at random, and the
    weight P/m that makes their Σxxᵀ an unbiased estimate of all the rows' (each row is kept with probability m/P,
    so E[(P/m)·Σ_kept xxᵀ] = Σ xxᵀ). `rows` (B·P, d) are sample-major and `keys` (B·P,) one uniform random key per
    row: each sample keeps its rows with the m largest keys, so the choice follows the keys' stream (the same on
    every rank of a distributed pass). With m ≥ P every row is kept, with weight 1."""
    if rows.shape[0] != keys.numel() or per_sample < 1 or rows.shape[0] % per_sample:
        raise ValueError(
            f"sample_positions: {rows.shape[0]} rows with {keys.numel()} keys are not whole samples of "
            f"{per_sample} positions; pass one key per row, sample-major"
        )
    if kept < 1:
        raise ValueError(f"sample_positions: kept must be ≥ 1 position per sample, got {kept}")
    if kept >= per_sample or not rows.shape[0]:
        return rows, 1.0
    top = keys.view(-1, per_sample).topk(kept, dim=1).indices  # (B, m): each sample's chosen positions
    first = torch.arange(0, keys.numel(), per_sample, device=top.device)[:, None]  # each sample's first row
    return rows[(top + first).reshape(-1).to(rows.device)], per_sample / kept


def row_signature(module: nn.Module) -> tuple[object, ...]:
    """What `layer_input_rows` does to a layer's input: layers with equal signatures turn the same input tensor into
    the same rows (any Linear or Conv1D: the input's last dimension; a convolution: its own patches)."""
    if is_linear(module):
        return ("linear",)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        geometry = (module.kernel_size, module.stride, module.dilation, conv_padding(module), module.padding_mode)
        return (type(module).__name__, *geometry)
    raise UnsupportedLayerError(f"no layer-input rows for {type(module).__name__}")


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight as an (o, d) matrix, a view of it: rows · weight_matrixᵀ is the layer without its bias.
    (transformers' Conv1D stores the transpose, d×o; a convolution's kernel is flattened in its rows' order.)"""
    weight = module.weight  # type: ignore[union-attr]
    return weight.T if is_transposed_linear(module) else weight.reshape(weight.shape[0], -1)


def input_dim(module: nn.Module) -> int:
    """d, the length of one layer-input row (in_features, or C_in·k_h·k_w)."""
    return weight_matrix(module).shape[1]


def output_dim(module: nn.Module) -> int:
    """o, the layer's number of outputs (out_features, or output channels)."""
    return weight_matrix(module).shape[0]


def with_bias_input(rows: Tensor) -> Tensor:
    """Rows x̃ = [x; 1]: with them a layer's bias is the last row of its weight, x̃ᵀW̃ = xᵀW + b, so a null space
    of the x̃ also protects earlier inputs from a change of the bias."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


GRAM_BLOCKS_FROM = 512
"""The width d and row count n from which `gram` forms XᵀX in blocks: below either, one product is faster (measured
on the CPU, float64, d = 784: 0.73 against 0.50 ms at n = 64, 24.5 against 31.8 ms at n = 4,096)."""


def gram(rows: Tensor) -> Tensor:
    """XᵀX of rows X (n, d). From n and d = `GRAM_BLOCKS_FROM` on, with X = [A B] split in two column halves: AᵀA, BᵀB
    and AᵀB are formed and BᵀA is AᵀB's transpose, 3/4 of the multiply-adds of one product; exactly symmetric."""
    n, d = rows.shape
    if min(n, d) < GRAM_BLOCKS_FROM:
        return rows.T @ rows
    half = d // 2
    left, right = rows[:, :half], rows[:, half:]
    out = rows.new_empty(d, d)
    out[:half, :half] = left.T @ left
    out[half:, half:] = right.T @ right
    cross = left.T @ right
    out[:half, half:] = cross
    out[half:, :half] = cross.T
    return out


def input_covariance(rows: Tensor) -> Tensor:
    """C = Σ x xᵀ over the rows (paper Eq. 7), accumulated in float64 so sums over tasks stay exact."""
    return gram(rows.detach().to(torch.float64))


class CovarianceSum:
    """Σxxᵀ over rows that arrive in batches, at the matrix-product limit: the rows are pooled into chunks of at least
    `chunk` (one large product instead of one per small batch) and each chunk's xᵀx, taken in `dtype`, is added in
    place into a sum kept in `sum_dtype` on `device` (default: the rows' device). The product runs where the rows
    are; with the sum elsewhere (a model on a GPU, its sums on the CPU) only each chunk's d×d product moves.

    float64 products and sum (the default) keep Σxxᵀ exact to float64 round-off. float32 products run about twice as
    fast on a CPU but leave a relative error of about 1e-6 (MNIST's first layer): an exact null direction then looks
    like noise and σ_max(U), which a printed certificate multiplies, moves (BENCHMARKS.md). A float32 sum halves the
    bytes kept per layer (NESSConfig.statistics_dtype), at that same precision."""

    def __init__(
        self,
        chunk: int = 4096,
        dtype: torch.dtype = torch.float64,
        *,
        sum_dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        self.chunk, self.dtype, self.sum_dtype, self.device = chunk, dtype, sum_dtype, device
        self.total: Tensor | None = None
        self._pending: list[Tensor] = []
        self._rows = 0

    def add(self, rows: Tensor, weight: float = 1.0) -> None:
        """Add Σxxᵀ of `rows` (n, d), times `weight` (a sample's P/m: `sample_positions`)."""
        if self.total is None:
            device = rows.device if self.device is None else self.device
            self.total = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.sum_dtype, device=device)
        rows = rows.detach()
        if weight != 1.0:  # (√w·x)(√w·x)ᵀ = w·xxᵀ, scaled in the product's dtype
            rows = rows.to(self.dtype) * math.sqrt(weight)
        self._pending.append(rows)
        self._rows += rows.shape[0]
        if self._rows >= self.chunk:
            self._flush()

    def copy(self) -> CovarianceSum:
        """An independent sum holding what this one holds: the total cloned, the pooled rows shared (never changed)."""
        twin = CovarianceSum(self.chunk, self.dtype, sum_dtype=self.sum_dtype, device=self.device)
        twin.total = None if self.total is None else self.total.clone()
        twin._pending, twin._rows = list(self._pending), self._rows
        return twin

    def result(self) -> Tensor:
        """The sum of every row's xxᵀ so far (in `sum_dtype`, on `device`)."""
        self._flush()
        if self.total is None:
            raise ValueError("no rows were added")
        return self.total

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)  # cat promotes dtypes
        rows = rows.to(self.dtype)
        self.total += gram(rows).to(self.total.device, self.sum_dtype)  # type: ignore[union-attr]
        self._pending, self._rows = [], 0


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


def null_rank(
    singular_values: Tensor,
    rule: ThresholdRule,
    eps1: float | None,
    delta: float | None = None,
    rank: int | None = None,
) -> tuple[int, float]:
    """(r, τ): how many of the smallest directions (σ ascending) form U under `rule`, and the σ cut-off.

    frobenius / nuclear: σᵢ ≤ τ of `null_threshold` (knob ε₁). energy: the most smallest directions whose energy
    Σσᵢ² is ≤ δ of the total (knob δ; U's share of Σxᵀx over the old inputs). rank: the `rank` smallest directions.
    For energy and rank, τ is the largest kept σ (0 when none is kept).
    """
    d = singular_values.numel()
    if rule in ("frobenius", "nuclear"):
        if eps1 is None:
            raise ValueError(f"the {rule} rule needs eps1 (ε₁ of Eq. 5)")
        tau = null_threshold(singular_values, eps1, rule)
        return int((singular_values <= tau).sum()), tau
    if rule == "energy":
        if delta is None:
            raise ValueError("the energy rule needs delta, the share of input energy U may carry")
        energies = singular_values.double() ** 2
        r = int((energies.cumsum(0) <= delta * float(energies.sum())).sum())
    elif rule == "rank":
        if rank is None:
            raise ValueError("the rank rule needs rank, the number of directions per layer")
        r = min(rank, d)
    else:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    return r, float(singular_values[r - 1]) if r else 0.0


def null_basis(
    covariance: Tensor,
    eps1: float | None,
    rule: ThresholdRule = "frobenius",
    name: str = "layer",
    *,
    delta: float | None = None,
    rank: int | None = None,
) -> NullBasis:
    """The approximate null space of the inputs summarised by `covariance` (d×d), chosen by `rule` (`null_rank`)."""
    return spectrum_null_basis(covariance_spectrum(covariance, name), eps1, rule, delta=delta, rank=rank)


def spectrum_null_basis(
    spectrum: Spectrum,
    eps1: float | None,
    rule: ThresholdRule = "frobenius",
    *,
    delta: float | None = None,
    rank: int | None = None,
) -> NullBasis:
    """`null_basis` from a covariance's spectrum: layers that share a covariance pay for one eigh, whatever rules."""
    sigma = spectrum.singular_values
    r, tau = null_rank(sigma, rule, eps1, delta, rank)  # σ ascending, so the kept directions are the first r
    basis = spectrum.eigenvectors[:, :r]
    if r < basis.shape[0]:  # a copy of the r columns, so that the d×d eigenvectors need not outlive the eigh's user
        basis = basis.clone()
    return NullBasis(basis, sigma, tau, spectrum.fallback)


EIGH_COPIES = 6
"""d×d float64 matrices a float64 eigh holds at its peak, counted generously: the upcast covariance, its symmetrised
copy, the eigenvectors, and LAPACK's / cuSOLVER's divide-and-conquer workspace (about 2d² more), plus one spare."""
EIGH_MEMORY_SHARE = 0.5
"""The share of a GPU's free memory an eigh may take there; beyond it, it runs on the CPU."""


def eigh_bytes(d: int) -> int:
    """Bytes a float64 eigh of a d×d matrix needs at its peak (`EIGH_COPIES` d×d float64 matrices)."""
    return EIGH_COPIES * 8 * d * d


def eigh_device(device: torch.device, d: int) -> torch.device:
    """Where a float64 eigh of a d×d covariance runs for a model on `device`: on its GPU while `eigh_bytes(d)` is at
    most `EIGH_MEMORY_SHARE` of the GPU's free memory, else on the CPU (a CPU model; MPS has no float64)."""
    if device.type == "cuda" and eigh_bytes(d) <= EIGH_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]:
        return device
    return torch.device("cpu")


def projector_distance(a: Tensor, b: Tensor) -> float:
    """‖AAᵀ − BBᵀ‖_F for orthonormal columns A (d, r_a) and B (d, r_b): how far apart the two subspaces are.

    Computed as sqrt(‖B − A(AᵀB)‖²_F + ‖A − B(BᵀA)‖²_F), the parts of each basis outside the other's span, which
    equals it for any ranks (‖P_A − P_B‖²_F = r_a + r_b − 2‖AᵀB‖²_F) without that form's cancellation, at 2·d·r_a·r_b
    multiply-adds per product instead of a d×d matrix. With r_a = r_b it is sqrt(2·Σ sin²θᵢ) over the principal
    angles θᵢ; each rank more on one side adds 1 to its square."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    overlap = a.T @ b
    outside_a, outside_b = b - a @ overlap, a - b @ overlap.T
    return math.sqrt(float((outside_a**2).sum() + (outside_b**2).sum()))


# -- gradient projection memory: GPM (Saha et al., ICLR 2021) and SGP (Saha & Roy, AAAI 2023), METHODS_SPEC §3–§4 ---
# GPM's representation R (d×n, one column per layer-input row) is never formed: R Rᵀ is `input_covariance` of the
# rows, its eigenvalues are the squared singular values s_i² of R, and its eigenvectors R's left singular vectors.


def energy_rank(energies: Tensor, threshold: float, total: float | None = None) -> int:
    """How many directions GPM keeps, given their `energies` (s_i², descending) and ε_th.

    First task (`total` None): r = #{k : Σ_{i≤k} s_i² / Σ_i s_i² < ε_th}, the longest prefix whose cumulative energy
    stays *below* ε_th (one fewer than reaching it; the official code has the `+1` commented out).
    Later tasks (`total` = ‖R‖²_F, `energies` = the residual's ŝ_i²): the captured fraction starts at
    (‖R‖²_F − Σ ŝ_i²)/‖R‖²_F and, while it is below ε_th, the next ŝ_i²/‖R‖²_F is added and r grows, so here r
    *includes* the direction that reaches ε_th. Both rules are the official loops, float64 and in the same order.
    """
    e = energies.detach().to("cpu", torch.float64)
    if total is None:
        total_energy = float(e.sum())
        if total_energy <= 0:  # the layer saw only zeros: nothing to protect
            return 0
        return int((torch.cumsum(e / total_energy, 0) < threshold).sum())
    if total <= 0:
        return 0
    captured = (total - float(e.sum())) / total
    r = 0
    for fraction in (e / total).tolist():
        if captured >= threshold:
            break
        captured += fraction
        r += 1
    return r


def residual_covariance(covariance: Tensor, basis: Tensor) -> Tensor:
    """(I − MMᵀ) C (I − MMᵀ): the covariance R̂R̂ᵀ of GPM's residual R̂ = R − MMᵀR (Eq. 8) when C = RRᵀ."""
    m = basis.to(covariance)
    q = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device) - m @ m.T
    return q @ covariance @ q


def captured_energy(covariance: Tensor, basis: Tensor) -> float:
    """‖MᵀR‖²_F / ‖R‖²_F = tr(MᵀCM)/tr(C): the fraction of the representation's energy inside span(M) (NaN if none)."""
    total = float(torch.trace(covariance))
    if total <= 0:
        return math.nan
    m = basis.to(covariance)
    return float(torch.trace(m.T @ covariance @ m)) / total


@dataclass(frozen=True)
class MemoryUpdate:
    """One layer's GPM memory after a task: M grown by the task's most energetic new directions."""

    basis: Tensor  # M, (d, k) orthonormal columns, float64: the old columns first, then the added ones
    added: int  # r, the number of columns appended by this update
    captured_before: float  # fraction of the task's ‖R‖²_F already inside the old span(M) (0 at the first task)
    captured: float  # the same fraction for the grown M


def grow_basis(basis: Tensor | None, covariance: Tensor, threshold: float, name: str = "layer") -> MemoryUpdate:
    """GPM's memory update of one layer (METHODS_SPEC §3.1) from the task's representation covariance C = RRᵀ.

    `basis` None is the first task: M = U_{:, :r}, r by `energy_rank`'s first-task rule. Otherwise the top r
    eigenvectors of the residual covariance (the left singular vectors Û of R̂) are appended, r by the later-task
    rule, and M is cut to d columns as in the official code. Directions whose energy is round-off (≤ d·eps·‖R‖²_F)
    are never kept: the official loop appends them when ε_th ≥ 1, which the +0.003-per-task schedule reaches on
    20 tasks, and they make M's columns non-orthonormal (MMᵀ then no longer projects).
    """
    d = covariance.shape[0]
    cov = covariance.to(torch.float64)
    total = float(torch.trace(cov))
    spectrum = covariance_spectrum(cov if basis is None else residual_covariance(cov, basis), name)
    energies = spectrum.eigenvalues.flip(0)  # s_i² (or ŝ_i²), descending
    directions = spectrum.eigenvectors.flip(1)
    significant = int((energies > d * torch.finfo(torch.float64).eps * total).sum())
    r = energy_rank(energies[:significant], threshold, None if basis is None else total)
    new = directions[:, :r]
    if basis is None:
        return MemoryUpdate(new, r, 0.0, captured_energy(cov, new))
    old = basis.to(new)
    grown = torch.cat([old, new], dim=1)[:, :d]
    return MemoryUpdate(grown, grown.shape[1] - old.shape[1], captured_energy(cov, old), captured_energy(cov, grown))


def projection_matrix(basis: Tensor, importance: Tensor | None = None) -> Tensor:
    """P = M diag(λ) Mᵀ (d×d); λ = 1 gives GPM's orthogonal projector MMᵀ, λ ∈ [0, 1] SGP's scaled one."""
    if importance is None:
        return basis @ basis.T
    return (basis * importance.to(basis)) @ basis.T


def project_gradient(grad: Tensor, projector: Tensor) -> Tensor:
    """G − G·P for a gradient viewed as (o, d): removes (GPM) or scales down (SGP) its component in span(M)."""
    return grad - grad @ projector


def coordinates_in_span(rows: Tensor, basis: Tensor, weights: Tensor | None = None) -> Tensor:
    """(x·M)·diag(λ) for rows x (n, d), M (d, k), λ (k,) (all 1 when None): each row's coordinates along M's columns,
    scaled by their weights."""
    along = rows @ basis
    return along if weights is None else along * weights


def component_in_span(grad: Tensor, basis: Tensor, weights: Tensor | None = None) -> Tensor:
    """G·M diag(λ) Mᵀ for gradient rows G (o, d), M (d, k), λ (k,) (all 1 when None): G's component in span(M), each
    direction scaled by its weight, as ((G·M)·λ)·Mᵀ, o·d·k multiply-adds twice instead of forming the d×d matrix;
    differentiable in G and λ (FS-DGPM learns λ)."""
    return coordinates_in_span(grad, basis, weights) @ basis.T


@dataclass(frozen=True)
class GradientProjection:
    """G ↦ G − G·M diag(λ) Mᵀ on gradient rows (o, d), in the cheaper of two forms: the dense d×d matrix P (o·d²
    multiply-adds a step), or the factors (`component_in_span`: 2·o·d·k), which win while k < d/2."""

    basis: Tensor
    """M (d, k)."""
    importance: Tensor | None
    """λ (k,), SGP's scaled projection; None for GPM's λ = 1."""
    dense: Tensor | None
    """P = M diag(λ) Mᵀ (d, d) when the dense form is the cheaper one, else None."""

    def __call__(self, grad: Tensor) -> Tensor:
        if self.dense is not None:
            return project_gradient(grad, self.dense)
        return self.project_rows(grad)

    def project_(self, grad: Tensor) -> Tensor:
        """The projection of gradient rows (o, d) in place (the factored form needs no (o, d) temporary)."""
        if self.dense is not None:
            return grad.copy_(project_gradient(grad, self.dense))
        return grad.addmm_(coordinates_in_span(grad, self.basis, self.importance), self.basis.T, alpha=-1)

    def multiply_adds(self, outputs: int) -> int:
        """What projecting an (outputs, d) gradient costs: o·d² dense, 2·o·d·k factored."""
        d, k = self.basis.shape
        return outputs * d * d if self.dense is not None else 2 * outputs * d * k

    def project_rows(self, rows: Tensor) -> Tensor:
        """x − x·M diag(λ) Mᵀ for rows x (n, d), in the factored form (2·n·d·k multiply-adds): for a Linear layer's
        input rows, δᵀ of them is its projected weight gradient, G − G·M diag(λ) Mᵀ with G = δᵀx."""
        return torch.addmm(rows, coordinates_in_span(rows, self.basis, self.importance), self.basis.T, alpha=-1)

    def complete(self, grad: Tensor, delivered: list[Tensor]) -> Tensor | None:
        """A weight's whole gradient `grad` (o, d) of which the parts in `delivered` arrived projected already: None
        when they are all of it, else delivered + P(grad − delivered), each part projected exactly once (SGP's
        scaled projection is not idempotent)."""
        if len(delivered) == 1 and grad is delivered[0]:  # autograd handed on the one delivered tensor: nothing else
            return None
        done = torch.stack(delivered).sum(0) if delivered else torch.zeros_like(grad)
        return done + self(grad - done)


class _LinearWithProjectedWeightGradient(torch.autograd.Function):
    """F.linear(x, W, b) whose backward gives W the projected gradient δᵀ·(x − x·M diag(λ) Mᵀ) directly; the
    gradients of x (δ·W) and b (Σδ) are F.linear's."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        projection: GradientProjection,
        delivered: list[Tensor],
        projected_rows: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, projected_rows)
        ctx.projection, ctx.has_bias, ctx.delivered = projection, bias is not None, delivered
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, projected_rows = ctx.saved_tensors
        if grad_out.dtype != weight.dtype:  # autocast: the output was in half precision, W and x were not
            grad_out = grad_out.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
            grad_x = grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if projected_rows is None:
                rows = x.reshape(-1, x.shape[-1])
                rows = rows if rows.dtype == weight.dtype else rows.to(weight.dtype)
                projected_rows = ctx.projection.project_rows(rows)
            grad_weight = grad_rows.T @ projected_rows
            ctx.delivered.append(grad_weight)
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


def linear_with_projected_weight_gradient(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    projection: GradientProjection,
    delivered: list[Tensor],
    projected_rows: Tensor | None = None,
) -> Tensor:
    """F.linear(x, weight, bias) whose weight gradient arrives already projected by `projection` (GPM's and SGP's
    G − G·M diag(λ) Mᵀ): computed from the layer's input rows as δᵀ(x − x·M diag(λ) Mᵀ), 2·n·d·k multiply-adds
    for n rows, instead of 2·o·d·k on the (o, d) gradient; cheaper while n < o (batch 10 against 100 outputs).
    Each backward appends the weight gradient it gives to `delivered` (what else reached the weight can then be
    told apart: `GradientProjection.complete`). `projected_rows`, when given, are x's rows projected already (for
    x (n, d): the projection's own x − x·M diag(λ) Mᵀ, made elsewhere, as GPM does once for a training split)."""
    return _LinearWithProjectedWeightGradient.apply(x, weight, bias, projection, delivered, projected_rows)


def gradient_projection(
    basis: Tensor, importance: Tensor | None = None, like: Tensor | None = None
) -> GradientProjection:
    """The projection removing P = M diag(λ) Mᵀ (`projection_matrix`) from gradients, in the cheaper form for M's
    shape, on `like`'s device and in its dtype (default: M's)."""
    d, k = basis.shape
    dense = projection_matrix(basis, importance) if 2 * k >= d else None
    if like is not None:
        basis = basis.to(like)
        importance = None if importance is None else importance.to(like)
        dense = None if dense is None else dense.to(like)
    return GradientProjection(basis, importance, dense)


def projected_norms(basis: Tensor, covariance: Tensor) -> Tensor:
    """‖Rᵀm_j‖ = sqrt(m_jᵀ C m_j) for each column m_j of M: how much of the representation lies along it.

    For an old column this is SGP's importance of the new task on it, Σ_k (m_jᵀu_{c,k})² s_{c,k}² with (U_c, S_c) the
    SVD of MMᵀR, since that sum is m_jᵀ(MMᵀR)(MMᵀR)ᵀm_j = m_jᵀCm_j. For an added column (an eigenvector of the
    residual covariance, orthogonal to the old M) it is its singular value ŝ_j.
    """
    m = basis.to(covariance)
    return ((covariance @ m) * m).sum(dim=0).clamp(min=0.0).sqrt()


def importance_map(x: Tensor, alpha: float) -> Tensor:
    """SGP's f(x) = (α+1)·x / (α·x + max x), elementwise with max over the whole vector; f(max x) = 1.

    An all-zero x (a layer whose inputs were all zero) maps to zeros instead of the official code's 0/0.
    """
    if x.numel() == 0 or float(x.max()) <= 0:
        return torch.zeros_like(x)
    return (alpha + 1) * x / (alpha * x + x.max())


def sgp_importance(previous: Tensor | None, norms: Tensor, alpha: float) -> Tensor:
    """SGP's importance update (METHODS_SPEC §4): λ = f(x) for x = [a; ŝ], then λ_j ← clip(λ_j + λ_old_j, 0, 1) for
    the k old columns. `norms` = `projected_norms` of the grown M (k old columns first), `previous` = λ_old (k,),
    None at the first task (λ = f(s)). No added column is the official `r == 0` branch (x = a)."""
    importance = importance_map(norms, alpha)
    if previous is not None:
        k = previous.numel()
        importance[:k] = (importance[:k] + previous.to(importance)).clamp(0.0, 1.0)
    return importance


def clip_spectral_norm(matrix: Tensor, bound: float) -> Tensor:
    """The nearest matrix (in every unitarily invariant norm) with spectral norm ≤ bound: the SVD with every
    singular value above `bound` lowered to it. Used to certify Eq. 10: ‖V‖₂ ≤ √ε/σ_max(U) ⇒ ‖xᵀUV‖² ≤ ε."""
    if not bound >= 0:
        raise ValueError(f"clip_spectral_norm: the bound must be ≥ 0, got {bound}")
    if float(torch.linalg.matrix_norm(matrix.double())) <= bound:  # ‖·‖₂ ≤ ‖·‖_F: inside, no SVD needed
        return matrix
    left, singular, right_t = torch.linalg.svd(matrix.double(), full_matrices=False)
    if singular.numel() == 0 or float(singular[0]) <= bound:
        return matrix
    return ((left * singular.clamp(max=bound)) @ right_t).to(matrix.dtype)


def project_to_output_budget(v: Tensor, sigma: Tensor, budget: float, iterations: int = 60) -> Tensor:
    """The V' nearest to V (Frobenius) with ‖diag(σ)·V'‖²_F ≤ budget; V unchanged when it already fits.

    For U the eigenvectors of C = Σxxᵀ with singular values σ, ‖diag(σ)·V‖²_F = Σ_x ‖xᵀUV‖², the summed squared
    output change of every input the covariance recorded, so this holds the old inputs' total change to `budget`.
    The minimiser scales each row, v'ᵢ = vᵢ/(1 + μσᵢ²), with μ ≥ 0 the root of h(μ) = √budget, where
    h(μ)² = Σ σᵢ²‖vᵢ‖²/(1 + μσᵢ²)². Newton's method on 1/h (concave and increasing, as in the trust-region
    subproblem of Moré and Sorensen) approaches that root from below, so every iterate is feasible or short of it.
    """
    if not budget >= 0:
        raise ValueError(f"project_to_output_budget: the budget must be ≥ 0, got {budget}")
    w = sigma.to(torch.float64) ** 2
    n = (v.detach().to(torch.float64) ** 2).sum(dim=1)
    if float((w * n).sum()) <= budget:
        return v
    if budget == 0:
        return v * (w == 0).to(v.dtype)[:, None]
    # Aim a few units of V's precision inside the boundary, so that rounding V' to its dtype cannot step past it.
    target, mu = math.sqrt(budget) * (1 - 4 * torch.finfo(v.dtype).eps), 0.0
    for _ in range(iterations):
        s = 1 + mu * w
        h = float((w * n / s**2).sum().sqrt())
        if abs(h - target) <= 1e-12 * target:
            break
        slope = float((w**2 * n / s**3).sum()) / h**3  # d(1/h)/dμ
        mu += (1 / target - 1 / h) / slope
    scaled = v.to(torch.float64) / (1 + mu * w)[:, None]
    excess = float((w * (scaled**2).sum(dim=1)).sum().sqrt()) / target
    if excess > 1:  # round-off past the root: shrink onto the boundary
        scaled = scaled / excess
    return scaled.to(v.dtype)


def output_change(v: Tensor, sigma: Tensor) -> float:
    """‖diag(σ)·V‖²_F: with U the eigenvectors of C = Σxxᵀ for the singular values σ, the exact Σ_x ‖xᵀUV‖² over
    every input C recorded (each direction's price is its σᵢ²)."""
    return float(((sigma.to(v.device, torch.float64) ** 2)[:, None] * v.detach().to(torch.float64) ** 2).sum())


def old_output_energy(covariance: Tensor, layer: nn.Module, bias: bool = False) -> float:
    """Σ_x ‖x̃ᵀW̃‖² = tr(W̃ C W̃ᵀ) over the inputs C = Σx̃x̃ᵀ recorded: what the old inputs put out through the layer.
    W̃ is the weight as (o, d) rows, with the bias as a last column when `bias` (rows x̃ = [x; 1])."""
    weight = weight_matrix(layer).detach().to(covariance.device, torch.float64)
    if bias:
        weight = torch.cat([weight, layer.bias.detach().to(weight)[:, None]], dim=1)
    return float(((weight @ covariance.to(torch.float64)) * weight).sum())


@dataclass(frozen=True)
class TransferDirections:
    """Ū of a transfer adapter: the directions outside span(U) where a task's inputs carry the most energy."""

    basis: Tensor  # (d, k) float64, orthonormal, most energetic first
    outside_share: float  # the share of the inputs' energy Σ‖x‖² that lies outside span(U)
    captured_share: float  # the share Ū captures (≤ outside_share)


def transfer_directions(covariance: Tensor, null_basis: Tensor, k: int, name: str = "layer") -> TransferDirections:
    """The top-k eigenvectors of P·C·P, P = I − UUᵀ, for C = Σxxᵀ of a new task's inputs: the directions it needs
    that the shared update U·V cannot reach. Directions whose energy is round-off (≤ d·eps·tr C) are never taken,
    so k may come out smaller (0 for inputs that lie inside span(U))."""
    c = covariance.to(torch.float64)
    d = c.shape[0]
    u = null_basis.to(c)
    outside = torch.eye(d, dtype=torch.float64, device=c.device) - u @ u.T
    spectrum = covariance_spectrum(outside @ c @ outside, name)
    total = float(torch.trace(c))
    if total <= 0:
        return TransferDirections(c.new_zeros(d, 0), 0.0, 0.0)
    energies = spectrum.eigenvalues.flip(0)  # descending
    significant = int((energies > d * torch.finfo(torch.float64).eps * total).sum())
    k = min(k, significant)
    return TransferDirections(
        spectrum.eigenvectors.flip(1)[:, :k], float(energies.sum()) / total, float(energies[:k].sum()) / total
    )
