"""One table of every registered method through the same contract checks (the hooks the trainer relies on).

Each method runs a tiny 3-task synthetic benchmark on a conv net with BatchNorm (layer types, im2col and BN
freezing) and on an MLP with biases. The checks: it learns; ACC/BWT match the matrix; hooks out of order are errors;
other tasks' heads never change while a task trains; the same seed gives the same result; and a state_dict saved
mid-sequence, loaded into a fresh model, continues exactly like the original.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ness.data import Benchmark, Split, Task
from ness.methods import METHODS, TaskOrderError, build_method
from ness.models import MultiHeadNet
from ness.trainer import TrainConfig, run_continual, seed_everything, train_task

# Small settings per method so the table runs in seconds; each method's own tests check its numbers.
OPTIONS: dict[str, dict] = {
    "ness": {"eps1": 0.05},
    "gpm": {"samples": 32, "threshold": 0.97},
    "fsdgpm": {"memories": 32, "mem_batch_size": 32, "eta1": 0.01},
    "sgp": {"samples": 32, "threshold": 0.97},
    "trgp": {"samples": 32, "threshold": 0.97, "gradient_samples": 32},
    "dfgp": {"samples": 32, "threshold": 0.97, "mixup_weight": 0.1},
    "ewc": {"lam": 100.0},
    "agem": {"memory_per_task": 16, "memory_batch_size": 16},
    "hat": {"c": 0.1, "s_max": 50.0},
    "owm": {"clip_grad_norm": 10.0},
}
CONFIG = TrainConfig(
    epochs=4, lr=0.05, momentum=0.9, batch_size=16, test_batch_size=32, lr_patience=2, lr_factor=2.0, lr_min=1e-4
)


def image_split(gen: torch.Generator, t: int, n: int) -> Split:
    """2-class 1×8×8 images: class c of task t lights up a task-specific quadrant pattern, plus noise."""
    labels = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    row, col = divmod(t, 2)
    x[:, 0, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] += (2.0 * labels.float() - 1.0)[:, None, None]
    return Split(x, labels)


def benchmark(seed: int = 0) -> Benchmark:
    gen = torch.Generator().manual_seed(seed)
    tasks = tuple(
        Task(f"quadrant {t}", 2, image_split(gen, t, 64), image_split(gen, t, 32), image_split(gen, t, 48), lambda x: x)
        for t in range(3)
    )
    return Benchmark("quadrants", tasks, input_shape=(1, 8, 8), shared_head=False, details={})


def conv_net(seed: int) -> MultiHeadNet:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 16, bias=False),
        nn.ReLU(),
    )
    return MultiHeadNet(backbone, 16, [2, 2, 2])


def mlp_net(seed: int) -> MultiHeadNet:
    """A tiny MLP (with biases, unlike the papers' nets) on the flattened images."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU())
    return MultiHeadNet(backbone, 16, [2, 2, 2])


NETWORKS = {"conv": conv_net, "mlp": mlp_net}


def make(name: str, seed: int = 0, network: str = "conv"):
    model = NETWORKS[network](seed)
    return model, build_method(name, model, OPTIONS.get(name, {}))


@pytest.fixture(scope="module", params=[(m, n) for m in sorted(METHODS) for n in NETWORKS], ids="-".join)
def finished(request):
    name, network = request.param
    model, method = make(name, network=network)
    result = run_continual(model, method, benchmark(), CONFIG, seed=1, progress=False)
    return name, model, method, result


def test_every_method_learns_each_task(finished):
    name, _, _, result = finished
    r = result["acc_matrix"]
    for i in range(3):
        assert r[i][i] > 75.0, f"{name}: task {i} learned to {r[i][i]:.1f}% only"


def test_acc_and_bwt_match_the_matrix(finished):
    _, _, _, result = finished
    r = result["acc_matrix"]
    assert len(r) == 3 and all(len(row) == 3 for row in r)
    assert all(math.isfinite(v) for row in r for v in row)
    assert all(math.isfinite(log["train_loss"]) for log in result["tasks"])
    assert math.isclose(result["acc"], sum(r[2]) / 3)
    assert math.isclose(result["bwt"], ((r[2][0] - r[0][0]) + (r[2][1] - r[1][1])) / 2)


def same_json(a: object, b: object) -> bool:
    """a and b are the same JSON value: equal and of the same type all the way down, NaN equal to NaN (a round
    trip gives a new NaN object, which `==` finds unequal to itself)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return type(a) is type(b)
    return type(a) is type(b) and a == b


def test_diagnostics_are_json_friendly_records(finished):
    _, _, method, _ = finished
    records = method.diagnostics()
    assert isinstance(records, list) and all(isinstance(r, dict) for r in records)
    # results.json holds them as written: only plain str/int/float/bool/None, lists and str-keyed dicts come back
    # the same (a tensor or float32 is not written at all; a tuple, an int key or a NumPy float comes back changed)
    assert same_json(json.loads(json.dumps(records, allow_nan=True)), records)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_hooks_out_of_order_are_errors(name):
    _, method = make(name)
    with pytest.raises(TaskOrderError):
        method.begin_task(1)
    with pytest.raises(TaskOrderError):
        method.end_task(0, [])
    method.begin_task(0)
    with pytest.raises(TaskOrderError):
        method.begin_task(0)
    with pytest.raises(TaskOrderError):
        method.trainable_parameters(1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_other_heads_never_change_while_a_task_trains(name):
    model, method = make(name)
    bench = benchmark()
    generator = seed_everything(0)
    for t, task in enumerate(bench.tasks[:2]):
        method.begin_task(t)
        # Heads of tasks the step does not train on (all but t's; joint training also trains the earlier ones).
        before = {j: model.task_heads[j].weight.detach().clone() for j in range(3) if j not in method.data_tasks(t)}
        train_task(model, method, t, task, CONFIG, generator, progress=False, earlier=bench.tasks[:t])
        for j, w in before.items():
            assert torch.equal(model.task_heads[j].weight, w), f"{name}: head {j} moved while task {t} trained"
        method.end_task(t, [(task.train.inputs, task.train.labels)])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_seed_same_result(name):
    runs = []
    for _ in range(2):
        model, method = make(name)
        runs.append(run_continual(model, method, benchmark(), CONFIG, seed=3, progress=False)["acc_matrix"])
    assert runs[0] == runs[1]


def finish_task(model, method, t, task, generator):
    method.begin_task(t)
    train_task(model, method, t, task, CONFIG, generator, progress=False, earlier=benchmark().tasks[:t])
    method.end_task(t, [(task.train.inputs[i : i + 16], task.train.labels[i : i + 16]) for i in range(0, 64, 16)])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_mid_sequence_continues_identically(tmp_path, name):
    bench = benchmark()
    model, method = make(name)
    generator = seed_everything(5)
    finish_task(model, method, 0, bench.tasks[0], generator)
    torch.save(method.state_dict(), tmp_path / "state.pt")
    generator_state = generator.get_state()

    fresh_model, fresh = make(name, seed=999)  # another initialisation: everything must come from the state
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    fresh_generator = torch.Generator()
    fresh_generator.set_state(generator_state)
    for t in (1, 2):
        torch.manual_seed(100 + t)  # dropout-free net, but methods may draw from the global RNG
        finish_task(model, method, t, bench.tasks[t], generator)
        torch.manual_seed(100 + t)
        finish_task(fresh_model, fresh, t, bench.tasks[t], fresh_generator)
    for (key, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=f"{name}: {key} differs after resuming")
