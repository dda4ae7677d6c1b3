"""EWC: elastic weight consolidation (Kirkpatrick et al., PNAS 2017), as the HAT repository implements it.

That implementation (METHODS_SPEC §11) is the one the GPM-era papers, and so the NESS paper's table, use:
loss_t = CE + λ/2·Σᵢ Fᵢ(θᵢ − θ*ᵢ)² over every parameter (BatchNorm and heads included, §12b), with θ* the
weights after the last task, F an empirical diagonal Fisher averaged over the tasks, and the gradient norm
clipped at 100.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.methods.base import ContinualMethod, Forward, buffers_kept, labelled_batches, register
from ness.models import call_model
from ness.validation import Rule, Validated, count, number, optional


@dataclass(frozen=True)
class EWCConfig(Validated):
    """EWC settings; the defaults are the official code's (METHODS_SPEC §11)."""

    lam: float = 5000.0
    """λ, the weight of the quadratic penalty (0: plain fine-tuning with gradient clipping)."""
    fisher_batch_size: int = 20
    """Examples per minibatch of the Fisher pass; each squared batch-mean gradient counts this many times."""
    clip_grad_norm: float | None = 100.0
    """Clip the norm of the whole gradient (CE + penalty) to this value before each step; None: no clipping."""

    RULES: ClassVar[dict[str, Rule]] = {
        "lam": number(at_least=0, fix="a negative λ rewards forgetting; the paper uses 5000"),
        "fisher_batch_size": count(fix="official: 20"),
        "clip_grad_norm": optional(number(above=0, fix="the official code clips at 100"), "for no clipping"),
    }


