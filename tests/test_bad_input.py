"""Bad input never costs results: each wrong option, setting, path or file gets one clear error, before training.

Through the command line, a user error makes `ness run` (report, plot, adapters) print `ness <command>: error:
<message>` and return 2, and argparse's own errors exit with SystemExit(2); every test checks the message's key
words (what is wrong, where, and what is valid), not only that something failed. Runs use Split Digits (offline) and
one epoch per task; `no_training` makes any attempt to build a benchmark fail the test, so the errors it guards are
raised before any data is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ness.experiment
from ness.checkpoint import CHECKPOINT_NAME, Checkpointer, CheckpointError, read_header
from ness.cli import main
from ness.data import build_benchmark
from ness.experiment import resolve_settings, run_experiment
from ness.methods import NESS, FineTune, FSDGPMConfig, GPMConfig, NESSConfig, OWMConfig
from ness.modules import all_finite
from ness.presets import get_protocol
from ness.runs import RunSpec
from ness.trainer import TrainConfig

RUN = ["run", "--benchmark", "split_digits", "--method", "ness", "--seeds", "1", "--quiet"]
"""A one-run `ness run` command on the offline Split Digits; tests add --out and the bad input."""
FINETUNE_RUN = ["run", "--benchmark", "split_digits", "--method", "finetune", "--seeds", "1", "--quiet"]
SEED_FOLDER = Path("split_digits", "ness", "seed_1")


def user_error(capsys: pytest.CaptureFixture[str], argv: list[str], command: str = "run") -> str:
    """The message of a command that must fail with a user error: exit status 2 and `ness <command>: error:`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ness {command}: error: "), err
    assert "Traceback" not in err
    return err


def argparse_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The message of a command argparse refuses: SystemExit(2) and its usage line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def assert_says(message: str, *words: str) -> None:
    """Every one of `words` is in `message`."""
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in: {message}"


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a benchmark (reading data, then training) fails the test: the error must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a benchmark was built: the bad input was not caught before training")

    monkeypatch.setattr(ness.experiment, "build_benchmark", refuse)


# -- 1. names: benchmark, method, network, preset ---------------------------------------------------------------


def test_unknown_benchmark_lists_the_valid_ones(tmp_path, capsys, no_training):
    err = argparse_error(capsys, ["run", "--benchmark", "split_cifar", "--method", "ness", "--out", str(tmp_path)])
    assert_says(err, "--benchmark", "invalid choice: 'split_cifar'", "split_cifar100", "split_digits", "split_mnist")
    with pytest.raises(ValueError, match=r"unknown benchmark 'split_cifar'; choose one of \[.*'split_digits'"):
        run_experiment(RunSpec("split_cifar", "ness", 1))
    with pytest.raises(ValueError, match=r"unknown benchmark 'split_cifar'; valid names: split_digits"):
        build_benchmark("split_cifar", seed=1)


def test_unknown_method_lists_the_variants_and_methods(tmp_path, capsys, no_training):
    argv = ["run", "--benchmark", "split_digits", "--method", "nes", "--out", str(tmp_path), "--quiet"]
    err = user_error(capsys, argv)
    assert_says(err, "unknown method or variant 'nes' for split_digits", "variants: ['finetune', 'ness']", "'gpm'")
    assert not tmp_path.joinpath(".ness").exists()  # no plan recorded for a command that cannot run


def test_unknown_network_lists_the_valid_ones(tmp_path, capsys, no_training):
    err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--network", "lenet"])
    assert_says(err, "unknown network 'lenet'", "'mlp'", "'alexnet'", "'vit'")


def test_network_the_benchmark_cannot_feed_names_the_ones_it_can(tmp_path, capsys):
    err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--network", "alexnet", "--set", "epochs=1"])
    assert_says(err, "--network alexnet needs (channels, height, width) images", "flat inputs of 64", "mlp", "vit")
    assert not list(tmp_path.rglob("results.json"))
    with pytest.raises(ValueError, match=r"network 'mlp' needs MLP widths.*choose one of alexnet, resnet18, vit"):
        resolve_settings(RunSpec("split_cifar100", "ness", 1, network="mlp"))  # no data needed to know


