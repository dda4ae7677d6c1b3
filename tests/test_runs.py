"""What identifies a run is one RunSpec: the command line builds it once, resolves it once and passes it down; the
plan and the checkpoint record `asdict(spec)`, and a resume is checked against it. Plans and checkpoints written
before run specs existed still resume."""

from __future__ import annotations

import dataclasses
import json

import pytest

import ness.experiment
from ness.checkpoint import read_header
from ness.cli import Plan, build_parser, main, read_plans
from ness.experiment import ResolvedSettings, resolve_settings, run_experiment
from ness.runs import RunSpec
from ness.validation import ConfigError
from test_bad_input import interrupted_run

COMMAND = ["run", "--benchmark", "split_digits", "--method", "finetune", "--seeds", "1", "2", "--quiet"]


def test_a_spec_survives_its_json_record_unchanged():
    spec = RunSpec("split_digits", "ness", 3, "paper", "vit", True, {"exclude": ("fc",), "eps1": 0.01})
    assert spec.overrides == {"exclude": ["fc"], "eps1": 0.01}  # stored as JSON reads it back
    assert RunSpec(**json.loads(json.dumps(dataclasses.asdict(spec)))) == spec


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"seed": 2**32}, r"RunSpec\.seed: got 4294967296; an integer in 0\.\.4294967295"),
        ({"seed": True}, r"RunSpec\.seed: got True"),
        ({"overrides": {"exclude": {"fc"}}}, r"RunSpec\.overrides: got \{'exclude': \{'fc'\}\}; a dict .* JSON"),
        ({"overrides": {1: 2}}, r"RunSpec\.overrides: got \{1: 2\}"),
        ({"benchmark": ""}, r"RunSpec\.benchmark: got ''; a non-empty string"),
        ({"faithful": "yes"}, r"RunSpec\.faithful: got 'yes'; True or False"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(fields, words):
    with pytest.raises(ConfigError, match=words):
        RunSpec(**{"benchmark": "split_digits", "method": "ness", "seed": 1, **fields})


def test_the_plan_records_each_runs_spec_and_reads_it_back():
    args = build_parser().parse_args([*COMMAND, "--set", "epochs=1", "--method", "finetune", "ness"])
    plan = Plan.from_args(args)
    assert [(s.method, s.seed) for s in plan.runs] == [("finetune", 1), ("finetune", 2), ("ness", 1), ("ness", 2)]
    assert all(s.overrides == {"epochs": 1} and s.preset == "quick" for s in plan.runs)
    assert Plan.from_json(json.loads(json.dumps(dataclasses.asdict(plan)))) == plan


def test_a_plan_of_the_layout_before_run_specs_is_read_as_its_runs():
    old = {  # what `ness run` recorded before RunSpec: one key per option of the command
        "benchmark": "split_digits",
        "method": ["finetune"],
        "seeds": None,
        "preset": "quick",
        "network": None,
        "faithful": False,
        "download": False,
        "data_root": None,
        "set": [["epochs", 1]],
        "save_adapters": False,
        "checkpoint": "task",
    }
    plan = Plan.from_json(old)
    assert plan.checkpoint == "task"
    assert plan.runs == tuple(RunSpec("split_digits", "finetune", s, overrides={"epochs": 1}) for s in (1, 2, 3))


def test_each_run_is_resolved_once_and_passed_down(tmp_path, monkeypatch):
    resolved: list[RunSpec] = []

    def counting(spec: RunSpec, download: bool = False) -> ResolvedSettings:
        resolved.append(spec)
        return resolve_settings(spec, download)

    monkeypatch.setattr(ness.experiment, "resolve_settings", counting)
    assert main([*COMMAND, "--out", str(tmp_path), "--set", "epochs=1"]) == 0
    assert [s.seed for s in resolved] == [1, 2]  # once per run: the checks and the run itself share it
    (path,) = (tmp_path / ".ness").glob("plan-*.json")
    assert json.loads(path.read_text())["runs"] == [dataclasses.asdict(s) for s in resolved]


def test_the_checkpoint_records_the_spec_and_a_resume_compares_it(tmp_path, monkeypatch):
    path = interrupted_run(tmp_path, monkeypatch)
    spec = RunSpec("split_digits", "ness", 1, overrides={"epochs": 1})
    assert read_header(path)["meta"]["spec"] == dataclasses.asdict(spec)
    # The protocol's own network named: the same folder and resolved settings, but not the spec that was run.
    with pytest.raises(ValueError, match=r"other settings \(network = None in the checkpoint, 'mlp' now\)"):
        run_experiment(dataclasses.replace(spec, network="mlp"), out=tmp_path, resume=True, progress=False)
    (_, plan), *_ = read_plans(tmp_path)
    assert plan.runs == (spec,)


def test_a_checkpoint_written_before_run_specs_still_resumes(tmp_path, monkeypatch):
    path = interrupted_run(tmp_path, monkeypatch)
    header_line, payload = path.read_bytes().split(b"\n", 1)
    header = json.loads(header_line)
    del header["meta"]["spec"]  # the header's layout before RunSpec: the resolved settings alone
    path.write_bytes(json.dumps(header).encode() + b"\n" + payload)
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == 0
    results = json.loads((path.parent / "results.json").read_text())
    assert results["resumed_from"] == [{"task": 0, "epochs_done": 1}]


def test_a_checkpoint_written_before_an_option_existed_resumes_at_its_default(tmp_path, monkeypatch, capsys):
    """Options added since a checkpoint was written (TrainConfig.compile, NESSConfig.statistics_dtype) count as
    their defaults, which that run ran with; one whose default is not what the run resolves to is still refused."""
    path = interrupted_run(tmp_path, monkeypatch)
    header_line, payload = path.read_bytes().split(b"\n", 1)

    def write_without(train_keys: tuple[str, ...], method_keys: tuple[str, ...]) -> None:
        header = json.loads(header_line)
        settings = header["meta"]["settings"]
        for key in train_keys:
            del settings["train"][key]
        for key in method_keys:
            del settings["method"][key]
        path.write_bytes(json.dumps(header).encode() + b"\n" + payload)

    write_without(("epochs",), ())  # the run has epochs = 1; TrainConfig's default is 200
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) != 0
    assert "other settings (train.epochs = 200 in the checkpoint, 1 now)" in capsys.readouterr().err
    write_without(("compile", "compile_backend"), ("statistics_dtype", "statistics_device"))
    assert main(["run", "--resume", str(tmp_path), "--quiet"]) == 0
    results = json.loads((path.parent / "results.json").read_text())
    assert results["resumed_from"] == [{"task": 0, "epochs_done": 1}]
