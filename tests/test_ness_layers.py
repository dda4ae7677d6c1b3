"""NESS beyond the paper's layers: Conv1d, sequence inputs (B, T, d), biases in the null space (inputs [x; 1]),
layer selection by PEFT-style target_modules, and BatchNorm frozen or kept per task. Every number is checked against
the tests' own loops, closed forms and eigendecompositions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method_steps import batches, train
from ness import NESS, NESSConfig, NullSpaceAdapter
from ness.cli import main
from ness.models import MultiHeadNet, call_model
from ness.subspace import layer_input_rows, with_bias_input


def orthonormal(d, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]


def conv1d_rows_by_slicing(conv, x):
    """im2col of a zero-padded Conv1d by explicit slices, rows ordered (sample, position), columns (c, k)."""
    (k,), (s,), (dil,), (p,) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    b, c, length = x.shape
    padded = torch.zeros(b, c, length + 2 * p, dtype=x.dtype)
    padded[:, :, p : p + length] = x
    positions = (length + 2 * p - dil * (k - 1) - 1) // s + 1
    rows = [padded[:, :, i * s : i * s + dil * (k - 1) + 1 : dil].reshape(b, -1) for i in range(positions)]
    return torch.stack(rows, dim=1).reshape(b * positions, -1)


# ---------------------------------------------------------------------------------------------------------
# Conv1d and biases in the adapter
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv1d_rows_match_explicit_slices_and_reproduce_the_conv(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 5, 3, stride=stride, padding=padding, dilation=dilation, bias=False).double()
    x = torch.randn(4, 3, 11, dtype=torch.float64)
    rows = layer_input_rows(conv, x)
    torch.testing.assert_close(rows, conv1d_rows_by_slicing(conv, x))
    out = conv(x)  # (B, o, L')
    torch.testing.assert_close(rows @ conv.weight.reshape(5, -1).T, out.permute(0, 2, 1).reshape(-1, 5))


def test_with_bias_input_appends_a_column_of_ones():
    rows = torch.arange(6.0).reshape(3, 2)
    assert with_bias_input(rows).tolist() == [[0.0, 1.0, 1.0], [2.0, 3.0, 1.0], [4.0, 5.0, 1.0]]


def layers_with_bias():
    torch.manual_seed(1)
    return {
        "linear": (nn.Linear(6, 4).double(), torch.randn(5, 7, 6, dtype=torch.float64)),  # a (B, T, d) input
        "conv1d": (nn.Conv1d(2, 4, 3, padding=1).double(), torch.randn(5, 2, 9, dtype=torch.float64)),
        "conv2d": (nn.Conv2d(2, 4, 3, stride=2, padding=1).double(), torch.randn(5, 2, 6, 6, dtype=torch.float64)),
    }


def explicit_output(layer, x, weight, bias):
    """The layer's operation with an explicit weight and bias (the functional form, not the adapter)."""
    if isinstance(layer, nn.Linear):
        return x @ weight.T + bias
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("merged_path", [True, False])
def test_bias_adapter_forward_and_merge_equal_the_explicit_layer(monkeypatch, kind, merged_path):
    base, x = layers_with_bias()[kind]
    d = base.weight[0].numel()
    u = orthonormal(d + 1, 3, seed=2)
    adapter = NullSpaceAdapter(base, u, name=kind, adapt_bias=True)
    with torch.no_grad():
        adapter.V.copy_(torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    # ΔW̃ = U V is (d+1)×o: the first d rows are ΔW in the paper's layout, the last row is Δb.
    full = u @ adapter.V.detach()
    weight = base.weight.detach() + full[:d].T.reshape(base.weight.shape)
    bias = base.bias.detach() + full[d]
    expected = explicit_output(base, x, weight, bias)
    monkeypatch.setattr(NullSpaceAdapter, "_merged_path_is_cheaper", lambda self, x, terms=None, rows=None: merged_path)
    torch.testing.assert_close(adapter(x), expected)
    merged = adapter.merged()
    torch.testing.assert_close(merged.weight.detach(), weight)
    torch.testing.assert_close(merged.bias.detach(), bias)


def test_bias_adapter_needs_a_bias_and_the_augmented_basis():
    with pytest.raises(ValueError, match="adapt_bias needs a layer with a bias"):
        NullSpaceAdapter(nn.Linear(6, 4, bias=False), orthonormal(7, 2, 0), adapt_bias=True)
    with pytest.raises(ValueError, match=r"d\+1 with the bias row=7"):
        NullSpaceAdapter(nn.Linear(6, 4), orthonormal(6, 2, 0).float(), adapt_bias=True)


# ---------------------------------------------------------------------------------------------------------
# NESS on sequence models, Conv1d and with biases: Eq. 8 on the (augmented) rows of earlier inputs
# ---------------------------------------------------------------------------------------------------------


class SequenceNet(nn.Module):
    """(B, T, d) tokens → Linear per token → ReLU → Conv1d over time → mean over time: a small sequence model."""

    def __init__(self, d=6, width=8, bias=False):
        super().__init__()
        self.blocks = nn.ModuleDict(
            {"token": nn.Linear(d, width, bias=bias), "mix": nn.Conv1d(width, width, 3, padding=1, bias=bias)}
        )

    def forward(self, x):
        h = F.relu(self.blocks["token"](x))  # (B, T, width)
        h = F.relu(self.blocks["mix"](h.transpose(1, 2)))  # (B, width, T)
        return h.mean(dim=2)


def sequence_model(seed, bias=False):
    torch.manual_seed(seed)
    return MultiHeadNet(SequenceNet(bias=bias), 8, [3, 3], head_bias=bias)


def sequence_task(task, seed, n=24, t_len=5):
    """Task 0 tokens lie near a 2-dimensional subspace of R^6, so null directions exist; task 1 is full rank."""
    g = torch.Generator().manual_seed(seed)
    if task == 0:
        x = torch.randn(n, t_len, 2, generator=g) @ torch.randn(2, 6, generator=g)
        x = x + 0.01 * torch.randn(n, t_len, 6, generator=g)
    else:
        x = 2 * torch.randn(n, t_len, 6, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


@torch.no_grad()
def inputs_of(model, name, x, t):
    seen = {}
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.eval()
    call_model(model, x, t)
    handle.remove()
    return seen["x"].double()


def explicit_rows(layer, x):
    """Rows of a layer's input by the tests' own flattening: tokens for Linear, explicit slices for Conv1d."""
    if isinstance(layer, nn.Conv1d):
        return conv1d_rows_by_slicing(layer, x)
    return x.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("adapt_bias", [False, True])
def test_eq8_holds_for_token_and_conv1d_layers_of_a_sequence_model(adapt_bias):
    model = sequence_model(0, bias=adapt_bias)
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.05, adapt_bias=adapt_bias))
    assert method.layer_names == ["backbone.blocks.token", "backbone.blocks.mix"]
    x0, y0 = sequence_task(0, seed=10)
    method.begin_task(0)
    train(method, model, 0, x0, y0, steps=5, lr=0.1)
    method.end_task(0, batches(x0, y0, 8))
    # Each layer's task-0 rows (with a 1 appended when biases are adapted) and their covariance, by the tests.
    rows = {}
    for name in method.layer_names:
        r = explicit_rows(model.get_submodule(name).double(), inputs_of(model.double(), name, x0.double(), 0))
        rows[name] = torch.cat([r, torch.ones(r.shape[0], 1, dtype=r.dtype)], 1) if adapt_bias else r
    model.float()
    before = {n: (model.get_submodule(n).weight.detach().clone(), model.get_submodule(n).bias) for n in rows}
    before = {n: (w, None if b is None else b.detach().clone()) for n, (w, b) in before.items()}

    method.begin_task(1)
    x1, y1 = sequence_task(1, seed=11)
    train(method, model, 1, x1, y1, steps=20, lr=1.0)
    layers = {n: model.get_submodule(n) for n in rows}
    assert all(isinstance(m, NullSpaceAdapter) for m in layers.values())
    bounds = {}
    for name, adapter in layers.items():
        cov = rows[name].T @ rows[name]
        u, v = adapter.U.double(), adapter.V.detach().double()
        assert u.shape[0] == cov.shape[0]  # d + 1 rows exactly when the bias is adapted
        # σ_max(U)² = the largest eigenvalue of UᵀCU for eigenvector columns U of C.
        bounds[name] = float(torch.linalg.eigvalsh(u.T @ cov @ u).max().clamp(min=0).sqrt()) * float(
            torch.linalg.matrix_norm(v, ord=2)
        )
    method.end_task(1, batches(x1, y1, 8))
    for name, (w0, b0) in before.items():
        layer = model.get_submodule(name)
        delta = (layer.weight.detach() - w0).double().reshape(w0.shape[0], -1).T  # (d, o)
        if adapt_bias:
            delta_bias = (layer.bias.detach() - b0).double()
            assert delta_bias.abs().max() > 1e-4, "the bias did not move: it was not adapted"
            delta = torch.cat([delta, delta_bias[None]], 0)
        shift = (rows[name] @ delta).norm(dim=1)
        assert shift.max() > 0
        assert shift.max() <= bounds[name] * (1 + 1e-4) + 1e-6, name


