"""PEFT-style files for NESS: save a method's adapters and statistics, load them onto the base model, merge.

A directory holds `adapter_config.json` (format, NESSConfig, layers, task counters, ranks, records, checksums, and a
digest of every base tensor the files do not carry), `adapter_model.safetensors` (each finished task's U and V and,
with NESSConfig.transfer_rank, its own transfer adapter Ū and A; the open task's U, V, kept σ, Ū and A; the modules
saved whole: task heads, BatchNorm layers, NESSConfig.modules_to_save; a sketch of the base weights) and
`adapter_statistics.safetensors` (covariances, probe rows, replay inputs, per-task BatchNorm states: what
`begin_task` of the next task needs). The base model is the network as task 0 left it; adding each finished task's
ΔW to it, in order, and putting the saved modules in gives the trained shared network back; a task's transfer term
Ū·A acts only when that task is predicted, so it is kept apart and merged only into that task's own model
(`merge_and_unload(method, task=j)`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from ness.adapters import NullSpaceAdapter, base_layer
from ness.models import call_model, task_heads
from ness.models.heads import Forward
from ness.modules import replace_module, short_list, tensor_digest
from ness.normalization import BatchNormState, batchnorm_layers, load_batchnorm_state, restore_momenta
from ness.results import atomic_file, write_json_atomic
from ness.subspace import SUPPORTED_LAYERS, input_dim, output_dim, supported_layers, weight_matrix

FORMAT = "ness-adapters"
FORMAT_VERSION = 4
"""Version 4 stores a statistic that several layers share (layers reading one input, such as q/k/v, share their
covariance and probe rows) once, under its first key, and lists the other keys in `statistics.aliases` (key → the
stored key); its sums may be float32 (NESSConfig.statistics_dtype). Files before it hold no alias.
Version 3 added the transfer adapters of NESSConfig.transfer_rank: `transfer.task{t}.{layer}.basis` / `.A` of each
finished task, `active.{layer}.transfer_basis` / `.A` of the open one, their ranks (`transfer_ranks` of each entry of
`tasks` and of `active`) and `transfer_task`. Version 2 added `base_tensors` to the config and
NESSConfig.modules_to_save to the saved modules. Files of versions 1 and 2 hold no transfer adapter (their NESSConfig
has no transfer_rank: 0); version 1 files are read without the base-tensor check (with a warning), unless their
NESSConfig has modules_to_save (refused)."""
CONFIG_FILE = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
STATISTICS_FILE = "adapter_statistics.safetensors"
# The entries of NESS.state_dict() these files hold; "model" is held as the base model plus ΔW's, heads and
# BatchNorm tensors; "final_task" is always None in them (save_adapters refuses a method closed with last=True), so
# it is not stored and loads as None.
STATE_KEYS = {
    "method",
    "tasks_done",
    "active_task",
    "final_task",
    "model",
    "config",
    "covariances",
    "probes",
    "replay",
    "task_deltas",
    "batchnorm_states",
    "records",
    "probe_generator",
    "active",
    "transfers",
    "transfer_task",
}
LAYER_KINDS: dict[str, type[nn.Module]] = {kind.__name__: kind for kind in SUPPORTED_LAYERS}
BASE_MODEL_HINT = (
    "Pass the model as it was after task 0 (`ness run --save-adapters` writes it to seed_N/base_model.safetensors)."
)
Transfer = dict[str, tuple[Tensor, Tensor]]
"""One task's transfer adapter: layer → (Ū, A), whose term Ū·A adds to the layer's W (and b, with adapt_bias)."""
log = logging.getLogger(__name__)
AdapterMethod = Any
"""A method whose class says `saves_adapters` (ness.methods.ness.NESS): these files know its state, but this module
imports nothing from ness.methods, so the dependency points one way (NESS uses this module)."""


# -- saving ------------------------------------------------------------------------------------------------------
def save_adapters(method: AdapterMethod, directory: str | Path) -> Path:
    """Write the method's adapters, statistics and config to `directory` (created if needed); returns it.

    Each file is written atomically and the config last, so a directory with a config is complete. The optimiser's
    state is not saved: training an open task continues with a fresh optimiser."""
    if not getattr(type(method), "saves_adapters", False):
        raise TypeError(f"save_adapters takes a NESS method, got {type(method).__name__}")
    if method.tasks_done == 0:
        raise ValueError(
            "save_adapters: task 0 has not ended, and NESS's adapters start with task 1; save the model itself "
            "after task 0 (its state then is the base model that load_adapters needs)"
        )
    if method.final_task is not None:
        t = method.final_task
        raise ValueError(
            f"save_adapters: task {t} was ended with end_task({t}, ..., last=True), which skips the statistics pass, "
            f"so these files would lack task {t}'s statistics that continuing from them needs; end the last task with "
            "last=False to save adapters (`ness run --save-adapters` and run_continual(..., continuable=True) do). "
            "save_lora and merge_and_unload need no statistics and still work"
        )
    state = method.state_dict()
    unknown = set(state) - STATE_KEYS
    if unknown:  # a new entry of NESS.state_dict() must get a place in these files before they can hold it
        raise NotImplementedError(f"save_adapters does not know how to save NESS state entries {sorted(unknown)}")
    directory = Path(directory)
    model = method.model
    adapters: dict[str, Tensor] = {}
    # (t, ΔW's (U, V), transfer terms (Ū, A)) of each finished task t ≥ 1
    finished = list(zip(range(1, state["tasks_done"]), state["task_deltas"], _finished_transfers(state), strict=True))
    for t, deltas, terms in finished:
        for name, (u, v) in deltas.items():
            adapters[f"task{t}.{name}.U"], adapters[f"task{t}.{name}.V"] = u, v
        for name, (basis, factor) in terms.items():
            adapters[f"transfer.task{t}.{name}.basis"], adapters[f"transfer.task{t}.{name}.A"] = basis, factor
    for name, layer in method.active.items():
        adapter = layer.adapter
        adapters[f"active.{name}.U"], adapters[f"active.{name}.V"] = adapter.U, adapter.V
        adapters[f"active.{name}.kept_singular_values"] = state["active"][name]["kept_singular_values"]
        if adapter.A is not None:  # the open task's transfer adapter (named as in the model's state dict)
            adapters[f"active.{name}.transfer_basis"], adapters[f"active.{name}.A"] = adapter.transfer_basis, adapter.A
    modules = _modules_to_save(method)
    for module_name in modules:
        for key, value in model.get_submodule(module_name).state_dict().items():
            adapters[f"modules_to_save.{module_name}.{key}"] = value
    for name in method.layer_names:
        direction, sketch, shift = _base_sketch(method, name)
        adapters[f"base_check.{name}.direction"] = direction
        adapters[f"base_check.{name}.sketch"], adapters[f"base_check.{name}.shift"] = sketch, shift

    statistics: dict[str, Tensor] = {f"covariance.{n}": c for n, c in state["covariances"].items()}
    for name, rows in state["probes"].items():
        statistics.update({f"probe.task{j}.{name}": probe for j, probe in enumerate(rows)})
    statistics.update({f"active_probe.{n}": active["probe"] for n, active in state["active"].items()})
    statistics.update({f"replay.task{j}": x for j, x in enumerate(state["replay"])})
    for j, batchnorm in enumerate(state["batchnorm_states"]):
        for layer_name, tensors in batchnorm.items():
            statistics.update({f"batchnorm.task{j}.{layer_name}.{key}": v for key, v in tensors.items()})
    statistics["probe_generator"] = state["probe_generator"]
    statistics, aliases = _stored_once(statistics)

    files = {}
    for file_name, tensors in ((ADAPTER_FILE, adapters), (STATISTICS_FILE, statistics)):
        data = _tensor_bytes(tensors)
        with atomic_file(directory / file_name, "wb") as f:
            f.write(data)
        files[file_name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "config": state["config"],
        "layers": {
            name: {
                "type": type(_layer(model, name)).__name__,
                "d": input_dim(_layer(model, name)),
                "out": output_dim(_layer(model, name)),
                "weight_shape": list(_layer(model, name).weight.shape),
                "adapt_bias": name in method.bias_layers,
            }
            for name in method.layer_names
        },
        "tasks_done": state["tasks_done"],
        "active_task": state["active_task"],
        "tasks": [
            {
                "task": t,
                "ranks": {name: u.shape[1] for name, (u, _) in deltas.items()},
                "transfer_ranks": {name: factor.shape[0] for name, (_, factor) in terms.items()},
            }
            for t, deltas, terms in finished
        ],
        "active": None
        if state["active_task"] is None
        else {
            "task": state["active_task"],
            "ranks": {n: a["rank"] for n, a in state["active"].items()},
            "transfer_ranks": {n: a["transfer_rank"] for n, a in state["active"].items() if a["transfer_rank"]},
        },
        "transfer_task": state["transfer_task"],
        "modules_to_save": modules,
        "base_tensors": {
            name: _tensor_record(tensor)
            for name, tensor in _uncarried_tensors(
                model, {name: name in method.bias_layers for name in method.layer_names}, modules
            ).items()
        },
        "statistics": {
            "covariance_layers": list(state["covariances"]),
            "probe_tasks": {name: len(rows) for name, rows in state["probes"].items()},
            "replay_tasks": len(state["replay"]),
            "batchnorm_tasks": len(state["batchnorm_states"]),
            "aliases": aliases,
        },
        "files": files,
        "records": state["records"],
    }
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def _stored_once(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`tensors` with each tensor object once, under its first key, and {other key: that key} for the rest:
    safetensors refuses tensors that share memory, and layers that read one input share their statistics."""
    first: dict[int, str] = {}
    for key, tensor in tensors.items():
        first.setdefault(id(tensor), key)
    stored = {key: tensors[key] for key in first.values()}
    return stored, {key: first[id(tensor)] for key, tensor in tensors.items() if first[id(tensor)] != key}


