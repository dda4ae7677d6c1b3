"""HAT: hard attention to the task (Serrà, Surís, Miron & Karatzoglou, ICML 2018), METHODS_SPEC §8, ported.

Each task t learns an embedding e_t^ℓ per unit of every gated layer ℓ (a conv's output channels, a Linear's
output features); the gate m = σ(s·e) multiplies the unit's output. s anneals from 1/s_max to s_max inside every
epoch, so the gates end nearly binary, and a regulariser c·reg asks task t to reuse units the earlier tasks took
rather than take free ones. For t ≥ 1 each weight's gradient is scaled by 1 − min(m_prev^out, m_prev^in), with
m_prev the element-wise max of the earlier tasks' final gates: a weight between two units an earlier task uses
fully no longer moves, so that task's outputs stay as they were.

"Ported" means on the library's shared networks, for which no official HAT code exists (its AlexNet has biases
and no BatchNorm). The choices, also recorded per layer in `diagnostics()`:
- The gate sits on the output of the BatchNorm that directly follows the layer (the next module registered, with
  matching width), else on the layer's own output. A per-channel gate m > 0 commutes with ReLU, dropout and
  pooling, so this equals HAT's gate after the activation and pooling; it must come after the BatchNorm, because
  batch-statistics BatchNorm would divide a per-channel gate applied before it away.
- A layer's input gate, for the min(out, in) rule, is the gate of the layer that feeds it: its previous gated
  sibling in an nn.Sequential when only ReLU, dropout, pooling, flatten or identity modules lie between, and
  conv1 for a ResNet BasicBlock's conv2. A Linear behind a flattened conv sees each channel's gate repeated over
  the channel's positions ((C, H, W) order). Where no single gate feeds the layer (the first layer, a ResNet
  block's conv1 and shortcut, whose input is a residual sum) the out-gate alone decides, as for HAT's conv1:
  stricter, never weaker, protection.
- Declared task heads are not gated. A model without task heads (one output shared by every task, Permuted
  MNIST) has its last layer as the output: it is not gated (gating logits would drop classes) and counts as fully
  used, so its weight gradients are scaled by 1 − m_prev^in and its bias is frozen after task 0.
- BatchNorm affine parameters train in task 0 and are frozen afterwards (§8 allows frozen or per-task; frozen is
  GPM's rule). After task 0 only the gated layers' weights and biases, the shared output layer, the task's head and
  its embedding train; any other parameter (which HAT could not protect) is frozen too.
The protection is exact where the old gates are exactly 0 or 1 and BatchNorm uses batch statistics, as in the
shared networks; running statistics, or weight decay in the optimiser, would still move old tasks' outputs.

The embeddings are registered on the model (parameters `hat_embedding_<t>`, one vector over all gated units per
task, N(0, 1) as nn.Embedding), so the trainer's best-validation snapshot and the model's state_dict hold them.
Called directly, the model runs ungated; HAT's outputs come from `predict(x, t)` and `training_loss`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.methods.base import ContinualMethod, Forward, StepProgress, register, subspace_layers
from ness.models import call_model, head_parameters, task_heads
from ness.models.resnet import BasicBlock
from ness.validation import Rule, Validated, number, optional

EMBEDDING_PREFIX = "hat_embedding_"
COSH_CLAMP = 50.0
"""|s·e| bound inside cosh in the embedding-gradient compensation (official `thres_cosh`), against overflow."""
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
GATE_PRESERVING = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Identity,
)
"""Modules f with f(m·x) = m·f(x) for a per-channel m > 0: a gate before them is still the gate after them."""


@dataclass(frozen=True)
class HATConfig(Validated):
    """HAT settings; the defaults are the official code's (METHODS_SPEC §8)."""

    c: float = 0.75
    """Weight of the attention regulariser in CE + c·reg (official `lamb`, chosen from a grid in the paper)."""
    s_max: float = 400.0
    """Largest gate slope s: training anneals s from 1/s_max to s_max in every epoch; evaluation uses s_max."""
    clip_grad_norm: float | None = 10000.0
    """Clip the norm of the whole (masked, compensated) gradient to this before each step; None: no clipping."""
    embedding_bound: float = 6.0
    """After each step the task's embeddings are clamped to [−bound, bound] (official `thres_emb`)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "c": number(at_least=0, fix="the paper uses 0.75"),
        "s_max": number(at_least=1, fix="s anneals from 1/s_max up to s_max; the paper uses 400"),
        "clip_grad_norm": optional(number(above=0, fix="the official code clips at 10000"), "for no clipping"),
        "embedding_bound": number(above=0, fix="the official code clamps the embeddings to ±6"),
    }


# -- the maths ---------------------------------------------------------------------------------------------
def annealed_s(fraction: float, s_max: float) -> float:
    """s = 1/s_max + (s_max − 1/s_max)·fraction, with `fraction` ∈ [0, 1) the share of the epoch already done."""
    return 1 / s_max + (s_max - 1 / s_max) * fraction


def attention_regulariser(m: Tensor, m_prev: Tensor | None) -> Tensor:
    """reg = Σ m(1 − m_prev) / Σ (1 − m_prev) over every gated unit of every layer; Σ m / units for the first task.

    It is the share of the still-free capacity the task takes (≤ 1, as m ≤ 1); when no unit is free at all it is 0.
    """
    if m_prev is None:
        return m.mean()
    free = 1 - m_prev
    return (m * free).sum() / free.sum().clamp_min(torch.finfo(free.dtype).tiny)


def embedding_gradient_scale(e: Tensor, s: float, s_max: float) -> Tensor:
    """(s_max/s)·(cosh(clamp(s·e, ±50)) + 1)/(cosh(e) + 1), HAT's compensation of the embedding gradient.

    dσ(s·e)/de = s/(2(cosh(s·e) + 1)) vanishes for large s·e and depends on s; times this factor it becomes
    s_max/(2(cosh(e) + 1)) = s_max·σ'(e), the same at every s and alive wherever |e| is moderate.
    """
    numerator = torch.cosh(torch.clamp(s * e, -COSH_CLAMP, COSH_CLAMP)) + 1
    return (s_max / s) * numerator / (torch.cosh(e) + 1)


def spread_gate(gate: Tensor, width: int, layer: str) -> Tensor:
    """The input gate of a layer with `width` inputs: `gate` itself, or each channel's gate repeated over its
    positions when the layer reads a flattened (C, H, W) map."""
    if width % gate.numel():
        raise ValueError(
            f"HAT: layer '{layer}' has {width} inputs, not a multiple of the {gate.numel()} units that feed it"
        )
    return gate.repeat_interleave(width // gate.numel())


def weight_gradient_mask(out_used: Tensor, in_used: Tensor | None, shape: torch.Size) -> Tensor:
    """1 − min(m_prev^out[o], m_prev^in[i]) for the weight of shape (O, I, *kernel); 1 − m_prev^out[o] without
    an input gate. `in_used` already has one entry per input I."""
    extra = (1,) * (len(shape) - 2)
    used = out_used.view(-1, 1, *extra)
    if in_used is not None:
        used = torch.minimum(used, in_used.view(1, -1, *extra))
    return (1 - used).expand(shape).clone()


# -- where the gates go ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatePlacement:
    """One layer HAT works on: where its gate sits and which gate its input carries."""

    layer: str
    units: int
    gate_after: str | None
    """The module whose output the gate multiplies (the following BatchNorm, or the layer); None: not gated."""
    input_gate: str | None
    """The gated layer whose gate the input carries; None: the out-gate alone protects the weights."""


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _units(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _following_batch_norm(model: nn.Module, name: str) -> str | None:
    """The BatchNorm registered right after layer `name` in the same parent, with its width, else None."""
    modules = list(model.named_modules())
    position = [n for n, _ in modules].index(name)
    if position + 1 == len(modules):
        return None
    after, module = modules[position + 1]
    same_parent = after.rpartition(".")[0] == name.rpartition(".")[0]
    if isinstance(module, BATCH_NORMS) and same_parent and module.num_features == _units(model.get_submodule(name)):
        return after
    return None


def _input_gate(model: nn.Module, name: str, gated_at: dict[str, str]) -> str | None:
    """The gated layer whose gate the input of `name` carries (see the module docstring), else None.

    `gated_at` maps each gate's module to its gated layer."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, BasicBlock) and child == "conv2":  # conv2 reads relu(bn1(conv1(x)))
        return _join(parent_name, "conv1")
    if not isinstance(parent, nn.Sequential):
        return None
    siblings = list(parent.named_children())
    position = [n for n, _ in siblings].index(child)
    for sibling_name, sibling in reversed(siblings[:position]):
        full = _join(parent_name, sibling_name)
        if full in gated_at:
            return gated_at[full]
        if not isinstance(sibling, GATE_PRESERVING):
            return None
    return None


