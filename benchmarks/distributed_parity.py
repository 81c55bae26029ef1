"""The distributed parity table (issue 9): world size x geometry x optimizer -> max relative error
against the single-process run on the same global batch, plus the collectives per step.

    PYTHONPATH=. python benchmarks/distributed_parity.py --json benchmarks/results/distributed_parity.json

It spawns the same gloo workers as tests/test_distributed.py (tests/distributed_cases.py: FSDP2 on
world 2 and 4, DDP and the compile backend on world 2, DCP save/load) and measures what the tests
assert: the largest max|a - b| / max|b| over every parameter and optimizer-state tensor (gathered)
after 5 steps, and for DDP the largest difference between any rank and rank 0 after any step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRITON_INTERPRET", "1")     # the triton case runs on CPU, under the interpreter

from geomcompile.errors import GeomCompileWarning     # noqa: E402
from tests import distributed_cases as cases          # noqa: E402
from tests.test_distributed import relative_error, spawn  # noqa: E402

warnings.filterwarnings("ignore", category=GeomCompileWarning)   # the cases' known warnings (max_norm, AdamW)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = {}
        table.update(spawn(2, ["fsdp", "ddp", "collectives", "fsdp_backends", "dcp_save"], tmp, tmp / "ckpt"))
        table.update(spawn(4, ["fsdp", "dcp_load"], tmp, tmp / "ckpt"))
        table.update(spawn(2, ["dcp_load"], tmp, tmp / "ckpt"))
    spawned_s = time.perf_counter() - start
    failed = {str(k): v for k, v in table.items() if isinstance(v, str) or "error" in v}
    if failed:
        print(f"cases failed: {failed}", file=sys.stderr)
        return 1
    rows = []
    references: dict = {}
    for key, entry in sorted(table.items(), key=str):
        kind = key[0]
        if kind not in ("fsdp", "ddp", "fsdp_compile", "fsdp_triton"):
            continue
        _, world, case, optimizer = key
        ref_key = (case, optimizer, world)
        if ref_key not in references:
            references[ref_key] = cases.reference(case, optimizer, cases.STEPS, world)
        err, where = relative_error(entry["result"], references[ref_key])
        row = {"engine": {"fsdp": "FSDP2", "ddp": "DDP", "fsdp_compile": "FSDP2 compile",
                                       "fsdp_triton": "FSDP2 triton"}[kind], "world": world,
               "geometry": case, "optimizer": optimizer, "max_rel_error": err, "where": where}
        if kind == "ddp":
            row["max_rank_spread"] = max(entry["rank_spread"])
        rows.append(row)
    saved, resumed = table[("dcp", 2, "uninterrupted")], {w: table[("dcp", w, "resumed")] for w in (2, 4)}
    dcp = {f"resumed on {w} ranks": relative_error(resumed[w]["result"], saved["result"])[0] for w in (2, 4)}
    collectives = {case: table[("collectives", 2, case)]["per_step"] for case in cases.POLICIES}

    print(f"{'engine':<14} {'world':>5} {'geometry':<26} {'optimizer':<13} {'max rel error':>13}  rank spread")
    for r in rows:
        spread = f"{r['max_rank_spread']:.1e}" if "max_rank_spread" in r else ""
        print(f"{r['engine']:<14} {r['world']:>5} {r['geometry']:<26} {r['optimizer']:<13} "
              f"{r['max_rel_error']:>13.2e}  {spread}")
    for what, err in dcp.items():
        print(f"DCP, saved at step 3 on 2 ranks, {what}: {err:.2e} vs the uninterrupted run")
    print("collectives per step (world 2; all-reduces, all-gathers, requests they answered):")
    for case, steps in collectives.items():
        print(f"  {case:<22} " + "; ".join(f"step {i + 1}: {s['sum']} sum, {s['gather']} gather, "
                                           f"{s['requests']} requests" for i, s in enumerate(steps)))
    print(f"spawned workers: {spawned_s:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "torch": torch.__version__, "platform": platform.platform(), "steps": cases.STEPS,
            "rows": rows, "dcp": dcp, "collectives_per_step": collectives, "spawned_seconds": spawned_s},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
