"""NESS with Hugging Face `transformers.Trainer`, against fine-tuning, on a CPU and offline.

Two task sequences, each model built from a small config (random weights, nothing downloaded) and trained task after
task by the Trainer through `ness.hf.train_task`:

* vision: `ViTForImageClassification` on Split MNIST (real data: five tasks of two digits, one shared 2-way head,
  so the head is adapted in the null space like every other Linear layer);
* text: `GPT2ForSequenceClassification` (its attention and MLP are transformers' Conv1D) on a synthetic sequence
  of token tasks: a key token hidden among random tokens of random length (padded, with an attention mask), whose
  meaning flips from one task to the next; each task draws its other tokens from its own part of the vocabulary.

    NESS_DATA_ROOT=../shared/data python examples/hf_trainer.py      # both sequences, ~25 s on 2 idle cores
    python examples/hf_trainer.py --sequence text                    # no data files needed

With a pretrained model the code is the same: build it with `from_pretrained(...)` instead of from a config.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging

from ness import NESS, FineTune, NESSConfig, average_accuracy, backward_transfer
from ness.batches import model_inputs
from ness.data import split_mnist
from ness.hf import train_task
from ness.trainer import seed_everything

Items = list[dict[str, Any]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequence", choices=("vision", "text", "both"), default="both")
    parser.add_argument("--data-root", default=None, help="folder holding mnist/ (default: $NESS_DATA_ROOT)")
    parser.add_argument("--train-per-task", type=int, help="examples per task (default: 1000 images, 600 texts)")
    parser.add_argument("--epochs", type=int, help="epochs per task (default: 2 for vision, 4 for text)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# -- the two task sequences ------------------------------------------------------------------------------------
def mnist_tasks(args: argparse.Namespace) -> list[tuple[Items, Items]]:
    """Split MNIST as (train, test) lists of {"pixel_values": (1, 28, 28), "labels": 0/1} items."""
    benchmark = split_mnist(args.data_root, seed=args.seed, train_per_task=args.train_per_task or 1000)

    def items(task: Any, split: Any) -> Items:
        images = task.transform(split.inputs).reshape(-1, 1, 28, 28)
        return [{"pixel_values": x, "labels": int(y)} for x, y in zip(images, split.labels, strict=True)]

    return [(items(task, task.train), items(task, task.test)) for task in benchmark.tasks]


def token_tasks(
    seed: int, tasks: int = 4, vocab: int = 64, train: int = 600, test: int = 300
) -> list[tuple[Items, Items]]:
    """Task t: sequences of 4–16 tokens from task t's own range of the vocabulary, one of them a key token (1 or 2);
    the label is which key, flipped in odd tasks. The rule conflicts from task to task, so a model that only
    follows the last task forgets; the task's tokens tell the tasks apart. Token 0 pads."""
    generator = torch.Generator().manual_seed(seed)
    width = (vocab - 3) // tasks

    def sample(t: int, n: int) -> Items:
        items = []
        for _ in range(n):
            length = int(torch.randint(4, 17, (1,), generator=generator))
            ids = torch.randint(3 + t * width, 3 + (t + 1) * width, (length,), generator=generator)
            key = int(torch.randint(0, 2, (1,), generator=generator))
            ids[int(torch.randint(0, length, (1,), generator=generator))] = 1 + key
            items.append({"input_ids": ids, "labels": key ^ (t % 2)})
        return items

    return [(sample(t, train), sample(t, test)) for t in range(tasks)]


def pad_tokens(items: Items) -> dict[str, torch.Tensor]:
    """The text collator: right-padding with token 0, and the attention mask that marks the real tokens."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}


def stack_images(items: Items) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "labels": torch.tensor([item["labels"] for item in items]),
    }


def vit() -> torch.nn.Module:
    config = ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return ViTForImageClassification(config)


def gpt2() -> torch.nn.Module:
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, num_labels=2, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2ForSequenceClassification(config)


# -- training with the Trainer ---------------------------------------------------------------------------------
class ListDataset(Dataset):
    def __init__(self, items: Items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


@torch.no_grad()
def accuracy(method: Any, t: int, items: Items, collate: Callable[[Items], dict]) -> float:
    """Test accuracy (%) of task t, through the method's prediction for task t."""
    model = method.model
    was_training = model.training
    model.eval()
    correct = 0
    for batch in DataLoader(items, batch_size=256, collate_fn=collate):
        correct += int((method.predict(model_inputs(batch, "accuracy"), t).argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return 100.0 * correct / len(items)


def run(
    name: str,
    build: Callable[[], torch.nn.Module],
    tasks: list[tuple[Items, Items]],
    collate: Callable[[Items], dict],
    args: argparse.Namespace,
    epochs: int,
) -> list[list[float]]:
    """Train a fresh model (the same initial weights for each method) over the tasks; R[i][j], as in the paper."""
    seed_everything(args.seed)
    model = build()
    method = NESS(model, NESSConfig()) if name == "ness" else FineTune(model)
    matrix = []
    with tempfile.TemporaryDirectory() as scratch:
        for t, (train, _) in enumerate(tasks):
            settings = TrainingArguments(
                output_dir=f"{scratch}/task{t}", num_train_epochs=epochs, per_device_train_batch_size=32,
                per_device_eval_batch_size=256, learning_rate=1e-3, lr_scheduler_type="constant", report_to=[],
                save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=args.seed,
            )  # fmt: skip
            trainer = Trainer(model=model, args=settings, train_dataset=ListDataset(train), data_collator=collate)
            train_task(trainer, method, t)
            matrix.append(
                [accuracy(method, j, tasks[j][1], collate) for j in range(t + 1)] + [0.0] * (len(tasks) - t - 1)
            )
    return matrix


def report(title: str, matrices: dict[str, list[list[float]]]) -> dict[str, dict[str, float]]:
    print(f"\n{title}")
    summary = {}
    for name, matrix in matrices.items():
        summary[name] = {"acc": average_accuracy(matrix), "bwt": backward_transfer(matrix)}
        print(f"  {name:8s} ACC {summary[name]['acc']:5.1f}  BWT {summary[name]['bwt']:+5.1f}   last row: "
              + " ".join(f"{a:5.1f}" for a in matrix[-1]))  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    results = {}
    if args.sequence in ("vision", "both"):
        tasks, epochs = mnist_tasks(args), args.epochs or 2
        matrices = {name: run(name, vit, tasks, stack_images, args, epochs) for name in ("finetune", "ness")}
        results["vision"] = report(
            f"ViT (transformers, from a config) on Split MNIST: 5 tasks, {args.train_per_task or 1000} images each, "
            f"shared 2-way head, {epochs} epochs, AdamW, seed {args.seed}",
            matrices,
        )
    if args.sequence in ("text", "both"):
        tasks, epochs = token_tasks(args.seed, train=args.train_per_task or 600), args.epochs or 4
        matrices = {name: run(name, gpt2, tasks, pad_tokens, args, epochs) for name in ("finetune", "ness")}
        results["text"] = report(
            f"GPT-2 (transformers, from a config) on 4 synthetic key-token tasks (the key's meaning flips), padded "
            f"batches, {epochs} epochs, AdamW, seed {args.seed}",
            matrices,
        )
    return results


if __name__ == "__main__":
    main()
