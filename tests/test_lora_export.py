"""PEFT LoRA export: `NESS.save_lora` writes tasks 1..T as one LoRA on the task-0 model that
`peft.PeftModel.from_pretrained` loads unchanged, with each task head's outputs those of the NESS model after task T
(the shared model, or task j's own with its transfer adapter and BatchNorm state), lora_B·lora_A the sum of the tasks'
(U V)ᵀ, per-layer ranks in the config, PEFT's merge giving NESS's merged weights; a method loaded from its adapter
files exports the same; what PEFT cannot hold is refused with a clear error."""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ness import NESS, NESSConfig
from ness.lora_export import lora_factors
from ness.models import MultiHeadNet, call_model
from ness.models.heads import Forward
from ness.subspace import UnsupportedLayerError
from test_adapter_files import (
    HEADS,
    Case,
    SharedClassifierNet,
    begin,
    conv1d_batchnorm,
    conv2d_batchnorm,
    end,
    mlp,
    mlp_with_biases,
    paper_ness,
    task_data,
    train,
)

peft = pytest.importorskip("peft", reason="the LoRA export is checked by loading it with peft")

# Each layer its own rank (backbone.0 3 per task, backbone.2 5), so the config needs its per-layer patterns.
MLP = Case(mlp, (12,), paper_ness(threshold="rank", rank=5, layer_rules={"backbone.0": {"rank": 3}}))
MLP_BIAS_TRANSFER = Case(mlp_with_biases, (12,), NESSConfig(threshold="rank", rank=5, adapt_bias=True, transfer_rank=3))
# Conv2d with stride 2 and padding 1, and BatchNorm per task.
CNN_TRANSFER = Case(
    conv2d_batchnorm, (2, 6, 6), NESSConfig(threshold="rank", rank=4, batchnorm="per_task", transfer_rank=4)
)
# nn.Conv1d (padding 1) with adapted biases: lora_B's bias on a 1-wide conv; BatchNorm frozen, so not exported.
CONV1D_BIAS = Case(conv1d_batchnorm, (3, 8), paper_ness(threshold="rank", rank=4, adapt_bias=True))
CASES = {
    "mlp": MLP,
    "mlp_adapt_bias_transfer": MLP_BIAS_TRANSFER,
    "cnn_per_task_batchnorm_transfer": CNN_TRANSFER,
    "conv1d_adapt_bias": CONV1D_BIAS,
}


@torch.no_grad()
def outputs(method: NESS, case: Case) -> dict[str, list[torch.Tensor]]:
    """On fixed inputs, in eval mode: each task's `predict` (its own model) and each head of the shared model."""
    x, _ = task_data(case, 99)
    method.model.eval()
    shared = method.merge_and_unload().eval()
    heads = range(method.tasks_done)
    return {"own": [method.predict(x, j) for j in heads], "shared": [method.forward(shared, x, j) for j in heads]}


def history(
    case: Case, tasks: int = 3, forward: Forward = call_model
) -> tuple[NESS, nn.Module, list[dict[str, list[torch.Tensor]]]]:
    """(method after `tasks` tasks, the task-0 model, each finished task's `outputs` as it ended)."""
    torch.manual_seed(0)
    method = NESS(case.build(), case.config, forward)
    base, after = None, []
    for t in range(tasks):
        begin(method, case, t)
        train(method, case, t)
        end(method, case, t)
        after.append(outputs(method, case))
        if t == 0:
            base = copy.deepcopy(method.model)
    return method, base, after


@pytest.fixture(scope="module", params=list(CASES))
def trained(request):
    """(case, method, base, outputs after each task) of each case, trained once."""
    case = CASES[request.param]
    return case, *history(case)


def with_task(model: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
    """A multi-head model's task-t output: model(x, t). (`call_model` sees no declared heads through a PeftModel.)"""
    return model(x, t)


@torch.no_grad()
def peft_outputs(
    base: nn.Module, directory: Path, case: Case, tasks: int, forward: Forward = with_task
) -> list[torch.Tensor]:
    """Heads 0..tasks-1 of the PEFT model loaded from `directory` onto a copy of `base`."""
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    x, _ = task_data(case, 99)
    return [forward(model, x, j) for j in range(tasks)]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for j, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, j=j: f"head {j}: {m}")


