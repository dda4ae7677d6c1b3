"""The Hugging Face snippets of the README and the guide run as written and do what they say: the Trainer loop (with
a small GPT-2 in place of the download) and the PEFT LoRA export."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from hf_models import gpt2, pad_batch, token_task, transformers
from ness.adapter_files import read_state_dict
from ness.adapters import NullSpaceAdapter
from test_lora_export import MLP_BIAS_TRANSFER, history
from test_readme import snippet

ROOT = Path(__file__).resolve().parents[1]
peft = pytest.importorskip("peft", reason="the snippets load the LoRA files with peft")


def test_readme_trainer_snippet_trains_each_task_and_exports_loadable_loras(tmp_path, monkeypatch):
    downloads = []

    def from_pretrained(name, **settings):  # offline: the small GPT-2 of the tests stands in for "gpt2"
        downloads.append((name, settings))
        return gpt2(num_labels=settings["num_labels"])

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)
    tasks = [(token_task(t), pad_batch) for t in range(3)]
    scope = {"tasks": tasks}
    exec(snippet("hf-trainer"), scope)
    method, model = scope["method"], scope["model"]
    assert downloads == [("gpt2", {"num_labels": 2, "pad_token_id": 50256})]
    assert method.tasks_done == 3
    assert all(name.endswith(("c_attn", "c_fc")) for name in method.layer_names)
    assert not any(isinstance(m, NullSpaceAdapter) for m in model.modules())  # every ΔW merged after its task
    for t in (1, 2):
        directory = tmp_path / "lora" / f"after_task{t}"
        config = json.loads((directory / "adapter_config.json").read_text())
        ranks = {name: sum(deltas[name][0].shape[1] for deltas in method.task_deltas[:t] if name in deltas)
                 for name in method.layer_names}  # fmt: skip
        assert config["rank_pattern"] == {f"^{re.escape(name)}": r for name, r in ranks.items() if r}
        factors = read_state_dict(directory / "adapter_model.safetensors")
        assert any(key.endswith("c_attn.lora_A.weight") for key in factors)
        peft.PeftModel.from_pretrained(gpt2(), str(directory))  # loads: names and shapes fit a GPT-2


def test_guide_lora_snippet_runs_and_gives_the_ness_models_outputs(tmp_path, monkeypatch):
    method, base, _ = history(MLP_BIAS_TRANSFER)
    x = torch.randn(5, *MLP_BIAS_TRANSFER.input_shape)
    shared = method.merge_and_unload().eval()
    with torch.no_grad():
        expected = method.forward(shared, x, 1)
    monkeypatch.chdir(tmp_path)
    scope = {"method": method, "base": copy.deepcopy(base).eval(), "x": x, "t": 1}
    exec(snippet("lora-export"), scope)
    torch.testing.assert_close(scope["logits"], expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(scope["plain"](x, 1), expected, rtol=0, atol=1e-5)
    assert all((tmp_path / d / "adapter_config.json").exists() for d in ("lora", "lora_upto1", "lora_task2"))


def test_the_offline_example_forgets_less_with_ness_through_the_trainer(capsys):
    """examples/hf_trainer.py's text sequence on 128 sequences per task (seed 0: fine-tuning ACC 51.2 BWT -17.3,
    NESS ACC 80.9 BWT +0.2); the vision sequence is the same code on Split MNIST (BENCHMARKS.md)."""
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    outcome = example.main(["--sequence", "text", "--train-per-task", "128"])["text"]
    assert outcome["ness"]["bwt"] > outcome["finetune"]["bwt"] + 10, outcome
    assert outcome["ness"]["acc"] > outcome["finetune"]["acc"] + 10, outcome
    assert "GPT-2 (transformers, from a config)" in capsys.readouterr().out
