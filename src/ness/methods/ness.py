"""NESS: Null-space Estimated from Small Singular values (Pham, Vepakomma, Horváth, CPAL 2026).

Task 0 trains the whole network. Before each later task, every adapted layer gets ΔW = U·V, where U holds
the eigenvectors of the earlier tasks' layer-input covariance whose singular values are ≤ τ (Eq. 5) and only
V trains, so each earlier input x sees ‖xᵀΔW‖ ≤ σ_max(U)·‖V‖₂ (Eq. 8). At the end of the task ΔW merges into W.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ness import adapter_files, distributed, lora_export
from ness.adapters import NullSpaceAdapter, StepRows, added_low_rank_terms, base_layer
from ness.batches import attention_mask, to_device, token_rows
from ness.data.tasks import BatchRows
from ness.methods.base import (
    ContinualMethod,
    Forward,
    adaptable_layers,
    check_patterns_match,
    matching_modules,
    register,
    subspace_layers,
    task_inputs,
    unreachable_layers,
    watch_layer_inputs,
)
from ness.models import call_model, head_parameters, task_heads
from ness.modules import distinct, replace_module, shared_apply, short_list, tensor_digest
from ness.normalization import (
    BatchNormState,
    batchnorm_layers,
    batchnorm_state,
    batchnorm_swapped,
    freeze_running_statistics,
    restore_momenta,
)
from ness.shared_inputs import LayerStatistics, SharedInputs
from ness.subspace import (
    THRESHOLD_RULES,
    CovarianceSum,
    NullBasis,
    ThresholdRule,
    TransferDirections,
    clip_spectral_norm,
    covariance_spectrum,
    eigh_device,
    input_dim,
    is_linear,
    largest_keys,
    layer_input_rows,
    old_output_energy,
    output_change,
    output_dim,
    project_to_output_budget,
    row_signature,
    spectrum_null_basis,
    supported_layers,
    transfer_directions,
    with_bias_input,
)
from ness.validation import ConfigError, Rule, Validated, choice, count, flag, integer, number, optional, patterns

log = logging.getLogger(__name__)

Memory = Literal["covariance", "replay"]
MEMORIES: tuple[str, ...] = ("covariance", "replay")
MEMORY_TASKS: tuple[str, ...] = ("all", "first")
BATCHNORM_MODES: tuple[str, ...] = ("frozen", "per_task")
STATISTICS_DTYPES: tuple[str, ...] = ("float64", "float32")
STATISTICS_DEVICES: tuple[str, ...] = ("model", "cpu")
LAYER_RULE_KEYS: tuple[str, ...] = ("threshold", "eps1", "delta", "rank")


def _unknown_layer_settings(rules: dict[Any, Any]) -> dict[Any, list[str]]:
    """{pattern: the settings its rule may not set} of a layer_rules dict; a pattern that is no string, or a rule
    that is no dict, is listed too."""
    unknown = {
        pattern: sorted(set(rule) - set(LAYER_RULE_KEYS)) if isinstance(rule, dict) else ["(not a dict)"]
        for pattern, rule in rules.items()
    }
    return {p: keys for p, keys in unknown.items() if keys or not isinstance(p, str)}


def _layer_rules_fix(rules: Any) -> str:
    """The advice for a refused layer_rules: what is unknown in it, and an example."""
    example = "e.g. {'backbone.0': {'threshold': 'rank', 'rank': 64}}"
    return f"unknown settings {_unknown_layer_settings(rules)}; {example}" if isinstance(rules, dict) else example


@dataclass(frozen=True)
class NESSConfig(Validated):
    """NESS settings. The defaults are one setting for every benchmark, chosen on validation (BENCHMARKS.md): a
    strict null space (U carries at most δ = 0.1 % of the earlier inputs' energy) and a transfer adapter of rank 100
    per task. The paper's NESS is `NESSConfig(eps1=1e-3, transfer_rank=0)` (its CIFAR-100 values, §2.5)."""

    eps1: float | None = None
    """ε₁ of Eq. 5: keep directions with σᵢ ≤ ε₁·‖I_t‖_F (frobenius) or ε₁·Σσᵢ (nuclear). Giving it without a
    `threshold` selects the paper's Frobenius rule."""
    threshold: ThresholdRule | None = None
    """'frobenius' is the paper's Eq. 5; 'nuclear' is what the official code computes (a larger τ); 'energy' keeps
    the smallest directions carrying at most `delta` of the layer's input energy; 'rank' keeps `rank` directions.
    None: 'frobenius' when eps1 is given, 'rank' when rank is, else 'energy' (the default)."""
    delta: float = 1e-3
    """δ of the 'energy' rule, in (0, 1): the share of Σ‖x‖² over earlier inputs that U may carry."""
    rank: int | None = None
    """The 'rank' rule's per-layer budget r ≥ 1 (capped at d); required with threshold='rank'."""
    layer_rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-layer overrides of threshold / eps1 / delta / rank by module-name glob, e.g. {'backbone.0': {'threshold':
    'rank', 'rank': 64}} (PEFT's rank_pattern idea); the first matching pattern wins, each must match a layer."""
    memory: Memory = "covariance"
    """'covariance' keeps only running d×d sums Σxxᵀ (the paper's Eq. 7, no data kept); 'replay' keeps earlier
    tasks' raw inputs and recomputes every covariance through the current model, as the official code does."""
    replay_batch_size: int = 64
    """memory='replay': the batch size in which the stored inputs pass through the model at each task start (the
    official code's DataLoader batch of 64, §2.3); it bounds the pass's memory, and batch-statistics BatchNorm
    normalises each such batch on its own."""
    memory_tasks: Literal["all", "first"] = "all"
    """Which finished tasks define the null space: 'all' (the paper), or 'first' as the official 5-datasets
    scripts, which store only task 0's data (METHODS_SPEC §2.7, a bug kept for --faithful runs)."""
    statistics_dtype: Literal["float64", "float32"] = "float64"
    """The dtype of the per-layer sums Σxxᵀ (that memory='covariance' keeps across tasks) and of their products:
    'float32' halves their bytes (a LLaMA-sized d = 4096 layer: 64 MiB instead of 128 MiB); each sum is then
    1.7e-7 to 3.6e-7 from the float64 one (relative, measured), which keeps the bases but blurs exact null directions
    into noise (BENCHMARKS.md, "Wide layers"). Each eigh still runs in float64."""
    statistics_positions: int | None = None
    """m: at most this many output positions per sample of each adapted convolution enter its Σxxᵀ in a statistics
    pass, drawn uniformly per sample and weighted P/m (P: the positions per sample), so the sum is an unbiased
    estimate of the full one at about m/P of its products, which dominate a wide im2col layer's pass (N·d² against
    the convolution's N·d·o). Linear layers sum every row, and the probes come from every row. None (the paper):
    every position, the exact sum. The bases, σ_max(U) and the reported bounds then come from an estimate, so this
    refuses max_output_shift, whose certificate needs the exact sum (BENCHMARKS.md measures the effect)."""
    statistics_device: Literal["model", "cpu"] = "model"
    """Where the kept sums live between tasks: 'model' (on the model's device, where the statistics pass makes them),
    or 'cpu', which frees the GPU of them: each chunk's product is still taken on the model's device, then added on
    the CPU. Either way each layer's eigh runs on the model's GPU when it fits there (`ness.subspace.eigh_device`)."""
    target_modules: tuple[str, ...] | None = None
    """Adapt only the layers these entries match, as PEFT's target_modules: module-name globs ('blocks.*.attn.q'),
    bare names matched against the end of a module name ('q'), or class names ('Linear', 'Conv1d'). None: every
    nn.Linear / nn.Conv1d / nn.Conv2d outside the task heads."""
    exclude: tuple[str, ...] = field(default_factory=tuple)
    """Entries of the same kinds (e.g. 'features.0', 'encoder.*', 'Conv2d') left unadapted, applied after targets:
    from task 1 on they are frozen (a warning names them). Each entry must match a module of the model."""
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)
    """Modules that keep training fully in every task, as PEFT's modules_to_save: a shared classifier, heads the
    model does not declare as `task_heads`, LayerNorms, embeddings. They are never adapted, and their changes are
    not confined to a null space: NESS does not protect earlier tasks from them. Entries as in `exclude`."""
    adapt_bias: bool = False
    """Adapt biases in the null space too: rows x̃ = [x; 1], a (d+1)² covariance, and the last row of U·V is the
    bias change Δb, so Eq. 8 bounds xᵀΔW + Δb. False (the paper): biases stay as task 0 left them."""
    batchnorm: Literal["frozen", "per_task"] = "frozen"
    """'frozen' (the paper): after task 0 BatchNorm's affine parameters and running statistics never change.
    'per_task': every task trains its own and keeps them; evaluating task j swaps task j's back in, as task heads."""
    transfer_rank: int = 100
    """k: each task t ≥ 1 also trains its own transfer adapter Ū_t·A_t in every adapted layer. Ū_t holds the k
    directions in which task t's inputs (through the model as the task starts) carry the most energy outside U,
    which the shared ΔW = U·V cannot use; A_t trains from zero. It is kept per task and acts only when task t is
    predicted (`predict(x, t)`), so no other task ever sees it: TRGP's reuse of old directions per task, through
    an adapter. Needs the task's data before training: `begin_task(t, loader)`. 0: none (the paper)."""
    output_budget: float | None = None
    """β, a budget on what each task may change for the earlier inputs, relative to what they produce: after every
    step each adapted layer's V is projected (in `after_step`) so that its squared output change summed over every
    recorded earlier input, Σ‖x̃ᵀΔW‖² = ‖diag(σ_U)·V‖²_F, stays ≤ β·Σ‖x̃ᵀW̃‖², β times the old outputs' energy
    through the layer. Scale-free: one β fits every layer. None: no budget (the paper)."""
    probe_samples: int = 256
    """Layer-input rows kept per layer and task to measure the real max ‖xᵀΔW‖ (0: report bounds only)."""
    max_output_shift: float | None = None
    """ε of Eq. 10, enforced: after every step each adapted layer's V is clipped to ‖V‖₂ ≤ √ε/σ_max(U), so every
    earlier input x of the layer (as the memory recorded it) has ‖xᵀΔW‖² ≤ ε, certified from the covariance
    alone. None: no constraint (the paper, which relies on weight decay to keep V small)."""

    RULES: ClassVar[dict[str, Rule]] = {
        "eps1": optional(
            number(
                above=0,
                below=1,
                fix="ε₁ ≤ 0 keeps no direction and ε₁ ≥ 1 keeps every one; the paper uses 1e-3 "
                "on CIFAR-100 and 5e-4 on miniImageNet",
            ),
            "to use another rule",
        ),
        "threshold": optional(choice(THRESHOLD_RULES), "to choose the rule from the knob given"),
        "delta": number(above=0, below=1, fix="the share of the earlier inputs' energy U may carry, e.g. 1e-3"),
        "rank": optional(count(fix="the null directions per layer under threshold='rank'")),
        "layer_rules": Rule(
            lambda rules: isinstance(rules, dict) and not _unknown_layer_settings(rules),
            f"a dict of module-name pattern → {{setting: value}}, the settings among {LAYER_RULE_KEYS}",
            _layer_rules_fix,
        ),
        "memory": choice(MEMORIES),
        "replay_batch_size": count(),
        "memory_tasks": choice(MEMORY_TASKS),
        "statistics_dtype": choice(STATISTICS_DTYPES),
        "statistics_positions": optional(
            count(fix="the output positions per sample each convolution sums, e.g. 64"), "to sum every position"
        ),
        "statistics_device": choice(STATISTICS_DEVICES),
        "target_modules": optional(patterns(non_empty=True), "to adapt every layer"),
        "exclude": patterns(),
        "modules_to_save": patterns(),
        "adapt_bias": flag(),
        "batchnorm": choice(BATCHNORM_MODES),
        "transfer_rank": integer(at_least=0, fix="k, the directions of each task's own transfer adapter; 0: none"),
        "output_budget": optional(
            number(above=0, fix="β: the earlier inputs' squared output change per layer, relative to their energy"),
            "for no budget",
        ),
        "probe_samples": integer(at_least=0, fix="0 reports bounds only"),
        "max_output_shift": optional(number(above=0, fix="ε, the certified ‖xᵀΔW‖² per layer"), "for no constraint"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold is None:
            if self.eps1 is not None and self.rank is not None:
                raise ConfigError(
                    "NESSConfig: both eps1 and rank are given but no threshold: say which rule to use, "
                    "threshold='frobenius' (or 'nuclear') for ε₁ or 'rank' for the rank"
                )
            rule = "frobenius" if self.eps1 is not None else "rank" if self.rank is not None else "energy"
            object.__setattr__(self, "threshold", rule)
        if self.threshold in ("frobenius", "nuclear") and self.eps1 is None:
            raise ConfigError(f"NESSConfig: threshold={self.threshold!r} needs eps1 (ε₁ of Eq. 5), e.g. eps1=1e-3")
        if self.statistics_positions is not None and self.max_output_shift is not None:
            raise ConfigError(
                "NESSConfig: max_output_shift certifies ‖xᵀΔW‖² ≤ ε for every earlier input from the exact Σxxᵀ, but "
                f"statistics_positions={self.statistics_positions} sums only a sample of each convolution's rows, so "
                "the certificate would not hold: drop statistics_positions (or max_output_shift)"
            )
        if self.threshold == "rank" and self.rank is None:
            raise ConfigError("NESSConfig: threshold='rank' needs rank=r, the number of null directions per layer")
        for pattern, rule in self.layer_rules.items():
            try:
                self.for_layer_rule(rule)  # validates the combination
            except ConfigError as err:
                raise ConfigError(f"NESSConfig.layer_rules[{pattern!r}]: {err}") from err

    def for_layer_rule(self, rule: dict[str, Any]) -> NESSConfig:
        """This config with one layer rule's settings applied (and validated). A rule that sets another rule's knob
        without naming its threshold switches to that rule ({'eps1': 0.01} under the energy rule: Frobenius)."""
        knob_rule = {"eps1": ("frobenius", "nuclear"), "delta": ("energy",), "rank": ("rank",)}
        if "threshold" not in rule:
            for knob, rules in knob_rule.items():
                if knob in rule and self.threshold not in rules:
                    rule = {**rule, "threshold": rules[0]}
        return dataclasses.replace(self, **rule, layer_rules={})

    def layer_config(self, name: str) -> NESSConfig:
        """The settings of layer `name`: the first layer rule whose pattern matches it, else the config's own."""
        for pattern, rule in self.layer_rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return self.for_layer_rule(rule)
        return self


@dataclass(frozen=True)
class StatisticsSize:
    """One layer's kept sum Σxxᵀ, in `NESS.statistics_bytes()`."""

    layer: str
    bytes: int
    dtype: str
    device: str
    owner: str
    """The first layer (in the model's order) holding the same sum: the layer itself, unless it reads the same input
    as an earlier layer and shares that layer's sum, whose bytes are counted there, once."""

    @property
    def shared(self) -> bool:
        """Whether the sum is an earlier layer's (its bytes are counted at `owner`)."""
        return self.owner != self.layer


@dataclass
class ActiveLayer:
    """A layer adapted in the current task: its adapter and what is needed to report on it at the end."""

    adapter: NullSpaceAdapter
    kept_singular_values: Tensor  # σᵢ of U's directions
    probe: Tensor  # earlier tasks' layer-input rows, for the measured shift
    record: dict[str, Any]
    budget: float | None = None  # output_budget: the largest ‖diag(σ_U)·V‖²_F, β·Σ‖x̃ᵀW̃‖² over old inputs


class TrainingLoopError(RuntimeError):
    """A training loop broke what NESS relies on: it changed a parameter NESS froze, left the V's out of its
    optimiser, or skipped `after_step` under certified stability. `end_task` raises it before changing anything."""


@dataclass(frozen=True)
class LayerRole:
    """What happens to one module's parameters in a task: adapted (only V trains), trains fully, or frozen."""

    module: str
    kind: str
    """The module's class name."""
    status: Literal["adapted", "trains", "frozen"]
    reason: str
    """Why, as a code: adapted, transfer (rank 0 with a transfer adapter), rank0, modules_to_save, head, other_head,
    batchnorm, excluded, unreachable, not_targeted, not_adaptable."""
    detail: str
    """Why, in words."""
    trainable: int
    """Parameters the task trains here (V's entries for an adapted layer)."""


SURPRISING_FREEZES = ("rank0", "excluded", "unreachable", "not_targeted", "not_adaptable")
"""Reasons a module is frozen that a user may not expect: `begin_task` warns about each once."""
PROTECTS_LITTLE = 0.5
"""U's share of the earlier inputs' energy Σ‖x‖² from which `begin_task` warns that an adapted layer protects little:
old inputs then put at least half their energy through the directions the task trains (e.g. ε₁ of the Frobenius
scale under the nuclear rule keeps 783 of MNIST's 784 pixel directions)."""


@register
class NESS(ContinualMethod):
    """NESS on any model made of nn.Linear / nn.Conv1d / nn.Conv2d layers or transformers' Conv1D (declared task
    heads are never adapted)."""

    name = "ness"
    config_class = NESSConfig
    distributed_ok = True
    saves_adapters = True
    mapping_batches = True

    def __init__(self, model: nn.Module, config: NESSConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        check_patterns_match(model, self.config.modules_to_save, "NESSConfig.modules_to_save")
        saved = matching_modules(model, self.config.modules_to_save)
        # The outermost matched modules: everything inside them trains fully and is never adapted.
        self.saved_modules = [n for n in saved if not any(n.startswith(f"{m}.") for m in saved)]
        layers = subspace_layers(
            model,
            (*self.config.exclude, *self.saved_modules),
            "NESS",
            self.config.target_modules,
            kinds=supported_layers(),
        )
        self.layer_names = [name for name in layers if self._saved_module(name) is None]
        if not self.layer_names:
            raise ValueError(f"NESS: every adaptable layer lies inside modules_to_save {self.saved_modules}")
        candidates = adaptable_layers(model, (), self.config.target_modules, supported_layers())
        self.excluded_layers = [n for n in candidates if n not in layers and self._saved_module(n) is None]
        # Layers whose bias NESS adapts: with adapt_bias, every adapted layer that has one.
        self.bias_layers = {
            name for name in self.layer_names if self.config.adapt_bias and model.get_submodule(name).bias is not None
        }
        if self.config.adapt_bias and not self.bias_layers:
            raise ValueError(
                f"NESSConfig: adapt_bias=True but no adapted layer has a bias (layers: {self.layer_names}); build the "
                "model's layers with bias=True, or leave adapt_bias off"
            )
        if self.config.statistics_positions is not None and all(
            is_linear(model.get_submodule(name)) for name in self.layer_names
        ):
            raise ValueError(
                f"NESSConfig: statistics_positions={self.config.statistics_positions} samples a convolution's output "
                f"positions, but no adapted layer is a convolution (layers: {self.layer_names}): leave it unset"
            )
        for pattern in self.config.layer_rules:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in self.layer_names):
                raise ValueError(
                    f"NESSConfig.layer_rules pattern {pattern!r} matches no adapted layer; the layers are "
                    f"{self.layer_names}"
                )
        self.covariances: dict[str, Tensor] = {}  # memory='covariance': running Σxxᵀ over finished tasks
        self.probes: dict[str, list[Tensor]] = {name: [] for name in self.layer_names}  # per finished task
        self.replay: list[Tensor] = []  # memory='replay': raw model inputs of each finished task
        self.active: dict[str, ActiveLayer] = {}
        self.records: list[dict[str, Any]] = []
        self.task_deltas: list[dict[str, tuple[Tensor, Tensor]]] = []  # (U, V) per layer, task 1, 2, ... (CPU)
        self.batchnorm_states: list[BatchNormState] = []  # batchnorm='per_task': each finished task's BatchNorm
        self.roles: list[LayerRole] = []  # the open task's `layer_roles`
        self.transfers: list[dict[str, tuple[Tensor, Tensor]]] = []  # per finished task: layer → (Ū, A)
        self._transfer_task: int | None = None  # the open task, once its adapters hold its transfer terms
        self._probe_generator = torch.Generator().manual_seed(0)
        self._step_rows = StepRows()  # the trainer's step batch, for the adapters' precomputed products
        self._frozen_momenta: dict[str, float | None] | None = None  # batchnorm='frozen': the momenta to restore
        self._digests: dict[str, bytes] = {}  # the open task's parameters (all but the V's) as it began
        self._trainable: set[str] = set()  # names of the parameters the open task trains
        self._warned: set[tuple[str, str]] = set()  # (module, reason) of the surprising freezes already reported

    def _saved_module(self, name: str) -> str | None:
        """The module of modules_to_save that holds (or is) module `name`, if any."""
        return next((m for m in self.saved_modules if name == m or name.startswith(f"{m}.")), None)

    # -- hooks -----------------------------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        """Every layer's null basis (Eq. 5) from the earlier tasks' inputs, then the adapters: the bases are all
        computed before the model changes, so an error (a non-finite covariance, say) leaves it as it was."""
        heads = task_heads(self.model)
        if heads is not None and t >= len(heads):
            raise IndexError(f"begin_task({t}): task {t} has no head, the model declares {len(heads)} task_heads")
        if t == 0:
            return
        generator_state = self._probe_generator.get_state()
        try:
            if self.config.memory == "replay":
                stats = self._collect(self._replay_batches(), where=f"begin_task({t})")
                covariances = {name: s.covariance for name, s in stats.items()}
                probes = {name: s.probe for name, s in stats.items()}
            else:
                covariances = dict(self.covariances)
                joined: dict[tuple[int, ...], Tensor] = {}  # layers sharing their statistics share one probe too
                for rows in self.probes.values():
                    if rows and tuple(map(id, rows)) not in joined:
                        joined[tuple(map(id, rows))] = torch.cat(rows)
                probes = {name: joined[tuple(map(id, rows))] for name, rows in self.probes.items() if rows}
            self._fill_unseen_layers(t, covariances, probes)
            bases = self._null_bases(covariances)
        except BaseException:
            self._probe_generator.set_state(generator_state)
            raise
        if self.config.batchnorm == "frozen":
            self._frozen_momenta = freeze_running_statistics(self.model)
        for name, basis in bases.items():
            record = self._basis_record(t, name, basis, covariances)
            self.records.append(record)
            if basis.rank == 0 and not self.config.transfer_rank:  # the layer does not change in this task
                continue
            base = self.model.get_submodule(name)
            budget = None
            if self.config.output_budget is not None:
                record["old_output_energy"] = old_output_energy(covariances[name], base, name in self.bias_layers)
                budget = record["output_budget"] = self.config.output_budget * record["old_output_energy"]
            adapter = NullSpaceAdapter(base, basis.basis, name, adapt_bias=name in self.bias_layers)
            adapter.step_rows = self._step_rows
            replace_module(self.model, name, adapter)
            self.active[name] = ActiveLayer(adapter, basis.kept_singular_values, probes[name], record, budget)
        self._guard_task(t)
        if not self.config.transfer_rank:  # else once preview_task has added the transfer adapters
            self._report_roles(t)

    def _fill_unseen_layers(self, t: int, covariances: dict[str, Tensor], probes: dict[str, Tensor]) -> None:
        """A layer no finished task called (a head of its own per task, say) has no old input to protect: its
        covariance is 0, so U is its whole input space and it trains freely. Said once per layer, since it often
        means per-task heads NESS was not told about."""
        unseen = [name for name in self.layer_names if name not in covariances]
        for name in unseen:
            module = self.model.get_submodule(name)
            d = input_dim(base_layer(module)) + (name in self.bias_layers)
            covariances[name] = torch.zeros(d, d, dtype=self._statistics_dtype, device=self._statistics_device)
            probes[name] = torch.zeros(0, d)
        new = [name for name in unseen if (name, "unseen") not in self._warned]
        if new:
            self._warned.update((name, "unseen") for name in new)
            log.warning(
                "NESS, task %d: %s received no input in the finished tasks, so nothing of theirs is protected and they "
                "train freely (U is their whole input space); if they are per-task heads, declare them as the "
                "model's `task_heads` (an nn.ModuleList) or list them in NESSConfig.modules_to_save",
                t,
                short_list(new),
            )

    def preview_task(self, t: int, batches: Iterable[Any]) -> None:
        """With transfer_rank = k: task t's transfer directions, from one pass of its data through the model as the
        task starts (each layer's Σxxᵀ), and a transfer adapter Ū·A on every adapted layer. The trainer calls it
        before the first step; in an own loop, `begin_task(t, loader)` does."""
        if t == 0 or not self.config.transfer_rank or self._transfer_task == t:
            return
        self._check_active(t, "preview_task")
        where = f"preview_task({t})"
        stats = self._collect(((x, t) for x in task_inputs(batches, where)), where, torch.Generator().manual_seed(t))
        directions: dict[str, TransferDirections] = {}
        computed: dict[int, list[tuple[Tensor, TransferDirections]]] = {}  # statistics (by id) → (U, directions)
        for name, layer in self.active.items():
            if name not in stats:  # a layer the new task does not call (another task's head) needs no transfer adapter
                continue
            # layers sharing their statistics and their U (the same rule) share the directions: one eigh for them
            same = computed.setdefault(id(stats[name]), [])
            known = next((d for u, d in same if torch.equal(u, layer.adapter.U)), None)
            if known is None:
                covariance = self._for_eigh(stats[name].covariance)
                known = transfer_directions(covariance, layer.adapter.U, self.config.transfer_rank, name)
                same.append((layer.adapter.U, known))
            directions[name] = known
        for name, found in directions.items():
            layer = self.active[name]
            layer.record.update(
                transfer_rank=found.basis.shape[1],
                new_energy_outside_U=found.outside_share,
                transfer_energy=found.captured_share,
            )
            if found.basis.shape[1]:
                layer.adapter.add_transfer(found.basis)
                self._trainable.add(f"{name}.A")
        self._transfer_task = t
        self._report_roles(t)

    def trainable_parameters(self, t: int) -> list[nn.Parameter]:
        if t > 0 and self.config.transfer_rank and self._transfer_task != t and self.active_task == t:
            raise TrainingLoopError(
                f"trainable_parameters({t}): NESSConfig.transfer_rank={self.config.transfer_rank} chooses task {t}'s "
                f"transfer directions from its data, which NESS has not seen: call method.begin_task({t}, loader) "
                f"(or method.preview_task({t}, loader)) with the task's training batches first, or set "
                "transfer_rank=0"
            )
        return super().trainable_parameters(t)

    def _null_bases(self, covariances: dict[str, Tensor]) -> dict[str, NullBasis]:
        """Every layer's U under its rule (the config's, or the first matching layer rule): one float64 eigh per
        distinct covariance, on the model's GPU when it fits there, whose spectrum gives the bases of all the layers
        sharing that covariance before the next eigh runs."""
        sharing: dict[int, list[str]] = {}  # covariance (by id) → the layers holding it
        for name in self.layer_names:
            sharing.setdefault(id(covariances[name]), []).append(name)
        bases = {}
        for names in sharing.values():
            spectrum = covariance_spectrum(self._for_eigh(covariances[names[0]]), names[0])
            for name in names:
                rule = self.config.layer_config(name)
                bases[name] = spectrum_null_basis(spectrum, rule.eps1, rule.threshold, delta=rule.delta, rank=rule.rank)
        return {name: bases[name] for name in self.layer_names}

    def _for_eigh(self, covariance: Tensor) -> Tensor:
        """`covariance` in float64 where its eigh runs: the model's GPU when it fits there, else the CPU."""
        return covariance.to(eigh_device(self._model_device, covariance.shape[0]), torch.float64)

    @property
    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _statistics_dtype(self) -> torch.dtype:
        return getattr(torch, self.config.statistics_dtype)

    @property
    def _statistics_device(self) -> torch.device:
        """Where the kept sums live: NESSConfig.statistics_device."""
        return torch.device("cpu") if self.config.statistics_device == "cpu" else self._model_device

    def _basis_record(self, t: int, name: str, basis: NullBasis, covariances: dict[str, Tensor]) -> dict[str, Any]:
        """The diagnostics record of layer `name`'s basis in task t (from `covariances`); `end_task` adds what V did."""
        energies = basis.singular_values.double() ** 2
        total_energy = float(energies.sum())
        covariance = covariances[name]
        return {
            "task": t,
            "layer": name,
            "d": basis.singular_values.numel(),
            "out": output_dim(base_layer(self.model.get_submodule(name))),
            "rank": basis.rank,
            "frozen": basis.rank == 0,
            "rule": self.config.layer_config(name).threshold,
            "threshold": basis.threshold,
            "sigma_max_U": float(basis.kept_singular_values.max()) if basis.rank else 0.0,
            "sigma_max_all": float(basis.singular_values.max()),
            # U's share of the earlier inputs' energy Σ‖x‖²: what old inputs put through the adapted directions.
            "energy_share_U": float(energies[: basis.rank].sum()) / total_energy if total_energy > 0 else 0.0,
            "eigh_fallback": basis.fallback,
            "memory_bytes": self.memory_bytes(),
            # the bytes of the layer's Σxxᵀ, and the first layer holding the same one (layers reading one input share
            # it; its bytes count once, at that layer)
            "statistics_bytes": covariance.numel() * covariance.element_size(),
            "statistics_owner": next(n for n in self.layer_names if covariances[n] is covariance),
            # The whole spectrum, descending: experiment.py moves it to spectra.json for the figures.
            "singular_values": basis.singular_values.flip(0).tolist(),
        }

    def _guard_task(self, t: int) -> None:
        """Freeze what task t does not train (so a loop that skips `trainable_parameters` trains nothing else) and
        take a digest of every parameter but the V's, which `end_task` compares to catch a loop that changed them."""
        trainable = {id(p) for p in ContinualMethod.trainable_parameters(self, t)}
        adapters = {id(layer.adapter.V) for layer in self.active.values()}
        self._trainable = {n for n, p in self.model.named_parameters() if id(p) in trainable}
        self._digests = {n: tensor_digest(p) for n, p in self.model.named_parameters() if id(p) not in adapters}

    def layer_roles(self, t: int) -> list[LayerRole]:
        """Per module with parameters, what task t does with them: adapted (rank r of d), trains fully, or frozen
        and why; PEFT's print_trainable_parameters, per layer. `begin_task` logs it."""
        self._check_active(t, "layer_roles")
        trainable = {id(p) for p in self.task_parameters(t)}
        records = {r["layer"]: r for r in self.records if r["task"] == t}
        heads = task_heads(self.model)
        head_modules = {id(m): i for i, head in enumerate(heads or ()) for m in head.modules()}
        unreachable = unreachable_layers(self.model)
        roles = []
        for name, module in self.model.named_modules():
            own = list(module.parameters(recurse=False))
            if isinstance(module, NullSpaceAdapter):
                own = list(module.parameters())  # V, and the base layer's frozen weight and bias
            elif not own or isinstance(self.model.get_submodule(name.rpartition(".")[0]), NullSpaceAdapter):
                continue  # no parameters of its own, or the base layer inside an adapter (reported with it)
            count = sum(p.numel() for p in own if id(p) in trainable)
            kind = type(base_layer(module)).__name__
            status, reason, detail = self._role(name, module, records, head_modules, unreachable, t, count)
            roles.append(LayerRole(name, kind, status, reason, detail, count))
        return roles

    def _role(
        self,
        name: str,
        module: nn.Module,
        records: dict[str, dict[str, Any]],
        head_modules: dict[int, int],
        unreachable: dict[str, str],
        t: int,
        trainable: int,
    ) -> tuple[Literal["adapted", "trains", "frozen"], str, str]:
        """(status, reason code, words) of one module in task t; see `layer_roles`."""
        if name in records:
            r = records[name]
            transfer = module.transfer_rank if isinstance(module, NullSpaceAdapter) else 0
            own = f"; transfer adapter of rank {transfer} (task {t}'s own)" if transfer else ""
            if r["rank"] == 0 and transfer:
                return "adapted", "transfer", f"rank 0 of {r['d']}: the shared weights stay{own}"
            if r["rank"] == 0:
                return (
                    "frozen",
                    "rank0",
                    (
                        f"rank 0 of {r['d']}: no direction of the earlier inputs has σ ≤ τ = {r['threshold']:.3g} "
                        f"({r['rule']} rule); raise ε₁ (or δ) to let it learn"
                    ),
                )
            bias = (
                "bias adapted too"
                if name in self.bias_layers
                else "bias frozen"
                if module.base.bias is not None
                else ""
            )
            detail = f"rank {r['rank']} of {r['d']}; only V trains{'; ' + bias if bias else ''}{own}"
            if r["energy_share_U"] >= PROTECTS_LITTLE:
                detail += (
                    f"; U carries {100 * r['energy_share_U']:.0f}% of the earlier inputs' energy, so it protects "
                    f"little: lower ε₁ (or δ) for this layer"
                )
            return "adapted", "adapted", detail
        saved = self._saved_module(name)
        if saved is not None:
            return "trains", "modules_to_save", f"modules_to_save ('{saved}'): trains fully, not protected"
        if id(module) in head_modules:
            if head_modules[id(module)] == t:
                return "trains", "head", f"head of task {t}"
            return "frozen", "other_head", "another task's head"
        if isinstance(module, _BatchNorm):
            if trainable:
                return "trains", "batchnorm", "batchnorm='per_task': this task's own copy"
            return "frozen", "batchnorm", "batchnorm='frozen': as task 0 left it"
        if name in self.excluded_layers:
            return "frozen", "excluded", "excluded by NESSConfig.exclude; list it in modules_to_save to train it fully"
        if name in unreachable:
            return "frozen", "unreachable", f"not adaptable: {unreachable[name]}"
        if isinstance(module, supported_layers()):  # an adaptable kind that the target_modules leave out
            return (
                "frozen",
                "not_targeted",
                "not in NESSConfig.target_modules; add it there to adapt it, or to modules_to_save to train it fully",
            )
        return (
            "frozen",
            "not_adaptable",
            (
                f"NESS adapts only Linear / Conv1d / Conv2d / Conv1D layers, not a {type(module).__name__}; list it in "
                "modules_to_save to train it fully"
            ),
        )

    def _report_roles(self, t: int) -> None:
        """Log task t's `layer_roles` (INFO), and warn once per module about a freeze a user may not expect and about
        an adapted layer whose U carries so much of the earlier inputs' energy that it protects little."""
        self.roles = self.layer_roles(t)
        log.info("NESS, task %d: what trains\n%s", t, format_roles(self.roles, self.model))
        shares = {r["layer"]: r["energy_share_U"] for r in self.records if r["task"] == t}
        frozen = [r for r in self.roles if r.reason in SURPRISING_FREEZES]
        unprotected = [r for r in self.roles if r.reason == "adapted" and shares[r.module] >= PROTECTS_LITTLE]
        for roles, what in ((frozen, "are frozen from now on"), (unprotected, "protect the earlier tasks little")):
            new = [r for r in roles if (r.module, r.reason) not in self._warned]
            if new:
                self._warned.update((r.module, r.reason) for r in new)
                lines = "\n".join(f"  {r.module} ({r.kind}): {r.detail}" for r in new)
                log.warning("NESS, task %d: these modules %s:\n%s", t, what, lines)

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        if t == 0:
            return super().task_parameters(t)
        own_head, _ = head_parameters(self.model, t)
        norms = batchnorm_layers(self.model).values() if self.config.batchnorm == "per_task" else ()
        norm_parameters = [p for layer in norms for p in layer.parameters(recurse=False)]
        saved = [p for name in self.saved_modules for p in self.model.get_submodule(name).parameters()]
        factors = [f for layer in self.active.values() for f in (layer.adapter.V, layer.adapter.A) if f is not None]
        params = factors + own_head + norm_parameters + saved
        return list({id(p): p for p in params}.values())  # a saved module may hold the head: each parameter once

    def predict(self, x: Tensor, t: int) -> Tensor:
        """Task t's logits: with its own transfer adapter (transfer_rank), and with batchnorm='per_task' an earlier
        task with its own BatchNorm state."""
        if self._computes_task(t):  # every training step: no transfer terms to switch, no block entered
            return self._predict_with_batchnorm(x, t)
        with self._transfer_of(t):
            return self._predict_with_batchnorm(x, t)

    def _predict_with_batchnorm(self, x: Tensor, t: int) -> Tensor:
        if self.config.batchnorm != "per_task" or t >= len(self.batchnorm_states) or t == self.active_task:
            return self.forward(self.model, x, t)
        with batchnorm_swapped(self.model, self.batchnorm_states[t]):
            return self.forward(self.model, x, t)

    def _computes_task(self, t: int) -> bool:
        """Whether the model's transfer terms are task t's as they stand (`_transfer_of(t)` would change nothing): t
        is the open transfer task, or no transfer term is open and task t kept none of its own."""
        if t == self._transfer_task:
            return True
        if self._transfer_task is not None or (t < len(self.transfers) and self.transfers[t]):
            return False
        return all(layer.adapter.A is None for layer in self.active.values())

    @contextmanager
    def _transfer_of(self, t: int) -> Iterator[None]:
        """Inside the block the model computes task t's function: the open task's transfer terms act only for the
        open task, and a finished task's own terms are added back for it."""
        if t == self._transfer_task or (not self.transfers and self._transfer_task is None):
            yield  # the open task (its terms act, outside any block too) or no transfer adapter: nothing to change
            return
        opened = [layer.adapter for layer in self.active.values() if layer.adapter.A is not None]
        own = self.transfers[t] if t < len(self.transfers) and t != self._transfer_task else {}
        for adapter in opened:
            adapter.transfer_enabled = t == self._transfer_task
        try:
            with added_low_rank_terms(self.model, own, self.bias_layers):
                yield
        finally:
            for adapter in opened:
                adapter.transfer_enabled = True

    def on_step_rows(self, t: int, rows: BatchRows | None) -> None:
        """Tell the adapters which rows of the prepared training split the step's batch is: an adapter reading that
        batch takes its frozen products from rows computed once per task (`NullSpaceAdapter._batch_products`)."""
        self._step_rows.rows = rows

    def after_step(self, t: int) -> None:
        """With max_output_shift = ε: project each V back onto the ball ‖V‖₂ ≤ √ε/σ_max(U) (Eq. 10); with
        output_budget: onto the ellipsoid ‖diag(σ_U)·V‖²_F ≤ its budget (row scaling, which keeps ‖V‖₂ within the
        ball, so both hold)."""
        if self.config.max_output_shift is None and self.config.output_budget is None:
            return
        with torch.no_grad():
            for layer in self.active.values():
                bound = self._v_bound(layer)
                if bound is not None:
                    layer.adapter.V.copy_(clip_spectral_norm(layer.adapter.V, bound))
                if layer.budget is not None:
                    sigma = layer.kept_singular_values.to(layer.adapter.V.device)
                    layer.adapter.V.copy_(project_to_output_budget(layer.adapter.V, sigma, layer.budget))

    def _v_bound(self, layer: ActiveLayer) -> float | None:
        """√ε/σ_max(U) for the layer, or None without a constraint (or when U carries no energy at all)."""
        sigma = layer.kept_singular_values
        sigma_max = float(sigma.max()) if sigma.numel() else 0.0
        if self.config.max_output_shift is None or sigma_max == 0.0:
            return None
        return math.sqrt(self.config.max_output_shift) / sigma_max

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        """Check the task's training, merge each ΔW into W and record the task's inputs: all of it, or nothing (an
        error, in the checks or while reading `batches`, leaves the task open and the method as it was)."""
        self._close_task(t, batches)

    def on_end_last_task(self, t: int, batches: Iterable[Any]) -> None:
        """As `on_end_task`, but `batches` is never read: the statistics of the task's inputs serve only the bases of
        later tasks and the adapter files, and `end_task(t, ..., last=True)` promises neither will come."""
        self._close_task(t, None)

    def _close_task(self, t: int, batches: Iterable[Any] | None) -> None:
        """`on_end_task`'s work; with `batches` None, without the statistics pass (memory) over the task's inputs."""
        self._step_rows.rows = None  # the task's training split is no longer needed
        if t > 0:
            self._check_training(t)
            if self.config.transfer_rank and self._transfer_task != t:
                log.warning(
                    "NESS, task %d: trained without its transfer adapter, since its data never reached "
                    "begin_task(%d, loader) or preview_task: it learnt in the shared null space only",
                    t,
                    t,
                )
        measured = {name: self._measure(layer) for name, layer in self.active.items()}
        merged: dict[str, tuple[Tensor, Tensor | None]] = {}  # the base weights before the merge, to roll back
        generator_state, transfer_task = self._probe_generator.get_state(), self._transfer_task
        # Task t's own transfer terms leave the adapters and act through predict(x, t) from now on, as they will
        # whenever task t is predicted: the statistics pass below sees task t's inputs as task t computes them.
        self.transfers.append(
            {
                name: (layer.adapter.transfer_basis.detach(), layer.adapter.A.detach().clone())
                for name, layer in self.active.items()
                if layer.adapter.A is not None
            }
        )
        self._transfer_task = None
        try:
            for name, layer in self.active.items():
                base = layer.adapter.base
                merged[name] = (base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone())
                replace_module(self.model, name, layer.adapter.merged())
            memory = None if batches is None else self._task_memory(t, batches)
        except BaseException:
            with torch.no_grad():
                for name, (weight, bias) in merged.items():
                    adapter = self.active[name].adapter
                    adapter.base.weight.copy_(weight)
                    if bias is not None:
                        adapter.base.bias.copy_(bias)
                    replace_module(self.model, name, adapter)
            self._probe_generator.set_state(generator_state)
            self.transfers.pop()
            self._transfer_task = transfer_task
            raise
        deltas = {}
        for name, layer in self.active.items():
            layer.record.update(measured[name])
            if layer.adapter.rank:
                deltas[name] = (layer.adapter.U.detach().cpu().clone(), layer.adapter.V.detach().cpu().clone())
        if t > 0:
            self.task_deltas.append(deltas)
        if self._frozen_momenta is not None:
            restore_momenta(self.model, self._frozen_momenta)
            self._frozen_momenta = None
        if self.config.batchnorm == "per_task":
            self.batchnorm_states.append(batchnorm_state(self.model))
        self.active, self.roles, self._digests, self._trainable = {}, [], {}, set()
        if isinstance(memory, Tensor):
            self.replay.append(memory)
        elif memory is not None:
            # Layers that shared their sums and share this task's statistics keep sharing one sum: it is added once.
            sums: dict[tuple[int, int], Tensor] = {}
            for name, s in memory.items():
                old = self.covariances.get(name)
                key = (id(old), id(s))
                if key not in sums:
                    sums[key] = s.covariance if old is None else old + s.covariance
                self.covariances[name] = sums[key]
                self.probes[name].append(s.probe)

    def _task_memory(self, t: int, batches: Iterable[Any]) -> Tensor | dict[str, LayerStatistics] | None:
        """What the memory keeps of task t's inputs (read through the merged model): the raw inputs (replay), each
        layer's statistics (covariance), or None when only the first task is kept."""
        where = f"end_task({t})"
        if self.config.memory_tasks == "first" and t > 0:
            return None
        if self.config.memory == "replay":
            inputs = list(task_inputs(batches, where))
            if not all(isinstance(x, Tensor) for x in inputs):
                raise TypeError(
                    f"NESS, {where}: memory='replay' keeps tensor inputs, and this task's batches are mappings (a "
                    "Hugging Face batch); use memory='covariance', which keeps each layer's statistics"
                )
            return torch.cat([x.detach().cpu() for x in inputs])
        return self._collect(((x, t) for x in task_inputs(batches, where)), where=where)

    def _replay_batches(self) -> Iterator[tuple[Tensor, int]]:
        """The stored inputs of every finished task, in batches of replay_batch_size (views, no copies)."""
        for j, inputs in enumerate(self.replay):
            for batch in inputs.split(self.config.replay_batch_size):
                yield batch, j

    def _check_training(self, t: int) -> None:
        """Raise TrainingLoopError, before anything changes, when the task's training broke what NESS relies on."""
        shift = self.config.max_output_shift
        over = []
        for name, layer in self.active.items():
            bound = self._v_bound(layer)
            norm = float(torch.linalg.matrix_norm(layer.adapter.V.detach().double(), ord=2))
            if bound is not None and norm > bound * (1 + 1e-5):
                over.append(f"{name}: ‖V‖₂ = {norm:.4g} > √ε/σ_max(U) = {bound:.4g}")
        for name, layer in self.active.items():
            change = output_change(layer.adapter.V, layer.kept_singular_values)
            if layer.budget is not None and change > layer.budget * (1 + 1e-5):
                over.append(f"{name}: the old inputs' output change {change:.4g} > its budget {layer.budget:.4g}")
        if over:
            raise TrainingLoopError(
                f"end_task({t}): the constraint on V (max_output_shift={shift}, output_budget="
                f"{self.config.output_budget}) does not hold for "
                f"{'; '.join(over)}. after_step({t}) must follow every optimiser step, as the trainer does; call "
                f"method.after_step({t}) now to project each V onto its constraint, then end_task({t}) again."
            )
        changed = [
            n for n, p in self.model.named_parameters() if n in self._digests and tensor_digest(p) != self._digests[n]
        ]
        frozen_changed = [n for n in changed if n not in self._trainable]
        if frozen_changed:
            raise TrainingLoopError(
                f"end_task({t}): parameters NESS froze for task {t} changed during it: {short_list(frozen_changed)}. "
                f"NESS confines task {t}'s change to ΔW = U·V, so these changes are not protected and the "
                f"diagnostics do not see them. Build the optimiser after begin_task({t}) from "
                f"method.trainable_parameters({t}) and leave requires_grad as NESS sets it; to train a module "
                "fully on purpose, list it in NESSConfig.modules_to_save."
            )
        factors = {
            f"{n}.{key}": f
            for n, layer in self.active.items()
            for key, f in (("V", layer.adapter.V), ("A", layer.adapter.A))
            if f is not None and f.numel()
        }
        if not factors or any(bool(f.detach().any()) for f in factors.values()):
            return
        with_gradient = [n for n, f in factors.items() if f.grad is not None and bool(f.grad.any())]
        trained = [n for n in changed if n in self._trainable]
        if with_gradient or trained:
            evidence = (
                f"their gradients were computed ({short_list(with_gradient)})"
                if with_gradient
                else f"the task trained ({short_list(trained)} changed)"
            )
            raise TrainingLoopError(
                f"end_task({t}): no adapter's V (or transfer A) moved during task {t} although {evidence}: the "
                f"optimiser does not hold them, so nothing of the task was learnt in the adapted layers. An "
                f"optimiser made before begin_task({t}) cannot hold them: build one after begin_task({t}) from "
                f"method.trainable_parameters({t})."
            )

    def memory_bytes(self) -> int:
        """Bytes the method keeps between tasks to build null spaces: the d×d sums (memory='covariance'; a sum that
        layers reading one input share counts once) or the raw inputs of earlier tasks (memory='replay'). The
        probe rows kept for measuring shifts are not counted."""
        kept = self.replay if self.config.memory == "replay" else distinct(self.covariances.values())
        return sum(x.numel() * x.element_size() for x in kept)

    def statistics_bytes(self) -> list[StatisticsSize]:
        """Per layer (in the model's order) with a kept sum Σxxᵀ (memory='covariance', from the end of task 0): its
        bytes, dtype and device, and the layer owning it: the first layer holding the same sum, where layers reading
        one input (q/k/v, gate/up) share it. The owners' bytes add up to `memory_bytes()`."""
        owners: dict[int, str] = {}
        sizes = []
        for name in self.layer_names:
            if name in self.covariances:
                c = self.covariances[name]
                owner = owners.setdefault(id(c), name)
                dtype = str(c.dtype).removeprefix("torch.")
                sizes.append(StatisticsSize(name, c.numel() * c.element_size(), dtype, str(c.device), owner))
        return sizes

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per layer and task t ≥ 1: d, rank, τ, σ_max(U), ‖V‖₂, the Eq. 8 bound σ_max(U)·‖V‖₂, the tighter
        data-free bound ‖Σ_U V‖₂ = max over the covariance's inputs, and the measured max ‖xᵀΔW‖ on kept rows."""
        return [dict(r) for r in self.records]

    # -- statistics ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _collect(
        self, inputs: Iterable[tuple[Tensor, int]], where: str, generator: torch.Generator | None = None
    ) -> dict[str, LayerStatistics]:
        """One forward pass with hooks over `inputs` (eval mode): every layer's Σxxᵀ and a row sample, drawn with
        `generator` (default: the method's own, whose state the probes of later tasks continue). Layers that read
        the very same input in every batch (q/k/v, gate/up) share one LayerStatistics object (ness.shared_inputs).

        Under torchrun each rank passes its rows rank::world of every batch; the sums are then added over the
        ranks and the row samples merged, so every rank holds what one process would have (ness.distributed)."""
        k = self.config.probe_samples
        part: distributed.Shard | None = None  # this rank's part of the batch being passed
        mask: Tensor | None = None  # its attention mask: which token rows are real
        generator = self._probe_generator if generator is None else generator
        dtype = self._statistics_dtype
        kept = torch.device("cpu") if self.config.statistics_device == "cpu" else None  # None: where the rows are
        positions = self.config.statistics_positions
        shared = SharedInputs(k, lambda: CovarianceSum(dtype=dtype, sum_dtype=dtype, device=kept), positions)

        def record(name: str, module: nn.Module, x: Tensor) -> None:
            layer = base_layer(module)

            def rows_and_keys() -> tuple[Tensor, Tensor, int | None]:
                rows = layer_input_rows(layer, x)
                if name in self.bias_layers:
                    rows = with_bias_input(rows)
                keys = distributed.shard_keys(rows.shape[0], part, generator)
                rows = rows[: keys.numel()]  # a rank without rows passed a placeholder row: none of its rows count
                real = None if mask is None or not is_linear(layer) else token_rows(x, mask, name)
                if real is not None:  # padding positions: their keys are drawn (the stream stays aligned), then dropped
                    real = real[: keys.numel()].to(rows.device)
                    rows, keys = rows[real], keys[real.cpu()]
                samples = x.shape[0] if x.dim() == layer.weight.dim() else 1  # a convolution's batch, or unbatched
                per_sample = None if is_linear(layer) or not rows.shape[0] else rows.shape[0] // samples
                return rows, keys, per_sample

            shared.add(name, x, (row_signature(layer), name in self.bias_layers), rows_and_keys)

        device = next(self.model.parameters()).device
        with watch_layer_inputs(self.model, self.layer_names, record):
            for x, task in inputs:
                part = distributed.shard(x)
                mask = attention_mask(part.x)
                self.predict(to_device(part.x, device), task)
                shared.end_batch()
        if distributed.world_size() > 1:  # layers share only where they do on every rank: all sum the same groups
            names = [name for name in self.layer_names if name in shared.groups]
            every_rank = distributed.all_gather_rows(torch.tensor([shared.first_of_group(names)]))  # (world, layers)
            shared.refine({name: tuple(every_rank[:, i].tolist()) for i, name in enumerate(names)})
        stats = shared.statistics()
        if not stats:
            raise ValueError(f"{where}: no layer saw any input; the task's loader was empty")
        if distributed.world_size() > 1:  # every rank: the sums over all ranks' rows, the top k of all their keys
            for s in distinct(stats[name] for name in self.layer_names if name in stats):
                s.covariance = distributed.all_reduce_sum(s.covariance)
                pool_keys, pool_rows = distributed.all_gather_rows(s.probe_keys), distributed.all_gather_rows(s.probe)
                s.probe_keys, s.probe = largest_keys(pool_keys, k, pool_rows)
        return stats

    @torch.no_grad()
    def _measure(self, layer: ActiveLayer) -> dict[str, float]:
        """‖V‖₂, Eq. 8's bound, the covariance bound ‖diag(σ_U)·V‖₂ and the max ‖xᵀΔW‖ over kept rows."""
        v = layer.adapter.V.detach().double()
        sigma_u = layer.kept_singular_values.to(v.device)
        if v.numel():
            v_norm = float(torch.linalg.matrix_norm(v, ord=2))
            # For x a column of I_t = ŨΣṼᵀ: xᵀUV = eᵢᵀṼ_U Σ_U V with orthonormal Ṽ: ‖xᵀUV‖ ≤ ‖Σ_U V‖₂ ≤ σ_max(U)‖V‖₂.
            covariance_bound = float(torch.linalg.matrix_norm(sigma_u[:, None] * v, ord=2))
            sigma_max = float(sigma_u.max())
        else:  # rank 0 (a layer that holds only a transfer adapter): the shared weights do not change
            v_norm = covariance_bound = sigma_max = 0.0
        delta = layer.adapter.U.double() @ v  # (d, o) in the paper's layout
        probe = layer.probe.to(delta.device, torch.float64)
        measured = float((probe @ delta).norm(dim=1).max()) if probe.numel() else float("nan")
        shift, transfer = self.config.max_output_shift, layer.adapter.A
        return {
            "certified_shift": math.sqrt(shift) if shift is not None else None,
            "v_spectral_norm": v_norm,
            "eq8_bound": sigma_max * v_norm,
            "covariance_bound": covariance_bound,
            # Σ over every recorded earlier input of ‖x̃ᵀΔW‖², exact from the covariance (output_budget's measure).
            "predicted_output_change": output_change(layer.adapter.V, layer.kept_singular_values),
            "measured_max_shift": measured,
            "probe_rows": probe.shape[0],
            "transfer_norm": float(transfer.detach().norm()) if transfer is not None else None,
        }

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        cpu = shared_apply(Tensor.cpu)
        state.update(
            config=asdict(self.config),
            covariances={n: cpu(c) for n, c in self.covariances.items()},  # shared sums stay shared
            probes={n: [cpu(p) for p in rows] for n, rows in self.probes.items()},
            replay=list(self.replay),
            task_deltas=[dict(deltas) for deltas in self.task_deltas],
            batchnorm_states=list(self.batchnorm_states),
            records=[dict(r) for r in self.records],
            probe_generator=self._probe_generator.get_state(),
            active={
                n: {
                    "rank": a.adapter.rank,
                    "transfer_rank": a.adapter.transfer_rank,
                    "kept_singular_values": a.kept_singular_values.cpu(),
                    "probe": a.probe.cpu(),
                }
                for n, a in self.active.items()
            },
            transfers=[{n: (u.cpu(), a.cpu()) for n, (u, a) in terms.items()} for terms in self.transfers],
            transfer_task=self._transfer_task,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore into a method built on a fresh model of the same architecture (adapters are re-created)."""
        if self.active or self.tasks_done or self.active_task is not None:
            raise RuntimeError("load_state_dict needs a freshly constructed NESS (no task begun)")
        if state.get("config") != asdict(self.config):
            raise ValueError(f"saved NESSConfig {state.get('config')} differs from this one {asdict(self.config)}")
        records = {(r["task"], r["layer"]): r for r in state["records"]}
        for name, saved in state["active"].items():
            base = self.model.get_submodule(name)
            # U's values come with the model's state below; only its shape is needed to build the adapter.
            bias = name in self.bias_layers
            d = input_dim(base) + bias
            adapter = NullSpaceAdapter(base, torch.ones(d, saved["rank"]), name, adapt_bias=bias)
            if saved.get("transfer_rank"):  # Ū and A, like U, take their values from the model's state below
                adapter.add_transfer(torch.ones(d, saved["transfer_rank"]))
            replace_module(self.model, name, adapter)
            record = records[(state["active_task"], name)]
            budget = record.get("output_budget")  # set by begin_task when the config has an output_budget
            self.active[name] = ActiveLayer(adapter, saved["kept_singular_values"], saved["probe"], record, budget)
        super().load_state_dict(state)
        if self.active_task is not None and self.active_task > 0 and self.config.batchnorm == "frozen":
            self._frozen_momenta = freeze_running_statistics(self.model)
        device = next(self.model.parameters()).device
        kept = shared_apply(lambda c: c.to(self._statistics_device))  # layers that shared a sum share it again
        self.covariances = {n: kept(c) for n, c in state["covariances"].items()}
        self.probes = {n: list(rows) for n, rows in state["probes"].items()}
        self.replay = list(state["replay"])
        self.task_deltas = [dict(deltas) for deltas in state["task_deltas"]]
        self.batchnorm_states = list(state["batchnorm_states"])
        self._probe_generator.set_state(state["probe_generator"])
        self.records = list(records.values())
        self.transfers = [
            {n: (u.to(device), a.to(device)) for n, (u, a) in terms.items()} for terms in state.get("transfers", [])
        ]
        self._transfer_task = state.get("transfer_task")
        if self.active_task is not None and self.active_task > 0:
            self._guard_task(self.active_task)  # the open task goes on from here: check its training from now on

    # -- adapter files (PEFT-style; see ness.adapter_files) --------------------------------------------
    def save_adapters(self, directory: str | Path) -> Path:
        """Write adapter_config.json, the tasks' U and V and the statistics to `directory` (safetensors)."""
        return adapter_files.save_adapters(self, directory)

    @classmethod
    def load_adapters(cls, model: nn.Module, directory: str | Path, forward: Forward = call_model) -> NESS:
        """The saved method, rebuilt on `model` as it was after task 0 (the base model), ready to continue."""
        return adapter_files.load_adapters(cls, model, directory, forward)

    def save_lora(
        self,
        directory: str | Path,
        upto: int | None = None,
        task: int | None = None,
        *,
        base_model_name_or_path: str | None = None,
        task_type: str | None = None,
    ) -> Path:
        """Write tasks 1..`upto` (default: every finished task; never the open one) as one PEFT LoRA adapter that
        `peft.PeftModel.from_pretrained(task0_model, directory)` loads: the shared model, or with task=j task j's
        own (its transfer term and BatchNorm state); see ness.lora_export.save_lora. It holds ΔW's, heads and
        BatchNorm states but no statistics, so it works after `end_task(t, ..., last=True)` too."""
        return lora_export.save_lora(
            self, directory, upto, task, base_model_name_or_path=base_model_name_or_path, task_type=task_type
        )

    @property
    def transfer_task(self) -> int | None:
        """The task whose transfer directions `preview_task` chose (None before any)."""
        return self._transfer_task

    @property
    def frozen_momenta(self) -> dict[str, float | None] | None:
        """With batchnorm='frozen', the BatchNorm momenta held at 0 during the open task (None outside one)."""
        return self._frozen_momenta

    def merge_and_unload(self, task: int | None = None) -> nn.Module:
        """A plain copy of the model with the open task's ΔW merged, no adapters: task=None gives the shared model
        (no task's transfer term), task=j task j's own model, with outputs `predict(x, j)`'s (its transfer term
        Ū_j·A_j merged too); see ness.adapter_files.merge_and_unload."""
        return adapter_files.merge_and_unload(self, task)


def format_roles(roles: list[LayerRole], model: nn.Module) -> str:
    """`layer_roles` as text: one line per adapted (or rank-0) layer, the other modules grouped by what happens to
    them, and the trainable share of the model's parameters."""
    lines = []
    groups: dict[tuple[str, str], list[LayerRole]] = {}
    width = max((len(r.module) for r in roles), default=0)
    for role in roles:
        if role.reason in ("adapted", "rank0", "transfer"):
            trains = f" ({role.trainable:,} trainable)" if role.trainable else ""
            lines.append(f"  {role.module:<{width}}  {role.kind}: {role.status}, {role.detail}{trains}")
        else:
            groups.setdefault((role.status, role.detail), []).append(role)
    for (status, detail), members in groups.items():
        names = short_list([f"{m.module} ({m.kind})" for m in members], most=4)
        lines.append(f"  {names}: {status}, {detail}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(r.trainable for r in roles)
    lines.append(f"  trainable: {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
    return "\n".join(lines)
