"""GPM: Gradient Projection Memory (Saha, Garg & Roy, ICLR 2021), METHODS_SPEC §3.

After each task, every projected layer ℓ keeps M_ℓ (d×k, orthonormal columns): the directions that carry ε_th of
the energy of its representation R_ℓ (the layer inputs of a few random training samples), grown task by task.
In later tasks each weight gradient G (viewed o×d) becomes G − G·M Mᵀ, so for an earlier input x in span(M) the
update leaves W x unchanged. Task 0 trains the whole network; afterwards only the projected weights and the current
head train (BatchNorm and biases stay as task 0 left them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ness.data.tasks import PREPARED_BYTES_LIMIT, BatchRows, SplitProducts, StepRows
from ness.methods.base import (
    ContinualMethod,
    Forward,
    register,
    subspace_layers,
    task_inputs,
    watch_layer_inputs,
    weights_and_head,
)
from ness.models import call_model
from ness.subspace import (
    GradientProjection,
    MemoryUpdate,
    gradient_projection,
    grow_basis,
    input_covariance,
    largest_keys,
    layer_input_rows,
    linear_with_projected_weight_gradient,
)
from ness.validation import ConfigError, Rule, Validated, count, entries, number, optional, patterns


@dataclass(frozen=True)
class GPMConfig(Validated):
    """GPM settings; defaults are the official CIFAR-100 script's (METHODS_SPEC §3.2)."""

    threshold: float = 0.97
    """ε_th at task 0, in (0, 1]: the fraction of each layer's representation energy that M must capture."""
    threshold_increment: float = 0.003
    """Added to ε_th per finished task (ε_th = threshold + increment·t); 0 keeps it constant. The schedule may pass
    1 on long sequences (0.97 + 0.003·t from t = 10): M then takes every direction that carries energy."""
    layer_thresholds: tuple[float, ...] | None = None
    """Per-layer task-0 thresholds in (0, 1], one per projected layer in registration order, replacing `threshold`
    (GPM's Permuted MNIST: 0.95, 0.99, 0.99 with threshold_increment 0); the increment still applies."""
    samples: int = 125
    """Random training samples of the task whose layer inputs form the representations (one forward pass)."""
    layer_samples: tuple[int, ...] | None = None
    """Per projected layer, how many of those samples its representation uses (the first b_ℓ, each ≤ samples);
    the official AlexNet uses (24, 100, 100, 125, 125). None: all of them."""
    exclude: tuple[str, ...] = field(default_factory=tuple)
    """Module-name globs or class names neither projected nor trained after task 0."""
    patch_geometry: tuple[tuple[int, int] | None, ...] | None = None
    """Per projected layer, (stride, input map size) of the patch grid its representation uses instead of the
    conv's own (None entries: own). Only to reproduce NESS's GPM miniImageNet script, which cuts 84×84 activations
    with the 32×32 geometry (§3.3, `--faithful`); None: every layer's real geometry (correct)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "threshold": number(above=0, at_most=1, fix="the fraction of the representation energy kept; 0.95–0.99"),
        "threshold_increment": number(at_least=0, fix="0.003 in the official CIFAR-100 script, 0 keeps it constant"),
        "layer_thresholds": optional(
            entries(number(above=0, at_most=1), non_empty=True, fix="one per projected layer"), "to use `threshold`"
        ),
        "samples": count(fix="GPM uses 100–300"),
        "layer_samples": optional(
            entries(count(), non_empty=True, fix="one per projected layer, each ≤ samples"), "to use every sample"
        ),
        "exclude": patterns(),
        "patch_geometry": optional(
            entries(
                optional(entries(count(), length=2)),
                non_empty=True,
                expected="a non-empty list with one (stride, map size) pair of integers ≥ 1, or None, per projected "
                "layer",
            ),
            "for every layer's own geometry",
        ),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_samples is not None and max(self.layer_samples) > self.samples:
            raise ConfigError(
                f"{type(self).__name__}.layer_samples: got {self.layer_samples!r}; entries of at most samples="
                f"{self.samples} (raise `samples` or lower the entries)"
            )


def draw_samples(inputs: Iterable[Tensor], k: int, generator: torch.Generator) -> Tensor:
    """k examples drawn uniformly without replacement from a stream of input batches, in random order.

    Each example gets a uniform random key and the k largest keys win, sorted by key, so every prefix of the
    result is itself a uniform sample (layer_samples takes prefixes). Only k examples are held at any time.
    """
    pool: Tensor | None = None
    pool_keys = torch.empty(0)
    for x in inputs:
        keys = torch.rand(x.shape[0], generator=generator)
        candidates = x if pool is None else torch.cat([pool, x])
        pool_keys, pool = largest_keys(torch.cat([pool_keys, keys]), k, candidates)
    if pool is None:
        raise ValueError("draw_samples: the input stream was empty")
    return pool


MIN_SAVED_MULTIPLY_ADDS = 1 << 20
"""The input-side projection adds a Python autograd node per call (some 10–20 µs on a CPU): a layer takes it only
where it saves at least this many multiply-adds over projecting the weight's gradient after the backward pass."""


