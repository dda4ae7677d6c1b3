"""Wide layers (issue 17): the per-layer sums Σxxᵀ kept in float32 or on the CPU, the eigh on the model's device when
it fits, and one shared sum for the layers that read the very same input (q/k/v and gate/up of a LLaMA block), with
its bytes counted once, saved once, and every result as without sharing."""

from __future__ import annotations

import copy
import hashlib
import io
import json

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn

from hf_models import llama, pad_batch, token_task
from ness import NESS, NESSConfig
from ness.adapter_files import describe_adapters
from ness.models import multi_head_mlp
from ness.shared_inputs import SharedInputs
from ness.subspace import (
    CovarianceSum,
    eigh_bytes,
    eigh_device,
    layer_input_rows,
    null_basis,
    projector_distance,
    row_signature,
)

BLOCK = "model.layers.{}"
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def orthonormal(d: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q


# -- the linear algebra ---------------------------------------------------------------------------------------------


def test_projector_distance_is_the_principal_angles_and_the_explicit_projector_difference():
    a, b = orthonormal(9, 3, 0), orthonormal(9, 3, 1)
    cosines = torch.linalg.svdvals(a.T @ b)  # cosines of the principal angles
    explicit = float(torch.linalg.matrix_norm(a @ a.T - b @ b.T))
    assert projector_distance(a, b) == pytest.approx(float((2 * (1 - cosines**2).sum()).sqrt()), rel=1e-12)
    assert projector_distance(a, b) == pytest.approx(explicit, rel=1e-12)
    wider = orthonormal(9, 5, 2)  # unequal ranks: each rank more adds 1 to the square
    assert projector_distance(a, wider) == pytest.approx(float(torch.linalg.matrix_norm(a @ a.T - wider @ wider.T)))
    assert projector_distance(a, a[:, [2, 0, 1]] * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)) < 1e-15
    assert projector_distance(a[:, :0], b[:, :0]) == 0.0


def test_covariance_sum_keeps_a_float32_sum_on_the_cpu_and_its_copy_apart():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 6, generator=g) for n in (5, 40, 3)]
    exact, rough = CovarianceSum(chunk=16), CovarianceSum(chunk=16, dtype=torch.float32, sum_dtype=torch.float32)
    kept = CovarianceSum(chunk=16, device="cpu")
    for rows in batches[:2]:
        for total in (exact, rough, kept):
            total.add(rows)
    twin = exact.copy()  # after a flush and with rows pooled: an independent sum of the same rows
    for total in (exact, rough, kept):
        total.add(batches[2])
    rows = torch.cat(batches).double()
    assert (rough.result().dtype, kept.result().device.type) == (torch.float32, "cpu")
    torch.testing.assert_close(exact.result(), rows.T @ rows, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(rough.result().double(), rows.T @ rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(twin.result(), rows[:45].T @ rows[:45], rtol=1e-13, atol=1e-12)


def test_a_float32_sum_moves_the_null_basis_little_on_a_known_spectrum():
    """48 directions with σ in [1, 10] and 16 with σ in [1e-3, 1e-2] (energies 1e-6 to 1e-4 of the largest): the
    energy rule keeps the 16 in both dtypes. A float32 sum's relative error is ~1e-7 of ‖C‖, so it moves each small
    eigenvalue by ~1e-7 of the largest: U by ‖P₃₂ − P₆₄‖_F ≈ 3e-6 (the gap to the 17th direction is wide) and
    σ_max(U), 1e-3 of σ_max, by ≈ 0.1 % (measured, as in docs/guide.md)."""
    g = torch.Generator().manual_seed(4)
    d, n = 64, 8192
    sigma = torch.cat([torch.logspace(1, 0, 48), torch.logspace(-2, -3, 16)]).double()  # of the rows / √n
    rows = ((torch.randn(n, d, generator=g, dtype=torch.float64) * sigma) @ orthonormal(d, d, 5).T).float()
    sums = {}
    for dtype in (torch.float64, torch.float32):
        total = CovarianceSum(dtype=dtype, sum_dtype=dtype)
        for i in range(0, n, 512):
            total.add(rows[i : i + 512])
        sums[dtype] = total.result()
    assert float((sums[torch.float32].double() - sums[torch.float64]).norm() / sums[torch.float64].norm()) < 1e-6
    exact, rough = (null_basis(sums[dtype], None, "energy", delta=1e-4) for dtype in (torch.float64, torch.float32))
    assert rough.rank == exact.rank == 16
    assert projector_distance(exact.basis, rough.basis) < 1e-4
    sigma_u = [float(b.kept_singular_values.max()) for b in (exact, rough)]
    assert abs(sigma_u[1] - sigma_u[0]) < 1e-2 * sigma_u[0]


def test_row_signature_tells_apart_only_layers_that_make_other_rows():
    transformers = pytest.importorskip("transformers")
    linear, conv1d = nn.Linear(4, 3), transformers.pytorch_utils.Conv1D(3, 4)
    assert row_signature(linear) == row_signature(conv1d) == row_signature(nn.Linear(4, 7))
    conv = nn.Conv2d(2, 3, 3, padding=1)
    assert row_signature(conv) == row_signature(nn.Conv2d(2, 5, 3, padding=1))
    assert row_signature(conv) != row_signature(nn.Conv2d(2, 3, 3, padding=1, stride=2))
    assert row_signature(nn.Conv1d(2, 3, 3)) != row_signature(conv)


def test_the_eigh_runs_on_the_gpu_only_when_it_fits_there(monkeypatch):
    assert eigh_bytes(4096) == 6 * 8 * 4096**2
    assert eigh_device(torch.device("cpu"), 4096) == torch.device("cpu")
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * eigh_bytes(4096), 80 * 2**30))
    assert eigh_device(gpu, 4096) == gpu
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * eigh_bytes(4096) - 1, 80 * 2**30))
    assert eigh_device(gpu, 4096) == torch.device("cpu")


