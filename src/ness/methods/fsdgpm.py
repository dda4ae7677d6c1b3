"""FS-DGPM: flattening sharpness for dynamic gradient projection memory (Deng et al., NeurIPS 2021), METHODS_SPEC §7.

GPM's memory M_ℓ with a soft weight λ_j ∈ (0, 1) per basis vector, learned: later tasks' weight gradients become
G − G·M diag(λ) Mᵀ, so directions with λ < 1 stay partly trainable. Each step first climbs the loss inside span(M)
(the sharpness step w̃ = w + η₁·clamp(G·M diag(λ) Mᵀ)), then descends the loss of the batch plus replayed old samples
at w̃, which flattens the loss where old tasks live and gives λ its gradient. M is rebuilt after every task from a
reservoir buffer of raw samples of all tasks so far.

Ported (METHODS_SPEC §7, §15): the official code has its own AlexNet with one running-statistics BN and a single
100-way head masked to the task's classes; here it runs on the library's networks and task-incremental protocol,
each sample through its own task's head, which gives the same argmax and loss as the masked head.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
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
    watch_layer_inputs,
    weights_and_head,
)
from ness.models import call_model
from ness.subspace import component_in_span, covariance_spectrum, energy_rank, input_covariance, layer_input_rows
from ness.validation import Rule, Validated, count, flag, number, patterns

LAMBDA_MOMENTUM = 0.9
"""Momentum of the soft weights' SGD: the official code uses the weights' momentum, 0.9 in all its scripts."""


@dataclass(frozen=True)
class FSDGPMConfig(Validated):
    """FS-DGPM settings; defaults are the official CIFAR-100 script's (METHODS_SPEC §7)."""

    memories: int = 1000
    """Replay buffer size: a reservoir over the raw samples seen in epoch 0 of every task (§7; 200 on PMNIST)."""
    mem_batch_size: int = 125
    """Random buffer samples whose layer inputs form the representations M is rebuilt from (§7; 300 on PMNIST)."""
    threshold: float = 0.97
    """ε_th at task 0, in (0, 1]: the fraction of each layer's representation energy M must reach (§7)."""
    threshold_increment: float = 0.003
    """Added to ε_th per finished task (§7): ε_th(t) = min(threshold + increment·t, threshold_last)."""
    threshold_last: float = 0.99999999999
    """Cap of the ε_th schedule (the official argparse default); ≥ 1 keeps every direction with energy."""
    eta1: float = 1e-3
    """η₁, the sharpness (ascent) step inside span(M) (§7; 0.05 on PMNIST); divided with the lr at each decay."""
    eta2: float = 1e-2
    """η₂, the soft weights' learning rate (§7); divided with the lr at each decay."""
    inner_batches: int = 2
    """Pieces the current batch is split into, one sharpness step each; the meta-losses are averaged (§7)."""
    second_order: bool = True
    """Differentiate through the sharpness steps' gradients (create_graph); the official CIFAR script does, its
    PMNIST script does not."""
    grad_clip: float = 2.0
    """Clamp of each sharpness gradient entry, and max norm of the weights' and of the soft weights' gradients (§7)."""
    tmp: float = 10.0
    """τ of λ = σ(τ·θ) (§7)."""
    lam_init: float = 1.0
    """θ at each task start, so λ starts at σ(τ·lam_init) = 0.99995 (§7); with `rewrap_lambdas`, λ itself."""
    rewrap_lambdas: bool = False
    """True reproduces the official code: λ is a raw parameter (1.0 at task start, so the first step projects as
    GPM) that is replaced after every step by a new tensor σ(τ·λ). That disconnects it from its optimiser, which
    then moves λ once per rebuild (task start, lr decays); in between λ ← σ(τλ) drives it to 0.99995 (§7). False:
    λ = σ(τ·θ) with θ trained by its own optimiser for the whole task."""
    freeze_bn: bool = False
    """True: after task 0 only the projected weights and the current head train (the official `--freeze_bn`, used on
    CIFAR-100 superclass); False, the official CIFAR setting: BatchNorm and biases keep training, helped by replay."""
    exclude: tuple[str, ...] = field(default_factory=tuple)
    """Module-name globs or class names that get no memory (they train unprojected)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "memories": count(fix="official: 1000 on CIFAR"),
        "mem_batch_size": count(fix="official: 125 on CIFAR"),
        "threshold": number(above=0, at_most=1, fix="official: 0.97 on CIFAR, 0.99 on PMNIST"),
        "threshold_increment": number(at_least=0, fix="official: 0.003 on CIFAR"),
        "threshold_last": number(above=0, fix="official: 0.99999999999"),
        "eta1": number(at_least=0, fix="official: 1e-3 on CIFAR"),
        "eta2": number(at_least=0, fix="official: 1e-2"),
        "inner_batches": count(fix="official: 2"),
        "second_order": flag(),
        "grad_clip": number(above=0, fix="official: 2.0"),
        "tmp": number(above=0, fix="official: 10"),
        "lam_init": number(fix="official: 1.0"),
        "rewrap_lambdas": flag(),
        "freeze_bn": flag(),
        "exclude": patterns(),
    }


# -- pure functions -------------------------------------------------------------------------------------------


def reach_rank(energies: Tensor, threshold: float) -> int:
    """How many directions FS-DGPM keeps, given their energies s_i² (descending): the first k whose cumulative
    energy reaches ε_th, i.e. (first index with Σ_{i≤k} s_i²/Σ s² ≥ ε_th) + 1. That is one more than GPM's first-task
    rule (`energy_rank`); ε_th ≥ 1 keeps every direction, as the official code does."""
    if energies.numel() == 0 or float(energies.sum()) <= 0:
        return 0
    return min(energy_rank(energies, threshold) + 1, energies.numel())


def reservoir_writes(seen: int, arriving: int, memories: int, generator: torch.Generator) -> dict[int, int]:
    """Reservoir sampling of `arriving` new samples after `seen` earlier ones: {buffer slot: index of the new
    sample written there} (a later write to a slot replaces an earlier one).

    The n-th sample of the stream (n = 1, 2, …) fills slot n−1 while the buffer has room; otherwise it replaces
    slot p for p uniform in [0, n) when p < memories, so the buffer stays a uniform sample of the whole stream.
    """
    draws = torch.rand(arriving, generator=generator, dtype=torch.float64).tolist()
    writes: dict[int, int] = {}
    for i, u in enumerate(draws):
        n = seen + i + 1
        slot = n - 1 if n <= memories else int(u * n)
        if slot < memories:
            writes[slot] = i
    return writes


class _Reparametrized(nn.Module):
    """Runs a closure while the wrapped model's parameters are replaced by given tensors (torch.func.functional_call
    on this wrapper), so the library's own loss code evaluates the model at the fast weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, closure: Callable[[], Tensor]) -> Tensor:
        return closure()


