"""The NESS adapter: a Linear, Conv1d/Conv2d or transformers Conv1D layer with weight W + ΔW, ΔW = U·V (Eq. 6).

U (d×r) is a fixed buffer, the approximate null basis of earlier inputs; V (r×o) is the only trainable
tensor and starts at zero. In the paper's layout xᵀΔW is the change of a layer's output for input row x;
in PyTorch's weight layout (o×d) the same change is (U V)ᵀ (transformers' Conv1D stores d×o: there it is U V).
With `adapt_bias` the rows are x̃ = [x; 1] and U is (d+1)×r: the first d rows of U·V are ΔW and the last is the
bias change Δb, so x̃ᵀ(U V) = xᵀΔW + Δb.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from ness.data.tasks import PREPARED_BYTES_LIMIT, SplitProducts, StepRows
from ness.subspace import (
    check_supported,
    conv_padding,
    conv_with_weight,
    input_dim,
    is_linear,
    is_transposed_linear,
    output_dim,
)


def output_rows(module: nn.Module, x: Tensor) -> int:
    """N, the number of layer-input rows one forward pass multiplies (batch × output positions)."""
    if is_linear(module):
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


def low_rank_shift(base: nn.Module, x: Tensor, basis: Tensor, factor: Tensor, adapt_bias: bool = False) -> Tensor:
    """What the update B·F (B: d×k rows of input directions, F: k×o) adds to `base`'s output for input x, computed
    in low rank: (x·B)·F for a Linear layer; for a convolution the k directions act as a k-channel kernel and F mixes
    them into the o outputs. With `adapt_bias` B has a last row for the constant input 1, whose term is a bias."""
    weight_basis = basis[:-1] if adapt_bias else basis
    if weight_basis.dtype != x.dtype:  # autocast: the layer's input decides the precision
        weight_basis = weight_basis.to(x.dtype)
    if is_linear(base):
        shift = (x @ weight_basis) @ factor
        return shift + basis[-1] @ factor if adapt_bias else shift
    kernel = weight_basis.T.reshape(basis.shape[1], *base.weight.shape[1:])  # (k, C_in, k...)
    z = conv_with_weight(base, x, kernel, None)  # (B, k, *positions)
    dims = base.weight.dim()
    shift = (z.movedim(-dims + 1, -1) @ factor).movedim(-1, -dims + 1)
    if adapt_bias:
        shift = shift + (basis[-1] @ factor).reshape(-1, *[1] * (dims - 2))
    return shift


def add_low_rank_shift(
    out: Tensor, base: nn.Module, x: Tensor, basis: Tensor, factor: Tensor, adapt_bias: bool = False
) -> Tensor:
    """out + `low_rank_shift(base, x, basis, factor, adapt_bias)`; for a Linear layer on a batch of rows, one fused
    out + (x·B)·F (addmm), which spares a batch-sized intermediate and a kernel per layer and step."""
    if x.dim() == 2 and not adapt_bias and is_linear(base) and basis.dtype == x.dtype == out.dtype:
        return torch.addmm(out, x @ basis, factor)
    return out + low_rank_shift(base, x, basis, factor, adapt_bias)


PRODUCTS_BYTES_LIMIT = PREPARED_BYTES_LIMIT
"""The most bytes an adapter keeps of its frozen products over a training split (as the trainer's prepared split)."""


def base_layer(module: nn.Module) -> nn.Module:
    """The layer that defines the operation: the module itself, or the base layer a NullSpaceAdapter wraps."""
    return module.base if isinstance(module, NullSpaceAdapter) else module


class NullSpaceAdapter(nn.Module):
    """A base layer plus ΔW = U·V (and Δb with `adapt_bias`); `merged()` folds them into the base layer.

    With `add_transfer(Ū)` it also holds a task-specific term Ū·A (Ū fixed, A trained from zero): the open task's
    transfer adapter, which acts while `transfer_enabled` and is never merged into W."""

    def __init__(self, base: nn.Module, null_basis: Tensor, name: str = "layer", adapt_bias: bool = False) -> None:
        super().__init__()
        check_supported(name, base)
        if adapt_bias and base.bias is None:  # type: ignore[union-attr]
            raise ValueError(f"{name}: adapt_bias needs a layer with a bias; this {type(base).__name__} has none")
        d = input_dim(base) + int(adapt_bias)
        if null_basis.dim() != 2 or null_basis.shape[0] != d:
            what = "d+1 with the bias row" if adapt_bias else "d"
            raise ValueError(f"{name}: null basis must be ({what}={d}, r), got {tuple(null_basis.shape)}")
        weight = base.weight  # type: ignore[union-attr]
        outputs = output_dim(base)
        self.base = base
        self.adapt_bias = adapt_bias
        self.register_buffer("U", null_basis.to(device=weight.device, dtype=weight.dtype).contiguous())
        self.V = nn.Parameter(torch.zeros(null_basis.shape[1], outputs, device=weight.device, dtype=weight.dtype))
        self.register_buffer("transfer_basis", None)
        self.register_parameter("A", None)
        self.transfer_enabled = True
        self._stacked: tuple[Tensor, Tensor, tuple[int, int], Tensor] | None = None  # (U, Ū, their versions, [U Ū])
        self.step_rows: StepRows | None = None  # the trainer's step batch, as NESS shares it (`_batch_products`)
        self._split_products = SplitProducts()  # [split·Wᵀ + b, split·basis] of that batch's split

    def __getstate__(self) -> dict:
        # a cache, rebuilt when next needed (the split's products drop themselves: `SplitProducts`)
        return {**super().__getstate__(), "_stacked": None}

    def __setstate__(self, state: dict) -> None:
        # checkpoints written before the caches existed, or with the products' earlier cache
        state.pop("_row_products", None)
        super().__setstate__({"_stacked": None, "_split_products": SplitProducts(), "step_rows": None, **state})

    @property
    def weight(self) -> Tensor:
        """The base layer's weight W (without ΔW): model code that reads a layer's `weight` (its dtype, device,
        shape, as Hugging Face models do) sees the layer it wrapped."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias (without Δb)."""
        return self.base.bias

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def transfer_rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    def add_transfer(self, basis: Tensor) -> None:
        """Give the layer the task-specific term Ū·A: Ū = `basis` (d×k, or (d+1)×k with the bias row), A = 0."""
        weight = self.base.weight
        if basis.dim() != 2 or basis.shape[0] != self.U.shape[0] or basis.shape[1] == 0:
            raise ValueError(f"transfer basis must be ({self.U.shape[0]}, k>0), got {tuple(basis.shape)}")
        self.transfer_basis = basis.to(device=weight.device, dtype=weight.dtype).contiguous()
        self.A = nn.Parameter(
            torch.zeros(basis.shape[1], output_dim(self.base), device=weight.device, dtype=weight.dtype)
        )

    def terms(self) -> list[tuple[Tensor, Tensor]]:
        """The (basis, factor) pairs acting now: U·V when r > 0, and Ū·A while the transfer term is enabled."""
        # read the registries directly: this runs in every forward pass, and nn.Module's attribute lookup is slow
        buffers, parameters = self._buffers, self._parameters
        V, A = parameters["V"], parameters["A"]
        terms = [(buffers["U"], V)] if V.shape[0] else []
        if A is not None and self.transfer_enabled:
            terms.append((buffers["transfer_basis"], A))
        return terms

    @property
    def weight_basis(self) -> Tensor:
        """The rows of U that multiply x (all of U without `adapt_bias`)."""
        return self.U[:-1] if self.adapt_bias else self.U

    def delta_weight(self, terms: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """ΔW in the base weight's layout, (B F)ᵀ summed over `terms` (default: U·V) and reshaped to (o, d),
        (o, C_in, k) or (o, C_in, k_h, k_w); B F itself, (d, o), for transformers' Conv1D."""
        terms = [(self.U, self.V)] if terms is None else terms
        delta = torch.as_tensor(sum((basis[:-1] if self.adapt_bias else basis) @ factor for basis, factor in terms))
        return delta if is_transposed_linear(self.base) else delta.T.reshape(self.base.weight.shape)

    def delta_bias(self, terms: list[tuple[Tensor, Tensor]] | None = None) -> Tensor | None:
        """Δb: the bias row of each basis times its factor (None without `adapt_bias`)."""
        if not self.adapt_bias:
            return None
        terms = [(self.U, self.V)] if terms is None else terms
        return sum(basis[-1] @ factor for basis, factor in terms)

    def _merged_path_is_cheaper(
        self, x: Tensor, terms: list[tuple[Tensor, Tensor]] | None = None, rows: int | None = None
    ) -> bool:
        # Multiply-adds beyond the frozen base op, for N input rows, rank r (all terms), d inputs, o outputs.
        # Low-rank: x·B and (x·B)·F forward, N·r·(d + o); the gradient of F, N·r·o; and, when x needs a gradient,
        # N·r·(o + d) more. Merged: forming ΔW = B·F, d·r·o; in training also the gradient of W + ΔW, N·d·o, and
        # the gradient of F from it, d·r·o. The merged path also runs more kernels, which cost more than their
        # arithmetic at small sizes (at batch 10 it was the slower one at equal multiply-adds): it is taken only
        # at less than half the low-rank path's multiply-adds.
        # `rows`: N where the caller knows it (a batch of rows)
        terms = self.terms() if terms is None else terms
        n = output_rows(self._modules["base"], x) if rows is None else rows
        (basis, factor), *more = terms
        d, o = basis.shape[0], factor.shape[1]
        r = factor.shape[0] + sum(f.shape[0] for _, f in more)
        low_rank = n * r * (d + o)
        merged = d * r * o
        if torch.is_grad_enabled() and (factor.requires_grad or any(f.requires_grad for _, f in more)):
            low_rank += n * r * o + (n * r * (o + d) if x.requires_grad else 0)
            merged += n * d * o + d * r * o
        return 2 * merged < low_rank

    @staticmethod
    def _plain_linear_call(base: nn.Module) -> bool:
        """Whether calling `base` is exactly F.linear with its weight and bias (an nn.Linear itself, no hook on it
        or on every module): then it is called as that, without nn.Module's per-call machinery."""
        return (
            type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)
        )

    def _stacked_terms(self, terms: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """U·V + Ū·A as one term [U Ū]·[V; A]: one product of x with the bases instead of two, and half the
        kernels forward and backward. [U Ū] is kept until U or Ū changes (in place, or by a move to a device); under
        torch.compile it is formed in the graph instead (reading the tensors' versions there breaks the graph)."""
        if len(terms) < 2:
            return terms
        (u, v), (u_bar, a) = terms
        if torch.compiler.is_compiling():  # traced: the graph stacks them; the cache's version check would break it
            return [(torch.cat([u, u_bar], dim=1), torch.cat([v, a]))]
        cached = self._stacked
        if cached is None or not (cached[0] is u and cached[1] is u_bar and cached[2] == (u._version, u_bar._version)):
            cached = self._stacked = (u, u_bar, (u._version, u_bar._version), torch.cat([u, u_bar], dim=1))
        return [(cached[3], torch.cat([v, a]))]

    def _batch_products(self, x: Tensor, basis: Tensor) -> Tensor | None:
        """[x·Wᵀ + b, x·B] (the frozen output's o columns, then B's r) for x the training step's batch (`step_rows`),
        as rows of those products computed once for the whole fixed tensor x is drawn from: exact, since W, b and
        the basis B do not train within a task and each row's products depend on that row alone; at batch 10
        against a 784-wide input this spares the step N·d·(o + r) multiply-adds and the read of B (1.3 MB at
        r = 416). Only for a plain nn.Linear base (no hook to run) that does not train, a batch that is the very
        tensor the trainer drew (unchanged in place), eager and without autocast, and products within
        `PRODUCTS_BYTES_LIMIT`; else None, and the layer computes them."""
        rows = self.step_rows.rows  # type: ignore[union-attr]
        if rows is None or torch.compiler.is_compiling() or not rows.drew(x):  # traced: no identity checks
            return None
        base = self._modules["base"]
        if x.requires_grad or x.dim() != 2 or not self._plain_linear_call(base):
            return None
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        frozen = (basis, weight) if bias is None else (basis, weight, bias)
        return self._split_products.read(rows, frozen, lambda source: self._products_of(source, basis))

    def _products_of(self, source: Tensor, basis: Tensor) -> Tensor | None:
        """[source·Wᵀ + b, source·B] for every row of `source` (N, d), one product with [Wᵀ B] (N, o + r); None
        beyond `PRODUCTS_BYTES_LIMIT`."""
        n, outputs = source.shape[0], output_dim(self.base)
        if n * (outputs + basis.shape[1]) * source.element_size() > PRODUCTS_BYTES_LIMIT or basis.dtype != source.dtype:
            return None
        weight_basis = basis[:-1] if self.adapt_bias else basis
        products = source @ torch.cat([self.base.weight.T, weight_basis], dim=1)
        if self.base.bias is not None:
            products[:, :outputs] += self.base.bias
        if self.adapt_bias:
            products[:, outputs:] += basis[-1]
        return products

    def forward(self, x: Tensor) -> Tensor:
        base, terms = self._modules["base"], self._stacked_terms(self.terms())
        if not terms:
            return base(x)  # type: ignore[misc]
        if len(terms) == 1:
            basis, factor = terms[0]
            products = self._batch_products(x, basis) if self.step_rows is not None else None
            if products is not None:  # the step's batch of a fixed split: its frozen products read, not computed
                outputs = factor.shape[1]
                return torch.addmm(products[:, :outputs], products[:, outputs:], factor)
            # a batch of rows through a plain nn.Linear (the training step of an MLP): F.linear and one addmm,
            # without the general path's checks
            if (
                x.dim() == 2
                and not self.adapt_bias
                and basis.dtype == x.dtype
                and self._plain_linear_call(base)
                and not self._merged_path_is_cheaper(x, terms, x.shape[0])
            ):
                parameters = base._parameters
                return add_low_rank_shift(F.linear(x, parameters["weight"], parameters["bias"]), base, x, basis, factor)
        if self._merged_path_is_cheaper(x, terms):
            weight = base.weight + self.delta_weight(terms)
            delta_bias = self.delta_bias(terms)
            bias = base.bias if delta_bias is None else base.bias + delta_bias
            if isinstance(base, nn.Linear):
                return F.linear(x, weight, bias)
            if is_transposed_linear(base):
                return F.linear(x, weight.T, bias)
            return conv_with_weight(base, x, weight, bias)
        out = F.linear(x, base.weight, base.bias) if self._plain_linear_call(base) else base(x)
        for basis, factor in terms:
            out = add_low_rank_shift(out, base, x, basis, factor, self.adapt_bias)
        return out

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with W ← W + ΔW and b ← b + Δb of U·V (in place; the transfer term is not merged);
        refuses to write a non-finite value."""
        delta, delta_bias = self.delta_weight(), self.delta_bias()
        if not torch.isfinite(delta).all() or (delta_bias is not None and not torch.isfinite(delta_bias).all()):
            raise FloatingPointError("ΔW holds NaN or Inf; training diverged, refusing to merge it into W")
        self.base.weight.add_(delta)
        if delta_bias is not None:
            self.base.bias.add_(delta_bias)
        return self.base


@contextmanager
def added_low_rank_terms(
    model: nn.Module, terms: dict[str, tuple[Tensor, Tensor]], bias_layers: set[str] | frozenset[str] = frozenset()
) -> Iterator[None]:
    """Inside the block each named layer's output gains its term's low-rank shift x·B·F (`low_rank_shift`): a
    finished task's transfer adapter, put back for as long as that task is predicted. The layer may be wrapped in a
    NullSpaceAdapter (its base layer then defines the operation); hooks are removed on exit, even after an error."""
    handles = []
    try:
        for name, (basis, factor) in terms.items():
            layer = model.get_submodule(name)
            base = base_layer(layer)
            handles.append(
                layer.register_forward_hook(
                    lambda module, args, output, b=base, u=basis, a=factor, bias=name in bias_layers: (
                        output + low_rank_shift(b, args[0], u, a, bias)
                    )
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()