def lora_config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def test_the_export_loads_in_peft_as_each_tasks_model_after_every_task(trained, tmp_path):
    case, method, base, after = trained
    transfer = method.config.transfer_rank > 0
    for upto in (1, 2):
        want = after[upto]
        shared = method.save_lora(tmp_path / f"shared{upto}", upto=upto)
        # every head of the shared model; without transfer adapters that is what each task predicts
        assert_close(peft_outputs(base, shared, case, upto + 1), want["shared"])
        if not transfer:
            assert_close(want["shared"], want["own"])
            continue
        for j in range(1, upto + 1):  # task j's own model: its transfer term (and BatchNorm state) too
            own = method.save_lora(tmp_path / f"task{j}_upto{upto}", upto=upto, task=j)
            torch.testing.assert_close(peft_outputs(base, own, case, j + 1)[j], want["own"][j], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(peft_outputs(base, shared, case, j + 1)[j], want["own"][j], atol=1e-3)
    assert method.save_lora(tmp_path / "default") == tmp_path / "default"  # default: the last finished task
    assert (
        load_file(tmp_path / "default" / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "shared2" / "adapter_model.safetensors").keys()
    )


def test_the_factors_stack_every_tasks_update_and_the_config_gives_each_layer_its_rank(trained, tmp_path):
    case, method, base, _ = trained
    task = 2 if method.config.transfer_rank else None
    directory = method.save_lora(tmp_path / "lora", task=task, base_model_name_or_path="tiny", task_type=None)
    tensors, config = load_file(directory / "adapter_model.safetensors"), lora_config(directory)
    own = method.transfers[task] if task is not None else {}
    layers = [n for n in method.layer_names if any(n in d for d in method.task_deltas) or n in own]
    assert layers == method.layer_names  # every layer trained in some task here

    ranks = {}
    for layer in layers:
        weight = method.model.get_submodule(layer).weight
        o, d = weight.shape[0], weight[0].numel()
        expected, expected_bias, rank = torch.zeros(o, d, dtype=torch.float64), torch.zeros(o, dtype=torch.float64), 0
        terms = [deltas[layer] for deltas in method.task_deltas if layer in deltas]
        terms += [own[layer]] if layer in own else []
        for basis, factor in terms:  # Σ over tasks of (B F)ᵀ, the bias row apart
            update = (basis.double() @ factor.double()).T
            expected += update[:, :d]
            if layer in method.bias_layers:
                expected_bias += update[:, d]
            rank += basis.shape[1]
        a = tensors[f"base_model.model.{layer}.lora_A.weight"]
        b = tensors[f"base_model.model.{layer}.lora_B.weight"]
        assert a.shape == (rank, *weight.shape[1:]) and b.shape == (o, rank, *[1] * (weight.dim() - 2))
        product = b.reshape(o, rank).double() @ a.reshape(rank, d).double()
        torch.testing.assert_close(product, expected, atol=1e-6, rtol=0)
        if method.bias_layers:
            torch.testing.assert_close(tensors[f"base_model.model.{layer}.lora_B.bias"].double(), expected_bias)
        ranks[layer] = rank

    if case is MLP:  # 2 tasks of rank 3 and 5
        assert ranks == {"backbone.0": 6, "backbone.2": 10}
    patterns = {f"^{re.escape(layer)}": rank for layer, rank in ranks.items()}
    assert config["rank_pattern"] == config["alpha_pattern"] == patterns
    assert config["r"] == config["lora_alpha"] == max(ranks.values())
    assert (config["peft_type"], config["lora_dropout"], config["bias"]) == ("LORA", 0.0, "none")
    assert config["lora_bias"] == bool(method.bias_layers)
    assert not (config["use_rslora"] or config["use_dora"] or config["fan_in_fan_out"])
    assert (config["base_model_name_or_path"], config["task_type"]) == ("tiny", None)
    names = [n for n, _ in base.named_modules()]
    assert [n for n in names if re.fullmatch(config["target_modules"], n)] == layers
    batchnorm = ["backbone.1", "backbone.5"] if method.config.batchnorm == "per_task" else []
    assert config["modules_to_save"] == [*batchnorm, "task_heads.1", "task_heads.2"]
    heads = {
        f"base_model.model.task_heads.{j}.{k}": v
        for j in (1, 2)
        for k, v in method.model.task_heads[j].state_dict().items()
    }
    assert {k for k in tensors if "task_heads" in k} == set(heads)
    assert all(torch.equal(tensors[k], v) for k, v in heads.items())
    # PEFT builds each layer at its rank, with scaling 1
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
    for layer, rank in ranks.items():
        lora = model.base_model.model.get_submodule(layer)
        assert (lora.r["default"], lora.scaling["default"]) == (rank, 1.0)


def test_peft_merge_and_unload_gives_the_ness_merged_weights(trained, tmp_path):
    _, method, base, _ = trained
    for task in (None, 2) if method.config.transfer_rank else (None,):
        directory = method.save_lora(tmp_path / f"lora{task}", task=task)
        merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).merge_and_unload()
        want = method.merge_and_unload(task).state_dict()
        got = merged.state_dict()
        assert list(got) == list(want)
        for key, value in want.items():
            if method.config.batchnorm == "frozen" and key.endswith(".num_batches_tracked"):
                # frozen BatchNorm is not exported: the base's, whose counter alone NESS's training moved on
                assert got[key] < value
                continue
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_a_method_loaded_from_its_adapter_files_exports_the_same(trained, tmp_path):
    _, method, base, _ = trained
    task = 1 if method.config.transfer_rank else None
    method.save_lora(tmp_path / "live", upto=2, task=task)
    loaded = NESS.load_adapters(copy.deepcopy(base), method.save_adapters(tmp_path / "adapters"))
    loaded.save_lora(tmp_path / "loaded", upto=2, task=task)
    assert lora_config(tmp_path / "loaded") == lora_config(tmp_path / "live")
    live, again = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("live", "loaded"))
    assert list(live) == list(again)
    assert all(torch.equal(live[k], again[k]) for k in live)


