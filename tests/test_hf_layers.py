"""Hugging Face layers and batches: transformers' Conv1D adapted like a Linear layer, PEFT-style target names on
BERT, ViT, GPT-2 and LLaMA models built from configs, and statistics that leave padding out."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from hf_models import bert, gpt2, llama, pad_batch, token_task, transformers, vit
from ness import NESS, NESSConfig, NullSpaceAdapter
from ness.adapter_files import merged_state_dict
from ness.batches import model_inputs, token_rows
from ness.subspace import input_dim, layer_input_rows, output_dim, weight_matrix


def conv1d(d: int = 5, o: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = transformers.pytorch_utils.Conv1D(o, d).double()
    torch.nn.init.normal_(layer.bias)
    return layer


def test_conv1d_adapter_is_x_times_w_plus_uv_and_merges_into_the_d_by_o_weight() -> None:
    layer = conv1d()
    assert (input_dim(layer), output_dim(layer)) == (5, 3)
    u = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64)).Q
    adapter = NullSpaceAdapter(layer, u, "c_attn")
    with torch.no_grad():
        adapter.V.copy_(torch.randn(2, 3, dtype=torch.float64))
    x = torch.randn(4, 6, 5, dtype=torch.float64)  # (batch, tokens, d)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    expected = torch.einsum("btd,do->bto", x, w + u @ adapter.V.detach()) + b  # x·(W + U V) + b, W stored d×o
    torch.testing.assert_close(adapter(x), expected, rtol=0, atol=1e-12)
    # the layer's input rows and its (o, d) matrix: rows · Wᵀ is the layer without bias
    rows = layer_input_rows(layer, x)
    torch.testing.assert_close(rows @ weight_matrix(layer).T + b, layer(x).reshape(-1, 3), rtol=0, atol=1e-12)
    merged = adapter.merged()
    assert merged is layer and merged.weight.shape == (5, 3)
    torch.testing.assert_close(merged(x), expected, rtol=0, atol=1e-12)


def test_conv1d_adapter_merged_path_equals_low_rank_path() -> None:
    layer = conv1d(d=4, o=6)
    adapter = NullSpaceAdapter(layer, torch.eye(4, dtype=torch.float64), "c_fc")  # full rank: the merged path
    with torch.no_grad():
        adapter.V.copy_(torch.randn(4, 6, dtype=torch.float64))
    x = torch.randn(3, 50, 4, dtype=torch.float64)  # 150 rows: forming ΔW costs less than the low-rank products
    assert adapter._merged_path_is_cheaper(x)
    expected = x @ (layer.weight + adapter.V).detach() + layer.bias.detach()
    torch.testing.assert_close(adapter(x), expected, rtol=0, atol=1e-12)


def in_blocks(block: str, *names: str) -> list[str]:
    """The layers `names` of blocks 0 and 1, in the model's order."""
    return [f"{block.format(i)}.{name}" for i in (0, 1) for name in names]


@pytest.mark.parametrize(
    ("build", "targets", "expected"),
    [
        (gpt2, ("c_attn",), in_blocks("transformer.h.{}.attn", "c_attn")),
        (bert, ("query", "value"), in_blocks("bert.encoder.layer.{}.attention.self", "query", "value")),
        (llama, ("q_proj", "v_proj"), in_blocks("model.layers.{}.self_attn", "q_proj", "v_proj")),
        (vit, ("q_proj", "v_proj"), in_blocks("vit.layers.{}.attention", "q_proj", "v_proj")),
        (bert, ("dense",), None),
    ],
)
def test_target_modules_take_the_names_people_use(build, targets, expected) -> None:
    model = build()
    method = NESS(model, NESSConfig(target_modules=targets))
    if expected is None:  # every module whose name ends in 'dense' (attention output, intermediate, output, pooler)
        expected = [n for n, m in model.named_modules() if n.endswith(".dense") and isinstance(m, torch.nn.Linear)]
        assert len(expected) == 7
    assert method.layer_names == expected


def test_a_layer_the_targets_leave_out_is_frozen_as_not_targeted() -> None:
    method = NESS(gpt2(), NESSConfig(target_modules=("c_attn",), modules_to_save=("score",), transfer_rank=0))
    method.begin_task(0)
    method.end_task(0, [pad_batch(token_task(0))])
    method.begin_task(1)
    roles = {role.module: role for role in method.layer_roles(1)}
    assert roles["transformer.h.0.attn.c_attn"].status == "adapted"
    assert (roles["transformer.h.0.mlp.c_fc"].status, roles["transformer.h.0.mlp.c_fc"].reason) == (
        "frozen",
        "not_targeted",
    )
    assert roles["transformer.wte"].reason == "not_adaptable"


@pytest.mark.parametrize(("build", "target", "kind"), [(gpt2, "wte", "Embedding"), (bert, "LayerNorm", "LayerNorm")])
def test_targeting_an_embedding_or_a_layernorm_is_a_clear_error(build, target, kind) -> None:
    with pytest.raises(ValueError, match=rf"target '{target}' matches only .*\({kind}\).*modules_to_save"):
        NESS(build(), NESSConfig(target_modules=(target,)))


