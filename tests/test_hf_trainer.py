"""`ness.hf.train_task`: task after task through transformers.Trainer, with NESS's hooks in their places."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.data import DataLoader

from hf_models import gpt2, pad_batch, token_task, transformers
from ness import NESS, NESSConfig
from ness.hf import check_trainer_method, train_task
from ness.methods import FineTune, build_method

EPOCHS, LR = 3, 0.5
SHIFT = 1e-10
CONFIG = NESSConfig(max_output_shift=SHIFT, modules_to_save=("score",))  # a bound that binds: after_step clips V


def v_bound(record: dict) -> float:
    """Eq. 10's ball: ‖V‖₂ ≤ √ε / σ_max(U)."""
    return SHIFT**0.5 / record["sigma_max_U"]


def arguments(directory, **overrides) -> transformers.TrainingArguments:
    settings = dict(
        output_dir=str(directory), per_device_train_batch_size=16, per_device_eval_batch_size=16,
        num_train_epochs=EPOCHS, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    return transformers.TrainingArguments(**{**settings, **overrides})


def trainer_for(model, directory, task, **overrides) -> transformers.Trainer:
    trainer = transformers.Trainer(
        model=model, args=arguments(directory, **overrides), train_dataset=task, data_collator=pad_batch
    )
    # GPT-2's classification loss is a mean that ignores num_items_in_batch: the Trainer must then divide each
    # micro-batch's loss by the accumulation steps itself, as it does for a model without loss kwargs
    trainer.model_accepts_loss_kwargs = False
    return trainer


def own_loop(tasks, config=CONFIG):
    """ness's own API in a plain loop: one full-batch SGD step per epoch, after_step after each."""
    model = gpt2()
    method = NESS(model, config)
    for t, task in enumerate(tasks):
        loader = DataLoader(task, batch_size=len(task), collate_fn=pad_batch)
        method.begin_task(t, loader)
        optimizer = torch.optim.SGD(method.trainable_parameters(t), lr=LR)
        for _ in range(EPOCHS):
            for batch in loader:
                model(**batch).loss.backward()
                optimizer.step()
                method.after_step(t)
                optimizer.zero_grad()
        method.end_task(t, loader)
    return model, method


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_and_own_loop_end_with_the_same_weights(tmp_path, accumulation) -> None:
    tasks = [token_task(0), token_task(1)]
    expected, expected_method = own_loop(tasks)
    model = gpt2()
    method = NESS(model, CONFIG)
    for t, task in enumerate(tasks):
        overrides = dict(per_device_train_batch_size=16 // accumulation, gradient_accumulation_steps=accumulation)
        train_task(trainer_for(model, tmp_path / f"task{t}", task, **overrides), method, t)
    assert method.tasks_done == 2
    assert_same_weights(model, expected)
    # after_step ran after every optimiser step: the certified bound binds on a layer, and holds on every layer
    records = [r for r in method.diagnostics() if r["task"] == 1 and r["rank"]]
    assert all(r["v_spectral_norm"] <= v_bound(r) * (1 + 1e-6) for r in records)
    assert any(r["v_spectral_norm"] >= v_bound(r) * (1 - 1e-6) for r in records)
    for mine, theirs in zip(method.diagnostics(), expected_method.diagnostics(), strict=True):
        assert mine["rank"] == theirs["rank"]


def test_resume_from_checkpoint_inside_a_task_continues_correctly(tmp_path) -> None:
    tasks = [token_task(0), token_task(1)]
    model = gpt2()
    method = NESS(model, CONFIG)
    train_task(trainer_for(model, tmp_path / "task0", tasks[0]), method, 0)
    restarted_model, restarted = copy.deepcopy((model, method))  # the state a new process loads after task 0
    once = dict(per_device_train_batch_size=8, save_strategy="steps", save_steps=2)
    train_task(trainer_for(model, tmp_path / "task1", tasks[1], **once), method, 1)
    checkpoint = tmp_path / "task1" / "checkpoint-2"  # step 2 of 6: the middle of the task
    assert checkpoint.is_dir()
    train_task(
        trainer_for(restarted_model, tmp_path / "again", tasks[1], **once),
        restarted,
        1,
        resume_from_checkpoint=str(checkpoint),
    )
    assert_same_weights(restarted_model, model)


def test_bf16_autocast_trains_and_keeps_the_bound(tmp_path) -> None:
    tasks = [token_task(0), token_task(1)]
    model = gpt2()
    method = NESS(model, CONFIG)
    for t, task in enumerate(tasks):
        train_task(trainer_for(model, tmp_path / f"task{t}", task, bf16=True), method, t)
    records = [r for r in method.diagnostics() if r["task"] == 1 and r["rank"]]
    assert records and all(r["v_spectral_norm"] > 0 for r in records)
    assert all(r["v_spectral_norm"] <= v_bound(r) * (1 + 1e-6) for r in records)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_method_that_changes_the_loss_or_reads_tensor_batches_is_refused() -> None:
    model = gpt2()
    for name in ("ness", "l2", "finetune"):
        check_trainer_method(build_method(name, model))  # allowed
    with pytest.raises(TypeError, match="gpm reads \\(inputs, labels\\) tensor batches"):
        check_trainer_method(build_method("gpm", model))

    class OwnLoss(FineTune):
        name = "own-loss"

        def training_loss(self, t, x, y, tasks=None):
            return super().training_loss(t, x, y, tasks)

    with pytest.raises(TypeError, match="own-loss overrides training_loss"):
        check_trainer_method(OwnLoss(model))


def test_an_optimiser_made_before_the_bases_is_refused(tmp_path) -> None:
    model = gpt2()
    method = NESS(model, CONFIG)
    trainer = trainer_for(model, tmp_path, token_task(0))
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="already holds an optimiser"):
        train_task(trainer, method, 0)


def test_several_processes_are_refused(tmp_path, monkeypatch) -> None:
    model = gpt2()
    method = NESS(model, CONFIG)
    trainer = trainer_for(model, tmp_path, token_task(0))
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    with pytest.raises(RuntimeError, match=r"runs on 2 processes; ness\.hf trains in one process"):
        train_task(trainer, method, 0)
    assert method.active_task is None  # refused before anything began


def test_resuming_a_task_from_another_tasks_checkpoint_is_refused(tmp_path) -> None:
    """One output_dir for every task, as a Trainer script may have: resume_from_checkpoint=True would pick task 0's
    last checkpoint for task 1 (its weights and step belong to task 0)."""
    model = gpt2()
    method = NESS(model, CONFIG)
    save = dict(per_device_train_batch_size=8, save_strategy="steps", save_steps=2)
    train_task(trainer_for(model, tmp_path, token_task(0), **save), method, 0)
    assert json.loads((tmp_path / "checkpoint-6" / "ness_task.json").read_text())["task"] == 0
    with pytest.raises(ValueError, match=r"checkpoint-6 was saved in task 0, so it cannot continue task 1"):
        train_task(trainer_for(model, tmp_path, token_task(1), **save), method, 1, resume_from_checkpoint=True)
    assert method.active_task is None  # refused before task 1 began
