"""`geomcompile reproduce`: every experiment runs with the tiny budget and writes a complete report.

Structure only (claim, table rows, verdict in the allowed set, PNG and JSON written); the measured
numbers and verdicts at full budget live in benchmarks/results/reproduce/ and docs/reproduce.md.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest

import geomcompile.cli as cli
from geomcompile.errors import GeomCompileError
from geomcompile.reproduce import EXPERIMENTS, VERDICTS, run_experiments
from geomcompile.reproduce.harness import paired_gain

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["reproduce", "all", "--budget", "tiny", "--out", str(out), "--no-progress"])
    return rc, stdout.getvalue(), out


def test_the_command_runs_every_paper_and_prints_a_summary(tiny_run):
    rc, text, _ = tiny_run
    assert rc == 0
    assert "summary:" in text
    for paper in EXPERIMENTS:
        assert f"== paper {paper}:" in text


@pytest.mark.parametrize("paper", list(EXPERIMENTS))
def test_each_report_has_claim_table_verdict_png_and_json(tiny_run, paper):
    _, text, out = tiny_run
    path = out / f"{paper}_{EXPERIMENTS[paper]}.json"
    report = json.loads(path.read_text())
    assert report["paper"] == paper and report["budget"] == "tiny"
    assert len(report["claim"]) > 40 and len(report["setup"]) > 40
    assert report["criteria"] and all(isinstance(c, str) and c for c in report["criteria"])
    assert report["verdict"] in VERDICTS and report["reasons"]
    assert report["tables"]
    for table in report["tables"]:
        assert table["rows"], f"{paper}: table {table['title']!r} has no rows"
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    pngs = [f for f in report["figures"] if f.endswith(".png")]
    assert pngs
    for png in pngs:
        with open(png, "rb") as fh:
            assert fh.read(8) == PNG_MAGIC
    assert str(path) in report["figures"]
    block = text.split(f"== paper {paper}:")[1].split("== paper")[0]
    assert "claim: " in block and f"verdict: {report['verdict'].upper()}" in block
    assert table["columns"][0] in block


def test_an_unknown_paper_or_budget_fails_before_running(tmp_path):
    with pytest.raises(GeomCompileError, match="use one of 000, 001, 002, 003, 004 or all"):
        run_experiments("005", out_dir=tmp_path)
    with pytest.raises(GeomCompileError, match="unknown budget 'huge'"):
        run_experiments("003", budget="huge", out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_paired_gain_needs_the_mean_to_clear_two_standard_errors():
    assert paired_gain([0.9, 0.91, 0.92], [0.8, 0.81, 0.82]).improves
    gain = paired_gain([0.9, 0.7], [0.8, 0.8])          # +0.1 and -0.1: mean 0
    assert not gain.improves and not gain.hurts
    assert paired_gain([0.7, 0.71], [0.8, 0.8]).hurts