def gate_placements(model: nn.Module) -> list[GatePlacement]:
    """Every nn.Linear / nn.Conv2d HAT works on, in registration order (declared heads excluded); the last one is
    the ungated shared output when the model declares no task heads."""
    layers = subspace_layers(model, (), "HAT")
    shared_output = layers[-1] if task_heads(model) is None else None
    if layers == [shared_output]:
        raise ValueError(f"HAT found no layer to gate: the model's only layer '{shared_output}' is its output")
    gate_after = {name: _following_batch_norm(model, name) or name for name in layers if name != shared_output}
    gated_at = {point: name for name, point in gate_after.items()}
    return [
        GatePlacement(name, _units(model.get_submodule(name)), gate_after.get(name), _input_gate(model, name, gated_at))
        for name in layers
    ]


# -- the method ---------------------------------------------------------------------------------------------
@register
class HAT(ContinualMethod):
    """HAT on any model of nn.Linear / nn.Conv2d layers (see the module docstring for the port's choices)."""

    name = "hat"
    config_class = HATConfig
    distributed_ok = True

    def __init__(self, model: nn.Module, config: HATConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        self.placements = gate_placements(model)
        self.gated = [p for p in self.placements if p.gate_after is not None]
        self.offsets: dict[str, tuple[int, int]] = {}  # gated layer → its slice of a task's embedding vector
        start = 0
        for p in self.gated:
            self.offsets[p.layer] = (start, start + p.units)
            start += p.units
        self.total_units = start
        self.m_prev: Tensor | None = None  # max over finished tasks of σ(s_max·e), all gated units
        self.s = 1 / self.config.s_max
        self.records: list[dict[str, Any]] = []
        self._gradient_masks: dict[str, tuple[Tensor, Tensor | None]] = {}  # layer → (weight mask, bias mask)
        self._active_gates: dict[str, Tensor] | None = None
        for p in self.gated:
            gate_module = model.get_submodule(p.gate_after)
            # a partial of a bound method, not a lambda, so that the model pickles (checkpoints mid-task)
            gate_module.register_forward_hook(partial(self._gate_hook, p.layer))

    # -- gates -------------------------------------------------------------------------------------------
    def embedding(self, t: int) -> nn.Parameter:
        """e_t: task t's embeddings of every gated unit, layer after layer."""
        e = getattr(self.model, f"{EMBEDDING_PREFIX}{t}", None)
        if e is None:
            raise ValueError(
                f"HAT: task {t} has no embeddings yet (tasks so far: 0..{self._tasks_with_embeddings() - 1})"
            )
        return e

    def gates(self, t: int, s: float) -> Tensor:
        """m = σ(s·e_t) over every gated unit."""
        return torch.sigmoid(s * self.embedding(t))

    def _split(self, m: Tensor) -> dict[str, Tensor]:
        return {layer: m[start:end] for layer, (start, end) in self.offsets.items()}

    @contextmanager
    def _gated_by(self, m: Tensor) -> Iterator[None]:
        self._active_gates = self._split(m)
        try:
            yield
        finally:
            self._active_gates = None

    def _gate_hook(self, layer: str, module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        return self._apply_gate(layer, out)

    def _apply_gate(self, layer: str, out: Tensor) -> Tensor | None:
        if self._active_gates is None:  # called outside predict/training_loss: the ungated network
            return None
        gate = self._active_gates[layer]
        return out * gate.view(1, -1, *(1,) * (out.dim() - 2))  # (B, C, ...) · (1, C, 1, ...)

    def _add_embedding(self, t: int) -> None:
        reference = self.model.get_submodule(self.gated[0].layer).weight
        e = torch.randn(self.total_units, dtype=reference.dtype).to(reference.device)  # nn.Embedding's N(0, 1)
        self.model.register_parameter(f"{EMBEDDING_PREFIX}{t}", nn.Parameter(e))

    def _tasks_with_embeddings(self) -> int:
        return sum(1 for n, _ in self.model.named_parameters(recurse=False) if n.startswith(EMBEDDING_PREFIX))

    # -- hooks -------------------------------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        self._add_embedding(t)
        self.s = 1 / self.config.s_max

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        """Task 0: everything but other heads, plus e_0. Later: the gated layers and the shared output (their
        gradients masked), task t's head and e_t; BatchNorm affine and anything else stay frozen."""
        own_head, other_heads = head_parameters(self.model, t)
        embeddings = [p for n, p in self.model.named_parameters(recurse=False) if n.startswith(EMBEDDING_PREFIX)]
        if t == 0:
            skip = {id(p) for p in other_heads + embeddings}
            body = [p for p in self.model.parameters() if id(p) not in skip]
        else:
            body = [q for p in self.placements for q in self.model.get_submodule(p.layer).parameters()] + own_head
        return [*body, self.embedding(t)]

    def begin_step(self, t: int, progress: StepProgress) -> None:
        self.s = annealed_s(progress.epoch_fraction, self.config.s_max)

    def predict(self, x: Tensor, t: int) -> Tensor:
        """Task t's logits with its gates at s = s_max."""
        with self._gated_by(self.gates(t, self.config.s_max)):
            return self.forward(self.model, x, t)

    def training_loss(self, t: int, x: Tensor, y: Tensor, tasks: Tensor | None = None) -> Tensor:
        """CE + c·reg with task t's gates at the current s."""
        if tasks is not None:
            raise ValueError("HAT trains one task at a time; it got a batch of mixed tasks")
        m = self.gates(t, self.s)
        with self._gated_by(m):
            ce = F.cross_entropy(self.forward(self.model, x, t), y)
        return ce + self.config.c * attention_regulariser(m, self.m_prev)

    def after_backward(self, t: int) -> None:
        """Mask the layer gradients (t ≥ 1), compensate e_t's gradient for s, clip the total norm."""
        with torch.no_grad():
            if t > 0:
                for layer, (weight_mask, bias_mask) in self._gradient_masks.items():
                    module = self.model.get_submodule(layer)
                    if module.weight.grad is not None:
                        module.weight.grad.mul_(weight_mask)
                    if bias_mask is not None and module.bias.grad is not None:
                        module.bias.grad.mul_(bias_mask)
            e = self.embedding(t)
            if e.grad is not None:
                e.grad.mul_(embedding_gradient_scale(e, self.s, self.config.s_max))
        if self.config.clip_grad_norm is not None:
            grads = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.config.clip_grad_norm)

    def after_step(self, t: int) -> None:
        with torch.no_grad():
            self.embedding(t).clamp_(-self.config.embedding_bound, self.config.embedding_bound)

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        """m_prev ← max(m_prev, σ(s_max·e_t)), and the gradient masks of the next tasks from it."""
        with torch.no_grad():
            m = self.gates(t, self.config.s_max).detach().clone()
            reg = float(attention_regulariser(m, self.m_prev))
            self.m_prev = m if self.m_prev is None else torch.maximum(self.m_prev, m)
        self._gradient_masks = self._build_gradient_masks(self.m_prev)
        task_gates, used = self._split(m), self._split(self.m_prev)
        for p in self.placements:
            weight_mask, _ = self._gradient_masks[p.layer]
            record = {
                "task": t,
                "layer": p.layer,
                "units": p.units,
                "gate_after": p.gate_after,
                "input_gate": p.input_gate,
                "bn_affine": "trained in task 0, frozen after",
                "reg": reg,
                "weights_frozen": float((weight_mask == 0).float().mean()),
            }
            if p.gate_after is not None:
                record.update(
                    gate_mean=float(task_gates[p.layer].mean()),
                    units_used=float((task_gates[p.layer] > 0.5).float().mean()),
                    units_used_so_far=float((used[p.layer] > 0.5).float().mean()),
                )
            self.records.append(record)

    def _build_gradient_masks(self, m_prev: Tensor) -> dict[str, tuple[Tensor, Tensor | None]]:
        """(1 − min(m_prev^out, m_prev^in) for the weight, 1 − m_prev^out for the bias) per layer."""
        used = self._split(m_prev)
        masks = {}
        for p in self.placements:
            module = self.model.get_submodule(p.layer)
            weight = module.weight
            # The ungated shared output counts as fully used by every task.
            out_used = used[p.layer] if p.gate_after is not None else weight.new_ones(p.units)
            in_used = None if p.input_gate is None else spread_gate(used[p.input_gate], weight.shape[1], p.layer)
            bias_mask = None if module.bias is None else 1 - out_used
            masks[p.layer] = (weight_gradient_mask(out_used, in_used, weight.shape), bias_mask)
        return masks

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per (task, layer): the gate placement, the task's reg at s_max, its mean gate and share of units used
        (m > 0.5), the share used by any task so far, and the share of the weights frozen for later tasks."""
        return [dict(r) for r in self.records]

    # -- saving ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # the model's, embeddings included
        state.update(
            config=asdict(self.config),
            m_prev=None if self.m_prev is None else self.m_prev.cpu(),
            s=self.s,
            records=self.diagnostics(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") == self.name and state.get("config") != asdict(self.config):
            raise ValueError(f"saved HATConfig {state.get('config')} differs from this one {asdict(self.config)}")
        saved = sum(1 for key in state.get("model", {}) if key.startswith(EMBEDDING_PREFIX))
        for t in range(self._tasks_with_embeddings(), saved):
            self._add_embedding(t)
        super().load_state_dict(state)
        device = self.model.get_submodule(self.gated[0].layer).weight.device
        self.m_prev = None if state["m_prev"] is None else state["m_prev"].to(device)
        self.s = float(state["s"])
        self.records = [dict(r) for r in state["records"]]
        self._gradient_masks = {} if self.m_prev is None else self._build_gradient_masks(self.m_prev)