def test_unknown_preset_lists_the_valid_ones(tmp_path, capsys, no_training):
    err = argparse_error(capsys, [*RUN, "--out", str(tmp_path), "--preset", "fast"])
    assert_says(err, "--preset", "invalid choice: 'fast'", "'quick'", "'paper'")
    with pytest.raises(ValueError, match=r"unknown preset 'fast' for split_digits; choose one of \('quick', 'paper'\)"):
        get_protocol("split_digits", "fast")


# -- 2. --set: ranges, types, keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("epochs=0", ["TrainConfig.epochs: got 0;", "an integer ≥ 1"]),
        ("epochs=-3", ["TrainConfig.epochs: got -3;", "an integer ≥ 1"]),
        ("batch_size=0", ["TrainConfig.batch_size: got 0;", "an integer ≥ 1"]),
        ("lr=0", ["TrainConfig.lr: got 0;", "a finite number > 0"]),
        ("lr=-0.1", ["TrainConfig.lr: got -0.1;", "a finite number > 0"]),
        ("lr=nan", ["TrainConfig.lr: got nan;", "a finite number > 0"]),
        ("lr=inf", ["TrainConfig.lr: got inf;", "a finite number > 0"]),
        ("momentum=1", ["TrainConfig.momentum: got 1;", "[0, 1)"]),
        ("momentum=1.5", ["TrainConfig.momentum: got 1.5;", "[0, 1)"]),
        ("epochs=abc", ["TrainConfig.epochs: got 'abc';", "an integer ≥ 1"]),
        ("epochs=2.5", ["TrainConfig.epochs: got 2.5;", "an integer ≥ 1"]),
        ("epochs=true", ["TrainConfig.epochs: got True;", "an integer ≥ 1"]),
        ("lr=fast", ["TrainConfig.lr: got 'fast';", "a finite number > 0"]),
        ("drop_last=3", ["TrainConfig.drop_last: got 3;", "True or False"]),
        ("sam_tasks=some", ["TrainConfig.sam_tasks: got 'some';", "'all', 'first'"]),
        ("device=tpu", ["TrainConfig.device: got 'tpu';", "a torch device name such as 'cpu'"]),
        ("pc_valid=2", ["split_digits data option pc_valid: got 2;", "[0, 1)", "held out"]),
        ("pc_valid=half", ["pc_valid: got 'half';", "[0, 1)"]),
    ],
)
def test_bad_training_or_data_setting_is_refused_naming_it(setting, words, tmp_path, capsys, no_training):
    err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--set", setting])
    assert_says(err, *words)
    assert not list(tmp_path.rglob("results.json"))


def test_unknown_set_key_lists_every_valid_key(tmp_path, capsys, no_training):
    err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--set", "epoch=3"])
    assert_says(err, "unknown option 'epoch'", "method options:", "'eps1'", "training options:", "'epochs'")
    assert_says(err, "data options:", "'pc_valid'")


@pytest.mark.parametrize("setting", ["epochs", "=3", " =3"])
def test_set_without_key_and_value_is_an_argparse_error(setting, tmp_path, capsys, no_training):
    err = argparse_error(capsys, [*RUN, "--out", str(tmp_path), "--set", setting])
    assert_says(err, "argument --set: expected KEY=VALUE", repr(setting), "--set epochs=3")