# -- the statistics pass: which layers share ------------------------------------------------------------------------


class Branches(nn.Module):
    """a and b read x; c reads x too, but a copy of it in a batch of 3 samples; g reads x with a bias row (adapt_bias);
    d and e read z, changed in place in between; f is called twice on y."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)
        self.g = nn.Linear(4, 2)
        self.d, self.e, self.f = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x) + self.b(x) + self.c(x if x.shape[0] != 3 else x.clone()) + self.g(x)
        z = x * 2
        out = out + self.d(z)
        z.add_(1)  # in place: e reads other values through the same tensor object
        y = x - 1
        return out + self.e(z) + self.f(y) + self.f(y)


def explicit_sums(model: nn.Module, names: list[str], batches: list[torch.Tensor], bias: set[str]) -> dict:
    """Σxxᵀ of every call's rows, per layer, from hooks of our own (float64, no pooling)."""
    sums = {
        name: torch.zeros(5 if name in bias else 4, 5 if name in bias else 4, dtype=torch.float64) for name in names
    }

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor]) -> None:
            rows = args[0].double()
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1) if name in bias else rows
            sums[name] += rows.T @ rows

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for handle in handles:
        handle.remove()
    return sums


@pytest.mark.parametrize("split", [False, True], ids=["every_batch_alike", "c_reads_a_copy_once"])
def test_layers_share_a_sum_exactly_while_they_read_the_very_same_input(split):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 4, generator=g) for n in ((5, 3, 6) if split else (5, 6))]
    model = Branches()
    method = NESS(model, NESSConfig(transfer_rank=0, adapt_bias=True))
    method.begin_task(0)
    method.end_task(0, batches)
    kept = method.covariances
    assert kept["a"] is kept["b"]
    assert (kept["c"] is kept["a"]) is not split  # a copy in one batch: c keeps its own sum from then on
    assert kept["g"] is not kept["a"]  # its rows carry the bias input
    assert kept["d"] is not kept["e"]  # the same tensor, changed in place in between
    expected = explicit_sums(model, method.layer_names, batches, method.bias_layers)
    for name in method.layer_names:
        torch.testing.assert_close(kept[name], expected[name], rtol=1e-12, atol=1e-12)


