"""Export NESS's finished tasks as one standard PEFT LoRA adapter on top of the task-0 model.

Task t's change of an adapted layer, ΔW_t = U_t·V_t (U_t: d×r_t, V_t: r_t×o, the paper's layout), is a LoRA update
with lora_A = U_tᵀ, lora_B = V_tᵀ and scaling 1. The sum over tasks 1..T is one LoRA of rank Σ_t r_t whose lora_A
stacks the U_tᵀ and lora_B the V_tᵀ: B·A = Σ_t V_tᵀU_tᵀ = (Σ_t U_t V_t)ᵀ, the summed ΔW in PyTorch's (o, d) layout.
So the model after task T is the task-0 model plus one adapter that `peft.PeftModel.from_pretrained(task0_model,
directory)` loads, with the task heads, per-task BatchNorm states and NESSConfig.modules_to_save as PEFT's
modules_to_save. Writing it needs only json and safetensors: this module imports neither peft nor transformers, and
nothing from ness.methods.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ness.adapter_files import (
    ADAPTER_FILE,
    CONFIG_FILE,
    AdapterMethod,
    method_transfers,
    outermost_modules,
    write_state_dict,
)
from ness.adapters import NullSpaceAdapter, base_layer
from ness.models import task_heads
from ness.modules import short_list
from ness.normalization import batchnorm_layers
from ness.results import write_json_atomic
from ness.subspace import UnsupportedLayerError, is_transposed_linear

LORA_FORMAT = "ness-lora"
"""The `ness_format` of the exported safetensors file's metadata (PEFT reads only the tensors)."""
PEFT_PREFIX = "base_model.model."
"""What PEFT's saved keys put before a module's name in the base model."""
log = logging.getLogger(__name__)
Term = tuple[Tensor, Tensor]
"""A low-rank term (B, F) of one layer, whose update is B·F: a task's (U, V) or a transfer adapter's (Ū, A)."""


@dataclass(frozen=True)
class LoraFactors:
    """One layer's stacked LoRA in PEFT's shapes: lora_A, lora_B, lora_B's bias (Δb, with adapt_bias)."""

    lora_a: Tensor
    lora_b: Tensor
    bias: Tensor | None
    fan_in_fan_out: bool
    """The layer stores its weight d×o (transformers' Conv1D, GPT-2), which PEFT must be told."""

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def save_lora(
    method: AdapterMethod,
    directory: str | Path,
    upto: int | None = None,
    task: int | None = None,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the method's tasks 1..`upto` as one PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
    to `directory`; returns it. `PeftModel.from_pretrained(task0_model, directory)` is then the model after task
    `upto` (default: the last finished task; an open task is never included, its V still trains).

    task=None: the shared model, what task 0 and every task without a transfer adapter compute; with
    batchnorm='per_task' it holds task `upto`'s BatchNorm state. task=j ≤ upto: task j's own model, whose outputs
    are `method.predict(x, j)`'s: its transfer term Ū_j·A_j (NESSConfig.transfer_rank) stacked into the same LoRA
    and, with batchnorm='per_task', its BatchNorm state. PEFT's modules_to_save hold heads 1..upto, the BatchNorm
    layers with batchnorm='per_task' and NESSConfig.modules_to_save (refused unless `upto` is the last finished task
    and no task is open). `base_model_name_or_path` and `task_type` go into the config as PEFT's fields."""
    if not getattr(type(method), "saves_adapters", False):
        raise TypeError(f"save_lora takes a NESS method, got {type(method).__name__}")
    last = _last_task(method, upto)
    own = _own_transfer(method, task, last)
    model = method.model
    terms: dict[str, list[Term]] = {}  # per layer: (U_t, V_t) of t = 1..last, then task j's (Ū_j, A_j)
    for deltas in [*method.task_deltas[:last], own]:
        for name, term in deltas.items():
            terms.setdefault(name, []).append(term)
    if not terms:
        raise ValueError(
            f"save_lora: tasks 1 to {last} changed no adapted layer (every rank was 0), so the task-0 model already "
            "is the model after them and a LoRA adapter has nothing to hold; use the task-0 model and its heads"
        )
    layers = {
        name: lora_factors(name, base_layer(model.get_submodule(name)), terms[name], name in method.bias_layers)
        for name in method.layer_names
        if name in terms
    }
    modules = _peft_modules(method, last, task)
    _check_peft_names(model, list(layers), list(modules))

    lora_bias = any(f.bias is not None for f in layers.values())
    tensors: dict[str, Tensor] = {}
    for name, factors in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = factors.lora_a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = factors.lora_b
        if lora_bias:  # PEFT's lora_bias is one setting for every layer: 0 where NESS adapts no bias
            bias = factors.bias if factors.bias is not None else factors.lora_b.new_zeros(factors.lora_b.shape[0])
            tensors[f"{PEFT_PREFIX}{name}.lora_B.bias"] = bias
    for module_name, state in modules.items():
        tensors.update({f"{PEFT_PREFIX}{module_name}.{key}": value for key, value in state.items()})
    no_bias = [name for name, factors in layers.items() if lora_bias and factors.bias is None]
    if no_bias:
        log.warning(
            "save_lora: %s adapt no bias (they have none), but PEFT's lora_bias, set for the adapted biases, applies "
            "to every layer: they get a zero lora_B bias, which loads and computes exactly, but PEFT refuses to merge "
            "a lora_bias into a layer without a bias (PeftModel.merge_and_unload raises); method.merge_and_unload() "
            "gives the merged model",
            short_list(no_bias),
        )

    directory = Path(directory)
    metadata = {"ness_format": LORA_FORMAT, "ness_upto": str(last), "ness_task": str(task)}
    write_state_dict(directory / ADAPTER_FILE, tensors, metadata)
    ranks = {name: factors.rank for name, factors in layers.items()}
    # Each layer's own rank r and lora_alpha = r, so PEFT's scaling alpha/r is 1 everywhere; "^" + the escaped name
    # matches that layer alone under PEFT's pattern match (.*\.)?(key)$, and the target regex is matched whole.
    patterns = {f"^{re.escape(name)}": rank for name, rank in ranks.items()}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "target_modules": "|".join(re.escape(name) for name in layers),
        "exclude_modules": None,
        "r": max(ranks.values()),
        "lora_alpha": max(ranks.values()),
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "lora_dropout": 0.0,
        "fan_in_fan_out": any(f.fan_in_fan_out for f in layers.values()),
        "bias": "none",
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": list(modules) or None,
    }
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def _last_task(method: AdapterMethod, upto: int | None) -> int:
    """T, the last task the export holds: `upto`, checked, or the last finished task."""
    finished = method.tasks_done - 1  # tasks 1..finished have ended; task 0 is the base
    if finished < 1:
        raise ValueError(
            f"save_lora: no task after task 0 has finished (tasks_done={method.tasks_done}); the LoRA adapter holds "
            "the ΔW of tasks 1..T on top of the task-0 model, so end task 1 first"
        )
    if upto is None:
        return finished
    if isinstance(upto, bool) or not isinstance(upto, int):
        raise TypeError(f"save_lora(upto={upto!r}): upto must be a task index (an int), or None for task {finished}")
    if upto == method.active_task:
        raise ValueError(
            f"save_lora(upto={upto}): task {upto} is open and its V still trains; end_task({upto}) first, or export "
            f"up to task {upto - 1}"
        )
    if not 1 <= upto <= finished:
        raise ValueError(
            f"save_lora(upto={upto}): tasks 1 to {finished} have finished (task 0 is the base model the adapter "
            f"goes on); pass upto between 1 and {finished}"
        )
    return upto


