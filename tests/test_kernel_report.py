"""The kernel report (kernels/report.py): every kernel configuration the launchers can pick, compiled
for sm_90 without a GPU, stays within 128 registers without spills; the aligned path makes 128-bit
loads; no kernel divides 64-bit integers.

All configurations (377 today: 320 of channel_directed and psi, 57 of pom) are compiled here (about two minutes on two cores): the per-schedule heaviest
ones (``--heaviest``) are not enough, a lighter one (channel_directed h0, bf16 AdamW, two passes) once
spilled 8 bytes at 40 registers while its heavier sibling fit. ``python -m geomcompile.kernels.report
--target sm_90 --json ...`` writes the same report (benchmarks/results/kernel_report_sm90_after.json).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geomcompile.kernels.report import toolchain_problem, violations

ROOT = Path(__file__).resolve().parents[1]


def test_the_limits_checker_flags_todays_spilling_kernels():
    """Control: the BEFORE report (the kernels of 037fe4b) breaks the limits in most rows; the checker
    must say so, or the test below could not fail."""
    before = json.loads((ROOT / "benchmarks/results/kernel_report_sm90_before.json").read_text())
    flagged = [r for r in before["rows"] if violations(r)]
    assert len(flagged) > len(before["rows"]) // 2
    assert any("spills" in v for r in flagged for v in violations(r))
    assert any("registers >" in v for r in flagged for v in violations(r))


def test_every_kernel_configuration_fits_128_registers_without_spills(tmp_path):
    problem = toolchain_problem()
    if problem:
        pytest.skip(f"the kernel report cannot run: {problem}")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "geomcompile.kernels.report", "--target", "sm_90",
                          "--jobs", "2", "--json", str(out)], capture_output=True, text=True, env=env, timeout=1800)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    bad = [f"{r['label']}: {'; '.join(r['violations'])}" for r in rows if violations(r)]
    assert not bad, "\n".join(bad)
    assert run.returncode == 0, run.stderr[-3000:]
    families = {(r["kernel"], r["schedule"].split(",")[0]) for r in rows}
    # pom's kernels read components through their strides only (a group's members lie anywhere)
    assert families == {(k, path) for k in ("_channel_directed_kernel", "_psi_kernel", "_psi_renorm_kernel")
                        for path in ("aligned", "strided")} | {
        (k, "strided") for k in ("_pom_kernel", "_pom_stats_kernel", "_pom_retract_kernel")} | {
        ("_jacobi_eigh_kernel", "small matrices")}, families     # spectral's eigensolver (registers only)
    assert all(r["div64_ptx"] == 0 for r in rows), [r["label"] for r in rows if r["div64_ptx"]]
    no_wide = [r["label"] for r in rows if r["schedule"].startswith("aligned") and r["ldg_128"] == 0]
    # bf16 in channel_directed's two-pass mode reads 64-bit vectors (4 elements per thread: docs/triton.md)
    assert all("two passes" in label and "bf16" in label for label in no_wide), no_wide
    assert any(r["ldg_128"] for r in rows if "two passes" in r["schedule"] and r["constexprs"]["DT"] == "fp32")