def test_shared_inputs_split_and_refine_keep_each_layers_own_sum():
    """Through SharedInputs alone: p and q share until q misses a batch; `refine` splits r from s."""
    shared = SharedInputs(2, lambda: CovarianceSum(chunk=1))
    keys = torch.Generator().manual_seed(0)
    x1, x2, x3 = (torch.full((2, 3), float(v)) for v in (1, 2, 3))

    def call(name: str, x: torch.Tensor) -> None:
        shared.add(name, x, ("linear",), lambda: (x, torch.rand(x.shape[0], generator=keys), None))

    for name in ("p", "q", "r", "s"):
        call(name, x1)
    shared.end_batch()
    call("p", x2)
    call("r", x2)
    call("s", x2)
    shared.end_batch()
    assert shared.groups["r"] is shared.groups["s"] is shared.groups["p"] is not shared.groups["q"]
    shared.refine({"p": 0, "q": 0, "r": 1, "s": 1})
    call("q", x3)
    stats = shared.statistics()
    assert stats["r"] is stats["s"] and stats["p"] is not stats["r"]
    ones = torch.ones(3, 3)
    for name, expected in {"p": 2 * (1 + 4), "q": 2 * (1 + 9), "r": 2 * (1 + 4), "s": 2 * (1 + 4)}.items():
        torch.testing.assert_close(stats[name].covariance, expected * ones.double())
    assert stats["q"].probe.shape == (2, 3)


@pytest.mark.parametrize("seed", range(8))
def test_shared_inputs_sample_the_rows_with_the_k_largest_keys_of_all_a_layer_read(seed):
    """The probe sample against an explicit top k over every row a layer read, its keys recorded as drawn: samples
    merged a few batches at a time (pending ones copied into a group that splits off) give exactly that."""
    k, keys = 3, torch.Generator().manual_seed(seed)
    shared = SharedInputs(k, lambda: CovarianceSum(chunk=1))
    seen: dict[str, list[tuple[float, float]]] = {"p": [], "q": []}  # (key, row id) of every row each layer read

    def call(name: str, x: torch.Tensor, drawn: list[torch.Tensor]) -> None:
        def rows_and_keys() -> tuple[torch.Tensor, torch.Tensor, None]:
            drawn.append(torch.rand(x.shape[0], generator=keys))
            return x, drawn[-1], None

        shared.add(name, x, ("linear",), rows_and_keys)

    row_id = 0
    for batch in range(23):  # p and q read the same rows until batch 11; from then on q reads rows of its own
        x = torch.arange(row_id, row_id + 5, dtype=torch.float32)[:, None].repeat(1, 2)
        row_id += 5
        drawn: list[torch.Tensor] = []
        call("p", x, drawn)
        if batch < 11:
            call("q", x, drawn)
            seen["q"] += zip(drawn[0].tolist(), x[:, 0].tolist(), strict=True)
        seen["p"] += zip(drawn[0].tolist(), x[:, 0].tolist(), strict=True)
        if batch >= 11:
            x_q = x + 1000
            call("q", x_q, drawn)
            seen["q"] += zip(drawn[1].tolist(), x_q[:, 0].tolist(), strict=True)
        shared.end_batch()
    stats = shared.statistics()
    for name in ("p", "q"):
        top = sorted(seen[name], reverse=True)[:k]
        assert stats[name].probe[:, 0].tolist() == [row for _, row in top]
        assert stats[name].probe_keys.tolist() == [key for key, _ in top]


# -- a LLaMA block --------------------------------------------------------------------------------------------------


def token_batches(t: int) -> list[dict[str, torch.Tensor]]:
    items = token_task(t, n=8)
    return [pad_batch(items[:4]), pad_batch(items[4:], length=11)]  # padded: the mask leaves rows out


def ended_task_0(config: NESSConfig, seed: int = 0) -> NESS:
    method = NESS(llama(seed).double(), config)
    method.begin_task(0)
    method.end_task(0, token_batches(0))
    return method


def test_llama_q_k_v_and_gate_up_share_one_sum_counted_once_equal_to_their_own_rows():
    method = ended_task_0(NESSConfig(transfer_rank=0))
    covariances = method.covariances
    for i in (0, 1):
        q, k, v = (covariances[f"{BLOCK.format(i)}.{name}"] for name in QKV)
        gate, up = (covariances[f"{BLOCK.format(i)}.{name}"] for name in GATE_UP)
        assert q is k is v and gate is up
        assert len({id(c) for c in (q, gate, covariances[f"{BLOCK.format(i)}.self_attn.o_proj"])}) == 3
    distinct = {id(c): c for c in covariances.values()}.values()
    assert len(distinct) == 2 * 4 + 1  # four inputs per block, and the score head
    assert (
        method.memory_bytes() == sum(c.numel() * 8 for c in distinct) < sum(c.numel() * 8 for c in covariances.values())
    )
    sizes = method.statistics_bytes()
    assert [s.layer for s in sizes] == method.layer_names
    assert sum(s.bytes for s in sizes if not s.shared) == method.memory_bytes()
    assert {s.layer: s.owner for s in sizes if s.shared} == {
        f"{BLOCK.format(i)}.{name}": f"{BLOCK.format(i)}.{first}"
        for i in (0, 1)
        for first, *rest in (QKV, GATE_UP)
        for name in rest
    }
    assert {(s.dtype, s.device) for s in sizes} == {("float64", "cpu")}
    probes = method.probes
    assert probes[f"{BLOCK.format(0)}.{QKV[0]}"][0] is probes[f"{BLOCK.format(0)}.{QKV[2]}"][0]

    # independent: q_proj's input rows from a hook of our own, each sentence alone and unpadded
    model = llama().double().eval()
    rows = []
    name = f"{BLOCK.format(1)}.{QKV[0]}"
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows.append(layer_input_rows(m, a[0])))
    with torch.no_grad():
        for item in token_task(0, n=8):
            model(input_ids=torch.tensor([item["input_ids"]]))
    handle.remove()
    stacked = torch.cat(rows)
    torch.testing.assert_close(covariances[name], stacked.T @ stacked, rtol=0, atol=1e-10)


