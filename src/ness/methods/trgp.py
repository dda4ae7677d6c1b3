"""TRGP: Trust Region Gradient Projection (Lin, Yang, Fan & Zhang, ICLR 2022), METHODS_SPEC §5.

GPM's projection, plus layer-wise knowledge transfer from the most related earlier tasks. Each finished task t keeps
its own input space Q_{t,ℓ} (the columns of [M, Û] that carry ε_th of its representation energy, §5.1). Before a new
task, the gradient g of its loss picks, per layer, the top-k earlier tasks by ‖g Q Qᵀ‖; those in "regime 2"
(‖g Q Qᵀ‖ > ε₁‖g‖) form its trust region. The task then trains, besides the GPM-projected W, a scale matrix Λ_s per
trusted space through the scaled weight projection W_eff = W + Σ_s W(Q_s Λ_s Q_sᵀ − Q_s Q_sᵀ) (§5.2); each task
keeps its scales and is evaluated with them on the current W.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ness.methods.base import Forward, labelled_batches, register
from ness.methods.gpm import GPM, GPMConfig, draw_samples
from ness.models import call_model
from ness.subspace import (
    MemoryUpdate,
    captured_energy,
    covariance_spectrum,
    grow_basis,
    residual_covariance,
)
from ness.validation import Rule, count, flag, number

SCALES = "trust_region_scales"
"""Name of the nn.ParameterList each TRGP layer holds its open task's Λ_s in (inside the model, so a restored
best-validation state_dict restores them with W, as in the official code)."""


@dataclass(frozen=True)
class TRGPConfig(GPMConfig):
    """TRGP settings: GPM's memory options (ε_th schedule, samples), plus the trust region's; defaults are the
    official CIFAR-100 script's (METHODS_SPEC §5.3). The flags below default to the fixed behaviour; True reproduces
    the official scripts."""

    regime_threshold: float = 0.5
    """ε₁ in [0, 1]: an earlier task is in regime 2 for a layer when ‖g Q Qᵀ‖ > ε₁·‖g‖ (§5.2; 0.5 in the CIFAR,
    5-datasets and miniImageNet scripts, 0.2 in the official Permuted MNIST script)."""
    top_k: int = 2
    """How many earlier tasks per layer are ranked into the trust region by ‖g Q Qᵀ‖ (§5.2: 2)."""
    gradient_samples: int = 125
    """Random training samples of the new task whose loss gradient decides the regimes (§5.3: 125 CIFAR, 500
    5-datasets/miniImageNet, 300 Permuted MNIST)."""
    latest_task_only_at_t2: bool = False
    """True: task 2 trusts only task 1, the most recent (the official Permuted MNIST, 5-datasets and miniImageNet
    scripts); False ranks tasks 0 and 1 by projection norm (the CIFAR script). Task 1 always trusts task 0."""
    memory_off_by_one: bool = False
    """True reproduces the official memory update, which appends the selected residual vectors with index > r_old
    instead of ≥ r_old, so the top residual vector Û[:, 0] can be in the task's space Q_t but never joins the
    global memory M (§5.1)."""
    train_batchnorm: bool = False
    """True: BatchNorm affine parameters keep training after task 0 (the official AlexNet/CIFAR script, whose
    `k<1` condition never zeroes them, §5.2); False freezes them as GPM and the official ResNet scripts do."""
    scales_need_first_layer: bool = False
    """True: no layer uses its scales unless the first layer has a trust region (the official forward passes
    space1/space2 only when space1[0] or space2[0] is set, §5.2); False: each layer uses its own."""
    scale_shortcuts: bool = True
    """False: 1×1 convolutions (the ResNet shortcuts) never use scales, as in the official ResNet, which calls
    them without spaces (§5.2, §12b); they are projected either way."""

    RULES: ClassVar[dict[str, Rule]] = {
        **GPMConfig.RULES,
        "regime_threshold": number(
            at_least=0, at_most=1, fix="ε₁, the largest ‖g Q Qᵀ‖/‖g‖ of regime 1; TRGP uses 0.5, 0.2 on Permuted MNIST"
        ),
        "top_k": count(fix="TRGP uses 2"),
        "gradient_samples": count(fix="TRGP uses 125 on CIFAR-100, 500 on 5-datasets and miniImageNet"),
        "latest_task_only_at_t2": flag(),
        "memory_off_by_one": flag(),
        "train_batchnorm": flag(),
        "scales_need_first_layer": flag(),
        "scale_shortcuts": flag(),
    }


# -- the maths, as pure functions ------------------------------------------------------------------------------


def scaled_weight(weight: Tensor, spaces: Sequence[Tensor], scales: Sequence[Tensor]) -> Tensor:
    """W_eff = W + Σ_s W(Q_s Λ_s Q_sᵀ − Q_s Q_sᵀ) = W + Σ_s (W Q_s)(Λ_s − I) Q_sᵀ, W viewed (o, d), Q_s (d, r_s),
    Λ_s (r_s, r_s). With every Λ_s = I the sum is exactly zero and W_eff is W."""
    w = weight.reshape(weight.shape[0], -1)  # (o, d)
    effective = w
    for q, scale in zip(spaces, scales, strict=True):
        eye = torch.eye(scale.shape[0], dtype=scale.dtype, device=scale.device)
        effective = effective + (w @ q) @ (scale - eye) @ q.T
    return effective.view_as(weight)


def projection_norms(grad: Tensor, spaces: Sequence[Tensor]) -> list[float]:
    """‖g Q_j Q_jᵀ‖_F for each space (g viewed (o, d)); equal to ‖g Q_j‖_F since Q_j has orthonormal columns."""
    g = grad.reshape(grad.shape[0], -1)
    return [float(torch.linalg.matrix_norm(g @ q.to(g))) for q in spaces]


def regimes(norms: Sequence[float], grad_norm: float, eps1: float) -> list[int]:
    """Regime 1 where ‖g Q Qᵀ‖ ≤ ε₁‖g‖ (the earlier task's space hardly meets the new gradient), else regime 2."""
    return [1 if n <= eps1 * grad_norm else 2 for n in norms]


def select_tasks(norms: Sequence[float], top_k: int, latest_only_at_t2: bool = False) -> tuple[int, ...]:
    """The earlier tasks a layer ranks into its trust region, highest ‖g Q Qᵀ‖ first (ties: the earlier task).

    One earlier task: (0,). Two, with `latest_only_at_t2`: (1,), as the official 5-datasets/miniImageNet/PMNIST
    scripts. Otherwise the top_k by norm."""
    t = len(norms)
    if t == 2 and latest_only_at_t2:
        return (1,)
    return tuple(sorted(range(t), key=lambda j: (-norms[j], j))[:top_k])


@dataclass(frozen=True)
class TaskSpace:
    """One layer's TRGP memory update after a task (METHODS_SPEC §5.1)."""

    space: Tensor  # Q_{t,ℓ} (d, r_t): the selected columns of [M_old, Û], largest energy first
    memory: MemoryUpdate  # the global memory M grown by the selected residual vectors
    reused: int  # columns of Q_{t,ℓ} taken from the old M


def select_task_space(
    basis: Tensor | None, covariance: Tensor, threshold: float, name: str = "layer", off_by_one: bool = False
) -> TaskSpace:
    """TRGP's per-layer memory update from the task's representation covariance C = RRᵀ.

    Task 0 (`basis` None): GPM's first-task bases, which are also Q_0. Later: the energies δ_j = m_jᵀ C m_j of the
    old bases and the squared singular values σ̂_i of the residual R̂ = R − MMᵀR (eigenvalues of its covariance)
    are sorted together, and entries are taken while their sum is below ε_th·‖R‖²_F (so the one that reaches it is
    included), at most d. Q_t is the selected columns of [M, Û]; M grows by the selected residual vectors. As in
    `grow_basis`, residual directions with round-off energy are never candidates (they would duplicate span(M));
    the new vectors are then orthogonal to M, so M never exceeds d columns. `off_by_one` is the official index bug.
    """
    if basis is None:
        first = grow_basis(None, covariance, threshold, name)
        return TaskSpace(first.basis, first, 0)
    cov = covariance.to(torch.float64)
    d = cov.shape[0]
    total = float(torch.trace(cov))
    old = basis.to(cov)
    k = old.shape[1]
    delta = ((cov @ old) * old).sum(dim=0)  # δ_j = m_jᵀ C m_j, the energy of R along each old basis
    spectrum = covariance_spectrum(residual_covariance(cov, old), name)
    sigma = spectrum.eigenvalues.flip(0)  # σ̂_i², descending
    significant = int((sigma > d * torch.finfo(torch.float64).eps * total).sum())
    candidates = torch.cat([old, spectrum.eigenvectors.flip(1)[:, :significant]], dim=1)  # [M, Û]
    energies, order = torch.cat([delta, sigma[:significant]]).sort(descending=True, stable=True)
    taken, accumulated = 0, 0.0
    for energy in energies.tolist():  # the official loop: take while below the target, r ≤ d
        if accumulated >= threshold * total or taken == d:
            break
        accumulated += energy
        taken += 1
    selected = order[:taken]
    new = selected[selected > k] if off_by_one else selected[selected >= k]
    grown = torch.cat([old, candidates[:, new]], dim=1)
    update = MemoryUpdate(grown, new.numel(), captured_energy(cov, old), captured_energy(cov, grown))
    return TaskSpace(candidates[:, selected], update, int((selected < k).sum()))


def draw_labelled_samples(
    batches: Iterable[Any], k: int, generator: torch.Generator, where: str
) -> tuple[Tensor, Tensor]:
    """k (input, label) pairs drawn uniformly without replacement: GPM's `draw_samples` on the inputs with the label
    appended as one more float64 feature (exact for any realistic label)."""
    like: list[Tensor] = []  # one input row, for the inputs' shape and dtype

    def packed() -> Iterable[Tensor]:
        for x, y in labelled_batches(batches, where):
            like[:] = [x[0]]
            yield torch.cat([x.reshape(x.shape[0], -1).double(), y[:, None].to(x.device, torch.float64)], dim=1)

    pool = draw_samples(packed(), k, generator)
    return pool[:, :-1].reshape(-1, *like[0].shape).to(like[0].dtype), pool[:, -1].round().long()


class _ModelCall(nn.Module):
    """`forward(model, x, t)` as a module holding the model, so `functional_call` can swap its weights by name."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self.call = forward

    def forward(self, x: Tensor, t: int) -> Tensor:
        return self.call(self.model, x, t)


@register
class TRGP(GPM):
    """TRGP on any model made of nn.Linear / nn.Conv2d layers (declared task heads are neither projected nor scaled).

    The model's weights stay plain nn.Parameters trained and projected exactly as in GPM; W_eff is applied only in
    `predict` (through torch.func.functional_call), so the representations for the memory and the regime gradient
    use plain W, as in the official code. Each layer holds its open task's Λ_s as r_s×r_s parameters (the official
    code keeps d×d tensors of which only this top-left block is used), reset to the identity every task; a finished
    task keeps a copy. Where it differs from the official scripts: see the config flags; the regime gradient is
    taken in eval mode (the official scripts take it right after evaluating, so in eval mode) in one batch.
    Weight decay would pull Λ_s towards 0, not I: the protocol uses none.
    """

    name = "trgp"
    config_class = TRGPConfig
    distributed_ok = True
    input_side_projection: ClassVar[bool] = False  # W reaches the loss through W_eff: G is projected after backward

    def __init__(self, model: nn.Module, config: TRGPConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        for name in self.layer_names:
            layer = self.model.get_submodule(name)
            if hasattr(layer, SCALES):
                raise ValueError(f"layer '{name}' already has '{SCALES}': the model is used by another TRGP")
            layer.register_module(SCALES, nn.ParameterList())
        self._model_call = _ModelCall(model, forward)
        self.task_spaces: list[dict[str, Tensor]] = []  # Q_{t,ℓ} per finished task, in the weights' dtype
        self.task_regions: list[dict[str, tuple[int, ...]]] = []  # per finished task: layer → trusted task ids
        self.task_scales: list[dict[str, list[Tensor]]] = []  # per finished task: layer → its Λ_s
        self.region: dict[str, tuple[int, ...]] | None = None  # the open task's trust regions (None: not previewed)
        self._trust: dict[str, dict[str, Any]] = {}  # the open task's regime records per layer

    # -- hooks -----------------------------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        super().on_begin_task(t)
        self.region = {} if t == 0 else None
        self._trust = {}

    def preview_task(self, t: int, batches: Iterable[Any]) -> None:
        """Choose task t's trust regions from its loss gradient on `gradient_samples` training samples (§5.2)."""
        self._check_active(t, "preview_task")
        if t == 0:
            return
        x, y = draw_labelled_samples(batches, self.config.gradient_samples, self._generator, f"preview_task({t})")
        grads = self._weight_gradients(x, y, t)
        region: dict[str, tuple[int, ...]] = {}
        for name in self.layer_names:
            spaces = [self.task_spaces[j][name] for j in range(t)]
            norms = projection_norms(grads[name], spaces)
            grad_norm = float(torch.linalg.vector_norm(grads[name]))
            regime = regimes(norms, grad_norm, self.config.regime_threshold)
            ranked = select_tasks(norms, self.config.top_k, self.config.latest_task_only_at_t2)
            region[name] = tuple(j for j in ranked if regime[j] == 2 and spaces[j].shape[1] > 0)
            if not self.config.scale_shortcuts and self._is_shortcut(name):
                region[name] = ()
            self._trust[name] = {
                "projection_ratios": [n / grad_norm if grad_norm > 0 else 0.0 for n in norms],
                "regimes": regime,
                "ranked_tasks": list(ranked),
            }
        if self.config.scales_need_first_layer and not region[self.layer_names[0]]:
            region = {name: () for name in region}
        self._open(region)

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        params = super().task_parameters(t)
        if t == 0:
            return params
        if self.region is None:
            raise RuntimeError(
                f"TRGP: call preview_task({t}, batches) with the task's training data before training task {t}: "
                "its trust regions come from the task's loss gradient"
            )
        scales = [p for name in self.layer_names for p in self._scales(name)]
        if not self.config.train_batchnorm:
            return params + scales
        batchnorms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        affine = [p for m in self.model.modules() if isinstance(m, batchnorms) for p in m.parameters()]
        return params + scales + affine

    def predict(self, x: Tensor, t: int) -> Tensor:
        """Task t's logits with W_eff from its trust regions and scales (the live ones while t trains, its stored
        ones once finished) on the current W; plain W where it has none."""
        if t == self.active_task:
            region = self.region or {}
            scales = {name: list(self._scales(name)) for name in region}
        elif t < len(self.task_regions):
            region, scales = self.task_regions[t], self.task_scales[t]
        else:
            region, scales = {}, {}
        weights = {
            f"model.{name}.weight": scaled_weight(
                self.model.get_submodule(name).weight, [self.task_spaces[j][name] for j in ids], scales[name]
            )
            for name, ids in region.items()
            if ids
        }
        if not weights:
            return self.forward(self.model, x, t)
        return functional_call(self._model_call, weights, (x, t))

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        """Keep task t's trust regions and scales, then grow the memory from plain-W representations."""
        region = self.region or {}
        self.task_regions.append(dict(region))
        self.task_scales.append({name: [p.detach().clone() for p in self._scales(name)] for name in region})
        self.task_spaces.append({})
        super().on_end_task(t, batches)  # its representation pass calls the model directly: plain W
        self._open({})

    # -- GPM's memory hooks, with TRGP's selection rule ------------------------------------------------------
    def update_memory(self, name: str, covariance: Tensor, threshold: float) -> MemoryUpdate:
        update = select_task_space(
            self.bases.get(name), covariance, threshold, name, off_by_one=self.config.memory_off_by_one
        )
        self.bases[name] = update.memory.basis
        weight = self.model.get_submodule(name).weight
        self.task_spaces[-1][name] = update.space.to(weight.device, weight.dtype)
        self._trust.setdefault(name, {}).update(
            task_space_size=update.space.shape[1],
            task_space_reused=update.reused,
            task_space_energy=captured_energy(covariance.to(torch.float64), update.space),
        )
        return update.memory

    def memory_record(self, name: str) -> dict[str, Any]:
        """The task's own space Q_t, its regimes (ratios ‖gQQᵀ‖/‖g‖ per earlier task), the ranked and trusted
        (scaled) tasks and how far each Λ_s moved from I (‖Λ − I‖_F)."""
        t = self.active_task
        assert t is not None
        trusted = self.task_regions[t].get(name, ())
        record = {"projection_ratios": [], "regimes": [], "ranked_tasks": [], **self._trust.get(name, {})}
        eye_distance = [
            float(torch.linalg.matrix_norm(s - torch.eye(s.shape[0], dtype=s.dtype, device=s.device)))
            for s in self.task_scales[t].get(name, [])
        ]
        return {**record, "trusted_tasks": list(trusted), "scale_change": eye_distance}

    # -- internals -------------------------------------------------------------------------------------
    def _scales(self, name: str) -> nn.ParameterList:
        return getattr(self.model.get_submodule(name), SCALES)

    def _is_shortcut(self, name: str) -> bool:
        layer = self.model.get_submodule(name)
        return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)

    def _open(self, region: dict[str, tuple[int, ...]]) -> None:
        """Make `region` the open task's trust regions, each trusted space with a fresh Λ_s = I."""
        self.region = region
        for name in self.layer_names:
            ids = region.get(name, ())
            weight = self.model.get_submodule(name).weight
            eye = [torch.eye(self.task_spaces[j][name].shape[1], dtype=weight.dtype, device=weight.device) for j in ids]
            setattr(self.model.get_submodule(name), SCALES, nn.ParameterList(nn.Parameter(e) for e in eye))

    def _weight_gradients(self, x: Tensor, y: Tensor, t: int) -> dict[str, Tensor]:
        """∂L/∂W per layer for task t's cross-entropy on (x, y) as one batch, plain W, eval mode; .grad untouched."""
        weights = [self.model.get_submodule(name).weight for name in self.layer_names]
        flags = [w.requires_grad for w in weights]
        was_training = self.model.training
        device = weights[0].device
        self.model.eval()
        try:
            for w in weights:
                w.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(self.forward(self.model, x.to(device), t), y.to(device))
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
        finally:
            for w, flag in zip(weights, flags, strict=True):
                w.requires_grad_(flag)
            self.model.train(was_training)
        return {
            name: torch.zeros_like(w) if g is None else g
            for name, w, g in zip(self.layer_names, weights, grads, strict=True)
        }

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["trust_regions"] = {
            "task_spaces": [{n: q.to("cpu", copy=True) for n, q in spaces.items()} for spaces in self.task_spaces],
            "task_regions": [{n: list(ids) for n, ids in r.items()} for r in self.task_regions],
            "task_scales": [{n: [s.to("cpu", copy=True) for s in v] for n, v in sc.items()} for sc in self.task_scales],
            "region": None if self.region is None else {n: list(ids) for n, ids in self.region.items()},
            "trust": {n: dict(r) for n, r in self._trust.items()},
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") == self.name and state.get("config") == asdict(self.config):
            # The open task's Λ_s are model parameters whose shapes follow its trust regions: create them (as I)
            # before the model's state fills in their values.
            saved = state["trust_regions"]
            device = next(self.model.parameters()).device
            self.task_spaces = [{n: q.to(device) for n, q in spaces.items()} for spaces in saved["task_spaces"]]
            self.task_regions = [{n: tuple(ids) for n, ids in r.items()} for r in saved["task_regions"]]
            self.task_scales = [{n: [s.to(device) for s in v] for n, v in sc.items()} for sc in saved["task_scales"]]
            self._open({n: tuple(ids) for n, ids in (saved["region"] or {}).items()})
            if saved["region"] is None:
                self.region = None
            self._trust = {n: dict(r) for n, r in saved["trust"].items()}
        super().load_state_dict(state)