def test_config_modules_to_save_are_exported_after_the_last_task_and_refused_before(tmp_path):
    case = Case(SharedClassifierNet, (12,), paper_ness(threshold="rank", rank=5, modules_to_save=["classifier"]))
    method, base, after = history(case)
    directory = method.save_lora(tmp_path / "lora")
    assert lora_config(directory)["modules_to_save"] == ["classifier"]
    assert_close(peft_outputs(base, directory, case, 1, lambda model, x, t: model(x)), after[2]["own"][:1])
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\].*not their state after task 1"):
        method.save_lora(tmp_path / "early", upto=1)
    begin(method, case, 3)
    with pytest.raises(ValueError, match="task 3 is open"):
        method.save_lora(tmp_path / "open")


class OwnHeadsNet(nn.Module):
    """Per-task heads the model does not declare as `task_heads`, trained through NESSConfig.modules_to_save."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(12, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, n) for n in HEADS)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.heads[t](self.features(x))


def test_a_module_list_in_modules_to_save_is_exported_by_its_members(tmp_path):
    """PEFT wraps each module of modules_to_save, and a wrapped ModuleList cannot be indexed: its heads go singly."""
    case = Case(OwnHeadsNet, (12,), paper_ness(threshold="rank", rank=5, modules_to_save=["heads"]))
    method, base, after = history(case, forward=with_task)
    directory = method.save_lora(tmp_path / "lora")
    assert lora_config(directory)["modules_to_save"] == [f"heads.{j}" for j in range(len(HEADS))]
    assert_close(peft_outputs(base, directory, case, 3), after[2]["own"])


def test_adapted_biases_beside_a_layer_without_one_load_exactly_with_a_warning(tmp_path, caplog):
    def build() -> nn.Module:
        backbone = nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        return MultiHeadNet(backbone, 16, HEADS)

    case = Case(build, (12,), paper_ness(threshold="rank", rank=5, adapt_bias=True))
    method, base, after = history(case)
    with caplog.at_level(logging.WARNING, logger="ness.lora_export"):
        directory = method.save_lora(tmp_path / "lora")
    assert "backbone.0" in caplog.text and "merge_and_unload" in caplog.text
    tensors = load_file(directory / "adapter_model.safetensors")
    assert not tensors["base_model.model.backbone.0.lora_B.bias"].any()
    with pytest.warns(UserWarning, match="lora_bias"):
        assert_close(peft_outputs(base, directory, case, 3), after[2]["own"])


def test_bad_requests_get_clear_errors(tmp_path):
    method, _, _ = history(MLP)
    for upto in (0, 3):
        with pytest.raises(ValueError, match=rf"upto={upto}\): tasks 1 to 2 have finished"):
            method.save_lora(tmp_path, upto=upto)
    with pytest.raises(TypeError, match="upto must be a task index"):
        method.save_lora(tmp_path, upto=True)
    with pytest.raises(ValueError, match="task 2 has not been learnt"):
        method.save_lora(tmp_path, upto=1, task=2)
    with pytest.raises(ValueError, match="transfer_rank is 0"):
        method.save_lora(tmp_path, task=1)
    begin(method, MLP, 3)
    with pytest.raises(ValueError, match="task 3 is open and its V still trains"):
        method.save_lora(tmp_path, upto=3)
    assert not any(tmp_path.iterdir())

    fresh = NESS(mlp(), MLP.config)
    begin(fresh, MLP, 0)
    train(fresh, MLP, 0)
    end(fresh, MLP, 0)
    with pytest.raises(ValueError, match="no task after task 0 has finished"):
        fresh.save_lora(tmp_path)


@pytest.mark.parametrize(
    "layer, message",
    [
        (nn.Conv2d(2, 4, 3, dilation=2), "dilation=\\(2, 2\\)"),
        (nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Bilinear(3, 3, 4), "is a Bilinear, which has no PEFT LoRA form"),
    ],
)
def test_a_layer_peft_cannot_hold_is_refused(layer, message):
    d = layer.weight[0].numel()
    with pytest.raises(UnsupportedLayerError, match=rf"layer 'x'.*{message}"):
        lora_factors("x", layer, [(torch.ones(d, 1), torch.ones(1, 4))], adapt_bias=False)


def test_names_that_peft_would_match_elsewhere_are_refused(tmp_path):
    """A top-level nn.Sequential: PEFT's modules_to_save '1' (a BatchNorm) ends '4.1' too, an adapted layer."""

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(12, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.Sequential(nn.ReLU(), nn.Linear(16, 3)),
        )

    case = Case(build, (12,), paper_ness(threshold="rank", rank=4, batchnorm="per_task"))
    method, _, _ = history(case, tasks=2)
    with pytest.raises(ValueError, match=r"'1' would also reach .*4\.1"):
        method.save_lora(tmp_path / "lora")


