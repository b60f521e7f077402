"""The options of aro stepbench / distbench / diagnose: declared once, in a dataclass each; the
command line is generated from it (aro.bench.options)."""

import dataclasses
import inspect
from pathlib import Path

import pytest

from aro.bench.cli import build_parser, main
from aro.bench.diagnose import DiagnoseOptions, run_diagnose
from aro.bench.distbench import DistbenchOptions, run_distbench
from aro.bench.options import options_from_args
from aro.bench.stepbench import StepbenchOptions, run_stepbench

COMMANDS = {"stepbench": (StepbenchOptions, run_stepbench), "distbench": (DistbenchOptions, run_distbench),
            "diagnose": (DiagnoseOptions, run_diagnose)}


def _parse(argv: list[str]):
    args = build_parser().parse_args(argv)
    return options_from_args(COMMANDS[argv[0]][0], args)


def _help(command: str) -> str:
    return build_parser()._subparsers._group_actions[0].choices[command].format_help()


@pytest.mark.parametrize("command", COMMANDS)
def test_parsed_defaults_are_the_dataclass_defaults(command):
    cls, _ = COMMANDS[command]
    assert _parse([command]) == cls()
    # whitespace removed: argparse wraps lines, also after a hyphen inside a word
    help_text = "".join(_help(command).split())
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in help_text
        assert "".join(f.metadata["help"].split()) in help_text, f.name


@pytest.mark.parametrize("command", COMMANDS)
def test_run_functions_take_the_dataclass_and_repeat_no_default(command):
    """The defaults live in the dataclass only: the run function's one option is the dataclass."""
    _, run = COMMANDS[command]
    params = inspect.signature(run).parameters
    assert list(params)[0] == "options"
    assert [n for n, p in params.items() if p.default is not inspect.Parameter.empty] == ["progress"]


def test_help_shows_the_defaults_as_written_on_the_command_line():
    text = " ".join(_help("stepbench").split())
    assert "(default: small)" in text and "(default: 128,256,512,1024,2048)" in text
    assert "(default: ddp,fsdp2)" in " ".join(_help("distbench").split())


def test_alias_flags_set_the_same_field():
    assert _parse(["stepbench", "--presets", "tiny,small"]) == _parse(["stepbench", "--models", "tiny,small"])
    assert _parse(["stepbench", "--presets", "tiny"]).models == ("tiny",)
    assert _parse(["stepbench", "--train-preset", ""]) == _parse(["stepbench", "--train-model", ""])
    assert _parse(["stepbench", "--train-preset", "tiny"]).train_model == "tiny"


def test_comma_separated_options_are_parsed_once_into_tuples():
    o = _parse(["stepbench", "--optimizers", "adamw, muon", "--dims", "", "--models", "", "--out", "x/sb.json",
                "--cold-allocator"])
    assert o.optimizers == ("adamw", "muon") and o.dims == () and o.models == ()
    assert o.out == Path("x/sb.json") and o.cold_allocator is True
    assert _parse(["distbench", "--worlds", "1,2"]).worlds == (1, 2)
    # built in Python: lists become tuples, strings paths
    o = StepbenchOptions(dims=[16, 32], out="sb.json")
    assert o.dims == (16, 32) and o.out == Path("sb.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.repeats = 2


@pytest.mark.parametrize("cls, changes, flag", [
    (StepbenchOptions, {"repeats": 0}, "--repeats"),
    (StepbenchOptions, {"warmup": -1}, "--warmup"),
    (StepbenchOptions, {"dims": (16, 0)}, "--dims"),
    (StepbenchOptions, {"optimizers": ("lion",)}, "--optimizers"),
    (StepbenchOptions, {"optimizers": ()}, "--optimizers"),
    (StepbenchOptions, {"models": ("huge",)}, "--models"),
    (StepbenchOptions, {"train_model": "huge"}, "--train-model"),
    (StepbenchOptions, {"budget": -1.0}, "--budget"),
    (DistbenchOptions, {"modes": ("mpi",)}, "--modes"),
    (DistbenchOptions, {"modes": ()}, "--modes"),
    (DistbenchOptions, {"worlds": (0, 2)}, "--worlds"),
    (DistbenchOptions, {"repeats": 0}, "--repeats"),
    (DistbenchOptions, {"sharing": "ring"}, "--sharing"),
    (DistbenchOptions, {"preset": "huge"}, "--preset"),
    (DiagnoseOptions, {"steps": 0}, "--steps"),
    (DiagnoseOptions, {"lr": 0.0}, "--lr"),
    (DiagnoseOptions, {"model": "huge"}, "--model"),
])
def test_a_bad_value_names_its_option(cls, changes, flag):
    with pytest.raises(ValueError, match=flag) as err:
        cls(**changes)
    assert any(hint in str(err.value) for hint in ("choose from", "must be", "give at least one"))


@pytest.mark.parametrize("argv, flag", [
    (["stepbench", "--repeats", "0"], "--repeats"),
    (["distbench", "--modes", "ddp,mpi"], "--modes"),
    (["diagnose", "--steps", "0"], "--steps"),
])
def test_the_command_line_reports_a_bad_value_in_one_line(argv, flag, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"aro {argv[0]}: error: {flag}") and err.count("\n") == 0
    assert not list(tmp_path.iterdir())  # refused before anything ran