@register
class FSDGPM(ContinualMethod):
    """FS-DGPM on any model made of nn.Linear / nn.Conv2d layers (declared task heads get no memory).

    Port choices: replayed samples pass through their own (frozen) task heads, so old heads never change (the
    official single head lets replay train old tasks' output rows); the sharpness inner loop splits the trainer's
    already shuffled batch in order; every non-head weight with a memory is projected, BN and biases are not. The
    memory pass forwards the sampled buffer as one batch in eval mode, like the official code.
    """

    name = "fsdgpm"
    config_class = FSDGPMConfig
    distributed_ok = False
    distributed_reason = (
        "its step ascends with torch.autograd.grad on each rank's rows, fills its replay buffer from them and "
        "learns its soft weights from them"
    )

    def __init__(self, model: nn.Module, config: FSDGPMConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        self.layer_names = subspace_layers(model, self.config.exclude, type(self).__name__)
        self._wrapper = _Reparametrized(model)
        self.bases: dict[str, Tensor] = {}  # M_ℓ (d, k), float64, rebuilt after every task
        self._working_bases: dict[str, Tensor] = {}  # M_ℓ of the open task in the weight's dtype and device
        self.soft: dict[str, Tensor] = {}  # per layer with a basis: θ (λ = σ(τθ)), or λ itself with rewrap_lambdas
        self._lambda_optimizer: torch.optim.SGD | None = None
        self._lambda_fresh = False  # rewrap_lambdas: the optimiser was just (re)built and may take its one step
        # The replay buffer: raw inputs, task-local labels and task ids, and how many samples the stream has had.
        self.buffer_inputs: Tensor | None = None
        self.buffer_labels = torch.empty(0, dtype=torch.int64)
        self.buffer_tasks = torch.empty(0, dtype=torch.int64)
        self.seen = 0
        # Seeded from torch's global generator, so they follow the run seed (official: seeded np.random).
        self._reservoir = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        self._sampling = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        self._epoch = 0
        self._initial_lr: float | None = None  # the task's first lr; η₁, η₂ scale with lr / initial lr
        self._lr_ratio = 1.0
        self._steps = 0
        self.records: list[dict[str, Any]] = []

    # -- soft weights and step sizes ------------------------------------------------------------------------
    def soft_weights(self, name: str) -> Tensor:
        """λ_ℓ of the layer's basis vectors: σ(τθ), or the raw λ with rewrap_lambdas (differentiable)."""
        value = self.soft[name]
        return value if self.config.rewrap_lambdas else torch.sigmoid(self.config.tmp * value)

    def threshold(self, t: int) -> float:
        """ε_th when task t ends: min(threshold + increment·t, threshold_last)."""
        return min(self.config.threshold + self.config.threshold_increment * t, self.config.threshold_last)

    # -- hooks -------------------------------------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        device = next(self.model.parameters()).device
        self.soft = {  # θ (or λ with rewrap_lambdas) = lam_init for every basis vector
            name: torch.full((m.shape[1],), float(self.config.lam_init), device=device, requires_grad=True)
            for name, m in self.bases.items()
            if m.shape[1] > 0
        }
        self._cast_bases()
        self._lambda_optimizer = self._new_lambda_optimizer(self.config.eta2)
        self._lambda_fresh = True
        self._initial_lr, self._lr_ratio, self._epoch, self._steps = None, 1.0, 0, 0

    def _cast_bases(self) -> None:
        """The bases of the layers with soft weights in their weights' dtype and device, for the steps."""
        self._working_bases = {name: self.bases[name].to(self.model.get_submodule(name).weight) for name in self.soft}

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        if t == 0 or not self.config.freeze_bn:
            return super().task_parameters(t)
        return weights_and_head(self.model, self.layer_names, t)

    def begin_step(self, t: int, progress: StepProgress) -> None:
        self._epoch = progress.epoch

    def training_step(
        self,
        t: int,
        x: Tensor,
        y: Tensor,
        optimizer: Optimizer,
        check_loss: Callable[[Tensor], None],
        tasks: Tensor | None = None,
    ) -> Tensor:
        """One FS-DGPM step (METHODS_SPEC §7 steps 1–4) on the batch and replayed samples; returns the mean
        meta-loss. The buffer takes the batch afterwards when the step lies in the task's epoch 0."""
        self._check_active(t, "training_step")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"FS-DGPM takes its own sharpness step and needs a plain torch optimiser, got "
                f"{type(optimizer).__name__}; set sam_rho=0"
            )
        ratio = self._follow_lr(optimizer)
        eta1 = self.config.eta1 * ratio
        own_tasks = torch.full_like(y, t) if tasks is None else tasks
        bx, by, btasks = self._with_replay(x, y, own_tasks)
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        weights = {name: self.soft_weights(name) for name in self.soft}  # λ, in the graph of this step

        # Sharpness: one ascent step per piece of the current batch, each followed by the meta-loss there.
        fast = dict(params)
        meta_losses = []
        size = math.ceil(x.shape[0] / self.config.inner_batches)
        for xs, ys, ts in zip(x.split(size), y.split(size), own_tasks.split(size), strict=True):
            fast = self._ascent(fast, weights, xs, ys, ts, t, eta1)
            meta_losses.append(self._loss_at(fast, bx, by, btasks, t))
        loss = torch.stack(meta_losses).mean()
        check_loss(loss)

        optimizer.zero_grad(set_to_none=True)
        for value in self.soft.values():
            value.grad = None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), self.config.grad_clip)
        if self.soft:
            self._lambda_step(ratio)
        self.after_backward(t)
        optimizer.step()
        self.after_step(t)
        self._steps += 1
        if self._epoch == 0:
            self._push(x, y, own_tasks)
        return loss.detach()

    def after_backward(self, t: int) -> None:
        """G ← G − G·M diag(λ) Mᵀ on every weight with a basis, with the current soft weights."""
        with torch.no_grad():
            for name in self.soft:
                grad = self.model.get_submodule(name).weight.grad
                if grad is None:
                    continue
                flat = grad.reshape(grad.shape[0], -1)
                projected = component_in_span(flat, self._working_bases[name], self.soft_weights(name).to(flat))
                grad.copy_((flat - projected).view_as(grad))

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        """Rebuild M from scratch from `mem_batch_size` random buffer samples (`batches` is not used)."""
        if self.buffer_inputs is None or self.buffer_labels.numel() == 0:
            raise ValueError(
                f"end_task({t}): FS-DGPM's replay buffer is empty; it is filled by training_step in each task's "
                "epoch 0, so train the task with the trainer (or training_step) before ending it"
            )
        lambdas = {name: self.soft_weights(name).detach().cpu() for name in self.soft}
        chosen = torch.randperm(self.buffer_labels.numel(), generator=self._sampling)[: self.config.mem_batch_size]
        covariances, rows = self._representations(self.buffer_inputs[chosen.to(self.buffer_inputs.device)], t)
        threshold = self.threshold(t)
        per_task = torch.bincount(self.buffer_tasks, minlength=t + 1).tolist()
        self.bases = {}
        for name in self.layer_names:
            if name not in covariances:
                raise RuntimeError(f"end_task({t}): layer '{name}' received no input in the forward pass")
            cov = covariances[name]
            spectrum = covariance_spectrum(cov, name)
            energies = spectrum.eigenvalues.flip(0)  # s_i², descending
            total = float(energies.sum())
            significant = int((energies > cov.shape[0] * torch.finfo(torch.float64).eps * total).sum())
            k = reach_rank(energies[:significant], threshold)
            self.bases[name] = spectrum.eigenvectors.flip(1)[:, :k]
            used = lambdas.get(name)
            self.records.append(
                {
                    "task": t,
                    "layer": name,
                    "d": cov.shape[0],
                    "threshold": threshold,
                    "samples": chosen.numel(),
                    "rows": rows[name],
                    "basis_size": k,
                    "energy_captured": float(energies[:k].sum()) / total if total > 0 else math.nan,
                    "lambda_min": float(used.min()) if used is not None else math.nan,
                    "lambda_mean": float(used.mean()) if used is not None else math.nan,
                    "lambda_max": float(used.max()) if used is not None else math.nan,
                    "buffer_size": self.buffer_labels.numel(),
                    "buffer_per_task": per_task,
                    "steps": self._steps,
                    "final_eta1": self.config.eta1 * self._lr_ratio,
                }
            )
        self.soft, self._working_bases, self._lambda_optimizer = {}, {}, None

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per (task, layer): d, ε_th, the buffer samples and rows of the representation, the rebuilt basis size k
        and the energy fraction it keeps; the soft weights λ the task trained with over the previous basis (min,
        mean, max; NaN at task 0); the buffer's size and count per task; steps and the last η₁. Protocol: ported,
        each sample through its own task's head (equivalent to the official masked 100-way head)."""
        return [dict(r) for r in self.records]

    # -- internals ---------------------------------------------------------------------------------------------
    def _follow_lr(self, optimizer: torch.optim.Optimizer) -> float:
        """lr / the task's first lr; with rewrap_lambdas a change of it is the official optimiser rebuild."""
        lr = float(optimizer.param_groups[0]["lr"])
        if self._initial_lr is None:
            self._initial_lr = lr
        ratio = lr / self._initial_lr
        if ratio != self._lr_ratio and self.config.rewrap_lambdas and self.soft:
            self._lambda_optimizer = self._new_lambda_optimizer(self.config.eta2 * ratio)
            self._lambda_fresh = True
        self._lr_ratio = ratio
        return ratio

    def _new_lambda_optimizer(self, lr: float) -> torch.optim.SGD | None:
        if not self.soft:
            return None
        return torch.optim.SGD(list(self.soft.values()), lr=lr, momentum=LAMBDA_MOMENTUM)

    def _lambda_step(self, ratio: float) -> None:
        """Clip the soft weights' gradient norm and take their SGD step (a descent step on the meta-loss)."""
        assert self._lambda_optimizer is not None
        values = list(self.soft.values())
        torch.nn.utils.clip_grad_norm_(values, self.config.grad_clip)
        if not self.config.rewrap_lambdas:
            for group in self._lambda_optimizer.param_groups:
                group["lr"] = self.config.eta2 * ratio
            self._lambda_optimizer.step()
            return
        if self._lambda_fresh:  # the one step the official optimiser takes before its parameters are replaced
            self._lambda_optimizer.step()
            self._lambda_fresh = False
        with torch.no_grad():
            for value in values:
                value.copy_(torch.sigmoid(self.config.tmp * value))

    def _loss_at(self, fast: dict[str, Tensor], x: Tensor, y: Tensor, tasks: Tensor, t: int) -> Tensor:
        """The count-weighted mean cross-entropy at the fast weights, each row through its own task's head."""
        prefixed = {f"model.{name}": value for name, value in fast.items()}

        def loss() -> Tensor:
            return self.training_loss(t, x, y, tasks)

        return torch.func.functional_call(self._wrapper, prefixed, (loss,))

    def _ascent(
        self,
        fast: dict[str, Tensor],
        weights: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        tasks: Tensor,
        t: int,
        eta1: float,
    ) -> dict[str, Tensor]:
        """w̃ ← w̃ + η₁·clamp(g), g the loss gradient at w̃ with the weights of layers with a basis replaced by
        their soft projection onto span(M), g·M diag(λ) Mᵀ (heads, BN and biases unprojected)."""
        loss = self._loss_at(fast, x, y, tasks, t)
        second = self.config.second_order
        grads = torch.autograd.grad(
            loss, list(fast.values()), create_graph=second, retain_graph=second, allow_unused=True
        )
        stepped = {}
        for (name, value), grad in zip(fast.items(), grads, strict=True):
            if grad is None:
                stepped[name] = value
                continue
            layer = name.removesuffix(".weight")
            if name.endswith(".weight") and layer in weights:
                flat = grad.reshape(grad.shape[0], -1)
                grad = component_in_span(flat, self._working_bases[layer], weights[layer]).view_as(grad)
            clip = self.config.grad_clip
            stepped[name] = value + eta1 * grad.clamp(-clip, clip)
        return stepped

    def _with_replay(self, x: Tensor, y: Tensor, tasks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The batch plus up to |batch| buffer samples drawn without replacement, each with its task id."""
        if self.buffer_inputs is None:
            return x, y, tasks
        chosen = torch.randperm(self.buffer_labels.numel(), generator=self._sampling)[: x.shape[0]]
        device = x.device
        return (
            torch.cat([x, self.buffer_inputs[chosen.to(self.buffer_inputs.device)].to(device, x.dtype)]),
            torch.cat([y, self.buffer_labels[chosen].to(device, y.dtype)]),
            torch.cat([tasks, self.buffer_tasks[chosen].to(device, tasks.dtype)]),
        )

    def _push(self, x: Tensor, y: Tensor, tasks: Tensor) -> None:
        """Offer the batch to the reservoir buffer."""
        writes = reservoir_writes(self.seen, x.shape[0], self.config.memories, self._reservoir)
        self.seen += x.shape[0]
        size = min(self.seen, self.config.memories)
        if self.buffer_inputs is None:
            self.buffer_inputs = x.new_zeros((0, *x.shape[1:]))
        grow = size - self.buffer_labels.numel()
        if grow > 0:
            self.buffer_inputs = torch.cat([self.buffer_inputs, self.buffer_inputs.new_zeros((grow, *x.shape[1:]))])
            self.buffer_labels = torch.cat([self.buffer_labels, torch.zeros(grow, dtype=torch.int64)])
            self.buffer_tasks = torch.cat([self.buffer_tasks, torch.zeros(grow, dtype=torch.int64)])
        if not writes:
            return
        slots = torch.tensor(list(writes.keys()))
        rows = torch.tensor(list(writes.values()))
        self.buffer_inputs[slots.to(self.buffer_inputs.device)] = x.detach()[rows.to(x.device)].to(self.buffer_inputs)
        self.buffer_labels[slots] = y.detach()[rows.to(y.device)].cpu()
        self.buffer_tasks[slots] = tasks.detach()[rows.to(tasks.device)].cpu()

    @torch.no_grad()
    def _representations(self, x: Tensor, t: int) -> tuple[dict[str, Tensor], dict[str, int]]:
        """One eval-mode forward pass of the samples as one batch: per layer, RRᵀ over its layer-input rows (im2col
        patches at the layer's own stride and padding for convolutions) and the number of rows."""
        covariances: dict[str, Tensor] = {}
        rows: dict[str, int] = {}

        def receive(name: str, layer: nn.Module, inputs: Tensor) -> None:
            r = layer_input_rows(layer, inputs)  # (n, d)
            covariances[name] = covariances[name] + input_covariance(r) if name in covariances else input_covariance(r)
            rows[name] = rows.get(name, 0) + r.shape[0]

        device = next(self.model.parameters()).device
        with watch_layer_inputs(self.model, self.layer_names, receive):
            self.forward(self.model, x.to(device), t)  # every head sees the same features; the logits are unused
        return covariances, rows

    # -- saving ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            config=asdict(self.config),
            records=self.diagnostics(),
            bases={name: m.to("cpu", copy=True) for name, m in self.bases.items()},
            soft={name: v.detach().to("cpu", copy=True) for name, v in self.soft.items()},
            lambda_optimizer=None
            if self._lambda_optimizer is None
            else copy.deepcopy(self._lambda_optimizer.state_dict()),
            lambda_fresh=self._lambda_fresh,
            buffer={
                "inputs": None if self.buffer_inputs is None else self.buffer_inputs.to("cpu", copy=True),
                "labels": self.buffer_labels.clone(),
                "tasks": self.buffer_tasks.clone(),
                "seen": self.seen,
            },
            generators=(self._reservoir.get_state(), self._sampling.get_state()),
            progress=(self._epoch, self._initial_lr, self._lr_ratio, self._steps),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") == self.name and state.get("config") != asdict(self.config):
            raise ValueError(f"saved FSDGPMConfig {state.get('config')} differs from this one {asdict(self.config)}")
        super().load_state_dict(state)
        device = next(self.model.parameters()).device
        self.records = [dict(r) for r in state["records"]]
        self.bases = {name: m.to(device) for name, m in state["bases"].items()}
        self.soft = {name: v.to(device).requires_grad_(True) for name, v in state["soft"].items()}
        self._cast_bases()
        self._lambda_optimizer = self._new_lambda_optimizer(self.config.eta2)
        if self._lambda_optimizer is not None and state["lambda_optimizer"] is not None:
            self._lambda_optimizer.load_state_dict(state["lambda_optimizer"])
        self._lambda_fresh = state["lambda_fresh"]
        buffer = state["buffer"]
        self.buffer_inputs = None if buffer["inputs"] is None else buffer["inputs"].to(device)
        self.buffer_labels, self.buffer_tasks, self.seen = buffer["labels"], buffer["tasks"], buffer["seen"]
        self._reservoir.set_state(state["generators"][0])
        self._sampling.set_state(state["generators"][1])
        self._epoch, self._initial_lr, self._lr_ratio, self._steps = state["progress"]