def _own_transfer(method: AdapterMethod, task: int | None, last: int) -> dict[str, Term]:
    """Task `task`'s transfer terms {layer: (Ū, A)} for its own model, or {} for the shared model (task=None)."""
    if task is None:
        return {}
    if isinstance(task, int) and not isinstance(task, bool) and task > last:
        raise ValueError(
            f"save_lora(task={task}): the export holds the model after task {last} (upto={last}), in which task "
            f"{task} has not been learnt; pass a task of 1 to {last}, or a larger upto"
        )
    return method_transfers(method).of(task, "save_lora")


def lora_factors(name: str, layer: nn.Module, terms: list[Term], adapt_bias: bool) -> LoraFactors:
    """Layer `name`'s terms (B_t, F_t) as one LoRA in PEFT's shapes, stacked in float64 and cast to the layer's dtype:
    lora_A = [B_1 … B_n]ᵀ without the bias row, lora_B = [F_1; …; F_n]ᵀ, so B·A = (Σ_t B_t F_t)ᵀ is the summed
    ΔW; with `adapt_bias` lora_B's bias is Σ_t F_tᵀ·b_t (b_t B_t's bias row), the summed Δb."""
    kind = _peft_kind(name, layer)
    basis = torch.cat([b.detach().to("cpu", torch.float64) for b, _ in terms], dim=1)  # (d (+1), R)
    factor = torch.cat([f.detach().to("cpu", torch.float64) for _, f in terms])  # (R, o)
    lora_a, lora_b = (basis[:-1] if adapt_bias else basis).T, factor.T  # (R, d), (o, R)
    weight = layer.weight
    if kind == "conv":  # lora_A: a conv with the layer's kernel whose R filters are the bases; lora_B: a 1×1 conv
        lora_a = lora_a.reshape(basis.shape[1], *weight.shape[1:])
        lora_b = lora_b.reshape(*lora_b.shape, *[1] * (weight.dim() - 2))
    bias = factor.T @ basis[-1] if adapt_bias else None
    return LoraFactors(
        lora_a.to(weight.dtype).contiguous(),
        lora_b.to(weight.dtype).contiguous(),
        None if bias is None else bias.to(weight.dtype),
        kind == "fan_in_fan_out",
    )


