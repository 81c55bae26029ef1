"""`geomcompile demo`: bad arguments are refused before anything loads, and the two runs train side by side."""
from __future__ import annotations

import math

import pytest

import geomcompile.cli as cli
import geomcompile.demo as demo
from geomcompile.errors import GeomCompileError


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the digits were loaded before the arguments were checked")
    monkeypatch.setattr(demo, "load_digits_tensors", refuse)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": -1}, "epochs must be an integer >= 1"),
    ({"epochs": 1.5}, "epochs must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": -3}, "batch_size must be an integer >= 1"),
    ({"lr": -0.1}, "lr must be a finite number > 0"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"lr": math.nan}, "lr must be a finite number > 0"),
    ({"seed": -1}, "seed must be an integer >= 0"),
])
def test_bad_arguments_are_refused_before_data_and_models(no_data, kwargs, message):
    with pytest.raises(GeomCompileError, match=message):
        demo.run_demo(**kwargs)


def test_an_unknown_policy_is_refused_before_the_data_loads(no_data):
    with pytest.raises(GeomCompileError, match="unknown policy 'nosuch'"):
        demo.run_demo(policy="nosuch", epochs=1)


def test_the_command_line_reports_a_negative_lr_as_an_error(no_data, capsys):
    assert cli.main(["demo", "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "lr must be a finite number > 0" in err and "Traceback" not in err


def test_the_two_runs_alternate_steps_and_swap_who_goes_first(monkeypatch, tmp_path):
    order = []
    real_step = demo.train_step

    def recording_step(model, optimizer, x, y):
        order.append(id(model))
        return real_step(model, optimizer, x, y)
    monkeypatch.setattr(demo, "train_step", recording_step)
    results = demo.run_demo(epochs=1, batch_size=256, out_dir=str(tmp_path))
    pairs = [tuple(order[i:i + 2]) for i in range(0, len(order), 2)]
    assert len(order) == 2 * len(results[0].losses) == 2 * len(results[1].losses)
    assert all(len(set(pair)) == 2 for pair in pairs)
    assert all(pairs[i] == pairs[i - 1][::-1] for i in range(1, len(pairs)))


def test_vs_plain_is_the_median_of_paired_ratios_so_a_load_change_cannot_invert_it():
    # plain ran its slow steps when the geometry did too (steps 3-4); the geometry run alone was slow
    # at step 2. Ratio of medians: 20/1 = 20x; paired: every pair but one is 2x.
    plain, geometry = [1.0, 1.0, 1.0, 10.0, 10.0], [2.0, 2.0, 20.0, 20.0, 20.0]
    assert demo.vs_plain(plain, geometry) == 2.0
    results = [demo.RunResult("plain", losses=[1.0], step_times=plain),
               demo.RunResult("geometry", losses=[1.0], step_times=geometry)]
    assert demo.results_table(results).splitlines()[-1].endswith("2.00x")