def test_shared_sums_give_the_bases_and_transfer_directions_of_the_unshared_computation():
    """k_proj and up_proj hooked without q, v or gate (nothing to share with) sum the same rows: the same covariances,
    bit for bit, and task 1's bases, records and transfer directions."""
    shared = ended_task_0(NESSConfig(transfer_rank=2))
    alone = ended_task_0(NESSConfig(transfer_rank=2, target_modules=("k_proj", "up_proj")))
    assert len({id(c) for c in alone.covariances.values()}) == len(alone.layer_names)
    shared.begin_task(1, token_batches(1))
    alone.begin_task(1, token_batches(1))
    records = {r["layer"]: r for r in shared.diagnostics()}
    compared = ("rank", "threshold", "sigma_max_U", "singular_values", "transfer_rank", "transfer_energy")
    for r in alone.diagnostics():
        name = r["layer"]
        assert torch.equal(alone.covariances[name], shared.covariances[name])
        mine = records[name]
        assert {k: mine[k] for k in compared} == {k: r[k] for k in compared}
        assert (mine["statistics_bytes"], r["statistics_owner"]) == (r["statistics_bytes"], name)
        for key in ("U", "transfer_basis"):
            assert torch.equal(getattr(alone.active[name].adapter, key), getattr(shared.active[name].adapter, key))
    q, k = (shared.active[f"{BLOCK.format(0)}.{name}"].adapter for name in QKV[:2])
    assert torch.equal(q.transfer_basis, k.transfer_basis)  # one covariance, one U: one set of directions