def _finished_transfers(state: dict[str, Any]) -> list[Transfer]:
    """The transfer terms {layer: (Ū, A)} of each finished task t ≥ 1, in order, beside `task_deltas` ({} for a task
    without; NESS.state_dict() lists them from task 0, which never has one, and a method restored from a checkpoint
    made before transfer adapters existed may list none)."""
    terms: list[Transfer] = state["transfers"]
    if terms and terms[0]:
        raise NotImplementedError("save_adapters: task 0 holds transfer adapters, which these files have no place for")
    return [terms[t] if t < len(terms) else {} for t in range(1, state["tasks_done"])]


def _layer(model: nn.Module, name: str) -> nn.Module:
    """The layer called `name`, looking through its adapter when the layer is wrapped."""
    return base_layer(model.get_submodule(name))


def _modules_to_save(method: AdapterMethod) -> list[str]:
    """Modules whose tensors change after task 0 outside ΔW, saved whole as PEFT's modules_to_save: the task heads
    (each task trains its own), the BatchNorm layers (batchnorm='per_task', or a custom loop) and the config's
    modules_to_save (they train fully in every task). The outermost of nested ones, in the model's order."""
    model = method.model
    chosen = {*batchnorm_layers(model), *method.saved_modules}
    if task_heads(model) is not None:
        chosen.add("task_heads")
    return outermost_modules(model, chosen)


