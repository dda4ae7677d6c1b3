"""OWM: Orthogonal Weights Modification (Zeng, Chen, Cui & Yu, Nature Machine Intelligence 2019), METHODS_SPEC §9.

Every projected layer ℓ keeps P_ℓ (d×d), the recursive-least-squares estimate of (I + Σᵢ rᵢrᵢᵀ/αᵢ)⁻¹ over the
batch-mean inputs rᵢ the layer has seen in training. At every step P absorbs the batch's r, k = P r,
P ← P − k kᵀ/(α + rᵀk), and the weight gradient G (viewed o×d) becomes G·P: updates move W only in directions
nearly orthogonal to every input seen so far, so W r is nearly unchanged for them. P starts at the identity and is
never reset, so it already acts during task 0; α decays within each task from 1 to a per-layer α_final.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ness.methods.base import (
    ContinualMethod,
    Forward,
    Optimizer,
    StepProgress,
    register,
    subspace_layers,
    weights_and_head,
)
from ness.models import call_model, task_heads
from ness.subspace import conv_padding, layer_input_rows
from ness.validation import Rule, Validated, count, entries, number, optional, patterns


@dataclass(frozen=True)
class OWMConfig(Validated):
    """OWM settings; defaults are the official CNN code's (`OWM_CNN/owm.py`, METHODS_SPEC §9).

    α_final by layer: each Conv2d takes `conv_alpha`; the first projected Linear `first_linear_alpha`; every later
    Linear `linear_alpha`; and in a model without declared task heads, a last projected Linear is the shared output
    layer and takes `output_alpha`. On the official CNN (c1–c3, fc1, fc2, fc3 = output) this gives its four values.
    """

    conv_alpha: float = 1e-5
    """α_final of every Conv2d (official: 1e-5 for c1–c3)."""
    first_linear_alpha: float = 1e-4
    """α_final of the first projected Linear (official fc1: 1e-4)."""
    linear_alpha: float = 1e-2
    """α_final of every later hidden Linear (official fc2: 1e-2)."""
    output_alpha: float = 0.1
    """α_final of a shared output layer (official fc3: 0.1); declared task heads are never projected."""
    layer_alphas: tuple[float, ...] | None = None
    """α_final per projected layer in registration order, replacing the four defaults above."""
    conv_patch_stride: int = 2
    """P absorbs one patch of the batch-mean conv input per output position visited with this step in each spatial
    dimension (the official loop's S = 2; 1 visits every position)."""
    clip_grad_norm: float | None = 10.0
    """Clip the norm of all trainable gradients after the projection, before the step (official: 10); None: no
    clipping."""
    exclude: tuple[str, ...] = field(default_factory=tuple)
    """Module-name globs or class names neither projected nor trained after task 0."""

    RULES: ClassVar[dict[str, Rule]] = {
        "conv_alpha": number(above=0, fix="official: 1e-5; α decays from 1 to it within each task"),
        "first_linear_alpha": number(above=0, fix="official: 1e-4; α decays from 1 to it within each task"),
        "linear_alpha": number(above=0, fix="official: 1e-2; α decays from 1 to it within each task"),
        "output_alpha": number(above=0, fix="official: 0.1; α decays from 1 to it within each task"),
        "layer_alphas": optional(
            entries(number(above=0), non_empty=True, fix="one per projected layer"), "to use the four defaults"
        ),
        "conv_patch_stride": count(fix="official: 2"),
        "clip_grad_norm": optional(number(above=0, fix="official: 10"), "for no clipping"),
        "exclude": patterns(),
    }


# -- the maths -----------------------------------------------------------------------------------------------


def scheduled_alpha(alpha_final: float, fraction: float) -> float:
    """α = α_final^λ at task progress λ ∈ [0, 1): 1 at the start of a task, α_final at its end."""
    return alpha_final**fraction


def rls_update_(projector: Tensor, rows: Tensor, alpha: float) -> Tensor:
    """Absorb the rows r₁ … r_n of `rows` (n, d) into P in place, one by one: k = P r, P ← P − k kᵀ/(α + rᵀk).

    The n rank-1 updates with one α are done at once by the Woodbury identity: they give
    P' = (P⁻¹ + RRᵀ/α)⁻¹ = P − K S⁻¹ Kᵀ with K = P R (d×n) and S = αI + RᵀK, so the official loop over conv patches
    costs one n×n Cholesky factorisation S = L Lᵀ; then P' = P − M Mᵀ with M = K L⁻ᵀ. For n = 1, M = k/√(α + rᵀk)
    and the update m_i·m_j is exactly symmetric; for n > 1 P is symmetrised, as it is in exact arithmetic.
    Computed in P's dtype; returns P.
    """
    r = rows.detach().to(projector).T  # (d, n)
    k = projector @ r  # (d, n)
    s = alpha * torch.eye(r.shape[1], dtype=r.dtype, device=r.device) + r.T @ k  # (n, n), symmetric PD
    factor, info = torch.linalg.cholesky_ex(s)
    if info.item() != 0:
        raise FloatingPointError(
            f"OWM: αI + RᵀPR is not positive definite (α = {alpha:g}); P has lost positive definiteness, "
            "raise the layer's α_final"
        )
    m = torch.linalg.solve_triangular(factor, k.T, upper=False).T  # (d, n)
    if r.shape[1] == 1:
        return projector.addr_(m[:, 0], m[:, 0], alpha=-1)
    projector.sub_(m @ m.T)
    return projector.copy_((projector + projector.T) / 2)


def conv_patch_rows(conv: nn.Conv2d, mean_input: Tensor, patch_stride: int) -> Tensor:
    """The im2col patches of a batch-mean conv input (C, H, W) at the conv's own padding, stride and dilation,
    at every `patch_stride`-th output position in each spatial dimension, row-major: shape (n, C·k_h·k_w).

    With patch_stride 2 on a stride-1 conv these are the official loop's patches x[:, :, 2i:2i+k, 2j:2j+k].
    """
    left, right, top, bottom = conv_padding(conv)
    height = mean_input.shape[-2] + top + bottom
    width = mean_input.shape[-1] + left + right
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    rows = layer_input_rows(conv, mean_input.unsqueeze(0))  # (out_h·out_w, d), row-major over positions
    grid = rows.view(out_h, out_w, -1)[::patch_stride, ::patch_stride]
    return grid.reshape(-1, rows.shape[1])


def owm_rows(layer: nn.Module, mean_input: Tensor, patch_stride: int) -> Tensor:
    """The vectors r that P absorbs for one step: the batch-mean input (1, d) of a Linear, the strided patches of a
    Conv2d's batch-mean input."""
    if isinstance(layer, nn.Conv2d):
        return conv_patch_rows(layer, mean_input, patch_stride)
    return mean_input.reshape(1, -1)


def project_rows(grad: Tensor, projector: Tensor) -> Tensor:
    """G·P for a gradient viewed as (o, d) (P is symmetric, so G·Pᵀ), in G's dtype: P is kept in float64 for the
    recursion, but the product needs only G's precision and costs half as much in float32."""
    return (grad.reshape(grad.shape[0], -1) @ projector.to(grad.dtype)).view_as(grad)


@register
class OWM(ContinualMethod):
    """OWM ported onto the library's networks and multi-head protocol.

    Ported means: declared task heads are not projected, and only the current one trains (the official CIFAR demo
    has one projected 10-way output); a shared output layer (Permuted MNIST) is an ordinary projected layer.
    BatchNorm affine parameters (OWM's net has none) and biases (likewise) train in task 0 and are frozen after it,
    as in GPM. P absorbs the inputs the layers receive in the training step's own forward pass (dropout and
    batch-statistics BatchNorm as they are in training); evaluation passes never touch it. Under SAM, P absorbs the
    first forward of a step only. The gradient clip acts after the projection, as in the official code; weight decay
    (none in OWM) would be added unprojected by the optimiser.

    A Conv2d's P absorbs the im2col patches of the batch-mean input at the conv's own padding, stride and dilation,
    at every 2nd output position in each dimension (`conv_patch_stride`): on the official stride-1 convs these are
    exactly the official loop's patches. α's λ runs over the configured epoch budget, so a task that stops early
    ends before α reaches α_final. When the trainer restores a task's best-validation weights, P keeps every step
    it absorbed, as in the official code. There is no faithful flag: the official demo's one deviation, choosing
    the epoch on test accuracy, is the trainer's business, and it selects on validation only.
    """

    name = "owm"
    config_class = OWMConfig
    distributed_ok = False
    distributed_reason = "its projectors absorb each step's batch-mean layer inputs, which differ from rank to rank"

    def __init__(self, model: nn.Module, config: OWMConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        self.layer_names = subspace_layers(model, self.config.exclude, type(self).__name__)
        self.alpha_finals = self.default_alphas() if self.config.layer_alphas is None else self.config.layer_alphas
        if len(self.alpha_finals) != len(self.layer_names):
            raise ValueError(
                f"OWMConfig.layer_alphas has {len(self.alpha_finals)} entries but the model has "
                f"{len(self.layer_names)} projected layers ({', '.join(self.layer_names)}): one per layer, in order"
            )
        self.projectors: dict[str, Tensor] = {}  # P_ℓ, float64, on the weight's device
        for name in self.layer_names:
            weight = self.model.get_submodule(name).weight
            self.projectors[name] = torch.eye(weight[0].numel(), dtype=torch.float64, device=weight.device)
        self.fraction = 0.0  # λ of the current step
        self.records: list[dict[str, Any]] = []
        self._task_stats = self._empty_stats()
        # Batch-mean layer inputs of the open step's first forward; None outside training_step.
        self._captured: dict[str, Tensor] | None = None
        self._absorbed = False  # whether the open step's inputs are already in P

    def default_alphas(self) -> tuple[float, ...]:
        """α_final per projected layer from its kind and position (see OWMConfig)."""
        config = self.config
        shared_output = task_heads(self.model) is None
        alphas: list[float] = []
        linear_seen = False
        for i, name in enumerate(self.layer_names):
            layer = self.model.get_submodule(name)
            if isinstance(layer, nn.Conv2d):
                alphas.append(config.conv_alpha)
            elif shared_output and i == len(self.layer_names) - 1:
                alphas.append(config.output_alpha)
            else:
                alphas.append(config.linear_alpha if linear_seen else config.first_linear_alpha)
                linear_seen = True
        return tuple(alphas)

    def alphas(self) -> dict[str, float]:
        """α of each projected layer at the current step's progress λ."""
        finals = zip(self.layer_names, self.alpha_finals, strict=True)
        return {name: scheduled_alpha(alpha_final, self.fraction) for name, alpha_final in finals}

    # -- hooks -----------------------------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        self.fraction = 0.0
        self._task_stats = self._empty_stats()

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        if t == 0:
            return super().task_parameters(t)
        return weights_and_head(self.model, self.layer_names, t)

    def begin_step(self, t: int, progress: StepProgress) -> None:
        self.fraction = progress.task_fraction

    def training_step(
        self,
        t: int,
        x: Tensor,
        y: Tensor,
        optimizer: Optimizer,
        check_loss: Callable[[Tensor], None],
        tasks: Tensor | None = None,
    ) -> Tensor:
        """The base step, with the projected layers' batch-mean inputs captured from its forward pass."""
        self._captured, self._absorbed = {}, False
        try:
            with self._capturing_inputs():
                loss = super().training_step(t, x, y, optimizer, check_loss, tasks)
        finally:
            self._captured = None
        self._task_stats["steps"] += 1
        return loss

    def after_backward(self, t: int) -> None:
        """Absorb the step's inputs into every P (once per step), then G ← G·P and clip."""
        self._check_active(t, "after_backward")
        if self._captured is None:
            raise RuntimeError(
                "OWM.after_backward was called outside OWM.training_step: the step's forward pass must run inside "
                "training_step, which records the layer inputs that P absorbs"
            )
        if not self._absorbed:
            self._absorb_inputs()
        stats = self._task_stats
        with torch.no_grad():
            for name in self.layer_names:
                grad = self.model.get_submodule(name).weight.grad
                if grad is None:
                    continue
                before = float(grad.norm())
                grad.copy_(project_rows(grad, self.projectors[name]))
                if before > 0:
                    stats["kept"][name] += float(grad.norm()) / before
                    stats["projections"][name] += 1
            if self.config.clip_grad_norm is not None:
                grads = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
                if grads:
                    norm = float(torch.nn.utils.clip_grad_norm_(grads, self.config.clip_grad_norm))
                    stats["clipped"] += int(norm > self.config.clip_grad_norm)
                    stats["clip_checks"] += 1

    def on_end_task(self, t: int, batches: Any) -> None:
        stats = self._task_stats
        alphas = self.alphas()
        for name, alpha_final in zip(self.layer_names, self.alpha_finals, strict=True):
            projector = self.projectors[name]
            projections = stats["projections"][name]
            self.records.append(
                {
                    "task": t,
                    "layer": name,
                    "d": projector.shape[0],
                    "alpha_final": alpha_final,
                    "alpha_last": alphas[name],
                    "updates": stats["updates"][name],
                    "free_fraction": float(torch.trace(projector)) / projector.shape[0],
                    "gradient_kept": stats["kept"][name] / projections if projections else None,
                    "steps": stats["steps"],
                    "clip_rate": stats["clipped"] / stats["clip_checks"] if stats["clip_checks"] else None,
                }
            )

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per (task, layer): d, α_final and the last α used, the rank-1 updates P absorbed in the task, tr(P)/d
        (1 = no direction protected, → 0 as the inputs fill the space), the mean ‖G·P‖/‖G‖ of the task's steps,
        and the fraction of steps whose gradient was clipped."""
        return [dict(r) for r in self.records]

    # -- internals -------------------------------------------------------------------------------------
    @contextmanager
    def _capturing_inputs(self) -> Iterator[None]:
        """Inside the block, the first forward of each projected layer stores its batch-mean input (detached)."""

        def capture(name: str, inputs: Tensor) -> None:
            if self._captured is not None and not self._absorbed and name not in self._captured:
                self._captured[name] = inputs.detach().mean(dim=0)  # (d,) or (C, H, W)

        handles = [
            self.model.get_submodule(name).register_forward_pre_hook(
                lambda layer, args, name=name: capture(name, args[0])
            )
            for name in self.layer_names
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def _absorb_inputs(self) -> None:
        assert self._captured is not None
        missing = [name for name in self.layer_names if name not in self._captured]
        if missing:
            raise RuntimeError(
                f"OWM: layers {missing} received no input in the training step's forward pass, so P cannot absorb "
                "their inputs; exclude them with OWMConfig.exclude"
            )
        alphas = self.alphas()
        for name in self.layer_names:
            rows = owm_rows(self.model.get_submodule(name), self._captured[name], self.config.conv_patch_stride)
            rls_update_(self.projectors[name], rows, alphas[name])
            self._task_stats["updates"][name] += rows.shape[0]
        self._absorbed = True

    def _empty_stats(self) -> dict[str, Any]:
        zeros = dict.fromkeys(self.layer_names, 0)
        return {
            "steps": 0,
            "clipped": 0,
            "clip_checks": 0,
            "updates": dict(zeros),
            "projections": dict(zeros),
            "kept": dict.fromkeys(self.layer_names, 0.0),
        }

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            config=asdict(self.config),
            projectors={name: p.to("cpu", copy=True) for name, p in self.projectors.items()},
            fraction=self.fraction,
            task_stats={k: dict(v) if isinstance(v, dict) else v for k, v in self._task_stats.items()},
            records=self.diagnostics(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") == self.name and state.get("config") != asdict(self.config):
            raise ValueError(f"saved OWMConfig {state.get('config')} differs from this one {asdict(self.config)}")
        super().load_state_dict(state)
        self.projectors = {
            name: p.to(self.model.get_submodule(name).weight.device, torch.float64, copy=True)
            for name, p in state["projectors"].items()
        }
        self.fraction = state["fraction"]
        self._task_stats = {
            key: dict(value) if isinstance(value, dict) else value for key, value in state["task_stats"].items()
        }
        self.records = [dict(r) for r in state["records"]]