@pytest.mark.parametrize("build", [gpt2, bert, llama])
def test_padding_never_enters_a_covariance(build) -> None:
    """The same sentences padded to different lengths give the same covariances (float64), and those equal the
    sums over the real tokens' rows computed one sentence at a time, without any padding."""
    items = token_task(0, n=6)
    covariances = []
    for extra in (0, 7):
        model = build().double().eval()
        method = NESS(model, NESSConfig())
        longest = max(len(item["input_ids"]) for item in items)
        method.begin_task(0)
        method.end_task(0, [pad_batch(items[:3], longest + extra), pad_batch(items[3:], longest + 2 * extra)])
        covariances.append(method.covariances)
    for name in covariances[0]:
        torch.testing.assert_close(covariances[0][name], covariances[1][name], rtol=0, atol=1e-10)
    # independent: each sentence alone, unpadded, its rows gathered by a hook
    model = build().double().eval()
    name = NESS(model, NESSConfig()).layer_names[0]
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows.append(layer_input_rows(m, a[0])))
    with torch.no_grad():
        for item in items:
            model(input_ids=torch.tensor([item["input_ids"]]))
    handle.remove()
    stacked = torch.cat(rows)
    assert stacked.shape[0] == sum(len(item["input_ids"]) for item in items)
    torch.testing.assert_close(covariances[0][name], stacked.T @ stacked, rtol=0, atol=1e-10)


def test_token_rows_refuses_an_input_the_mask_cannot_index() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert token_rows(torch.zeros(2, 3, 4), mask, "q").tolist() == [True, True, False, True, False, False]
    assert token_rows(torch.zeros(6, 4), mask, "q").tolist() == [True, True, False, True, False, False]
    assert token_rows(torch.zeros(2, 4), mask, "pooler") is None  # one row per sample: pooled features
    with pytest.raises(ValueError, match=r"layer 'odd'.*exclude the layer"):
        token_rows(torch.zeros(2, 2, 3, 4), mask, "odd")


def test_gpt2_conv1d_adapters_save_load_and_merge(tmp_path) -> None:
    items = [token_task(0), token_task(1)]
    model = gpt2()
    method = NESS(model, NESSConfig(modules_to_save=("score",), transfer_rank=0))
    for t, task in enumerate(items):
        loader = DataLoader(task, batch_size=8, collate_fn=pad_batch)
        method.begin_task(t, loader)
        optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=0.5)
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        method.end_task(t, loader)
        if t == 0:  # the base model: the network as task 0 left it
            base_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(name.endswith("c_attn") for name in method.layer_names)
    batch = pad_batch(items[0])
    with torch.no_grad():
        expected = model(**batch).logits
    method.save_adapters(tmp_path / "adapters")
    state = merged_state_dict(base_state, tmp_path / "adapters")
    fresh = gpt2()  # the base model again
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, rtol=0, atol=1e-5)
    base = gpt2()
    base.load_state_dict(base_state)
    loaded = NESS.load_adapters(base, tmp_path / "adapters")
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-5)


def test_a_token_batch_whose_padding_mask_would_be_lost_is_refused() -> None:
    """Found trying a user's own loop: (ids, mask, y) tuples gave the model ids alone and the covariance counted
    the padding (max difference 1.4e3 between two paddings of the same sentences)."""
    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    mask, labels = (ids != 0).long(), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"element 1 has the shape \(2, 3\) of its token ids x"):
        model_inputs((ids, mask, labels), "end_task(0)")
    with pytest.raises(ValueError, match=r"'padding_mask' has the shape of its token ids but NESS reads only"):
        model_inputs({"input_ids": ids, "padding_mask": mask}, "end_task(0)")
    # what is not refused: the named mask, per-token labels padded with -100, images, a ViT-MAE-style boolean mask
    assert model_inputs({"input_ids": ids, "attention_mask": mask, "labels": labels}, "x").keys() == {
        "input_ids",
        "attention_mask",
    }
    assert model_inputs((ids, torch.where(mask == 1, ids, -100)), "x") is ids
    images = torch.randn(2, 1, 4, 4)
    assert model_inputs((images, labels), "x") is images
    patches = {"pixel_values": images, "bool_masked_pos": torch.zeros(2, 3, dtype=torch.bool)}
    assert model_inputs(patches, "x").keys() == patches.keys()


def test_own_names_through_forward_and_an_attention_mask_keep_padding_out() -> None:
    """A user's token model with its own forward(ids, mask): mapping batches and forward=... give padding-free
    statistics, equal for two paddings of the same sentences and to the sum over the real tokens alone."""

    class TinyEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = torch.nn.Embedding(50, 8)
            self.mixer = torch.nn.Linear(8, 8)
            self.readout = torch.nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.mixer(self.tok(ids)))
            return self.readout((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))

    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    sums = []
    for pad in (0, 4):
        torch.manual_seed(0)
        model = TinyEncoder().double()
        method = NESS(
            model,
            NESSConfig(target_modules=["mixer"], modules_to_save=["readout"], transfer_rank=0),
            forward=lambda m, batch, t: m(batch["input_ids"], batch["attention_mask"]),
        )
        padded = torch.cat([ids, torch.zeros(2, pad, dtype=torch.long)], 1)
        method.begin_task(0)
        method.end_task(0, [{"input_ids": padded, "attention_mask": (padded != 0).long(), "labels": torch.zeros(2)}])
        sums.append(method.covariances["mixer"])
        real = model.tok(ids[ids != 0]).detach()  # the mixer's input rows of the real tokens, computed directly
    torch.testing.assert_close(sums[0], sums[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(sums[0], real.T @ real, rtol=0, atol=1e-12)