def test_adapt_bias_leaves_bias_free_layers_as_they_are_and_refuses_a_model_without_biases():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU())
    method = NESS(MultiHeadNet(backbone, 8, [2, 2]), NESSConfig(transfer_rank=0, eps1=0.05, adapt_bias=True))
    assert method.bias_layers == {"backbone.0"}
    with pytest.raises(ValueError, match="adapt_bias=True but no adapted layer has a bias"):
        NESS(sequence_model(0, bias=False), NESSConfig(transfer_rank=0, adapt_bias=True))


# ---------------------------------------------------------------------------------------------------------
# Layer selection: target_modules and exclude, on ModuleDict / custom modules
# ---------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)


def transformer_like():
    torch.manual_seed(0)
    backbone = nn.ModuleDict({"embed": nn.Conv1d(1, 8, 1), "blocks": nn.ModuleList([Block(), Block()])})
    return MultiHeadNet(backbone, 8, [2, 2])


@pytest.mark.parametrize(
    ("targets", "exclude", "expected"),
    [
        (None, (), None),  # every Linear/Conv1d outside the heads
        (
            ("q", "v"),
            (),
            [
                "backbone.blocks.0.attn.q",
                "backbone.blocks.0.attn.v",
                "backbone.blocks.1.attn.q",
                "backbone.blocks.1.attn.v",
            ],
        ),
        (("Conv1d",), (), ["backbone.embed"]),
        (("blocks.*.mlp.*",), ("blocks.1.*",), ["backbone.blocks.0.mlp.0", "backbone.blocks.0.mlp.2"]),
        (("attn.out",), (), ["backbone.blocks.0.attn.out", "backbone.blocks.1.attn.out"]),
    ],
)
def test_target_modules_select_layers_as_peft_does(targets, exclude, expected):
    model = transformer_like()
    method = NESS(model, NESSConfig(transfer_rank=0, target_modules=targets, exclude=exclude))
    if expected is None:
        every = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d)) and "task_heads" not in n]
        assert len(every) == 13
        expected = every
    assert method.layer_names == expected


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (("query",), "target 'query' matches no module of the model"),
        (("norm",), r"target 'norm' matches only backbone\.blocks\.0\.norm \(LayerNorm\)"),
        ((), r"NESSConfig\.target_modules: got \(\); a non-empty list of strings"),
        ("q", r"NESSConfig\.target_modules: got 'q'; .*write \['q'\] for one entry"),
    ],
)
def test_bad_target_modules_are_explained(targets, message):
    with pytest.raises((ValueError, TypeError), match=message):
        NESS(transformer_like(), NESSConfig(transfer_rank=0, target_modules=targets))


