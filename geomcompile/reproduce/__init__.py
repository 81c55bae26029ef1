"""`geomcompile reproduce`: one small-scale experiment per seed paper, with a verdict decided by fixed criteria.

    geomcompile reproduce 003                 # PSI: Figure 1 and Theorem 1 in numbers
    geomcompile reproduce all --budget tiny   # every experiment as a smoke test (seconds)

Each module (channel_directed, fgsgd, gsgd, psi, spectral) prints the paper's claim, its measured tables
and a verdict, and writes ``<paper>_<name>.json`` and its PNGs to the output folder.
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch

from ..errors import GeomCompileError
from .harness import DEFAULT_OUT, VERDICTS, Report, check_budget, write_json

EXPERIMENTS = {"000": "channel_directed", "001": "fgsgd", "002": "gsgd", "003": "psi", "004": "spectral"}

__all__ = ["EXPERIMENTS", "VERDICTS", "Report", "run_experiment", "run_experiments"]


def _module(paper: str):
    if paper not in EXPERIMENTS:
        raise GeomCompileError(f"no reproduction for paper {paper!r}: use one of {', '.join(EXPERIMENTS)} or all")
    return importlib.import_module(f".{EXPERIMENTS[paper]}", __name__)


def run_experiment(paper: str, budget: str = "full", out_dir: str | Path = DEFAULT_OUT,
                   progress: bool = True) -> Report:
    """Run one experiment on one CPU thread (tiny operators: more threads only add contention on a
    shared machine), print its report and write its JSON and PNGs."""
    check_budget(budget)
    module = _module(paper)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        report = module.run(module.BUDGETS[budget], budget, out, progress)
        report.wall_s, report.cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.set_num_threads(threads)
    path = out / f"{paper}_{EXPERIMENTS[paper]}.json"
    report.figures.append(str(path))
    write_json(report, path)
    print(report.render(), flush=True)
    return report


def run_experiments(which: str, budget: str = "full", out_dir: str | Path = DEFAULT_OUT,
                    progress: bool = True) -> list[Report]:
    papers = list(EXPERIMENTS) if which == "all" else [which]
    for paper in papers:
        _module(paper)                   # an unknown id fails before anything runs
    check_budget(budget)
    reports = []
    for paper in papers:
        reports.append(run_experiment(paper, budget, out_dir, progress))
        print()
    if len(reports) > 1:
        print("summary:")
        for r in reports:
            print(f"  {r.paper} {r.title}: {r.verdict} (wall {r.wall_s:.0f} s, CPU {r.cpu_s:.0f} s)")
    return reports