def rechunk(batches: Iterable[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive (x, y) chunks of exactly `size` examples in stream order; the last one may be smaller."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    held = 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        held += y.shape[0]
        while held >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, held = [x_all[size:]], [y_all[size:]], held - size
    if held:
        yield torch.cat(xs), torch.cat(ys)


@register
class EWC(ContinualMethod):
    """EWC with the penalty's gradient added in `after_backward`.

    It trains what the base class trains: everything but the other tasks' heads, which would move in the official
    code neither (no CE gradient reaches them, and at θ* the penalty's gradient is 0).
    """

    name = "ewc"
    config_class = EWCConfig
    distributed_ok = True

    def __init__(self, model: nn.Module, config: EWCConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        self.fisher: dict[str, Tensor] = {}  # merged diagonal Fisher of the finished tasks, by parameter name
        self.anchor: dict[str, Tensor] = {}  # θ*: the parameters at the end of the last finished task
        self.records: list[dict[str, Any]] = []

    # -- the loss ----------------------------------------------------------------------------------------
    def penalty(self) -> Tensor:
        """λ/2·Σᵢ Fᵢ(θᵢ − θ*ᵢ)² over all parameters at the current weights (0 before the first task ends)."""
        total = torch.zeros((), device=next(self.model.parameters()).device)
        for name, p in self.model.named_parameters():
            if name in self.fisher:
                total = total + (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
        return self.config.lam / 2 * total

    def after_backward(self, t: int) -> None:
        """Add λ·F⊙(θ − θ*) to each trainable parameter's gradient, then clip the total gradient norm.

        λ·F⊙(θ − θ*) is the gradient of the penalty λ/2·Σ F(θ − θ*)², so the sum is the gradient of CE + penalty,
        what the official code obtains by back-propagating the penalised loss.
        """
        self._check_active(t, "after_backward")
        params = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if self.fisher and self.config.lam > 0:
            with torch.no_grad():
                for name, p in params:
                    extra = self.config.lam * self.fisher[name] * (p - self.anchor[name])
                    if p.grad is None:  # the CE loss did not reach p; the penalty still pulls it back
                        p.grad = extra
                    else:
                        p.grad.add_(extra)
        if self.config.clip_grad_norm is not None:
            grads = [p for _, p in params if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.config.clip_grad_norm)

    # -- the end of a task ---------------------------------------------------------------------------------
    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        """Merge task t's Fisher into F, F ← (F_t + t·F)/(t + 1), and move θ* to the current weights."""
        with torch.no_grad():
            penalty = float(self.penalty())  # how far task t's training moved from θ*, weighted by the old F
        fisher, samples = self.task_fisher(t, batches)
        with torch.no_grad():
            self.anchor = {name: p.detach().clone() for name, p in self.model.named_parameters()}
            # F is the average of the tasks' Fishers: task t's weighs 1/(t + 1), the earlier merged one t/(t + 1).
            self.fisher = {
                name: (f + t * self.fisher[name]) / (t + 1) if self.fisher else f for name, f in fisher.items()
            }
        self.records.append(
            {
                "task": t,
                "penalty": penalty,
                "fisher_samples": samples,
                "fisher": {name: {"mean": float(f.mean()), "max": float(f.max())} for name, f in self.fisher.items()},
            }
        )

    def task_fisher(self, t: int, batches: Iterable[Any]) -> tuple[dict[str, Tensor], int]:
        """Task t's empirical diagonal Fisher over `batches` and the number of examples N (METHODS_SPEC §11).

        In train mode (dropout on, as the official code), the data is cut into consecutive chunks of
        `fisher_batch_size`; each adds fisher_batch_size·g² with g the gradient of the chunk's mean cross-entropy
        through task t's own head (the official constant, also for a smaller last chunk); the sum is divided by N.
        This is the batch-mean gradient squared, not the mean of per-example squares. The official loop cuts the
        training set, in its stored order, into contiguous chunks of 20; re-chunking the trainer's batches, which
        cover the split in dataset order, gives the same chunks, the only difference being the dropout masks drawn.
        The official loss also holds the EWC penalty, whose gradient is 0 here because θ* is the current θ.
        Every parameter gets its Fisher, whatever its requires_grad; the model's mode, requires_grad flags and
        buffers are restored and its gradients cleared afterwards.
        """
        where = f"end_task({t})"
        size = self.config.fisher_batch_size
        named = list(self.model.named_parameters())
        params = [p for _, p in named]
        flags = [p.requires_grad for p in params]
        sums = {name: torch.zeros_like(p) for name, p in named}
        samples = 0
        was_training = self.model.training
        device = params[0].device
        try:
            for p in params:
                p.requires_grad_(True)
            self.model.train()
            with torch.enable_grad(), buffers_kept(self.model):
                for x, y in rechunk(labelled_batches(batches, where), size):
                    x, y = x.to(device), y.to(device)
                    loss = F.cross_entropy(self.forward(self.model, x, t), y)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for (name, _), g in zip(named, grads, strict=True):
                        if g is not None:  # None: not on task t's path (another task's head), Fisher 0
                            sums[name] += size * g.detach() ** 2
                    samples += y.shape[0]
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            self.model.train(was_training)
            self.model.zero_grad(set_to_none=True)
        return {name: s / samples for name, s in sums.items()}, samples

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per task: the penalty at its end (against the earlier tasks' θ* and F), the Fisher's sample count,
        and the mean and max of the merged F per parameter tensor."""
        return [{**r, "fisher": {name: dict(stats) for name, stats in r["fisher"].items()}} for r in self.records]

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            config=asdict(self.config),
            fisher={name: f.cpu() for name, f in self.fisher.items()},
            anchor={name: a.cpu() for name, a in self.anchor.items()},
            records=self.diagnostics(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") == self.name and state.get("config") != asdict(self.config):
            raise ValueError(f"saved EWCConfig {state.get('config')} differs from this one {asdict(self.config)}")
        super().load_state_dict(state)  # the model's weights, checked against this architecture by torch
        params = dict(self.model.named_parameters())
        self.fisher = {name: f.to(params[name].device) for name, f in state["fisher"].items()}
        self.anchor = {name: a.to(params[name].device) for name, a in state["anchor"].items()}
        self.records = list(state["records"])