def test_float32_sums_on_the_cpu_keep_their_dtype_device_and_sharing_through_state_dicts():
    method = ended_task_0(NESSConfig(transfer_rank=0, statistics_dtype="float32", statistics_device="cpu"))
    exact = ended_task_0(NESSConfig(transfer_rank=0))
    q, k = (f"{BLOCK.format(0)}.{name}" for name in QKV[:2])
    assert method.covariances[q] is method.covariances[k]
    assert {(c.dtype, c.device.type) for c in method.covariances.values()} == {(torch.float32, "cpu")}
    assert 2 * method.memory_bytes() == exact.memory_bytes()
    for name in method.layer_names:
        torch.testing.assert_close(method.covariances[name].double(), exact.covariances[name], rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    for state in (method.state_dict(), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        fresh = NESS(llama().double(), method.config)
        fresh.load_state_dict(state)
        assert fresh.covariances[q] is fresh.covariances[k] and fresh.memory_bytes() == method.memory_bytes()
        assert fresh.covariances[q].dtype == torch.float32 and torch.equal(fresh.covariances[q], method.covariances[q])
    method.begin_task(1)  # the eigh runs in float64 on the float32 sum
    assert {r["statistics_bytes"] for r in method.diagnostics() if r["layer"] == q} == {16 * 16 * 4}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_cpu_statistics_device_keeps_the_sums_off_it():
    on_cpu = NESS(llama().double().cuda(), NESSConfig(transfer_rank=0, statistics_device="cpu"))
    on_gpu = NESS(llama().double().cuda(), NESSConfig(transfer_rank=0))
    for method in (on_cpu, on_gpu):
        method.begin_task(0)
        method.end_task(0, token_batches(0))
    assert {c.device.type for c in on_cpu.covariances.values()} == {"cpu"}
    assert {c.device.type for c in on_gpu.covariances.values()} == {"cuda"}
    for name in on_cpu.layer_names:
        torch.testing.assert_close(on_cpu.covariances[name], on_gpu.covariances[name].cpu(), rtol=1e-12, atol=1e-9)
    on_cpu.begin_task(1)
    assert all(layer.adapter.U.device.type == "cuda" for layer in on_cpu.active.values())


def test_adapter_files_store_a_shared_sum_once_and_load_it_shared(tmp_path):
    method = ended_task_0(NESSConfig(transfer_rank=0, statistics_dtype="float32"))
    base = copy.deepcopy(method.model)  # the model as task 0 left it
    method.begin_task(1)
    directory = method.save_adapters(tmp_path / "adapters")
    statistics = load_file(directory / "adapter_statistics.safetensors")
    config = json.loads((directory / "adapter_config.json").read_text())
    q, k, v = (f"{BLOCK.format(0)}.{name}" for name in QKV)
    assert f"covariance.{q}" in statistics and f"covariance.{k}" not in statistics
    aliases = config["statistics"]["aliases"]
    assert aliases[f"covariance.{k}"] == aliases[f"covariance.{v}"] == f"covariance.{q}"
    assert aliases[f"probe.task0.{k}"] == f"probe.task0.{q}"
    assert statistics[f"covariance.{q}"].dtype == torch.float32

    loaded = NESS.load_adapters(copy.deepcopy(base), directory)
    assert loaded.covariances[q] is loaded.covariances[k] is loaded.covariances[v]
    assert loaded.memory_bytes() == method.memory_bytes()
    for name in method.layer_names:
        assert torch.equal(loaded.covariances[name], method.covariances[name])
    lines = describe_adapters(directory).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("statistics: Σxxᵀ per layer"))
    assert f"{method.memory_bytes():,} bytes stored" in lines[start]
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 2 : start + 2 + len(method.layer_names)]}
    assert rows[q] == ["float32", "1,024"] and rows[k] == ["float32", "1,024", "=", q]

    # a file without aliases (as before format version 4): every layer's sum stored apart still loads
    for key, stored in aliases.items():
        statistics[key] = statistics[stored].clone()
    del config["statistics"]["aliases"]
    config["format_version"] = 3
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes((directory / "adapter_model.safetensors").read_bytes())
    data = safetensors.torch.save(statistics)
    (old / "adapter_statistics.safetensors").write_bytes(data)
    config["files"]["adapter_statistics.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (old / "adapter_config.json").write_text(json.dumps(config))
    again = NESS.load_adapters(copy.deepcopy(base), old)
    for name in method.layer_names:
        assert torch.equal(again.covariances[name], method.covariances[name])


def test_the_defaults_keep_float64_sums_on_the_models_device_and_bad_values_are_refused():
    config = NESSConfig()
    assert (config.statistics_dtype, config.statistics_device) == ("float64", "model")
    torch.manual_seed(0)
    method = NESS(multi_head_mlp(7, (5,), [2, 2]), NESSConfig(transfer_rank=0))
    method.begin_task(0)
    method.end_task(0, [(torch.randn(9, 7), torch.zeros(9, dtype=torch.int64))])
    assert {(c.dtype, c.device.type) for c in method.covariances.values()} == {(torch.float64, "cpu")}
    with pytest.raises(ValueError, match=r"NESSConfig.statistics_dtype: got 'half'; one of \('float64', 'float32'\)"):
        NESSConfig(statistics_dtype="half")
    with pytest.raises(ValueError, match=r"NESSConfig.statistics_device: got 'cuda'; one of \('model', 'cpu'\)"):
        NESSConfig(statistics_device="cuda")
    with pytest.raises(ValueError, match=r"NESSConfig.statistics_dtype: got \['float32'\]"):
        NESSConfig(statistics_dtype=["float32"])


def test_a_statistics_pass_over_inference_tensors_sums_their_rows():
    """Features made under torch.inference_mode() have no version counter; the pass reads them all the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.inference_mode():
        x = torch.randn(40, 6)
    method = NESS(model, NESSConfig(transfer_rank=0))
    method.begin_task(0)
    method.end_task(0, [(x[i : i + 10],) for i in range(0, 40, 10)])
    rows = x.clone().double()
    torch.testing.assert_close(method.covariances["0"], rows.T @ rows, rtol=1e-12, atol=1e-12)
