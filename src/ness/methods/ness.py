"""NESS: Null-space Estimated from Small Singular values (Pham, Vepakomma, Horváth, CPAL 2026).

Task 0 trains the whole network. Before each later task, every adapted layer gets ΔW = U·V, where U holds
the eigenvectors of the earlier tasks' layer-input covariance whose singular values are ≤ τ (Eq. 5) and only
V trains, so each earlier input x sees ‖xᵀΔW‖ ≤ σ_max(U)·‖V‖₂ (Eq. 8). At the end of the task ΔW merges into W.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ness import distributed
from ness.adapters import NullSpaceAdapter
from ness.methods.base import (
    ContinualMethod,
    Forward,
    config_tuple,
    is_count,
    is_number,
    replace_module,
    subspace_layers,
    task_inputs,
    watch_layer_inputs,
)
from ness.methods.normalization import (
    BatchNormState,
    batchnorm_layers,
    batchnorm_state,
    batchnorm_swapped,
    freeze_running_statistics,
    restore_momenta,
)
from ness.models import call_model, head_parameters
from ness.subspace import (
    SUPPORTED_LAYERS,
    THRESHOLD_RULES,
    ThresholdRule,
    clip_spectral_norm,
    input_covariance,
    input_dim,
    layer_input_rows,
    null_basis,
    with_bias_input,
)

Memory = Literal["covariance", "replay"]
MEMORIES: tuple[str, ...] = ("covariance", "replay")
MEMORY_TASKS: tuple[str, ...] = ("all", "first")
BATCHNORM_MODES: tuple[str, ...] = ("frozen", "per_task")


@dataclass(frozen=True)
class NESSConfig:
    """NESS settings; defaults are the paper's CIFAR-100 / 5-datasets values (METHODS_SPEC §2.5)."""

    eps1: float = 1e-3
    """ε₁ of Eq. 5: keep directions with σᵢ ≤ ε₁·‖I_t‖_F (frobenius) or ε₁·Σσᵢ (nuclear)."""
    threshold: ThresholdRule = "frobenius"
    """'frobenius' is the paper's Eq. 5; 'nuclear' is what the official code computes (a larger τ); 'energy' keeps
    the smallest directions carrying at most `delta` of the layer's input energy; 'rank' keeps `rank` directions."""
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
    memory_tasks: Literal["all", "first"] = "all"
    """Which finished tasks define the null space: 'all' (the paper), or 'first' as the official 5-datasets
    scripts, which store only task 0's data (METHODS_SPEC §2.7, a bug kept for --faithful runs)."""
    target_modules: tuple[str, ...] | None = None
    """Adapt only the layers these entries match, as PEFT's target_modules: module-name globs ('blocks.*.attn.q'),
    bare names matched against the end of a module name ('q'), or class names ('Linear', 'Conv1d'). None: every
    nn.Linear / nn.Conv1d / nn.Conv2d outside the task heads."""
    exclude: tuple[str, ...] = field(default_factory=tuple)
    """Entries of the same kinds (e.g. 'features.0', 'encoder.*', 'Conv2d') left unadapted, applied after targets."""
    adapt_bias: bool = False
    """Adapt biases in the null space too: rows x̃ = [x; 1], a (d+1)² covariance, and the last row of U·V is the
    bias change Δb, so Eq. 8 bounds xᵀΔW + Δb. False (the paper): biases stay as task 0 left them."""
    batchnorm: Literal["frozen", "per_task"] = "frozen"
    """'frozen' (the paper): after task 0 BatchNorm's affine parameters and running statistics never change.
    'per_task': every task trains its own and keeps them; evaluating task j swaps task j's back in, as task heads."""
    probe_samples: int = 256
    """Layer-input rows kept per layer and task to measure the real max ‖xᵀΔW‖ (0: report bounds only)."""
    max_output_shift: float | None = None
    """ε of Eq. 10, enforced: after every step each adapted layer's V is clipped to ‖V‖₂ ≤ √ε/σ_max(U), so every
    earlier input x of the layer (as the memory recorded it) has ‖xᵀΔW‖² ≤ ε, certified from the covariance
    alone. None: no constraint (the paper, which relies on weight decay to keep V small)."""

    def __post_init__(self) -> None:
        if isinstance(self.eps1, bool) or not isinstance(self.eps1, (int, float)) or not math.isfinite(self.eps1):
            raise ValueError(f"NESSConfig.eps1 must be a finite number in (0, 1), got {self.eps1!r}")
        if not 0 < self.eps1 < 1:
            raise ValueError(
                f"NESSConfig.eps1 must be in (0, 1), got {self.eps1}: ε₁ ≤ 0 keeps no direction and ε₁ ≥ 1 "
                "keeps every direction (no protection). The paper uses 1e-3 (CIFAR-100) and 5e-4 (miniImageNet)."
            )
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"NESSConfig.threshold must be one of {THRESHOLD_RULES}, got {self.threshold!r}")
        if not is_number(self.delta) or not 0 < self.delta < 1:
            raise ValueError(f"NESSConfig.delta must be a number in (0, 1), the energy share; got {self.delta!r}")
        if self.rank is not None and not is_count(self.rank):
            raise ValueError(f"NESSConfig.rank must be an integer ≥ 1 or None, got {self.rank!r}")
        if self.threshold == "rank" and self.rank is None:
            raise ValueError("NESSConfig: threshold='rank' needs rank=r, the number of null directions per layer")
        if not isinstance(self.layer_rules, dict):
            raise TypeError(f"NESSConfig.layer_rules must be a dict of pattern → settings, got {self.layer_rules!r}")
        for pattern, rule in self.layer_rules.items():
            unknown = set(rule) - set(LAYER_RULE_KEYS) if isinstance(rule, dict) else {"(not a dict)"}
            if unknown:
                raise ValueError(
                    f"NESSConfig.layer_rules[{pattern!r}]: unknown settings {sorted(unknown)}; a layer rule may set "
                    f"{LAYER_RULE_KEYS}"
                )
            self.for_layer_rule(rule)  # validates the combination
        if self.memory not in MEMORIES:
            raise ValueError(f"NESSConfig.memory must be one of {MEMORIES}, got {self.memory!r}")
        if self.memory_tasks not in MEMORY_TASKS:
            raise ValueError(f"NESSConfig.memory_tasks must be one of {MEMORY_TASKS}, got {self.memory_tasks!r}")
        for key in ("exclude", "target_modules"):
            value = getattr(self, key)
            if isinstance(value, str):
                raise TypeError(f"NESSConfig.{key} must be a list of patterns, not a single string: [{value!r}]")
            if value is not None:
                object.__setattr__(self, key, config_tuple(value, f"NESSConfig.{key}", patterns=True))
        if self.target_modules == ():
            raise ValueError("NESSConfig.target_modules is empty: give patterns, or None to adapt every layer")
        if not isinstance(self.adapt_bias, bool):
            raise TypeError(f"NESSConfig.adapt_bias must be True or False, got {self.adapt_bias!r}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"NESSConfig.batchnorm must be one of {BATCHNORM_MODES}, got {self.batchnorm!r}")
        shift = self.max_output_shift
        if shift is not None and (not is_number(shift) or shift <= 0):
            raise ValueError(
                f"NESSConfig.max_output_shift must be a finite number > 0 (the certified ‖xᵀΔW‖² per layer) or "
                f"None, got {shift!r}"
            )
        if isinstance(self.probe_samples, bool) or not isinstance(self.probe_samples, int) or self.probe_samples < 0:
            raise ValueError(f"NESSConfig.probe_samples must be an integer ≥ 0, got {self.probe_samples!r}")

    def for_layer_rule(self, rule: dict[str, Any]) -> NESSConfig:
        """This config with one layer rule's settings applied (and validated)."""
        return dataclasses.replace(self, **rule, layer_rules={})

    def layer_config(self, name: str) -> NESSConfig:
        """The settings of layer `name`: the first layer rule whose pattern matches it, else the config's own."""
        for pattern, rule in self.layer_rules.items():
            if fnmatch.fnmatchcase(name, pattern):
                return self.for_layer_rule(rule)
        return self


LAYER_RULE_KEYS: tuple[str, ...] = ("threshold", "eps1", "delta", "rank")


@dataclass
class LayerStatistics:
    """One layer's inputs over a task: Σxxᵀ (float64) and a uniform sample of rows for measurements."""

    covariance: Tensor
    probe: Tensor
    probe_keys: Tensor


@dataclass
class ActiveLayer:
    """A layer adapted in the current task: its adapter and what is needed to report on it at the end."""

    adapter: NullSpaceAdapter
    kept_singular_values: Tensor  # σᵢ of U's directions
    probe: Tensor  # earlier tasks' layer-input rows, for the measured shift
    record: dict[str, Any]


class NESS(ContinualMethod):
    """NESS on any model made of nn.Linear / nn.Conv2d layers (declared task heads are never adapted)."""

    name = "ness"
    config_class = NESSConfig

    def __init__(self, model: nn.Module, config: NESSConfig | None = None, forward: Forward = call_model) -> None:
        super().__init__(model, config, forward)
        self.layer_names = subspace_layers(
            model, self.config.exclude, "NESS", self.config.target_modules, kinds=SUPPORTED_LAYERS
        )
        # Layers whose bias NESS adapts: with adapt_bias, every adapted layer that has one.
        self.bias_layers = {
            name for name in self.layer_names if self.config.adapt_bias and model.get_submodule(name).bias is not None
        }
        if self.config.adapt_bias and not self.bias_layers:
            raise ValueError(
                f"NESSConfig: adapt_bias=True but no adapted layer has a bias (layers: {self.layer_names}); build the "
                "model's layers with bias=True, or leave adapt_bias off"
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
        self._probe_generator = torch.Generator().manual_seed(0)
        self._frozen_momenta: dict[str, float | None] | None = None  # batchnorm='frozen': the momenta to restore

    # -- hooks -----------------------------------------------------------------------------------------
    def on_begin_task(self, t: int) -> None:
        if t == 0:
            return
        if self.config.batchnorm == "frozen":
            self._frozen_momenta = freeze_running_statistics(self.model)
        if self.config.memory == "replay":
            stats = self._collect(((x, j) for j, x in enumerate(self.replay)), where=f"begin_task({t})")
            covariances = {name: s.covariance for name, s in stats.items()}
            probes = {name: s.probe for name, s in stats.items()}
        else:
            covariances = self.covariances
            probes = {name: torch.cat(rows) for name, rows in self.probes.items()}
        for name in self.layer_names:
            rule = self.config.layer_config(name)
            basis = null_basis(
                covariances[name], rule.eps1, rule.threshold, name=name, delta=rule.delta, rank=rule.rank
            )
            base = self.model.get_submodule(name)
            record: dict[str, Any] = {
                "task": t,
                "layer": name,
                "d": basis.singular_values.numel(),
                "out": base.weight.shape[0],
                "rank": basis.rank,
                "frozen": basis.rank == 0,
                "rule": rule.threshold,
                "threshold": basis.threshold,
                "sigma_max_U": float(basis.kept_singular_values.max()) if basis.rank else 0.0,
                "sigma_max_all": float(basis.singular_values.max()),
                "eigh_fallback": basis.fallback,
                "memory_bytes": self.memory_bytes(),
                # The whole spectrum, descending: experiment.py moves it to spectra.json for the figures.
                "singular_values": basis.singular_values.flip(0).tolist(),
            }
            self.records.append(record)
            if basis.rank == 0:  # no direction is quiet enough: the layer does not change in this task
                continue
            adapter = NullSpaceAdapter(base, basis.basis, name, adapt_bias=name in self.bias_layers)
            replace_module(self.model, name, adapter)
            self.active[name] = ActiveLayer(adapter, basis.kept_singular_values, probes[name], record)

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        if t == 0:
            return super().task_parameters(t)
        own_head, _ = head_parameters(self.model, t)
        norms = batchnorm_layers(self.model).values() if self.config.batchnorm == "per_task" else ()
        norm_parameters = [p for layer in norms for p in layer.parameters(recurse=False)]
        return [layer.adapter.V for layer in self.active.values()] + own_head + norm_parameters

    def predict(self, x: Tensor, t: int) -> Tensor:
        """With batchnorm='per_task', an earlier task is evaluated with its own BatchNorm state."""
        if self.config.batchnorm != "per_task" or t >= len(self.batchnorm_states) or t == self.active_task:
            return self.forward(self.model, x, t)
        with batchnorm_swapped(self.model, self.batchnorm_states[t]):
            return self.forward(self.model, x, t)

    def after_step(self, t: int) -> None:
        """With max_output_shift = ε: project each V back onto the ball ‖V‖₂ ≤ √ε/σ_max(U) (Eq. 10)."""
        if self.config.max_output_shift is None:
            return
        with torch.no_grad():
            for layer in self.active.values():
                bound = self._v_bound(layer)
                if bound is not None:
                    layer.adapter.V.copy_(clip_spectral_norm(layer.adapter.V, bound))

    def _v_bound(self, layer: ActiveLayer) -> float | None:
        """√ε/σ_max(U) for the layer, or None without a constraint (or when U carries no energy at all)."""
        sigma_max = float(layer.kept_singular_values.max())
        if self.config.max_output_shift is None or sigma_max == 0.0:
            return None
        return math.sqrt(self.config.max_output_shift) / sigma_max

    def on_end_task(self, t: int, batches: Iterable[Any]) -> None:
        deltas = {}
        for name, layer in self.active.items():
            layer.record.update(self._measure(layer))
            deltas[name] = (layer.adapter.U.detach().cpu().clone(), layer.adapter.V.detach().cpu().clone())
            replace_module(self.model, name, layer.adapter.merged())
        if t > 0:
            self.task_deltas.append(deltas)
        if self._frozen_momenta is not None:
            restore_momenta(self.model, self._frozen_momenta)
            self._frozen_momenta = None
        if self.config.batchnorm == "per_task":
            self.batchnorm_states.append(batchnorm_state(self.model))
        self.active = {}
        where = f"end_task({t})"
        if self.config.memory_tasks == "first" and t > 0:
            return
        if self.config.memory == "replay":
            self.replay.append(torch.cat([x.detach().cpu() for x in task_inputs(batches, where)]))
            return
        stats = self._collect(((x, t) for x in task_inputs(batches, where)), where=where)
        for name, s in stats.items():
            self.covariances[name] = self.covariances.get(name, 0) + s.covariance
            self.probes[name].append(s.probe)

    def memory_bytes(self) -> int:
        """Bytes the method keeps between tasks to build null spaces: the d×d sums (memory='covariance') or the raw
        inputs of earlier tasks (memory='replay'). The probe rows kept for measuring shifts are not counted."""
        kept = self.replay if self.config.memory == "replay" else list(self.covariances.values())
        return sum(x.numel() * x.element_size() for x in kept)

    def diagnostics(self) -> list[dict[str, Any]]:
        """Per layer and task t ≥ 1: d, rank, τ, σ_max(U), ‖V‖₂, the Eq. 8 bound σ_max(U)·‖V‖₂, the tighter
        data-free bound ‖Σ_U V‖₂ = max over the covariance's inputs, and the measured max ‖xᵀΔW‖ on kept rows."""
        return [dict(r) for r in self.records]

    # -- statistics ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _collect(self, inputs: Iterable[tuple[Tensor, int]], where: str) -> dict[str, LayerStatistics]:
        """One forward pass with hooks over `inputs` (eval mode): every layer's Σxxᵀ and a row sample.

        Under torchrun each rank passes its rows rank::world of every batch; the sums are then added over the
        ranks and the row samples merged, so every rank holds what one process would have (ness.distributed)."""
        stats: dict[str, LayerStatistics] = {}
        k = self.config.probe_samples
        part: distributed.Shard | None = None  # this rank's part of the batch being passed

        def record(name: str, module: nn.Module, x: Tensor) -> None:
            rows = layer_input_rows(module, x)
            if name in self.bias_layers:
                rows = with_bias_input(rows)
            keys = distributed.shard_keys(rows.shape[0], part, self._probe_generator)
            rows = rows[: keys.numel()]  # a rank without rows passed a placeholder row: none of its rows count
            s = stats.get(name)
            if s is None:
                empty = rows[:0].detach().float().cpu()
                stats[name] = s = LayerStatistics(input_covariance(rows[:0]), empty, torch.empty(0))
            s.covariance = s.covariance + input_covariance(rows)
            # Uniform sample without replacement across batches: the k rows with the largest random keys.
            # The overall top k lies within each batch's own top k, so only those rows leave the device.
            batch_top = keys.topk(min(k, keys.numel())).indices
            pool_keys = torch.cat([s.probe_keys, keys[batch_top]])
            pool_rows = torch.cat([s.probe, rows[batch_top.to(rows.device)].detach().float().cpu()])
            top = pool_keys.topk(min(k, pool_keys.numel())).indices
            s.probe, s.probe_keys = pool_rows[top], pool_keys[top]

        device = next(self.model.parameters()).device
        with watch_layer_inputs(self.model, self.layer_names, record):
            for x, task in inputs:
                part = distributed.shard(x)
                self.predict(part.x.to(device), task)
        if not stats:
            raise ValueError(f"{where}: no layer saw any input; the task's loader was empty")
        if distributed.world_size() > 1:  # every rank: the sums over all ranks' rows, the top k of all their keys
            for s in stats.values():
                s.covariance = distributed.all_reduce_sum(s.covariance)
                pool_keys, pool_rows = distributed.all_gather_rows(s.probe_keys), distributed.all_gather_rows(s.probe)
                top = pool_keys.topk(min(k, pool_keys.numel())).indices
                s.probe, s.probe_keys = pool_rows[top], pool_keys[top]
        return stats

    @torch.no_grad()
    def _measure(self, layer: ActiveLayer) -> dict[str, float]:
        """‖V‖₂, Eq. 8's bound, the covariance bound ‖diag(σ_U)·V‖₂ and the max ‖xᵀΔW‖ over kept rows."""
        v = layer.adapter.V.detach().double()
        v_norm = float(torch.linalg.matrix_norm(v, ord=2))
        sigma_u = layer.kept_singular_values.to(v.device)
        # For x a column of I_t = ŨΣṼᵀ: xᵀUV = eᵢᵀ Ṽ_U Σ_U V with orthonormal Ṽ, so ‖xᵀUV‖ ≤ ‖Σ_U V‖₂ ≤ σ_max(U)‖V‖₂.
        covariance_bound = float(torch.linalg.matrix_norm(sigma_u[:, None] * v, ord=2))
        delta = layer.adapter.U.double() @ v  # (d, o) in the paper's layout
        probe = layer.probe.to(delta.device, torch.float64)
        measured = float((probe @ delta).norm(dim=1).max()) if probe.numel() else float("nan")
        shift = self.config.max_output_shift
        return {
            "certified_shift": math.sqrt(shift) if shift is not None else None,
            "v_spectral_norm": v_norm,
            "eq8_bound": float(sigma_u.max()) * v_norm,
            "covariance_bound": covariance_bound,
            "measured_max_shift": measured,
            "probe_rows": probe.shape[0],
        }

    # -- saving ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            config=asdict(self.config),
            covariances={n: c.cpu() for n, c in self.covariances.items()},
            probes={n: [p.cpu() for p in rows] for n, rows in self.probes.items()},
            replay=list(self.replay),
            task_deltas=[dict(deltas) for deltas in self.task_deltas],
            batchnorm_states=list(self.batchnorm_states),
            records=[dict(r) for r in self.records],
            probe_generator=self._probe_generator.get_state(),
            active={
                n: {
                    "rank": a.adapter.rank,
                    "kept_singular_values": a.kept_singular_values.cpu(),
                    "probe": a.probe.cpu(),
                }
                for n, a in self.active.items()
            },
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
            adapter = NullSpaceAdapter(base, torch.ones(input_dim(base) + bias, saved["rank"]), name, adapt_bias=bias)
            replace_module(self.model, name, adapter)
            self.active[name] = ActiveLayer(
                adapter, saved["kept_singular_values"], saved["probe"], records[(state["active_task"], name)]
            )
        super().load_state_dict(state)
        if self.active_task and self.config.batchnorm == "frozen":
            self._frozen_momenta = freeze_running_statistics(self.model)
        device = next(self.model.parameters()).device
        self.covariances = {n: c.to(device) for n, c in state["covariances"].items()}
        self.probes = {n: list(rows) for n, rows in state["probes"].items()}
        self.replay = list(state["replay"])
        self.task_deltas = [dict(deltas) for deltas in state["task_deltas"]]
        self.batchnorm_states = list(state["batchnorm_states"])
        self._probe_generator.set_state(state["probe_generator"])
        self.records = list(records.values())

    # -- adapter files (PEFT-style; see ness.adapter_files) --------------------------------------------
    def save_adapters(self, directory: str | Path) -> Path:
        """Write adapter_config.json, the tasks' U and V and the statistics to `directory` (safetensors)."""
        from ness.adapter_files import save_adapters

        return save_adapters(self, directory)

    @classmethod
    def load_adapters(cls, model: nn.Module, directory: str | Path, forward: Forward = call_model) -> NESS:
        """The saved method, rebuilt on `model` as it was after task 0 (the base model), ready to continue."""
        from ness.adapter_files import load_adapters

        return load_adapters(model, directory, forward)

    def merge_and_unload(self) -> nn.Module:
        """A plain copy of the model with the open task's ΔW merged: no adapters, the same outputs."""
        from ness.adapter_files import merge_and_unload

        return merge_and_unload(self)