class InputSideProjection:
    """A projected nn.Linear layer's forward during GPM's own training step. Its first call that trains the weight
    chooses, for the whole step, between F.linear and `linear_with_projected_weight_gradient` (the cheaper for its
    n input rows: 2·n·d·k + 2^20 against the projection's 2·o·d·k, so n < o at batch 10); every later call follows,
    so a layer never mixes gradients that arrived projected with ones to project (SGP's scaled projection is not
    idempotent). A hook on the weight projects whatever else reached it (`received`), so `after_backward` leaves the
    gradient alone after an input-side step."""

    def __init__(self, layer: nn.Linear, projection: GradientProjection, step_rows: StepRows | None = None) -> None:
        self.layer, self.projection = layer, projection
        self.input_side: bool | None = None  # undecided until the step's first call that trains the weight
        self.delivered: list[Tensor] = []  # the weight gradients this backward pass's calls gave, projected
        self.step_rows = step_rows  # the trainer's step batch, as GPM shares it (`projected_batch`)
        self.split_products = SplitProducts()  # the projected rows of that batch's split

    def received(self, grad: Tensor) -> Tensor | None:
        """The weight's hook during the step: what reaches the weight besides its calls (a tied use of the weight in
        the model) is projected here, so `after_backward` may leave the gradient alone."""
        delivered = self.delivered[:]
        self.delivered.clear()  # in place: the backward's context holds this list too, and a gradient still referenced
        # when autograd accumulates it would be copied, not taken
        return self.projection.complete(grad, delivered) if self.input_side else None

    @staticmethod
    def can_be_cheaper(layer: nn.Linear, projection: GradientProjection) -> bool:
        """Whether the input-side form wins for some batch (one row): else the layer keeps its own forward."""
        d, k = projection.basis.shape
        return 2 * d * k + MIN_SAVED_MULTIPLY_ADDS <= projection.multiply_adds(layer.out_features)

    def __call__(self, x: Tensor) -> Tensor:
        weight, bias = self.layer.weight, self.layer.bias
        if torch.is_grad_enabled() and weight.requires_grad:
            if self.input_side is None:
                rows, (d, k) = x.numel() // x.shape[-1], self.projection.basis.shape
                cost = 2 * rows * d * k + MIN_SAVED_MULTIPLY_ADDS
                # traced by torch.compile (TrainConfig.compile): plain F.linear, G projected after the backward pass
                compiling = torch.compiler.is_compiling()
                self.input_side = not compiling and cost <= self.projection.multiply_adds(weight.shape[0])
            if self.input_side:
                return linear_with_projected_weight_gradient(
                    x, weight, bias, self.projection, self.delivered, self.projected_batch(x)
                )
        return F.linear(x, weight, bias)

    def projected_batch(self, x: Tensor) -> Tensor | None:
        """x − x·M diag(λ) Mᵀ for x the trainer's step batch (`step_rows`), as rows of the whole split projected once
        (while M, λ and the split keep their versions): the step then reads neither M nor its products (at batch 10
        against M of 784×80 those two products, with M fetched from memory, cost more than the layer's own forward
        and backward). None for any other x, under autocast, or for a projected split larger than a prepared one may
        be."""
        rows = None if self.step_rows is None else self.step_rows.rows
        if rows is None or not rows.drew(x) or x.dim() != 2 or torch.is_autocast_enabled(x.device.type):
            return None
        projection = self.projection
        frozen = (projection.basis,) if projection.importance is None else (projection.basis, projection.importance)
        return self.split_products.read(rows, frozen, self._projected_split)

    def _projected_split(self, source: Tensor) -> Tensor | None:
        if source.dtype != self.projection.basis.dtype or source.numel() * source.element_size() > PREPARED_BYTES_LIMIT:
            return None
        return self.projection.project_rows(source)