def outermost_modules(model: nn.Module, chosen: set[str]) -> list[str]:
    """The modules named in `chosen` that lie in no other chosen module, in the model's order: each module's
    tensors once when a module and one inside it are both saved whole."""
    return [
        name
        for name, _ in model.named_modules()
        if name in chosen and not any(name.startswith(f"{outer}.") for outer in chosen)
    ]


def _uncarried_tensors(model: nn.Module, layers: dict[str, bool], modules: list[str]) -> dict[str, Tensor]:
    """The model's state-dict tensors that the adapter files do not carry, by their names in the plain base model
    (`x.base.bias` of a wrapped layer is `x.bias`): all but the adapted weights (and biases, where `layers[name]`
    says adapt_bias), the saved modules' tensors and the adapters' U, V, Ū and A. These must equal the base model's."""
    carried = {id(t) for name in modules for t in model.get_submodule(name).state_dict(keep_vars=True).values()}
    wrapped: dict[str, str] = {}  # "x.base." → "x." for each layer an adapter wraps
    for name, adapt_bias in layers.items():
        module, layer = model.get_submodule(name), _layer(model, name)
        if isinstance(module, NullSpaceAdapter):
            carried.update(id(t) for t in (module.U, module.V, module.transfer_basis, module.A) if t is not None)
            wrapped[f"{name}.base."] = f"{name}."
        carried.update(id(t) for t in (layer.weight, layer.bias if adapt_bias else None) if t is not None)
    tensors: dict[str, Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in carried:
            prefix = next((p for p in wrapped if key.startswith(p)), "")
            tensors[wrapped[prefix] + key[len(prefix) :] if prefix else key] = tensor.detach()
    return tensors


def _tensor_record(tensor: Tensor) -> dict[str, Any]:
    """What the config keeps of a base tensor it does not carry: shape, dtype and an exact digest of its bytes."""
    return {"shape": list(tensor.shape), "dtype": _dtype_name(tensor), "blake2b": tensor_digest(tensor).hex()}


def _dtype_name(tensor: Tensor) -> str:
    """'float32' for torch.float32: how the config names a dtype."""
    return str(tensor.dtype).removeprefix("torch.")


def _weight_rows(weight: Tensor, bias: Tensor | None) -> Tensor:
    """W̃ = [W | b] in float64 on the CPU, from W as `weight_matrix` gives it, (o, d): the matrix U·V changes,
    transposed."""
    w = weight.detach().to("cpu", torch.float64)
    return w if bias is None else torch.cat([w, bias.detach().to("cpu", torch.float64)[:, None]], dim=1)


def _base_sketch(method: AdapterMethod, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(g, W̃_base·g, Σ_t ΔW̃_t·g) for a fixed random g: enough to tell the base model from another one (e.g. the
    final one, whose sketch differs by exactly the shift) without keeping the base weights."""
    layer = _layer(method.model, name)
    bias = layer.bias if name in method.bias_layers else None
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(input_dim(layer) + (bias is not None), generator=generator, dtype=torch.float64)
    shift = torch.zeros(output_dim(layer), dtype=torch.float64)
    for deltas in method.task_deltas:
        if name in deltas:
            u, v = deltas[name]
            shift += v.double().T @ (u.double().T @ direction)  # ΔW̃ g = (U V)ᵀ g
    return direction, _weight_rows(weight_matrix(layer), bias) @ direction - shift, shift


def _tensor_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of CPU, contiguous copies of `tensors`; `metadata` adds to or replaces the
    header's {"format": "pt", "ness_format": ...}."""
    cpu = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    return safetensors.torch.save(cpu, metadata={"format": "pt", "ness_format": FORMAT, **(metadata or {})})


def write_state_dict(path: str | Path, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A model's state dict as one safetensors file, written atomically (the base model, a merged model, a LoRA
    export); `metadata` as in `_tensor_bytes`."""
    path = Path(path)
    with atomic_file(path, "wb") as f:
        f.write(_tensor_bytes(state, metadata))
    return path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict written by `write_state_dict` (or any safetensors file), with a clear error when it is not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file '{path}'")
    return _parse_tensors(path.read_bytes(), path)


# -- reading -----------------------------------------------------------------------------------------------------
@dataclass
class SavedAdapters:
    """A checked adapter directory: its config and the tensors of both files."""

    directory: Path
    config: dict[str, Any]
    adapters: dict[str, Tensor]
    statistics: dict[str, Tensor]

    def adapter(self, key: str) -> Tensor:
        return _take(self.adapters, key, self.directory / ADAPTER_FILE)

    def statistic(self, key: str) -> Tensor:
        """A statistic by key; a key stored under another's (format version 4: a shared statistic) gives that very
        tensor, so the layers that shared it share it again."""
        key = self.config["statistics"].get("aliases", {}).get(key, key)
        return _take(self.statistics, key, self.directory / STATISTICS_FILE)

    def task_deltas(self) -> list[dict[str, tuple[Tensor, Tensor]]]:
        """(U, V) per layer of each finished task t ≥ 1, in order."""
        return [
            {
                name: (self.adapter(f"task{task['task']}.{name}.U"), self.adapter(f"task{task['task']}.{name}.V"))
                for name in task["ranks"]
            }
            for task in self.config["tasks"]
        ]

    def active_deltas(self) -> dict[str, tuple[Tensor, Tensor]]:
        """(U, V) per layer of the open task (V as trained so far); empty between tasks."""
        active = self.config["active"] or {"ranks": {}}
        return {name: (self.adapter(f"active.{name}.U"), self.adapter(f"active.{name}.V")) for name in active["ranks"]}

    def task_transfers(self) -> list[Transfer]:
        """(Ū, A) per layer of each finished task t ≥ 1's own transfer adapter, in order: {} for a task without one
        (every task of a file before format version 3)."""
        return [
            {
                name: (
                    self.adapter(f"transfer.task{task['task']}.{name}.basis"),
                    self.adapter(f"transfer.task{task['task']}.{name}.A"),
                )
                for name in task.get("transfer_ranks", {})
            }
            for task in self.config["tasks"]
        ]

    def active_transfers(self) -> Transfer:
        """(Ū, A) per layer of the open task's transfer adapter (A as trained so far); empty between tasks, before
        the open task's transfer directions are chosen, and in files before format version 3."""
        active = self.config["active"] or {}
        return {
            name: (self.adapter(f"active.{name}.transfer_basis"), self.adapter(f"active.{name}.A"))
            for name in active.get("transfer_ranks", {})
        }

    def batchnorm_state(self, j: int) -> BatchNormState:
        """Task j's BatchNorm layers as it finished (batchnorm='per_task'): layer → tensor name → tensor."""
        prefix, state = f"batchnorm.task{j}.", {}
        for key, value in self.statistics.items():
            if key.startswith(prefix):
                layer, tensor = key[len(prefix) :].rsplit(".", 1)
                state.setdefault(layer, {})[tensor] = value
        return state

    def saved_modules(self) -> dict[str, dict[str, Tensor]]:
        """The saved state of each module saved whole (task heads, BatchNorm layers, NESSConfig.modules_to_save)."""
        prefixes = {name: f"modules_to_save.{name}." for name in self.config["modules_to_save"]}
        return {
            name: {key[len(prefix) :]: value for key, value in self.adapters.items() if key.startswith(prefix)}
            for name, prefix in prefixes.items()
        }


def read_adapters(directory: str | Path) -> SavedAdapters:
    """Read and check an adapter directory: its config's format and version, and each file against its checksum."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory '{directory}'; write one with method.save_adapters(dir)")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"'{directory}' has no {CONFIG_FILE}: it is not an adapter directory, or its save did not finish "
            "(the config is written last); save the adapters again"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); save the adapters again") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} is not a NESS adapter config: format {found!r}, expected {FORMAT!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format version {version!r}; this ness-cl reads versions 1 to {FORMAT_VERSION}. "
            "Upgrade ness-cl to read adapters written by a newer one."
        )
    tensors = []
    for file_name in (ADAPTER_FILE, STATISTICS_FILE):
        path = directory / file_name
        if not path.is_file():
            raise FileNotFoundError(f"'{directory}' has {CONFIG_FILE} but no {file_name}; save the adapters again")
        data = path.read_bytes()
        expected = config.get("files", {}).get(file_name)
        if expected is None:
            raise ValueError(f"{config_path} lists no checksum for {file_name}; save the adapters again")
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise ValueError(
                f"{path} does not match its checksum in {CONFIG_FILE} ({len(data)} bytes, {expected['bytes']} "
                "expected): the file is corrupt, was changed, or comes from another save; save the adapters again"
            )
        tensors.append(_parse_tensors(data, path))
    return SavedAdapters(directory, config, *tensors)


def _parse_tensors(data: bytes, path: Path) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load(data)
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err


def _take(tensors: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in tensors:
        raise ValueError(f"{path} has no tensor {key!r}; it does not belong to {CONFIG_FILE} beside it")
    return tensors[key]


# -- checking a base model ---------------------------------------------------------------------------------------
def _check_layer(name: str, spec: dict[str, Any], layer: nn.Module | None) -> None:
    """The base model's layer `name` must be what the adapters were trained on: its kind, d, outputs and bias."""
    saved = f"{spec['type']} with d={spec['d']} inputs per row and {spec['out']} outputs"
    if layer is None:
        raise ValueError(
            f"layer '{name}' ({saved}) of the saved adapters is not in the model; load them onto the architecture "
            "they were trained on"
        )
    found = type(layer).__name__
    if found != spec["type"] or input_dim(layer) != spec["d"] or output_dim(layer) != spec["out"]:
        described = (
            f"{found} with d={input_dim(layer)}, {output_dim(layer)} outputs"
            if isinstance(layer, supported_layers())
            else found
        )
        raise ValueError(
            f"layer '{name}': the adapters expect a {saved}, the model has a {described}; build the model with the "
            "sizes it was trained with"
        )
    if spec["adapt_bias"] and layer.bias is None:
        raise ValueError(f"layer '{name}': the adapters change its bias (adapt_bias) but the model's layer has none")


def _check_base(saved: SavedAdapters, name: str, weight: Tensor, bias: Tensor | None) -> None:
    """The layer's weights must be the base the adapters were trained from, up to float round-off of the merges."""
    direction = saved.adapter(f"base_check.{name}.direction")
    sketch, shift = saved.adapter(f"base_check.{name}.sketch"), saved.adapter(f"base_check.{name}.shift")
    rows = _weight_rows(weight, bias)
    given = rows @ direction
    # Each merge rounds W once (≤ ε|W| per entry), and 1% of the shift allows a ΔW formed at lower precision (TF32).
    round_off = 8 * torch.finfo(weight.dtype).eps * (len(saved.config["tasks"]) + 1) * (rows.abs() @ direction.abs())
    tolerance = float(round_off.norm()) + 0.01 * float(shift.norm())
    diff = float((given - sketch).norm())
    if diff <= tolerance:
        return
    final = float((given - sketch - shift).norm()) <= tolerance
    raise ValueError(
        f"layer '{name}': the model's weights are not the base model these adapters were trained from (a sketch of "
        f"the weights differs by {diff:.3g}, tolerance {tolerance:.3g})"
        + ("; they are the trained model's, with every task's ΔW already in them" if final else "")
        + f". {BASE_MODEL_HINT}"
    )


def _check_format_version(saved: SavedAdapters) -> None:
    """Version 1 files carry no digests of the other base tensors (a warning: they are not checked) and not the
    NESSConfig's modules_to_save (refused: the trained values of those modules are not in the files)."""
    if saved.config["format_version"] >= 2:
        return
    where = saved.directory / CONFIG_FILE
    if saved.config["config"].get("modules_to_save"):
        raise ValueError(
            f"{where}: format version 1 does not hold the NESSConfig's modules_to_save "
            f"{saved.config['config']['modules_to_save']} (their trained values are missing); save the adapters "
            "again with this ness-cl"
        )
    log.warning(
        "%s: format version 1 records only the adapted weights of the base model, so its other tensors (unadapted "
        "biases, excluded layers, LayerNorms, buffers) are not checked; save the adapters again to check them",
        where,
    )


def _saved_settings(saved: SavedAdapters) -> dict[str, Any]:
    """The saved NESSConfig's fields. Files before format version 3 come from a NESSConfig without transfer_rank:
    their method had no transfer adapters, which is transfer_rank=0 (not today's default)."""
    settings = dict(saved.config["config"])
    if saved.config["format_version"] < 3:
        settings.setdefault("transfer_rank", 0)
    return settings


def _check_uncarried(saved: SavedAdapters, tensors: dict[str, Tensor], what: str) -> None:
    """Every base tensor the files do not carry must be in `tensors` (`what`: the model or state dict passed) with
    the shape, dtype and exact bytes recorded at save time: the adapters only reproduce the trained model on top
    of the very base they were trained from."""
    recorded: dict[str, dict[str, Any]] | None = saved.config.get("base_tensors")
    if recorded is None:  # format version 1 (_check_format_version warned)
        return
    missing = [name for name in recorded if name not in tensors]
    extra = [name for name in tensors if name not in recorded]
    if missing or extra:
        found = ([f"lacks {short_list(missing)}"] if missing else []) + (
            [f"has {short_list(extra)}, which the base did not have"] if extra else []
        )
        raise ValueError(
            f"{what} does not have the tensors of the base model these adapters were trained from: it "
            f"{' and '.join(found)} (among the tensors the adapters do not carry: unadapted biases, excluded and "
            "other layers, buffers); build the model with the architecture it was trained with"
        )
    reshaped = [
        f"{name} ({_dtype_name(tensors[name])} {list(tensors[name].shape)}, base {r['dtype']} {r['shape']})"
        for name, r in recorded.items()
        if list(tensors[name].shape) != r["shape"] or _dtype_name(tensors[name]) != r["dtype"]
    ]
    if reshaped:
        raise ValueError(
            f"{what}: tensors differ in shape or dtype from the base model these adapters were trained from: "
            f"{short_list(reshaped, most=4)}; build the model with the sizes and dtype it was trained with"
        )
    differ = [name for name, r in recorded.items() if tensor_digest(tensors[name]).hex() != r["blake2b"]]
    if differ:
        raise ValueError(
            f"{what} is not the base model these adapters were trained from: {len(differ)} of the {len(recorded)} "
            f"tensors the adapters do not carry differ from the base's ({short_list(differ)}), and the loaded model "
            f"would not give the trained model's outputs. {BASE_MODEL_HINT} If a listed tensor is a buffer the model "
            "updates while it trains, list its module in NESSConfig.modules_to_save so the adapters carry it."
        )


# -- loading -----------------------------------------------------------------------------------------------------
def load_adapters(
    method_class: type, model: nn.Module, directory: str | Path, forward: Forward = call_model
) -> AdapterMethod:
    """A NESS method equivalent to the saved one, built on `model`: the base model (the architecture with its
    weights after task 0). Each finished task's ΔW is merged into it in order, the modules saved whole are put
    back, the open task's adapters are re-created with their U and V (and Ū and A of its transfer adapter), each
    finished task's transfer adapter is kept for when that task is predicted, and the statistics are restored, so
    training and `begin_task` continue. Before changing anything, the model is checked to be that base: its adapted
    weights through a sketch, every other tensor exactly against the digests saved with the adapters.
    `method_class` (NESS, whose `load_adapters` calls this) builds the method from its saved config."""
    saved = read_adapters(directory)
    _check_format_version(saved)
    config = saved.config
    wrapped = [name for name, m in model.named_modules() if isinstance(m, NullSpaceAdapter)]
    if wrapped:
        raise ValueError(
            f"the model holds NullSpaceAdapter layers {wrapped}: pass the plain base model (after task 0), not a "
            "model a NESS method has wrapped (merge_and_unload gives a plain copy of one)"
        )
    for name, spec in config["layers"].items():
        _check_layer(name, spec, _find(model, name))
    try:
        ness_config = method_class.config_class(**_saved_settings(saved))
    except TypeError as err:
        raise ValueError(f"{saved.directory / CONFIG_FILE}: its NESSConfig does not fit this ness-cl ({err})") from err
    method = method_class(model, ness_config, forward)
    extra = sorted(set(method.layer_names) - set(config["layers"]))
    if extra:
        raise ValueError(
            f"the model has layers {extra} that NESS would adapt but the saved adapters do not cover; load them "
            "onto the architecture they were trained on"
        )
    for name, spec in config["layers"].items():
        if (name in method.bias_layers) != spec["adapt_bias"]:
            raise ValueError(f"layer '{name}': the model's layer has a bias, the adapters were saved for one without")
        layer = model.get_submodule(name)
        _check_base(saved, name, weight_matrix(layer), layer.bias if spec["adapt_bias"] else None)
    modules = saved.saved_modules()
    for module_name, state in modules.items():
        _check_module_state(_find(model, module_name), module_name, state, saved.directory)
    layers = {name: spec["adapt_bias"] for name, spec in config["layers"].items()}
    _check_uncarried(saved, _uncarried_tensors(model, layers, list(modules)), "the model")
    state = _method_state(saved, method)  # every tensor read (and checked present) before the model changes

    for deltas in state["task_deltas"]:
        for name, (u, v) in deltas.items():
            _merge_delta(model.get_submodule(name), u, v, name, name in method.bias_layers)
    for module_name, tensors in modules.items():
        model.get_submodule(module_name).load_state_dict(tensors)
    state["model"] = _state_with_adapters(model, saved.active_deltas(), saved.active_transfers(), method.bias_layers)
    method.load_state_dict(state)
    return method


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_module_state(module: nn.Module | None, name: str, state: dict[str, Tensor], directory: Path) -> None:
    """A saved head or BatchNorm state must fit the model's module of that name, tensor by tensor."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()} if module is not None else {}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if own != found:
        raise ValueError(
            f"module '{name}' saved in {directory / ADAPTER_FILE} has tensors {found}, the model's has "
            f"{own or 'none'}; build the model with the heads, BatchNorm layers and modules_to_save it was trained "
            "with"
        )


def _method_state(saved: SavedAdapters, method: AdapterMethod) -> dict[str, Any]:
    """The saved method's NESS.state_dict() from the files, all but its "model" entry."""
    config, counts = saved.config, saved.config["statistics"]
    active = config["active"] or {"ranks": {}}
    transfer_ranks = active.get("transfer_ranks", {})
    return {
        "method": method.name,
        "tasks_done": config["tasks_done"],
        "active_task": config["active_task"],
        "config": asdict(method.config),
        "covariances": {n: saved.statistic(f"covariance.{n}") for n in counts["covariance_layers"]},
        "probes": {
            n: [saved.statistic(f"probe.task{j}.{n}") for j in range(k)] for n, k in counts["probe_tasks"].items()
        },
        "replay": [saved.statistic(f"replay.task{j}") for j in range(counts["replay_tasks"])],
        "task_deltas": saved.task_deltas(),
        "batchnorm_states": [saved.batchnorm_state(j) for j in range(counts["batchnorm_tasks"])],
        "records": config["records"],
        "probe_generator": saved.statistic("probe_generator"),
        "active": {
            name: {
                "rank": rank,
                "transfer_rank": transfer_ranks.get(name, 0),
                "kept_singular_values": saved.adapter(f"active.{name}.kept_singular_values"),
                "probe": saved.statistic(f"active_probe.{name}"),
            }
            for name, rank in active["ranks"].items()
        },
        "transfers": [{}, *saved.task_transfers()],  # task 0 never has a transfer adapter
        "transfer_task": config.get("transfer_task"),
    }


def _state_with_adapters(
    model: nn.Module,
    active: dict[str, tuple[Tensor, Tensor]],
    transfers: Transfer,
    bias_layers: set[str],
) -> dict[str, Tensor]:
    """The model's state dict as it reads with the open task's adapters (U, V, and Ū, A where `transfers` has the
    layer) in place, as NESS.state_dict() holds it; the model itself is left unwrapped (NESS.load_state_dict wraps
    it, adding a transfer term of the same shape from `active[layer]["transfer_rank"]`)."""
    layers = {name: model.get_submodule(name) for name in active}
    try:
        for name, (u, v) in active.items():
            adapter = _adapter(layers[name], u, v, name, name in bias_layers)
            if name in transfers:
                basis, factor = transfers[name]
                adapter.add_transfer(basis)
                with torch.no_grad():
                    adapter.A.copy_(factor)
            replace_module(model, name, adapter)
        return model.state_dict()
    finally:
        for name, layer in layers.items():
            replace_module(model, name, layer)


def _adapter(layer: nn.Module, basis: Tensor, factor: Tensor, name: str, adapt_bias: bool) -> NullSpaceAdapter:
    """`layer` wrapped in an adapter whose U·V is basis·factor (U = basis, V = factor)."""
    adapter = NullSpaceAdapter(layer, basis, name, adapt_bias=adapt_bias)
    with torch.no_grad():
        adapter.V.copy_(factor)
    return adapter


def _merge_delta(layer: nn.Module, basis: Tensor, factor: Tensor, name: str, adapt_bias: bool) -> None:
    """Fold one low-rank update basis·factor into `layer` in place, W ← W + (B F)ᵀ (and b ← b + its bias row): a
    task's ΔW = U·V, or a transfer term Ū·A. It goes through the adapter's own merge (the same arithmetic as the
    method's end_task, so the weights come out bit for bit)."""
    _adapter(layer, basis, factor, name, adapt_bias).merged()


# -- merging -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskTransfers:
    """The transfer adapter of every task that has begun (finished ones and the open one; {} where a task has none),
    with what explains a missing one: the choice of `merge_and_unload(method, task)`, `merged_state_dict` and
    `ness.lora_export.save_lora`."""

    terms: dict[int, Transfer]
    open_task: int | None
    previewed: bool
    """The open task's transfer directions are chosen (preview_task ran), so its adapters hold Ū and A."""
    transfer_rank: int
    """NESSConfig.transfer_rank."""

    def of(self, task: int, where: str) -> Transfer:
        """Task `task`'s transfer terms, or a clear error when the task does not exist or has no transfer adapter."""
        call = f"{where}(task={task!r})"
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"{call}: task must be a task index (an int), or None for the shared model")
        if task not in self.terms:
            begun = (
                "no task has begun"
                if not self.terms
                else f"tasks 0 to {max(self.terms)} have begun"
                + (f" (task {self.open_task} is open)" if self.open_task is not None else "")
            )
            raise ValueError(
                f"{call}: there is no task {task}; {begun}. Pass one of them, or task=None for the shared model"
            )
        if self.terms[task]:
            return self.terms[task]
        if task == 0:
            reason = "task 0 trains the whole network and has no transfer adapter"
        elif not self.transfer_rank:
            reason = "NESSConfig.transfer_rank is 0, so no task has a transfer adapter"
        elif task == self.open_task and not self.previewed:
            reason = (
                f"task {task} is open and its transfer directions are not chosen yet: call method.preview_task({task}, "
                f"batches) with its training data (begin_task({task}, loader) does) before merging"
            )
        else:
            reason = (
                f"no layer found a direction of task {task}'s inputs outside U, so it has transfer rank 0 everywhere"
            )
        raise ValueError(
            f"{call}: task {task} has no transfer term to merge ({reason}); task=None gives the shared model, which is "
            "what a task without a transfer adapter computes"
        )


def method_transfers(method: AdapterMethod) -> TaskTransfers:
    """The method's transfer adapters by task: each finished task's `method.transfers[t]`, and the open task's terms
    as its adapters hold them now (A as trained so far)."""
    terms = {j: method.transfers[j] if j < len(method.transfers) else {} for j in range(method.tasks_done)}
    if method.active_task is not None:
        terms[method.active_task] = {
            name: (layer.adapter.transfer_basis, layer.adapter.A.detach())
            for name, layer in method.active.items()
            if layer.adapter.A is not None
        }
    previewed = method.active_task is not None and method.transfer_task == method.active_task
    return TaskTransfers(terms, method.active_task, previewed, method.config.transfer_rank)


def _saved_transfers(saved: SavedAdapters) -> TaskTransfers:
    """The saved method's transfer adapters by task, from the files (none before format version 3)."""
    config, active = saved.config, saved.config["active"]
    terms = {0: {}, **{task["task"]: t for task, t in zip(config["tasks"], saved.task_transfers(), strict=True)}}
    open_task = None if active is None else active["task"]
    if open_task is not None:
        terms[open_task] = saved.active_transfers()
    previewed = open_task is not None and config.get("transfer_task") == open_task
    return TaskTransfers(terms, open_task, previewed, _saved_settings(saved)["transfer_rank"])


def merge_and_unload(method: AdapterMethod, task: int | None = None) -> nn.Module:
    """A deep copy of the method's model with the open task's adapters merged into their layers: only ordinary
    layers, every parameter trainable. The method itself is left as it was.

    task=None: the shared model, with the open task's U·V merged and no task's transfer term, which act only when
    their task is predicted: what task 0 and every task without a transfer adapter compute. With
    batchnorm='per_task' the copy holds the current task's BatchNorm state (method.predict swaps in others).

    task=j: task j's own standalone model, whose outputs are `method.predict(x, j)`'s: the shared model with task j's
    transfer term Ū_j·A_j (NESSConfig.transfer_rank) merged into W (and b, for adapted biases) and, with
    batchnorm='per_task', task j's BatchNorm state. A ValueError for a task that does not exist or has no transfer
    adapter."""
    own = {} if task is None else method_transfers(method).of(task, "merge_and_unload")
    merged = copy.deepcopy(method.model)
    for name in method.active:
        replace_module(merged, name, merged.get_submodule(name).merged())
    if method.frozen_momenta is not None:  # batchnorm='frozen' holds running statistics during a task
        restore_momenta(merged, method.frozen_momenta)
    for name, (basis, factor) in own.items():
        _merge_delta(merged.get_submodule(name), basis, factor, name, name in method.bias_layers)
    if task is not None and task < len(method.batchnorm_states):  # a finished task's own (batchnorm='per_task')
        load_batchnorm_state(merged, method.batchnorm_states[task])
    for parameter in merged.parameters():
        parameter.requires_grad_(True)
    return merged


def merged_state_dict(
    base_state: dict[str, Tensor], directory: str | Path, task: int | None = None
) -> dict[str, Tensor]:
    """The state dict of the merged model from the base model's state dict and an adapter directory, without the
    model's class: every finished task's ΔW (then the open task's) added in order, the modules saved whole (heads,
    BatchNorm, modules_to_save) put in, after checking the state dict is the base's. `ness adapters DIR --merge`
    writes it. `task` as in `merge_and_unload`: None gives the shared model, j task j's own model (its transfer
    term merged too, and its BatchNorm state with batchnorm='per_task')."""
    saved = read_adapters(directory)
    _check_format_version(saved)
    own = {} if task is None else _saved_transfers(saved).of(task, "merged_state_dict")
    state = {key: value.clone() for key, value in base_state.items()}
    layers = {}
    for name, spec in saved.config["layers"].items():
        weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        if weight is None or list(weight.shape) != spec["weight_shape"]:
            found = "no such tensor" if weight is None else f"shape {list(weight.shape)}"
            raise ValueError(
                f"the base state dict's '{name}.weight' ({found}) does not fit the adapters' {spec['type']} of shape "
                f"{spec['weight_shape']}; pass the base model saved with these adapters"
            )
        if spec["adapt_bias"] and bias is None:
            raise ValueError(f"the base state dict has no '{name}.bias', which the adapters change (adapt_bias)")
        layers[name] = _stand_in(spec["type"], weight, bias)
        _check_base(saved, name, weight_matrix(layers[name]), bias if spec["adapt_bias"] else None)
    saved_modules = {
        f"{module}.{key}": value for module, tensors in saved.saved_modules().items() for key, value in tensors.items()
    }
    for key, value in saved_modules.items():
        if key not in state or state[key].shape != value.shape:
            raise ValueError(
                f"the base state dict has no '{key}' of shape {list(value.shape)}, which the adapters hold"
            )
    carried = {*saved_modules}
    carried.update(f"{name}.weight" for name in layers)
    carried.update(f"{name}.bias" for name, spec in saved.config["layers"].items() if spec["adapt_bias"])
    _check_uncarried(saved, {k: v for k, v in base_state.items() if k not in carried}, "the base state dict")
    for deltas in [*saved.task_deltas(), saved.active_deltas(), own]:
        for name, (basis, factor) in deltas.items():
            _merge_delta(layers[name], basis, factor, name, saved.config["layers"][name]["adapt_bias"])
    state.update(saved_modules)
    if task is not None and task < saved.config["statistics"]["batchnorm_tasks"]:  # batchnorm='per_task'
        state.update(
            {
                f"{layer}.{key}": value
                for layer, tensors in saved.batchnorm_state(task).items()
                for key, value in tensors.items()
            }
        )
    return state


def _stand_in(kind: str, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A layer of `kind` whose weight and bias share the given tensors' storage, so merging into it writes there.
    transformers' Conv1D (weight d×o) stands in as an nn.Linear over the transposed view: the same matrix."""
    if kind == "Conv1D":
        kind, weight = "Linear", weight.T
    cls = LAYER_KINDS[kind]
    size = () if cls is nn.Linear else (tuple(weight.shape[2:]),)  # a convolution's kernel size
    layer = cls(weight.shape[1], weight.shape[0], *size, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


# -- summary -----------------------------------------------------------------------------------------------------
def describe_adapters(directory: str | Path) -> str:
    """A summary of an adapter directory: the settings, each layer's kind, size and rank per task, each task's
    transfer ranks (NESSConfig.transfer_rank), the modules saved whole, the number of base tensors checked at load,
    each file's size."""
    saved = read_adapters(directory)
    config = saved.config
    active = config["active"]
    settings = _saved_settings(saved)
    transfer_rank = settings["transfer_rank"]
    # (label, shared ranks, transfer ranks) per task t ≥ 1, the open one last
    columns = [(f"t{task['task']}", task["ranks"], task.get("transfer_ranks", {})) for task in config["tasks"]]
    if active is not None:
        columns.append((f"t{active['task']} (open)", active["ranks"], active.get("transfer_ranks", {})))
    unchosen = active is not None and transfer_rank > 0 and config.get("transfer_task") != active["task"]
    lines = [
        f"NESS adapters in '{saved.directory}' ({FORMAT} v{config['format_version']}): {config['tasks_done']} tasks "
        f"done, "
        + (f"task {active['task']} open" if active is not None else "no task open")
        + (" (its transfer directions not chosen yet)" if unchosen else ""),
        "settings: "
        + ", ".join(
            f"{k}={settings.get(k)}"
            for k in ("threshold", "eps1", "delta", "memory", "adapt_bias", "batchnorm", "transfer_rank")
        ),
        "rank per task ('-': the layer was frozen that task; 0: only its transfer adapter trained)",
    ]
    labels = [label for label, _, _ in columns]
    lines += _table(
        ["layer", "type", "d", "out", "Δb", *labels],
        [
            [name, spec["type"], str(spec["d"]), str(spec["out"]), "yes" if spec["adapt_bias"] else "no"]
            + [str(ranks.get(name, 0 if name in transfers else "-")) for _, ranks, transfers in columns]
            for name, spec in config["layers"].items()
        ],
    )
    if any(transfers for _, _, transfers in columns):
        lines.append("transfer rank per task (task t's own Ū·A, used only when task t is predicted; '-': none)")
        lines += _table(
            ["layer", *labels],
            [[name, *(str(transfers.get(name, "-")) for _, _, transfers in columns)] for name in config["layers"]],
        )
    if config["statistics"]["covariance_layers"]:
        lines += _statistics_lines(saved)
    checked = config.get("base_tensors")
    lines.append(
        f"saved whole: {', '.join(config['modules_to_save']) or 'none'}; other base tensors checked at load: "
        + (str(len(checked)) if checked is not None else "none (format version 1)")
    )
    files = [CONFIG_FILE, ADAPTER_FILE, STATISTICS_FILE]
    width = max(map(len, files))
    lines += [f"{name.ljust(width)}  {(saved.directory / name).stat().st_size:>12,} bytes" for name in files]
    return "\n".join(lines)


def _statistics_lines(saved: SavedAdapters) -> list[str]:
    """The kept sums Σxxᵀ, per layer: dtype and bytes, and the layer whose sum it is when layers share one."""
    aliases = saved.config["statistics"].get("aliases", {})
    rows, total = [], 0
    for name in saved.config["statistics"]["covariance_layers"]:
        key = f"covariance.{name}"
        covariance = saved.statistic(key)
        size = covariance.numel() * covariance.element_size()
        owner = aliases.get(key, key).removeprefix("covariance.")
        total += size if owner == name else 0
        rows.append([name, _dtype_name(covariance), f"{size:,}", "" if owner == name else f"= {owner}"])
    header = f"statistics: Σxxᵀ per layer, {total:,} bytes stored ('= L': layer L's sum, as both read one input)"
    return [header, *_table(["layer", "dtype", "bytes", "shared"], rows)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a table with left-aligned columns as wide as their widest cell."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
