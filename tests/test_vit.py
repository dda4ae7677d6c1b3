"""The small vision transformer: its geometry, NESS on its token layers (Eq. 8 measured with hooks), and NESS
forgetting less than fine-tuning on real digits, through the CLI, and on real MNIST via the example."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ness import NESS, FineTune, NESSConfig, NullSpaceAdapter
from ness.cli import main
from ness.data import split_digits
from ness.models import VisionTransformer, task_heads, vision_transformer
from ness.presets import NETWORKS, get_protocol
from ness.trainer import TrainConfig, run_continual, seed_everything

ROOT = Path(__file__).resolve().parents[1]
BLOCK_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.fc1", "mlp.fc2")


def tiny_digits_vit() -> nn.Module:
    """8×8 digits as a 2×2 grid of 4×4 patches, width 32, one block: trains in seconds with plain SGD."""
    return vision_transformer([2] * 5, image_shape=(1, 8, 8), patch=4, dim=32, depth=1, heads=4)


# -- the model -----------------------------------------------------------------------------------------------------


def test_default_vit_shapes_and_size():
    model = vision_transformer([2, 3, 2])
    x = torch.randn(4, 784)  # what split_mnist's transform gives
    assert [tuple(model(x, t).shape) for t in range(3)] == [(4, 2), (4, 3), (4, 2)]
    assert tuple(model.backbone(x).shape) == (4, 32)
    assert model.backbone.pos_embed.shape == (1, 17, 32)  # 16 patches of 7×7 and the class token
    assert 10_000 < sum(p.numel() for p in model.parameters()) < 60_000


def test_flat_and_image_inputs_give_the_same_output():
    torch.manual_seed(0)
    model = vision_transformer([2], image_shape=(3, 8, 12), patch=4, dim=8, depth=2, heads=2)
    images = torch.randn(5, 3, 8, 12)
    torch.testing.assert_close(model(images.flatten(1), 0), model(images, 0), rtol=0, atol=0)
    # Rows of an image are not interchangeable: the reshape must follow the (C, H, W) order of flatten.
    assert not torch.allclose(model(images.transpose(2, 3).flatten(1), 0), model(images, 0))


def test_attention_is_standard_multi_head_attention():
    """q, k, v, out as four nn.Linear compute what nn.MultiheadAttention computes with the same weights."""
    torch.manual_seed(0)
    attn = VisionTransformer(dim=12, heads=3).blocks[0].attn
    reference = nn.MultiheadAttention(12, 3, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        reference.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        reference.out_proj.weight.copy_(attn.out.weight)
        reference.out_proj.bias.copy_(attn.out.bias)
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(attn(x), reference(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch": 5}, r"28×28 is not divisible by patch 5"),
        ({"dim": 30, "heads": 4}, r"dim 30 is not divisible by heads 4"),
        ({"image_shape": (28, 28)}, r"image_shape must be \(channels, height, width\)"),
        ({"depth": 0}, r"depth must be an integer ≥ 1"),
        ({"mlp_ratio": 0.0}, r"mlp_ratio must be a positive number"),
    ],
)
def test_bad_geometry_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vision_transformer([2], **kwargs)


def test_input_of_the_wrong_size_is_a_clear_error():
    model = vision_transformer([2])
    with pytest.raises(ValueError, match=r"expects \(batch, 1, 28, 28\) images or \(batch, 784\)"):
        model(torch.randn(2, 64), 0)


def test_protocol_builds_the_vit_on_a_grid_of_patches():
    from types import SimpleNamespace

    tasks = [SimpleNamespace(num_classes=2)] * 5
    mnist = get_protocol("split_mnist", "quick").with_network("vit")
    model = mnist.network(SimpleNamespace(tasks=tasks, input_shape=(784,), shared_head=False))
    assert model.backbone.patch_embed.kernel_size == (7, 7) and len(model.task_heads) == 5
    digits = get_protocol("split_digits", "quick").with_network("vit")
    model = digits.network(SimpleNamespace(tasks=tasks, input_shape=(64,), shared_head=False))
    assert model.backbone.patch_embed.kernel_size == (4, 4)
    assert mnist.describe()["network"] == "vit" and mnist.describe()["hidden"] == []
    permuted = get_protocol("permuted_mnist", "quick").with_network("vit")  # one output shared by every task
    shared = permuted.network(
        SimpleNamespace(tasks=[SimpleNamespace(num_classes=10)] * 3, input_shape=(784,), shared_head=True)
    )
    assert task_heads(shared) is None and tuple(shared(torch.randn(3, 784)).shape) == (3, 10)
    with pytest.raises(ValueError, match=r"unknown network 'vgg'; choose one of \[.*'vit'\]") as error:
        mnist.with_network("vgg")
    assert all(repr(name) in str(error.value) for name in NETWORKS)


# -- NESS on the ViT -----------------------------------------------------------------------------------------------


def sgd_steps(model: nn.Module, params: list[nn.Parameter], x, y, task: int, steps: int, lr: float) -> None:
    optimizer = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x, task), y).backward()
        optimizer.step()


def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor, task: int) -> dict[str, torch.Tensor]:
    """Each named layer's input for `x`, read with forward pre-hooks in eval mode (as NESS's statistics pass)."""
    rows: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: rows.__setitem__(n, args[0]))
        for n in names
    ]
    try:
        with torch.no_grad():
            model.eval()(x, task)
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def row_norms(z: torch.Tensor) -> torch.Tensor:
    """‖z‖ of every row, all leading dimensions (images, tokens) flattened, in float64."""
    return z.reshape(-1, z.shape[-1]).double().norm(dim=1)


def test_ness_adapts_the_patch_embedding_and_every_block_linear():
    torch.manual_seed(0)
    bench = split_digits(seed=0)
    model = vision_transformer([2] * 5, image_shape=(1, 8, 8), patch=4, dim=16, depth=2, heads=2)
    method = NESS(model, NESSConfig(eps1=0.05, transfer_rank=0))
    expected = ["backbone.patch_embed"] + [f"backbone.blocks.{b}.{n}" for b in (0, 1) for n in BLOCK_LINEARS]
    assert method.layer_names == expected  # LayerNorms, the class token and the heads are not layers to adapt
    task = bench.tasks[0]
    x, y = task.transform(task.train.inputs), task.train.labels
    method.begin_task(0)
    sgd_steps(model, method.trainable_parameters(0), x, y, 0, 5, 0.1)
    method.end_task(0, [(x, y)])
    method.begin_task(1)
    for name in expected:
        assert isinstance(model.get_submodule(name), NullSpaceAdapter), name
    trained = {id(p) for p in method.trainable_parameters(1)}
    assert trained == {id(model.get_submodule(n).V) for n in expected} | {
        id(p) for p in model.task_heads[1].parameters()
    }


def test_old_token_inputs_move_a_layer_by_at_most_the_eq8_bound():
    """For layers fed (B, T, d) tokens: capture the old task's inputs with hooks, train task 1, and compare the
    measured ‖xᵀΔW‖ with σ_max(U)·‖V‖₂, σ_max(U) computed here from the captured rows (Eq. 5 caps it at ε₁‖I‖_F)."""
    torch.manual_seed(0)
    eps1 = 0.05
    bench = split_digits(seed=0)
    model = tiny_digits_vit()
    method = NESS(model, NESSConfig(eps1=eps1, transfer_rank=0))
    old, new = bench.tasks[0], bench.tasks[1]
    x_old, y_old = old.transform(old.train.inputs), old.train.labels
    method.begin_task(0)
    sgd_steps(model, method.trainable_parameters(0), x_old, y_old, 0, 20, 0.1)
    method.end_task(0, [(x_old, y_old)])

    names = ["backbone.blocks.0.attn.q", "backbone.blocks.0.attn.out", "backbone.blocks.0.mlp.fc2"]
    old_inputs = layer_inputs(model, names, x_old, 0)  # what end_task(0) recorded: same model, same images
    assert all(r.shape[:2] == (len(x_old), 5) for r in old_inputs.values())  # (B, 1 + 2×2 tokens, d)

    method.begin_task(1)
    layers = {n: model.get_submodule(n) for n in names}
    with torch.no_grad():
        before = {n: layers[n](old_inputs[n]) for n in names}
    sgd_steps(
        model.train(), method.trainable_parameters(1), new.transform(new.train.inputs), new.train.labels, 1, 10, 0.5
    )
    for n in names:
        layer = layers[n]
        with torch.no_grad():
            shift = row_norms(layer(old_inputs[n]) - before[n])  # ‖xᵀΔW‖ per (image, token) row
        rows = old_inputs[n].reshape(-1, old_inputs[n].shape[-1]).double()
        u, v = layer.U.double(), layer.V.detach().double()
        sigma_u = float(torch.linalg.matrix_norm(rows @ u, ord=2))
        v_norm = float(torch.linalg.matrix_norm(v, ord=2))
        assert sigma_u <= eps1 * float(rows.norm()) * (1 + 1e-9), n  # U holds only directions with σ ≤ τ (Eq. 5)
        assert v_norm > 0 and float(shift.max()) > 0, n  # the steps changed the layer
        assert float(shift.max()) <= sigma_u * v_norm * (1 + 1e-4) + 1e-5, n  # Eq. 8
        assert torch.all(shift <= row_norms(rows @ u) * v_norm * (1 + 1e-4) + 1e-5), n  # and row by row
        # The same V through the top-r directions of the old inputs (no null space) would move them far more.
        top = torch.linalg.eigh(rows.T @ rows).eigenvectors[:, -u.shape[1] :]
        assert float(row_norms(rows @ top @ v).max()) > 2 * float(shift.max()), n  # 2.4–6.1× over seeds 0–3


class HeadsOnly(FineTune):
    """A frozen backbone after task 0, only each new task's head trains: no forgetting, and the plasticity NESS
    must beat to show that its null-space updates learn something."""

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return super().task_parameters(t) if t == 0 else list(self.model.task_heads[t].parameters())


def test_ness_forgets_less_than_finetuning_on_split_digits():
    """Real digits, a tiny ViT, plain SGD. Over seeds 0–9 (ε₁ 0.05): NESS's BWT −3.6…−1.1 against fine-tuning's
    −35…−3.6 (seed 0: −1.1 and −19.2), and NESS's mean accuracy on each new task just learnt 96.1–97.5 against
    87.6–93.6 with the backbone frozen after task 0 (seed 0: 96.4 and 92.3)."""
    bench = split_digits(seed=0)
    config = TrainConfig(epochs=20, lr=0.1, batch_size=16, lr_schedule=False)
    methods = {
        "finetune": FineTune,
        "heads_only": HeadsOnly,
        "ness": lambda m: NESS(m, NESSConfig(eps1=0.05, transfer_rank=0)),
    }
    runs = {}
    for name, build in methods.items():
        seed_everything(0)  # the same initial weights for every method
        model = tiny_digits_vit()
        runs[name] = run_continual(model, build(model), bench, config, seed=0, progress=False)
    bwt = {name: r["bwt"] for name, r in runs.items()}
    learnt = {name: sum(r["acc_matrix"][t][t] for t in range(1, 5)) / 4 for name, r in runs.items()}
    assert bwt["ness"] > bwt["finetune"] + 5, bwt
    assert learnt["ness"] > learnt["heads_only"] + 2, learnt


# -- the command line and the example ------------------------------------------------------------------------------


def test_cli_runs_the_vit_and_records_it(tmp_path, capsys):
    argv = ["run", "--benchmark", "split_digits", "--method", "ness", "--network", "vit", "--seeds", "1"]
    assert main([*argv, "--set", "epochs=2", "--out", str(tmp_path), "--quiet"]) == 0
    results = json.loads((tmp_path / "split_digits" / "ness_vit" / "seed_1" / "results.json").read_text())
    assert results["network"] == "vit" and results["config"]["protocol"]["network"] == "vit"
    assert results["variant"] == "ness_vit" and results["method"] == "ness"
    assert "vit" in results["config"]["protocol"]["sources"]["network"]
    layers = {record["layer"] for record in results["diagnostics"]}
    assert {"backbone.patch_embed", "backbone.blocks.1.attn.q"} <= layers  # the ViT's layers, not the MLP's
    assert "ness_vit" in capsys.readouterr().out


def test_cli_unknown_network_lists_the_valid_ones(tmp_path, capsys):
    argv = ["run", "--benchmark", "split_digits", "--method", "ness", "--network", "vgg", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown network 'vgg'; choose one of" in err and all(repr(name) in err for name in NETWORKS)
    assert not any(tmp_path.iterdir())  # nothing trained


def mnist_root() -> Path | None:
    root = os.environ.get("NESS_DATA_ROOT")
    if not root:
        return None
    folder = Path(root) / "mnist"
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")
    return Path(root) if all((folder / n).is_file() for n in (*names, "t10k-labels-idx1-ubyte.gz")) else None


@pytest.mark.skipif(mnist_root() is None, reason="NESS_DATA_ROOT does not point at a folder with the MNIST files")
def test_example_on_real_mnist_forgets_less_with_ness():
    """examples/vit_split_mnist.py on 1,000 images per task, 2 epochs (seeds 0–5: NESS's BWT beats fine-tuning's
    by 8.6–16.9 points)."""
    spec = importlib.util.spec_from_file_location("vit_split_mnist", ROOT / "examples" / "vit_split_mnist.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        outcomes = example.main(["--data-root", str(mnist_root()), "--train-per-task", "1000", "--epochs", "2"])
    assert outcomes["ness"]["bwt"] > outcomes["finetune"]["bwt"] + 5, {k: v["bwt"] for k, v in outcomes.items()}
    assert "BWT" in printed.getvalue()