def test_only_targeted_layers_change_after_task_0():
    model = transformer_like()
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=0.5, target_modules=("q",)))
    x = torch.randn(16, 1, 5)

    def features(inp):
        h = model.backbone["embed"](inp).transpose(1, 2)
        for block in model.backbone["blocks"]:
            a = block.attn
            h = block.norm(h + a.out(a.v(h) + a.q(h) + a.k(h)))
            h = h + block.mlp(h)
        return h.mean(1)

    model.forward = lambda inp, task: model.task_heads[task](features(inp))
    y = torch.randint(0, 2, (16,))
    method.begin_task(0)
    train(method, model, 0, x, y, steps=2)
    method.end_task(0, batches(x, y, 8))
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.begin_task(1)
    train(method, model, 1, 3 * torch.randn(16, 1, 5), y, steps=3)
    method.end_task(1, batches(x, y, 8))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), snapshot[n])}
    assert changed == {"backbone.blocks.0.attn.q.weight", "backbone.blocks.1.attn.q.weight", "task_heads.1.weight"}


# ---------------------------------------------------------------------------------------------------------
# BatchNorm: frozen after task 0 (default) or one state per task
# ---------------------------------------------------------------------------------------------------------


def bn_net(seed):
    """Linear → BatchNorm1d (running statistics) → ReLU, two heads."""
    torch.manual_seed(seed)
    return MultiHeadNet(nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU()), 8, [3, 3])


