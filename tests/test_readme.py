"""The README's Python snippets run as written, on scikit-learn's real 8×8 digits, and do what the README says."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    """The ```python block that follows the marker `<!-- README snippet: name ... -->` in the README."""
    match = re.search(
        rf"<!-- README snippet: {re.escape(name)}\b[^>]*-->\s*```python\n(.*?)```", README.read_text(), re.S
    )
    assert match, f"README.md has no snippet marked {name!r}"
    return match.group(1)


class DigitsNet(nn.Module):
    """The README's shape: features, then one `classifier` nn.Linear(64, 6) shared by every task (global labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsTask:
    """Digits 2t and 2t+1 with their global labels; `train_loader` is 10 shuffled epochs of batches of 32."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
        keep = (y == 2 * t) | (y == 2 * t + 1)
        self.x, self.y = x[keep], y[keep]
        g = torch.Generator().manual_seed(t)
        order = torch.cat([torch.randperm(self.y.numel(), generator=g) for _ in range(10)])
        self.train_loader = [(self.x[i], self.y[i]) for i in order.split(32)]


@pytest.fixture(scope="module")
def digit_tasks() -> list[DigitsTask]:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    return [DigitsTask(x, y, t) for t in range(3)]


def run_own_loop(code: str, tasks: list[DigitsTask]) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsNet()
    exec(compile(code, "README.md", "exec"), {"model": model, "tasks": tasks, "loss_fn": F.cross_entropy})
    return model


def accuracies(model: nn.Module, tasks: list[DigitsTask]) -> tuple[list[float], list[float]]:
    """(accuracy over all 6 classes, accuracy over the task's own 2 classes) per task."""
    overall, own = [], []
    with torch.no_grad():
        for t, task in enumerate(tasks):
            logits = model(task.x)
            overall.append(float((logits.argmax(1) == task.y).float().mean()))
            own.append(float((logits[:, 2 * t : 2 * t + 2].argmax(1) + 2 * t == task.y).float().mean()))
    return overall, own


def test_own_loop_snippet_adapts_the_shared_classifier_and_keeps_every_task(digit_tasks, caplog, capsys):
    code = snippet("own-loop")
    with caplog.at_level(logging.WARNING, logger="ness"):
        model = run_own_loop(code, digit_tasks)
    overall, own = accuracies(model, digit_tasks)
    assert min(overall) > 0.85  # over all six classes: each task's classes learnt, the earlier ones kept
    assert min(own) > 0.95
    assert "classifier" not in caplog.text
    assert "'rank'" in capsys.readouterr().out  # the diagnostics were printed


def test_own_loop_snippet_with_the_classifier_excluded_freezes_it_and_says_so(digit_tasks, caplog):
    """exclude=["classifier"] (what the README used to show): the classifier is frozen from task 1 on, so the later
    tasks' classes are learnt only as far as the frozen rows allow; a warning names it."""
    code = snippet("own-loop").replace("NESSConfig(eps1=0.1)", 'NESSConfig(eps1=0.1, exclude=["classifier"])')
    with caplog.at_level(logging.WARNING, logger="ness"):
        model = run_own_loop(code, digit_tasks)
    overall, own = accuracies(model, digit_tasks)
    assert overall[1] < 0.6 and own[1] < 0.6 and overall[2] < 0.6  # task 1 stays at chance (2 classes)
    assert "classifier (Linear): excluded by NESSConfig.exclude" in caplog.text


def test_own_loop_snippet_with_the_classifier_in_modules_to_save_trains_it_unprotected(digit_tasks, caplog):
    """modules_to_save=["classifier"]: it learns every new task's classes, and nothing protects the earlier ones."""
    code = snippet("own-loop").replace("NESSConfig(eps1=0.1)", 'NESSConfig(eps1=0.1, modules_to_save=["classifier"])')
    with caplog.at_level(logging.WARNING, logger="ness"):
        model = run_own_loop(code, digit_tasks)
    overall, own = accuracies(model, digit_tasks)
    assert overall[2] > 0.95 and max(overall[:2]) < 0.2 and min(own) > 0.85
    assert "classifier" not in caplog.text