def test_configs_refuse_bools_strings_and_floats_for_integers():
    for bad in (True, "3", 2.5):
        with pytest.raises(ValueError, match=rf"TrainConfig\.epochs: got {bad!r}; an integer ≥ 1"):
            TrainConfig(epochs=bad)
    with pytest.raises(
        ValueError,
        match=r"TrainConfig\.lr: got 'x'; a finite number > 0\nTrainConfig\.batch_size: got 64\.0; an integer",
    ):
        TrainConfig(batch_size=64.0, lr="x")  # every bad field in one message, a line each
    with pytest.raises(ValueError, match=r"NESSConfig\.probe_samples: got True; an integer ≥ 0"):
        NESSConfig(probe_samples=True)
    with pytest.raises(
        TypeError, match=r"NESSConfig\.exclude: got 3; a list of strings .* \(write \[3\] for one entry"
    ):
        NESSConfig(exclude=3)
    with pytest.raises(TypeError, match=r"NESSConfig\.target_modules: got \[0\]; a non-empty list of strings"):
        NESSConfig(target_modules=[0])
    with pytest.raises(TypeError, match=r"GPMConfig\.layer_samples: got 100; a non-empty list.*write \[100\] for one"):
        GPMConfig(layer_samples=100)
    with pytest.raises(TypeError, match=r"GPMConfig\.patch_geometry: got \[2\]; .* \(stride, map size\) pair"):
        GPMConfig(patch_geometry=[2])
    with pytest.raises(TypeError, match=r"OWMConfig\.layer_alphas: got 0\.5; .*write \[0\.5\] for one entry"):
        OWMConfig(layer_alphas=0.5)
    with pytest.raises(TypeError, match=r"FSDGPMConfig\.exclude: got \[1\]; a list of strings"):
        FSDGPMConfig(exclude=[1])


# -- 3. NESS options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps1", ["-0.1", "0", "nan", "1", "2"])
def test_eps1_outside_0_1_is_refused(eps1, tmp_path, capsys, no_training):
    # ε₁ scales the threshold τ = ε₁·‖I‖_F (or ε₁·Σσ): ε₁ ≤ 0 keeps no direction, ε₁ ≥ 1 keeps every direction of
    # the Frobenius rule (σᵢ ≤ ‖σ‖ always), i.e. no protection; METHODS_SPEC §2 uses 1e-3 and 5e-4.
    err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--set", f"eps1={eps1}"])
    assert_says(err, "NESSConfig.eps1: got", "a finite number in (0, 1)", "the paper uses 1e-3")


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("threshold=spectral", ["NESSConfig.threshold: got 'spectral'; one of", "'frobenius'", "'energy'"]),
        ("layer_rules={'backbone.0': {'epsilon': 0.1}}", ["NESSConfig.layer_rules", "unknown settings", "'eps1'"]),
        ("layer_rules=[1]", ["NESSConfig.layer_rules: got [1]; a dict of module-name pattern → {setting: value}"]),
        ("layer_rules={'backbone.0': {'threshold': 'rank'}}", ["layer_rules['backbone.0']", "needs rank=r"]),
        ("memory=disk", ["NESSConfig.memory: got 'disk'; one of", "'covariance'", "'replay'"]),
        ("delta=1.5", ["NESSConfig.delta: got 1.5; a finite number in (0, 1)"]),
        ("probe_samples=2.5", ["NESSConfig.probe_samples: got 2.5; an integer ≥ 0"]),
        ("rank=true", ["NESSConfig.rank: got True; an integer ≥ 1, or None"]),
        (
            "exclude='backbone.0'",
            ["NESSConfig.exclude: got 'backbone.0'; a list", "write ['backbone.0'] for one entry"],
        ),
    ],
)
def test_bad_ness_option_is_refused_naming_it(setting, words, tmp_path, capsys, no_training):
    assert_says(user_error(capsys, [*RUN, "--out", str(tmp_path), "--set", setting]), *words)


def test_layer_rule_matching_no_layer_names_the_layers(tmp_path, capsys):
    rule = "layer_rules={'classifier': {'eps1': 0.1}}"
    err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--set", rule, "--set", "epochs=1"])
    assert_says(err, "pattern 'classifier' matches no adapted layer", "backbone.0", "backbone.2")


