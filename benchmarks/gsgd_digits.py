"""G-SGD vs SGD on sklearn digits (design ../shared/designs/gspace.md §16; the paper's Fig. 4 trend).

    PYTHONPATH=. python benchmarks/gsgd_digits.py                     # full run (< 3 min on 2 CPU cores)
    PYTHONPATH=. python benchmarks/gsgd_digits.py --hs 8 --seeds 1 --epochs 1 --check identity   # smoke

Data, model, training and the five arms (sgd/he, sgd/skel1, gsgd/skel1, sgd/unbal, gsgd/unbal):
geomcompile/reproduce/gsgd.py, where the experiment lives (`geomcompile reproduce 002`); here
h ∈ {8, 16, 32, 64, 128}, 20 epochs, seeds 0-2 by default.

What it asserts (the design's acceptance trend, nothing more; --check identity keeps only the last):
  - gsgd/skel1's train loss is below sgd/skel1's at every h;
  - the relative gap at h = 128 is below the gap at h = 16;
  - gsgd/unbal ends at gsgd/skel1's loss to 1e-9 (every seed), while plain SGD's mean loss moves by
    more than 10% under the same rescaling (the control; see SGD_CONTROL for the design's 1.5×).
Test error is reported, not asserted: no gain is expected at this scale (design §16).
The experiment itself lives in geomcompile/reproduce/gsgd.py (`geomcompile reproduce 002`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from geomcompile.reproduce.gsgd import ARMS, check, digits, run_h

RESULTS = Path(__file__).resolve().parent / "results"


def table(rows) -> str:
    head = ("| h | H/m | train loss: sgd/he | sgd/skel1 | gsgd/skel1 | sgd/unbal | gsgd/unbal | test err %: sgd/he "
            "| sgd/skel1 | gsgd/skel1 | sgd/unbal | gap (skel1) | \\|gsgd unbal − bal\\| |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['h']} | {r['ratio']:.4f} | " + " | ".join(f"{r['loss ' + a]:.4g}" for a in ARMS) + " | "
                     + " | ".join(f"{r['err ' + a]:.1f}" for a in ARMS[:4]) + f" | {100 * r['gap']:.1f}% | "
                     f"{r['unbal_vs_bal']:.0e} |")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["ratio"] for r in rows], [100 * r["gap"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"h={r['h']}", (r["ratio"], 100 * r["gap"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("invariant ratio H/m")
    ax.set_ylabel("train-loss gap (sgd − gsgd)/sgd, %")
    ax.set_title("G-SGD vs SGD on digits, skeleton = 1 init")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hs", default="8,16,32,64,128", help="hidden widths, comma-separated")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--check", choices=("trend", "identity"), default="trend",
                   help="trend: the design's acceptance trend; identity: only the unbalanced-start identity")
    p.add_argument("--png", default=str(RESULTS / "gsgd_digits.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = digits()
    start = time.perf_counter()
    rows = [run_h(int(h), args.seeds, args.epochs, data) for h in args.hs.split(",")]
    print(table(rows))
    print("plain SGD, unbalanced / balanced final loss: " + ", ".join(
        f"h={r['h']}: {r['sgd_unbal_over_skel1']:.2f}x (seeds {', '.join(f'{x:.2f}' for x in r['per_seed_ratio'])})"
        for r in rows))
    print(f"wall {time.perf_counter() - start:.0f} s ({args.seeds} seed(s), {args.epochs} epoch(s), float64, 1 thread)")
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, Path(args.png))
    print(f"wrote {args.png}")
    problems = check(rows, args.check)
    for line in problems:
        print(f"FAILED: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
