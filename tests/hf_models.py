"""Tiny Hugging Face models built from configs (no downloads) and synthetic token tasks, for the hf tests."""

from __future__ import annotations

import torch
from torch import Tensor

transformers = __import__("pytest").importorskip("transformers", reason="the hf extra (transformers) is not installed")
transformers.logging.set_verbosity_error()

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def gpt2(num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    """GPT-2 for sequence classification: attention and MLP are transformers' Conv1D (weight d×o)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=32, num_labels=num_labels, pad_token_id=0,
        bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2ForSequenceClassification(config)


def bert(seed: int = 0) -> torch.nn.Module:
    """BERT for sequence classification: query / key / value / dense are nn.Linear."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, pad_token_id=0, **NO_DROPOUT,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def llama(seed: int = 0) -> torch.nn.Module:
    """LLaMA for sequence classification: q_proj / k_proj / v_proj / o_proj, gate_proj / up_proj / down_proj."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForSequenceClassification(config)


def vit(seed: int = 0) -> torch.nn.Module:
    """ViT for image classification (28×28 grey images, 7×7 patches): a Conv2d patch embedding, Linear layers."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=10, **NO_DROPOUT,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def token_task(t: int, n: int = 16, vocab: int = 40) -> list[dict[str, list[int] | int]]:
    """Task t: n sequences of 3–8 random tokens whose first token (a task-specific cue, shifted by the label)
    decides the label."""
    generator = torch.Generator().manual_seed(100 + t)
    items = []
    for k in range(n):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        ids = torch.randint(3, vocab, (length,), generator=generator)
        label = k % 2
        ids[0] = 3 + (2 * t + label) % (vocab - 3)
        items.append({"input_ids": ids.tolist(), "labels": label})
    return items


def pad_batch(items: list[dict], length: int | None = None) -> dict[str, Tensor]:
    """The data collator: right-padding with token 0 to the longest sequence (or to `length`), and the mask."""
    longest = max(len(item["input_ids"]) for item in items)
    length = longest if length is None else length
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
        mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}
