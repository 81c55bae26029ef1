"""`geomcompile bench`: time the geometries' update programs against torch's own optimizers.

    from geomcompile.bench import BenchConfig, run_and_report
    result = run_and_report(BenchConfig(model="resnet20", device="cpu"), json_path="out.json")

Modules: ``workloads`` (models, synthetic sweep, policies, optimizers), ``traffic`` (how bytes are
counted), ``timing`` (per-step timing and launch counting), ``run`` (the variants), ``report``
(table, JSON, PNG).
"""
from __future__ import annotations

from .report import format_table, write_json, write_png
from .run import BACKEND_NAMES, DEFAULTS, PHASES, BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench", "run_and_report", "format_table", "write_json", "write_png",
           "BACKEND_NAMES", "DEFAULTS", "PHASES"]


def run_and_report(config: BenchConfig, json_path: str | None = None, png_path: str | None = None,
                   echo=print) -> dict:
    """Run the benchmark, print the table, write the JSON and PNG files asked for."""
    result = run_bench(config)
    echo(format_table(result))
    if json_path:
        write_json(result, json_path)
        echo(f"wrote {json_path}")
    if png_path:
        write_png(result, png_path)
        echo(f"wrote {png_path}")
    return result