@register
class GPM(ContinualMethod):
    """GPM on any model made of nn.Linear / nn.Conv2d layers (declared task heads are never projected).

    Where it differs from the official scripts: R comes from the layer's own im2col (its real stride and padding, so
    the 84×84 ResNet geometry is right by construction, §3.3) and is used through RRᵀ in float64 instead of an SVD
    of R (same subspace and energies); zero-energy directions never join M (see `grow_basis`). Biases of projected
    layers (the papers' nets have none) are frozen after task 0, like BatchNorm; running statistics, where a model
    tracks them, still update in train mode (the papers' nets use batch statistics). Weight decay would shrink W
    inside span(M) too: the GPM protocol uses none.
    """

    name = "gpm"
    config_class = GPMConfig
    distributed_ok = True
    input_side_projection: ClassVar[bool] = True
    """In the trainer's step, projected nn.Linear layers take their weight gradients projected from their inputs
    (`InputSideProjection`), exact while the weight reaches the loss only through the layer's own call."""

    def __init__(self, model: nn.Module, config: GPMConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        self.layer_names = subspace_layers(model, self.config.exclude, type(self).__name__)
        for field_name in ("layer_thresholds", "layer_samples", "patch_geometry"):
            values = getattr(self.config, field_name)
            if values is not None and len(values) != len(self.layer_names):
                raise ValueError(
                    f"{type(self.config).__name__}.{field_name} has {len(values)} entries but the model has "
                    f"{len(self.layer_names)} projected layers ({', '.join(self.layer_names)}): "
                    "give one per layer, in this order"
                )
        self.bases: dict[str, Tensor] = {}  # M_ℓ after the finished tasks, float64
        self.records: list[dict[str, Any]] = []
        self._projectors: dict[str, GradientProjection] = {}  # P_ℓ of the open task, in the weight's dtype and device
        self._input_side: dict[str, InputSideProjection] = {}  # per Linear layer of _projectors: its forward in a step
        self._input_side_of: dict[str, GradientProjection] | None = None  # the _projectors it was made for
        self._step_rows = StepRows()  # the trainer's step batch, for the input side's projected split
        # Seeded from torch's global generator, so the samples follow the run seed (official: seeded np.random).
        self._generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))

    def threshold(self, t: int, layer: int) -> float:
        """ε_th of the layer-th projected layer when task t ends: its task-0 value plus the increment per task."""
        base = self.config.threshold if self.config.layer_thresholds is None else self.config.layer_thresholds[layer]
        return base + self.config.threshold_increment * t

    # -- hooks -----------------------------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        self._projectors = self._build_projectors() if t > 0 else {}

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        if t == 0:
            return super().task_parameters(t)
        return weights_and_head(self.model, self.layer_names, t)

    @contextmanager
    def step_context(self) -> Iterator[None]:
        """The trainer's step, with the weight gradients of projected nn.Linear layers projected from their inputs
        where cheaper (`InputSideProjection`). Only there: the step zeroes the gradients and takes them from
        `training_loss` alone, and a hook on each weight projects what reached it besides its calls (a tied use); in a
        user's own loop (and through transformers' Trainer) `after_backward` projects every layer's gradient."""
        if not self.input_side_projection:
            yield
            return
        if self._input_side_of is not self._projectors:  # one object per layer and task: torch.compile's guards hold
            layers = {name: self.model.get_submodule(name) for name in self._projectors}
            self._input_side_of = self._projectors
            self._input_side = {
                name: InputSideProjection(layer, self._projectors[name], self._step_rows)
                for name, layer in layers.items()
                if type(layer) is nn.Linear and InputSideProjection.can_be_cheaper(layer, self._projectors[name])
            }
        installed = [calls for calls in self._input_side.values() if "forward" not in calls.layer.__dict__]
        hooks = []
        for calls in installed:
            calls.layer.__dict__["forward"] = calls  # nn.Module calls self.forward: the instance's, for this step
            hooks.append(calls.layer.weight.register_hook(calls.received))
        try:
            yield
        finally:
            for calls, hook in zip(installed, hooks, strict=True):
                hook.remove()
                del calls.layer.__dict__["forward"]
                calls.input_side = None  # undecided: a user's loop projects every gradient in after_backward
                calls.delivered.clear()

    def on_step_rows(self, t: int, rows: BatchRows | None) -> None:
        """Tell the input-side projections which rows of the prepared training split the step's batch is: they read
        its projected rows from the split projected once per task (`InputSideProjection.projected_batch`)."""
        self._step_rows.rows = rows

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a checkpoint of an earlier version: no step rows, and layer forwards without them (rebuilt at the next step)
        self.__dict__.update({"_step_rows": StepRows(), **state})
        self._input_side_of = None

    def after_backward(self, t: int) -> None:
        for name, projector in self._projectors.items():
            grad = self.model.get_submodule(name).weight.grad
            calls = self._input_side.get(name)
            if calls is not None and calls.input_side:
                calls.input_side = None  # decided again by the next forward pass (SAM's second one, the next step)
                continue  # the backward pass gave this gradient projected: every call of the layer did
            if grad is not None and grad.is_contiguous():
                projector.project_(grad.view(grad.shape[0], -1))
            elif grad is not None:  # e.g. a channels-last weight's gradient: rows (o, d) only as a copy
                grad.copy_(projector(grad.reshape(grad.shape[0], -1)).view_as(grad))

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        # the task's training split and its projection are no longer needed (the next task's layers make their own)
        self._step_rows.rows, self._input_side, self._input_side_of = None, {}, None
        x = draw_samples(task_inputs(batches, f"end_task({t})"), self.config.samples, self._generator)
        covariances, rows = self._representations(x, t)
        for i, name in enumerate(self.layer_names):
            if name not in covariances:
                raise RuntimeError(f"end_task({t}): layer '{name}' received no input in the forward pass")
            threshold = self.threshold(t, i)
            update = self.update_memory(name, covariances[name], threshold)
            self.records.append(
                {
                    "task": t,
                    "layer": name,
                    "d": covariances[name].shape[0],
                    "threshold": threshold,
                    "samples": min(self._samples_of(i), x.shape[0]),
                    "rows": rows[name],
                    "basis_size": update.basis.shape[1],
                    "added": update.added,
                    "energy_before": update.captured_before,
                    "energy_captured": update.captured,
                    **self.memory_record(name),
                }
            )

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per (task, layer): d, ε_th, samples and rows of R, the basis size k after the update, the columns added,
        and the fraction of the task's representation energy inside span(M) before and after it."""
        return [dict(r) for r in self.records]

    # -- what SGP overrides ----------------------------------------------------------------------------
    def update_memory(self, name: str, covariance: Tensor, threshold: float) -> MemoryUpdate:
        """Grow M_ℓ with the task's representation covariance RRᵀ."""
        update = grow_basis(self.bases.get(name), covariance, threshold, name)
        self.bases[name] = update.basis
        return update

    def projector(self, name: str, like: Tensor | None = None) -> GradientProjection:
        """P_ℓ = M Mᵀ, removed from the layer's gradient rows."""
        return gradient_projection(self.bases[name], like=like)

    def memory_record(self, name: str) -> dict[str, Any]:
        """Extra diagnostics of the layer's memory after an update."""
        return {}

    # -- internals -------------------------------------------------------------------------------------
    def _samples_of(self, layer: int) -> int:
        return self.config.samples if self.config.layer_samples is None else self.config.layer_samples[layer]

    @torch.no_grad()
    def _representations(self, x: Tensor, t: int) -> tuple[dict[str, Tensor], dict[str, int]]:
        """One eval-mode forward pass of the samples as one batch (BatchNorm sees them together, as in the official
        code): per layer, RRᵀ over the layer-input rows of its first b_ℓ samples, and the number of rows n."""
        counts = {name: self._samples_of(i) for i, name in enumerate(self.layer_names)}
        geometry = dict(
            zip(self.layer_names, self.config.patch_geometry or [None] * len(self.layer_names), strict=True)
        )
        covariances: dict[str, Tensor] = {}
        rows: dict[str, int] = {}

        def receive(name: str, layer: nn.Module, inputs: Tensor) -> None:
            r = layer_input_rows(layer, inputs[: counts[name]], geometry[name])  # (n, d): the columns of R_ℓ
            covariances[name] = covariances[name] + input_covariance(r) if name in covariances else input_covariance(r)
            rows[name] = rows.get(name, 0) + r.shape[0]

        device = next(self.model.parameters()).device
        with watch_layer_inputs(self.model, self.layer_names, receive):
            self.forward(self.model, x.to(device), t)
        return covariances, rows

    def _build_projectors(self) -> dict[str, Tensor]:
        projectors = {}
        for name in self.layer_names:
            if self.bases[name].shape[1] == 0:  # nothing to protect: the gradient passes unchanged
                continue
            weight = self.model.get_submodule(name).weight
            projectors[name] = self.projector(name, like=weight)
        return projectors

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            config=asdict(self.config),
            records=[dict(r) for r in self.records],
            generator=self._generator.get_state(),
            memory=self.memory_state(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") == self.name and state.get("config") != asdict(self.config):
            raise ValueError(
                f"saved {type(self.config).__name__} {state.get('config')} differs from this one {asdict(self.config)}"
            )
        super().load_state_dict(state)
        self.records = [dict(r) for r in state["records"]]
        self._generator.set_state(state["generator"])
        self.load_memory_state(state["memory"])
        self._projectors = self._build_projectors() if self.active_task else {}

    def memory_state(self) -> dict[str, Any]:
        """The per-layer memory as CPU tensors."""
        return {"bases": {name: m.to("cpu", copy=True) for name, m in self.bases.items()}}

    def load_memory_state(self, memory: dict[str, Any]) -> None:
        device = next(self.model.parameters()).device
        self.bases = {name: m.to(device) for name, m in memory["bases"].items()}
