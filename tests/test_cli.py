"""`geomcompile` command line and demo: what a new user types (issue 14)."""
from __future__ import annotations

import argparse

import pytest

import geomcompile.cli as cli
import geomcompile.demo as demo
from geomcompile.errors import GeomCompileError


def test_plan_with_a_class_that_needs_arguments_is_an_error_with_the_fix(capsys):
    assert cli.main(["plan", "torch.nn:Linear", "resnet"]) == 2
    err = capsys.readouterr().err
    assert "torch.nn:Linear() failed" in err and "takes no arguments" in err and "Traceback" not in err


def test_demo_with_zero_epochs_is_an_error():
    with pytest.raises(GeomCompileError, match="epochs must be an integer >= 1"):
        demo.run_demo(epochs=0)


def test_demo_with_an_unknown_policy_fails_before_training(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the baseline was trained before the policy was checked")
    monkeypatch.setattr(demo, "train_side_by_side", no_training)
    with pytest.raises(GeomCompileError, match="nosuch"):
        demo.run_demo(policy="nosuch", epochs=1)


def _actions(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


def test_every_argument_has_help_and_the_docstring_names_every_command():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in sub.choices:
        for dest, action in _actions(parser, command).items():
            assert dest == "help" or action.help, f"{command} {dest} has no help text"
        assert command in cli.__doc__, f"the module docstring omits {command}"