# Settings refused only once the model exists: with several seeds (and methods) they must still fail once, as a user
# error before any seed trains, never as one FAILED line per seed with `--resume` advice that replays them.
MODEL_SETTINGS = [  # (methods, options, words of the message); layer_rules and target_modules are NESS's alone
    (
        ["ness"],
        ["--set", "layer_rules={'backbone.9': {'rank': 3}}"],
        ["--method ness on split_digits", "pattern 'backbone.9' matches no adapted layer", "backbone.0", "backbone.2"],
    ),
    (["ness"], ["--set", "target_modules=['fc']"], ["--method ness on split_digits", "target 'fc' matches no module"]),
    (
        ["finetune", "ness"],
        ["--network", "alexnet"],
        ["--method finetune on split_digits", "--network alexnet needs (channels, height, width) images", "64", "vit"],
    ),
]


@pytest.fixture
def no_seed_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Starting any seed's run fails that run; the list records every attempt (it must stay empty)."""
    started: list[tuple] = []

    def refuse(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise AssertionError("a seed started: the bad setting was not caught before the runs")

    monkeypatch.setattr(ness.experiment, "run_experiment", refuse)
    return started


def assert_one_error_before_any_seed(err: str, out: Path, started: list[tuple]) -> None:
    """One `ness run: error:` line, no FAILED lines or resume advice, no seed started, nothing written to `out`."""
    assert err.count("ness run: error:") == 1 and "FAILED" not in err, err
    assert "resume" not in err, err
    assert started == []
    assert list(out.iterdir()) == []  # no plan (`--resume` would replay it), no seed folder, no failure.txt


@pytest.mark.parametrize(
    ("methods", "options", "words"), MODEL_SETTINGS, ids=["layer_rules", "target_modules", "network"]
)
def test_setting_refused_by_the_model_fails_once_before_any_seed(
    methods, options, words, tmp_path, capsys, no_seed_runs
):
    argv = ["run", "--benchmark", "split_digits", "--method", *methods, "--seeds", "1", "2", "--quiet"]
    err = user_error(capsys, [*argv, "--out", str(tmp_path), *options])
    assert_says(err, *words)
    assert_one_error_before_any_seed(err, tmp_path, no_seed_runs)


@pytest.mark.parametrize("error", [ValueError, TypeError])
def test_any_value_or_type_error_building_the_method_is_a_user_error(
    error, tmp_path, capsys, monkeypatch, no_seed_runs
):
    # e.g. NESS's `exclude` entry that matches no module, raised by its constructor
    def refuse(name: str, model: nn.Module, options: dict) -> None:
        raise error(f"{name}: the model has no layer 'fc'")

    monkeypatch.setattr(ness.experiment, "build_method", refuse)
    err = user_error(capsys, [*RUN[:6], "1", "2", "3", "--quiet", "--out", str(tmp_path)])
    assert_says(err, "--method ness on split_digits: ness: the model has no layer 'fc'")
    assert_one_error_before_any_seed(err, tmp_path, no_seed_runs)


# -- 4. seeds ------------------------------------------------------------------------------------------------


def test_negative_seed_is_refused_before_any_run(tmp_path, capsys, no_training):
    argv = ["run", "--benchmark", "split_digits", "--method", "ness", "--seeds", "1", "-1", "--out", str(tmp_path)]
    err = user_error(capsys, argv)
    assert_says(err, "RunSpec.seed: got -1; an integer in 0..4294967295", "--seeds")
    with pytest.raises(ValueError, match=r"RunSpec\.seed: got -1"):
        run_experiment(RunSpec("split_digits", "ness", -1))
    err = user_error(capsys, ["demo", "--seed", "-1", "--out", str(tmp_path), "--quiet"], command="demo")
    assert_says(err, "RunSpec.seed: got -1")


def test_repeated_seeds_and_methods_run_once_with_a_warning(tmp_path, capsys):
    # Decision: a repeat is dropped with a warning, not refused; it would only run the same run twice into the same
    # folder, so refusing would stop a command for nothing.
    argv = ["run", "--benchmark", "split_digits", "--method", "finetune", "finetune", "--seeds", "2", "2"]
    assert main([*argv, "--out", str(tmp_path), "--set", "epochs=1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert_says(err, "--seeds lists 2 more than once: each runs once", "--method lists finetune more than once")
    assert out.count("split_digits finetune seed 2: ACC") == 1


def test_seed_options_argparse_refuses(tmp_path, capsys, no_training):
    assert_says(argparse_error(capsys, [*RUN[:5], "--seeds", "--out", str(tmp_path)]), "--seeds: expected at least")
    assert_says(argparse_error(capsys, [*RUN[:5], "--seeds", "one", "--out", str(tmp_path)]), "invalid int value")


# -- 5. data root ----------------------------------------------------------------------------------------------


MNIST = ["run", "--benchmark", "split_mnist", "--method", "ness", "--seeds", "1", "2", "--quiet"]


def test_no_data_root_says_how_to_give_one(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.delenv("NESS_DATA_ROOT", raising=False)
    err = user_error(capsys, [*MNIST, "--out", str(tmp_path / "out")])
    assert_says(err, "no data root given", "--data-root DIR", "NESS_DATA_ROOT")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_data_root_that_does_not_exist_is_named(tmp_path, capsys, monkeypatch, no_training):
    missing = tmp_path / "no_such_data"
    err = user_error(capsys, [*MNIST, "--out", str(tmp_path / "out"), "--data-root", str(missing)])
    assert_says(err, f"data root {missing} does not exist or is not a folder", "--data-root")
    monkeypatch.setenv("NESS_DATA_ROOT", str(missing))
    err = user_error(capsys, [*MNIST, "--out", str(tmp_path / "out")])
    assert_says(err, f"NESS_DATA_ROOT {missing} does not exist", "fix NESS_DATA_ROOT")


def test_data_root_without_mnist_names_the_files_and_how_to_get_them(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("NESS_DATA_ROOT", str(empty))
    err = user_error(capsys, [*MNIST[:-2], "--out", str(tmp_path / "out"), "--quiet"])
    assert_says(err, "MNIST file(s) not found", "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    assert_says(err, str(empty / "mnist"), "copy the four official MNIST files", "torchvision", "download=True")
    err = user_error(capsys, [*MNIST, "--out", str(tmp_path / "out"), "--download"])
    assert_says(err, "split_mnist has no download option", "read from the data root only")
    # Two seeds: each run fails alone, with the message (its traceback goes to failure.txt), and the command exits 1.
    assert main([*MNIST, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert_says(err, "split_mnist ness seed 1 FAILED: MNIST file(s) not found", "ness seed 2 FAILED: MNIST", "2 run(s)")
    assert "Traceback" not in err
    failure = tmp_path / "out" / "split_mnist" / "ness" / "seed_2" / "failure.txt"
    assert_says(failure.read_text(), "Traceback", "DataError: MNIST file(s) not found")


# -- 6. output folder ------------------------------------------------------------------------------------------


def test_output_path_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    err = user_error(capsys, [*RUN, "--out", str(file)])
    assert_says(err, f"output folder '{file}' cannot be created: it is an existing file", "--out")
    err = user_error(capsys, [*RUN, "--out", str(file / "runs")])
    assert_says(err, f"'{file}', a folder above it, is an existing file", "--out")
    assert file.read_text() == "not a folder"


def test_output_folder_not_writable_is_refused_before_training(tmp_path, capsys, monkeypatch, no_training):
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("ness.cli.tempfile.NamedTemporaryFile", denied)  # as a read-only folder answers
    err = user_error(capsys, [*RUN, "--out", str(tmp_path / "out")])
    assert_says(err, "is not writable (Permission denied)", "choose a folder you can write to with --out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_under_a_read_only_folder_is_refused(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = user_error(capsys, [*RUN, "--out", str(locked / "runs")])
    finally:
        locked.chmod(0o755)
    assert_says(err, "is not writable", "--out")


# -- 7. resume -------------------------------------------------------------------------------------------------


def test_resume_of_a_folder_without_runs(tmp_path, capsys, no_training):
    err = user_error(capsys, ["run", "--resume", str(tmp_path / "nowhere")])
    assert_says(err, "--resume", "no such folder", "the --out folder of the run")
    err = user_error(capsys, ["run", "--resume", str(tmp_path)])
    assert_says(err, "no run was recorded there", ".ness/plan-*.json")


def test_resume_refuses_settings_given_beside_it(tmp_path, capsys, no_training):
    err = user_error(capsys, ["run", "--resume", str(tmp_path), "--benchmark", "split_digits", "--set", "eps1=1"])
    assert_says(err, "with their own settings; drop --benchmark, --set eps1", "--data-root", "training options lr")
    err = user_error(capsys, ["run", "--resume", str(tmp_path), "--out", str(tmp_path / "elsewhere")])
    assert_says(err, "--resume DIR continues the runs in DIR and writes there; drop --out")


def interrupted_run(out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`ness run --out OUT` (NESS, 1 epoch a task) stopped by Ctrl-C right after its first checkpoint; its path."""
    save = Checkpointer.epoch_end

    def save_then_stop(self: Checkpointer, state: object, record: dict) -> None:
        save(self, state, record)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "epoch_end", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            main([*RUN, "--out", str(out), "--set", "epochs=1"])
    path = out / SEED_FOLDER / CHECKPOINT_NAME
    assert read_header(path)["meta"]["position"] == {"task": 0, "epochs_done": 1}
    return path


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, capsys, monkeypatch):
    path = interrupted_run(tmp_path, monkeypatch)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the payload
    path.write_bytes(bytes(data))
    err = user_error(capsys, ["run", "--resume", str(tmp_path), "--quiet"])
    assert_says(err, f"checkpoint '{path}' is corrupt", "SHA-256", "so it was not loaded", "delete it")
    assert path.read_bytes() == bytes(data)  # refused, not deleted
    assert not (path.parent / "results.json").exists()


def test_truncated_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    path = interrupted_run(tmp_path, monkeypatch)
    path.write_bytes(path.read_bytes()[:-4096])
    err = user_error(capsys, ["run", "--resume", str(tmp_path), "--quiet"])
    assert_says(err, "is corrupt or truncated", "does not match the size", "not loaded")


def test_file_that_is_no_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    path = interrupted_run(tmp_path, monkeypatch)
    path.write_bytes(b"PK\x03\x04 a zip file, say")
    err = user_error(capsys, ["run", "--resume", str(tmp_path), "--quiet"])
    assert_says(err, f"'{path}' is not a ness checkpoint", "ness-checkpoint header", "not loaded")


def test_checkpoint_of_another_format_version_is_refused(tmp_path, capsys, monkeypatch):
    path = interrupted_run(tmp_path, monkeypatch)
    header_line, payload = path.read_bytes().split(b"\n", 1)
    header = {**json.loads(header_line), "version": 99}
    path.write_bytes(json.dumps(header).encode() + b"\n" + payload)
    err = user_error(capsys, ["run", "--resume", str(tmp_path), "--quiet"])
    assert_says(err, "is a version 99 checkpoint; this ness-cl reads version 1", "the ness-cl that wrote it")


def test_checkpoint_header_without_its_checksum_is_refused(tmp_path, capsys, monkeypatch):
    path = interrupted_run(tmp_path, monkeypatch)
    header_line, payload = path.read_bytes().split(b"\n", 1)
    header = {k: v for k, v in json.loads(header_line).items() if k != "sha256"}
    path.write_bytes(json.dumps(header).encode() + b"\n" + payload)
    err = user_error(capsys, ["run", "--resume", str(tmp_path), "--quiet"])
    assert_says(err, "has a damaged header (no payload size or SHA-256)", "not loaded")


def test_checkpoint_of_other_settings_names_what_differs(tmp_path, monkeypatch):
    path = interrupted_run(tmp_path, monkeypatch)
    with pytest.raises(CheckpointError) as refused:
        spec = RunSpec("split_digits", "ness", 1, overrides={"epochs": 2, "eps1": 0.01})
        run_experiment(spec, out=tmp_path, resume=True, progress=False)
    assert_says(str(refused.value), f"cannot resume '{path}'", "other settings")
    assert_says(str(refused.value), "overrides.epochs = 1 in the checkpoint, 2 now", "overrides.eps1 = 'unset'")
    assert "lr =" not in str(refused.value)  # only what differs


def test_damaged_results_file_of_a_resumed_run_is_named(tmp_path, capsys, monkeypatch):
    interrupted_run(tmp_path, monkeypatch)
    (tmp_path / SEED_FOLDER / "results.json").write_text('{"acc": ')
    err = user_error(capsys, ["run", "--resume", str(tmp_path), "--quiet"])
    assert_says(err, "results.json' is damaged (not valid JSON", "delete it and resume again")


# -- 8. report, plot, adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["report", "plot"])
def test_report_and_plot_of_a_missing_folder(command, tmp_path, capsys):
    err = user_error(capsys, [command, str(tmp_path / "nowhere")], command=command)
    assert_says(err, "no results directory at", "nowhere")


def test_report_of_a_file_or_a_malformed_results_file(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("")
    assert_says(user_error(capsys, ["report", str(file)], "report"), "it is a file, not a folder", "--out folder")
    results = tmp_path / "runs" / SEED_FOLDER / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text('{"acc": 9')
    for command in ("report", "plot"):
        err = user_error(capsys, [command, str(tmp_path / "runs")], command)
        assert_says(err, f"'{results}' is not valid JSON", "delete it and re-run that seed")
    results.write_text('{"acc": 9}')
    err = user_error(capsys, ["report", str(tmp_path / "runs")], "report")
    assert_says(err, "missing key(s) 'benchmark'", "not a complete ness results file")


def test_adapters_of_a_folder_that_is_not_an_adapter_folder(tmp_path, capsys):
    err = user_error(capsys, ["adapters", str(tmp_path / "nowhere")], "adapters")
    assert_says(err, "no adapter directory", "save_adapters")
    err = user_error(capsys, ["adapters", str(tmp_path)], "adapters")
    assert_says(err, "has no adapter_config.json: it is not an adapter directory")
    err = user_error(capsys, ["adapters", str(tmp_path), "--merge"], "adapters")
    assert_says(err, "--merge goes with --base", "--out")


# -- 9. a diverging loss -----------------------------------------------------------------------------------------


def test_diverging_loss_before_any_checkpoint(tmp_path, capsys):
    argv = [*FINETUNE_RUN, "--out", str(tmp_path), "--set", "lr=1e30", "--set", "epochs=1"]
    err = user_error(capsys, argv)
    assert_says(err, "task 0, epoch 0, step", "the loss is", "lower the learning rate (now 1e+30)")
    assert_says(err, "No checkpoint of this run was written before it")


def test_diverging_loss_keeps_the_last_good_checkpoint_and_says_where(tmp_path, capsys, monkeypatch):
    loss = FineTune.training_loss

    def diverges_in_task_1(self: FineTune, t: int, *args: object) -> torch.Tensor:
        return loss(self, t, *args) * (math.nan if t == 1 else 1.0)

    monkeypatch.setattr(FineTune, "training_loss", diverges_in_task_1)
    argv = [*FINETUNE_RUN, "--out", str(tmp_path), "--set", "epochs=1"]
    err = user_error(capsys, argv)
    checkpoint = tmp_path / "split_digits" / "finetune" / "seed_1" / CHECKPOINT_NAME
    lr = resolve_settings(RunSpec("split_digits", "finetune", 1)).train.lr
    assert_says(err, f"task 1, epoch 0, step 0: the loss is nan; lower the learning rate (now {lr:g})")
    assert_says(
        err,
        "The last good state (after 1 finished task(s))",
        f"'{checkpoint}'",
        "ness run --resume OUT --set lr=",
        "lower learning rate",
    )
    assert read_header(checkpoint)["meta"]["position"] == {"tasks_done": 1}
    assert (checkpoint.parent / "failure.txt").is_file()
    with pytest.raises(FloatingPointError) as stopped:
        run_experiment(
            RunSpec("split_digits", "finetune", 1, overrides={"epochs": 1}), out=tmp_path / "api", progress=False
        )
    assert isinstance(stopped.value.__cause__, FloatingPointError)  # the trainer's own error, kept
    assert str(stopped.value).startswith(str(stopped.value.__cause__))


# -- 10. the rest ------------------------------------------------------------------------------------------------


def test_other_run_options(tmp_path, capsys, monkeypatch, no_training):
    err = argparse_error(capsys, [*RUN, "--out", str(tmp_path), "--checkpoint", "often"])
    assert_says(err, "--checkpoint: invalid choice: 'often'", "'epoch'", "'task'", "'none'")
    err = user_error(capsys, ["run", "--benchmark", "split_digits", "--out", str(tmp_path)])
    assert_says(err, "ness run needs --method (or --resume DIR")
    for interval in ("-1", "nan"):
        err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--checkpoint-interval", interval])
        assert_says(err, f"--checkpoint-interval {float(interval)}: give seconds ≥ 0")
    err = user_error(capsys, [*FINETUNE_RUN, "--out", str(tmp_path), "--save-adapters"])
    assert_says(err, "--save-adapters works with NESS variants only", "'finetune'")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--set", "device=cuda"])
    assert_says(err, "device='cuda': this machine has 0 CUDA device(s)", "--set device=cpu")
    err = user_error(capsys, [*RUN, "--out", str(tmp_path), "--set", "train_per_task=0"])
    assert_says(err, "unknown option 'train_per_task'", "data options: ['pc_valid']")  # digits: none
    with pytest.raises(
        ValueError, match=r"five_datasets data option datasets: got 'mnist'; a list .*write \['mnist'\]"
    ):
        resolve_settings(RunSpec("five_datasets", "ness_sgdm", 1, overrides={"datasets": "mnist"}))
    with pytest.raises(ValueError, match=r"split_mnist data option train_per_task: got 0; an integer ≥ 1, or None"):
        resolve_settings(RunSpec("split_mnist", "ness", 1, overrides={"train_per_task": 0}))


# -- eigendecomposition failure -----------------------------------------------------------------------------------


def test_eigh_failure_falls_back_to_the_svd_and_says_so_in_the_diagnostics(monkeypatch):
    # tests/test_subspace.py checks null_basis's fallback alone; this checks it inside NESS, with torch's own error.
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(200, 3, generator=generator) @ torch.randn(3, 6, generator=generator)  # rank 3 in R^6
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    method = NESS(model, NESSConfig(eps1=0.01, probe_samples=0))
    method.begin_task(0)
    method.end_task(0, [inputs[:100], inputs[100:]])

    def failing_eigh(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    method.begin_task(1)
    (record,) = method.diagnostics()
    assert record["eigh_fallback"] is True
    # The null space of the old inputs, by NumPy's eigh of XᵀX: eigenvalues σ², σ ≤ ε₁·‖σ‖₂ (Eq. 5).
    values, vectors = np.linalg.eigh(inputs.double().T.numpy() @ inputs.double().numpy())
    sigma = np.sqrt(np.clip(values, 0, None))
    kept = vectors[:, sigma <= 0.01 * np.linalg.norm(sigma)]
    assert record["rank"] == kept.shape[1] == 3
    basis = model[0].U.double().numpy()
    np.testing.assert_allclose(basis @ basis.T, kept @ kept.T, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_all_finite_finds_one_nan_or_inf_anywhere(dtype):
    """all_finite (one min/max reduction) against isfinite's elementwise mask, with one bad entry at every position
    of a contiguous tensor and of a strided view."""
    x = torch.randn(4, 6, dtype=dtype)
    assert all_finite(x) and all_finite(x[:, ::2]) and all_finite(torch.empty(0, 3, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in range(x.numel()):
            y = x.clone()
            y.view(-1)[i] = bad
            assert not all_finite(y)
            view = y[:, ::2]
            assert all_finite(view) == bool(torch.isfinite(view).all())
    assert all_finite(torch.arange(5))  # integers are always finite