def test_the_core_imports_neither_peft_nor_transformers():
    code = "import sys, ness, ness.lora_export; print(sorted({'peft', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_gpt2_conv1d_layers_export_with_fan_in_fan_out(tmp_path):
    """GPT-2's attention and MLP are transformers' Conv1D (weight d×o): PEFT's LoRA holds them as Linear layers with
    fan_in_fan_out, lora_A (r, d) and lora_B (o, r), and the loaded model is the NESS model after each task."""
    transformers = pytest.importorskip("transformers", reason="GPT-2 needs transformers")
    from hf_models import pad_batch, token_task

    def build() -> nn.Module:
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        return transformers.GPT2LMHeadModel(config)

    def language_batch(items: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(items)  # the labels: the next tokens, padding ignored
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    model = build()
    targets = ("c_attn", "c_proj", "c_fc")
    method = NESS(model, NESSConfig(threshold="rank", rank=6, target_modules=targets, transfer_rank=2))
    inputs = {k: v for k, v in language_batch(token_task(9, vocab=64)).items() if k != "labels"}
    after = []
    for t in range(3):
        loader = [language_batch(token_task(t, vocab=64))]
        method.begin_task(t, loader)
        optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=0.5)
        for _ in range(3):
            model(**loader[0]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        method.end_task(t, loader)
        model.eval()
        with torch.no_grad():
            after.append((method.merge_and_unload().eval()(**inputs).logits, method.predict(inputs, t)))
        model.train()
        if t == 0:
            base = copy.deepcopy(model)
    assert len(method.layer_names) == 8
    assert not torch.allclose(after[2][0], after[2][1], atol=1e-4)  # task 2's transfer adapter matters
    assert all(type(base.get_submodule(n)).__name__ == "Conv1D" for n in method.layer_names)

    def peft_logits(directory: Path) -> torch.Tensor:
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
        with torch.no_grad():
            return loaded(**inputs).logits

    for upto in (1, 2):
        directory = method.save_lora(tmp_path / f"shared{upto}", upto=upto)
        torch.testing.assert_close(peft_logits(directory), after[upto][0], atol=1e-5, rtol=1e-5)
        own = method.save_lora(tmp_path / f"own{upto}", upto=upto, task=upto)
        torch.testing.assert_close(peft_logits(own), after[upto][1], atol=1e-5, rtol=1e-5)
    config, tensors = lora_config(directory), load_file(directory / "adapter_model.safetensors")
    assert config["fan_in_fan_out"] and config["modules_to_save"] is None
    layer = "transformer.h.0.attn.c_attn"  # weight (32, 96): d = 32, o = 96
    u, v = zip(*(deltas[layer] for deltas in method.task_deltas), strict=True)
    assert tensors[f"base_model.model.{layer}.lora_A.weight"].shape == (12, 32)
    assert tensors[f"base_model.model.{layer}.lora_B.weight"].shape == (96, 12)
    a, b = tensors[f"base_model.model.{layer}.lora_A.weight"], tensors[f"base_model.model.{layer}.lora_B.weight"]
    expected = sum(ut.double() @ vt.double() for ut, vt in zip(u, v, strict=True))  # Σ U_t V_t, as W is stored
    torch.testing.assert_close((b.double() @ a.double()).T, expected, atol=1e-6, rtol=0)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).merge_and_unload()
    want = method.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=1e-6)