def exact_low_rank_task(task, seed, n=32):
    """Task 0 inputs lie exactly in a 3-dimensional subspace of R^6 (an exact null space); task 1 is full rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g) @ torch.randn(3, 6, generator=g) if task == 0 else torch.randn(n, 6, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def bn_tensors(bn):
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var)


@torch.no_grad()
def eval_logits(method, model, x, t):
    model.eval()
    out = method.predict(x, t)
    model.train()
    return out


@pytest.mark.parametrize("mode", ["frozen", "per_task"])
def test_batchnorm_modes_keep_task0_outputs_and_per_task_trains_its_own(mode):
    model = bn_net(0)
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=1e-3, batchnorm=mode))
    bn = model.backbone[1]
    x0, y0 = exact_low_rank_task(0, 1)
    method.begin_task(0)
    train(method, model, 0, x0, y0, steps=5)
    method.end_task(0, batches(x0, y0, 8))
    task0 = eval_logits(method, model, x0, 0)
    state0 = [t.clone() for t in bn_tensors(bn)]

    method.begin_task(1)
    params = method.trainable_parameters(1)
    assert any(p is bn.weight for p in params) == (mode == "per_task")
    x1, y1 = exact_low_rank_task(1, 2)
    train(method, model, 1, 5 * x1 + 3, y1, steps=10, lr=0.5)  # a plain loop: no trainer hook needed
    method.end_task(1, batches(x1, y1, 8))
    moved = [not torch.equal(a, b) for a, b in zip(state0, bn_tensors(bn), strict=True)]
    # frozen: nothing of BatchNorm moved; per_task: the model now holds task 1's trained BatchNorm.
    assert moved == ([False] * 4 if mode == "frozen" else [True] * 4)
    # Task 0's inputs see ΔW = 0 (exact null space) and, either way, task 0's own BatchNorm: identical outputs.
    torch.testing.assert_close(eval_logits(method, model, x0, 0), task0, rtol=0, atol=1e-5)
    assert [torch.equal(a, b) for a, b in zip(state0, bn_tensors(bn), strict=True)] == (
        [True] * 4 if mode == "frozen" else [False] * 4
    ), "evaluating task 0 must leave the model's current BatchNorm in place"
    assert bn.momentum == 0.1, "the momentum frozen during task 1 is restored at its end"


def test_per_task_batchnorm_without_swapping_would_change_task0():
    """The check above is sensitive: task 1's BatchNorm really does change task 0's outputs."""
    model = bn_net(0)
    method = NESS(model, NESSConfig(transfer_rank=0, eps1=1e-3, batchnorm="per_task"))
    x0, y0 = exact_low_rank_task(0, 1)
    method.begin_task(0)
    train(method, model, 0, x0, y0, steps=5)
    method.end_task(0, batches(x0, y0, 8))
    model.eval()
    task0 = call_model(model, x0, 0).detach()
    method.begin_task(1)
    x1, y1 = exact_low_rank_task(1, 2)
    train(method, model, 1, 5 * x1 + 3, y1, steps=10, lr=0.5)
    method.end_task(1, batches(x1, y1, 8))
    model.eval()
    assert (call_model(model, x0, 0).detach() - task0).abs().max() > 1e-2


def test_batchnorm_mode_is_validated():
    with pytest.raises(ValueError, match=r"NESSConfig\.batchnorm: got 'per_layer'; one of \('frozen', 'per_task'\)"):
        NESSConfig(transfer_rank=0, batchnorm="per_layer")
    with pytest.raises(TypeError, match=r"NESSConfig\.adapt_bias: got 'yes'; True or False"):
        NESSConfig(transfer_rank=0, adapt_bias="yes")


# ---------------------------------------------------------------------------------------------------------
# From the command line: --network mlp_bias / mlp_bn with adapt_bias and batchnorm, on the bundled digits
# ---------------------------------------------------------------------------------------------------------


def run_digits(tmp_path, network, *settings, method="ness", seeds=("1",), epochs=3):
    args = ["run", "--benchmark", "split_digits", "--method", method, "--seeds", *seeds, "--network", network]
    for setting in (*settings, *([f"epochs={epochs}"] if epochs else [])):
        args += ["--set", setting]
    assert main([*args, "--out", str(tmp_path), "--quiet"]) == 0
    return [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("results.json"))]


def test_cli_adapt_bias_builds_d_plus_1_bases_on_the_mlp_with_biases(tmp_path):
    (result,) = run_digits(tmp_path, "mlp_bias", "adapt_bias=true")
    assert result["network"] == "mlp_bias" and result["config"]["method"]["adapt_bias"] is True
    first = [r for r in result["diagnostics"] if r["layer"] == "backbone.0"]
    # Split Digits images have 8·8 = 64 pixels: the augmented rows [x; 1] have 65 entries.
    assert {r["d"] for r in first} == {65}
    assert {r["d"] for r in result["diagnostics"] if r["layer"] == "backbone.2"} == {101}


def test_cli_per_task_batchnorm_on_the_mlp_with_batchnorm(tmp_path):
    (result,) = run_digits(tmp_path, "mlp_bn", "batchnorm=per_task")
    assert result["config"]["method"]["batchnorm"] == "per_task"
    assert result["config"]["train"]["drop_last"] is True  # --network mlp_bn never trains on a 1-row batch
    assert "BatchNorm1d" in result["config"]["protocol"]["sources"]["network"]


def test_drop_last_skips_only_a_short_last_batch():
    from ness.data.tasks import Split, Task
    from ness.trainer import TrainConfig, epoch_batches

    split = Split(torch.zeros(23, 4), torch.zeros(23, dtype=torch.int64))
    task = Task("t", 2, split, split, split, lambda x: x)
    for drop_last, sizes in ((False, [10, 10, 3]), (True, [10, 10])):
        config = TrainConfig(batch_size=10, drop_last=drop_last)
        got = [
            x.shape[0]
            for x, *_ in epoch_batches([(0, split, task.transform)], config, torch.Generator().manual_seed(0))
        ]
        assert got == sizes


def test_with_biases_ness_forgets_no_more_than_without(tmp_path):
    """Real (bundled) digits, the quick preset, seeds 1–3: NESS adapting biases in the null space keeps a mean BWT at
    least as good as NESS on the same MLP without biases, up to one test image of a task (~0.27 points)."""
    seeds = ("1", "2", "3")
    with_bias = run_digits(tmp_path / "b", "mlp_bias", "adapt_bias=true", seeds=seeds, epochs=None)
    without = run_digits(tmp_path / "n", "mlp", seeds=seeds, epochs=None)
    bwt_with, bwt_without = (sum(r["bwt"] for r in runs) / len(runs) for runs in (with_bias, without))
    assert bwt_with >= bwt_without - 0.3, (bwt_with, bwt_without)
