"""Cost of channel_directed (Sobolev, the "plain" policy) on one huge linear weight, eager vs compile,
against plain SGD-momentum measured side by side: why a plan on CPU notes weights >= 2^24 elements.

    PYTHONPATH=. python benchmarks/huge_linear.py --json benchmarks/results/cpu_huge_linear.json

One nn.Linear per shape (25088 -> 4096 is VGG-16's first classifier layer on 224x224 inputs), three
SGD(momentum=0.9) optimizers on it: plain, plan "plain" backend=eager, plan "plain" backend=compile.
Every timed step starts from the same fixed gradient (written back untimed); the variants are timed
round-robin, one step each per round, so drift of the machine hits them alike. Medians of --steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import geomcompile as gc


def measure(out_f: int, in_f: int, steps: int) -> dict:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=False)
    grad = torch.randn_like(layer.weight) * 1e-3
    optimizers = {name: torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)
                  for name in ("plain SGD", "plain policy eager", "plain policy compile")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GeomCompileWarning)
        gc.apply(layer, "plain", optimizers["plain policy eager"], backend="eager")
        gc.apply(layer, "plain", optimizers["plain policy compile"], backend="compile")
    times = {name: [] for name in optimizers}
    first = {}
    for round_ in range(steps + 1):                  # round 0: creates the state, compiles (untimed)
        for name, opt in optimizers.items():
            layer.weight.grad = grad.clone()
            t = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - t
            if round_ == 0:
                first[name] = elapsed
            else:
                times[name].append(elapsed)
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    base = medians["plain SGD"]
    return {"shape": [out_f, in_f], "numel": out_f * in_f, "steps": steps,
            "median_ms": medians, "x_plain": {n: m / base for n, m in medians.items()},
            "first_step_s": first, "all_ms": {n: [t * 1e3 for t in ts] for n, ts in times.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x25088", help="OUTxIN,...")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    rows = [measure(*map(int, s.split("x")), args.steps) for s in args.shapes.split(",")]
    print(f"optimizer step, SGD momentum 0.9, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load {load_before:.2f} before / {os.getloadavg()[0]:.2f} after")
    print(f"{'shape':>12} {'variant':<22} {'median ms':>10} {'x plain':>8}")
    for r in rows:
        for name, ms in r["median_ms"].items():
            print(f"{'x'.join(map(str, r['shape'])):>12} {name:<22} {ms:>10.1f} {r['x_plain'][name]:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
                       "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