def _peft_kind(name: str, layer: nn.Module) -> str:
    """How PEFT's LoRA holds this layer: 'linear', 'conv' (nn.Conv1d / nn.Conv2d), 'fan_in_fan_out' (transformers'
    Conv1D, a Linear layer whose weight is stored d×o); else a clear error."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        # PEFT's lora_A is a conv with the base's kernel size, stride and padding only (peft 0.21, lora/layer.py).
        lost = [
            f"{what}={value!r}"
            for what, value, plain in (
                ("dilation", layer.dilation, (1,) * len(layer.dilation)),
                ("padding_mode", layer.padding_mode, "zeros"),
                ("groups", layer.groups, 1),
            )
            if value != plain
        ]
        if lost:
            raise UnsupportedLayerError(
                f"save_lora: layer '{name}' is a {type(layer).__name__} with {', '.join(lost)}, which PEFT's LoRA "
                "does not reproduce (its lora_A conv takes the kernel size, stride and padding alone); export "
                "without LoRA: method.merge_and_unload() gives the merged model, or exclude the layer from NESS "
                f"(NESSConfig.exclude=['{name}']) in a new run"
            )
        return "conv"
    if is_transposed_linear(layer):
        return "fan_in_fan_out"
    raise UnsupportedLayerError(
        f"save_lora: layer '{name}' is a {type(layer).__name__}, which has no PEFT LoRA form here (nn.Linear, "
        "nn.Conv1d, nn.Conv2d and transformers' Conv1D have); method.merge_and_unload() gives the merged model"
    )


def _peft_modules(method: AdapterMethod, last: int, task: int | None) -> dict[str, dict[str, Tensor]]:
    """PEFT's modules_to_save of the model after task `last` (task j's own with task=j), with their state: heads
    1..last (head 0 is in the base), the BatchNorm layers with batchnorm='per_task' (the state of task j, or of
    `last`) and NESSConfig.modules_to_save (trained in every task, so only their present state is known: refused
    unless that is the state after `last`). PEFT wraps each module, so a ModuleList or ModuleDict (which a forward
    indexes) is listed by its members."""
    model = method.model
    if method.saved_modules and (last < method.tasks_done - 1 or method.active_task is not None):
        when = f"task {method.active_task} is open" if method.active_task is not None else f"upto={last}"
        raise ValueError(
            f"save_lora: NESSConfig.modules_to_save {method.saved_modules} train fully in every task and only their "
            f"present state is kept, which is not their state after task {last} ({when}); export after the last "
            "finished task with no task open (save before begin_task of the next one)"
        )
    chosen = set(method.saved_modules)
    batchnorm: dict[str, Tensor] = {}
    if method.config.batchnorm == "per_task":
        chosen.update(batchnorm_layers(model))
        state = method.batchnorm_states[last if task is None else task]
        batchnorm = {f"{layer}.{key}": value for layer, tensors in state.items() for key, value in tensors.items()}
    heads = task_heads(model)
    if heads is not None:
        names = {id(module): name for name, module in model.named_modules()}
        chosen.update(names[id(heads[j])] for j in range(1, last + 1))
    modules: dict[str, dict[str, Tensor]] = {}
    for outer in outermost_modules(model, chosen):
        for name in _wrappable(model, outer):
            state = model.get_submodule(name).state_dict()
            modules[name] = {key: batchnorm.get(f"{name}.{key}", value) for key, value in state.items()}
    return modules


def _wrappable(model: nn.Module, name: str) -> list[str]:
    """`name`, or the members of the ModuleList / ModuleDict it names (recursively): what PEFT can wrap in place."""
    module = model.get_submodule(name)
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return [found for child, _ in module.named_children() for found in _wrappable(model, f"{name}.{child}")]
    return [name]


def _check_peft_names(model: nn.Module, targets: list[str], saved: list[str]) -> None:
    """PEFT wraps as modules_to_save every module whose name ends with a listed one (as a string) and adapts no target
    matching (^|.*\\.)name($|\\..*); refuse names that would reach another module, since the loaded model would then
    fail or differ."""
    adapters = [name for name, m in model.named_modules() if isinstance(m, NullSpaceAdapter)]
    plain = [  # the module names of the plain base model PEFT loads onto: no adapter's inner layer
        name for name, _ in model.named_modules() if not any(name.startswith(f"{a}.") for a in adapters)
    ]
    clashes = []
    for name in saved:
        also = [other for other in plain if other != name and other.endswith(name)]
        hidden = [t for t in targets if re.match(rf"(^|.*\.){name}($|\..*)", t)]
        if also or hidden:
            clashes.append(f"'{name}' would also reach {short_list([*also, *hidden])}")
    if clashes:
        raise ValueError(
            "save_lora: PEFT finds modules_to_save by the end of a module's name, and here "
            f"{'; '.join(clashes)}, so the loaded adapter would not be this model; give those modules names that no "
            "other module's name ends with (e.g. an nn.Sequential's children by name), or use method.merge_and_unload()"
        )
