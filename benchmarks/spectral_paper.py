"""Reproduce the numerical examples of seed 004 (Guo & Ye) with geomcompile's matrix-free spectral penalty.

    PYTHONPATH=. python benchmarks/spectral_paper.py            # Examples 1 and 2, table + PNGs
    PYTHONPATH=. python benchmarks/spectral_paper.py --cost     # timing of the penalty in ResNet-20/56

The paper's K = rand(3,3,g,h) is a kernel with k×k = 3×3 taps, g input and h output channels
(eq. 1.2: y[r,s,c] = Σ_d Σ_pq x[r−m+p, s−m+q, d]·K[p,q,d,c], m = ⌈k/2⌉), i.e. PyTorch weight
K.permute(3, 2, 0, 1) of shape (h, g, 3, 3), entries uniform in [0, 1], on a 15×15×g input with
"same" zero padding (padding 1). Gradient descent K ← K − 0.01·∇R_α(K) on R alone, 20 steps.

The runs and the plots are those of `geomcompile reproduce 004` (geomcompile/reproduce/spectral.py),
which adds a verdict; this script keeps the table at iterations 0/5/10/20 and the --cost timing.

R and ∇R come from the library (gc.functional.spectral_penalty, warm-started two-end LOBPCG
iteration). The paper computes the top singular triplet exactly before the first step (Algorithm
2.1, step 2) and updates it by the power method afterwards; here the start takes 200 iterations
and every step --iters (default 50, warm-started) so that the check measures the method, not an
unconverged eigenvector. With --iters 2 (the paper's setting) the same observations hold (R falls
42-57x); the method's R then lags the exact one and for α = 5 dips below α for a few steps before
returning to it, which is the dip the paper reports in Example 2.

The reported R, σ_max(M), σ_min(M), κ(M) come from the dense M built for the check (its singular
values via the eigenvalues of the smaller Gram matrix). σ_min(M) is the smallest of the min(m, n)
singular values (MATLAB's svd); when M has fewer rows than columns (g > h) MᵀM is singular, so
R_α ≥ α always and Theorem 2.1 cannot apply.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import geomcompile as gc
from geomcompile.geometries.spectral import spectral_penalty_step
from geomcompile.reproduce.spectral import EXAMPLE1, EXAMPLE2, LR, descend, paper_kernel, plot

ALPHA, STEPS = 1.0, 20
REPORT_AT = (0, 5, 10, 20)


def print_table(title: str, runs: dict[str, list[dict]]) -> None:
    print(title)
    print(f"{'kernel':>16} {'it':>3} {'R (dense)':>11} {'R (method)':>11} {'σmax(M)':>9} {'σmin(M)':>9} {'κ(M)':>9}")
    for label, hist in runs.items():
        for it in REPORT_AT:
            h = hist[it]
            print(f"{label:>16} {it:>3} {h['R']:>11.4f} {h['R_est']:>11.4f} {h['smax']:>9.4f} "
                  f"{h['smin']:>9.4f} {h['kappa']:>9.2f}")
        print(f"{'':>16} R falls {hist[0]['R'] / hist[-1]['R']:.1f}x, κ {hist[0]['kappa']:.2f} -> "
              f"{hist[-1]['kappa']:.2f}, σmin {hist[0]['smin']:.4f} -> {hist[-1]['smin']:.4f}")


def examples(out: Path, iters: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)     # tiny operators: OpenMP start-up costs more than it saves (13x on 2 busy cores)
    ex1 = {f"3x3x{g}x{h}": descend(paper_kernel(g, h), ALPHA, iters, STEPS) for g, h in EXAMPLE1}
    print_table(f"Example 1 (Figure 3.1): α = 1, input 15x15xg, zero padding 1, step {LR}, "
                f"{iters} warm-started solver iterations per step", ex1)
    ex2 = {f"3x3x3x1 α={a:g}": descend(paper_kernel(3, 1), a, iters, STEPS) for a in EXAMPLE2}
    print()
    print_table("Example 2 (Figure 3.2): 3x3x3x1 kernel, different α", ex2)
    print("\nthe paper's observations:")
    for label, hist in ex1.items():
        first, last = hist[0], hist[-1]
        print(f"  {label}: R_1 falls {first['R'] / last['R']:.1f}x (> 10x: {first['R'] / last['R'] > 10}), "
              f"κ falls {first['kappa'] / last['kappa']:.1f}x, σmin changes by "
              f"{100 * (last['smin'] / first['smin'] - 1):+.0f}% while σmax changes by "
              f"{100 * (last['smax'] / first['smax'] - 1):+.0f}%")
    for label, hist in ex2.items():
        alpha = float(label.split("=")[1])
        close = [abs(h["R"] - alpha) < 1e-3 * alpha for h in hist]
        settled = next((i for i in range(len(hist)) if all(close[i:])), None)
        print(f"  {label}: final R = {hist[-1]['R']:.4f} = {hist[-1]['R'] / alpha:.3f}·α"
              + (f", within 0.1% of α from iteration {settled} on" if settled is not None else ""))
    plot(ex1, "Example 1: R_1 = σmax(MᵀM − I) for four kernel sizes", out / "spectral_fig3_1.png")
    plot(ex2, "Example 2: σmax(MᵀM − αI) for the 3x3x3x1 kernel", out / "spectral_fig3_2.png")
    print(f"\nwrote {out / 'spectral_fig3_1.png'} and {out / 'spectral_fig3_2.png'}")


# ---- cost ---------------------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    fn()                                                  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _train_step(model, opt, x, y):
    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def cost(batch: int, repeats: int) -> None:
    """Median time of a training step with and without the geometry (two copies of the model, steps
    alternated so that a change in machine load hits both), the time spent in the pre-step hook
    (timed by optimizer pre-hooks registered before and after the plan's), and one penalty step per
    layer. On a shared machine the hook time is the steadier figure."""
    from geomcompile import models
    print(f"cost on CPU ({torch.get_num_threads()} threads), input 32x32, batch {batch}, power_iters 1, "
          f"medians of {repeats} alternated training steps, {4 * repeats} penalty steps per layer")
    policy = {"version": 1, "rules": [{"name": "convs", "match": {"kind": "conv"},
                                       "use": {"spectral": {"coef": 1e-4, "power_iters": 1}}}]}
    for name in ("resnet20", "resnet56"):
        torch.manual_seed(0)
        plain = getattr(models, name)()
        model = copy.deepcopy(plain)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        clock: list[float] = []
        opt.register_step_pre_hook(lambda *_: clock.append(time.perf_counter()))
        plan = gc.apply(model, policy, opt, example_inputs=(x[:2],))
        opt.register_step_pre_hook(lambda *_: clock.append(time.perf_counter() - clock.pop()))
        steps = {"plain": _train_step(plain, opt_plain, x, y), "spectral": _train_step(model, opt, x, y)}
        times = {k: [] for k in steps}
        for fn in steps.values():
            fn()                                          # warm-up (and the penalty's init_iters)
        clock.clear()
        for _ in range(repeats):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        base, with_penalty = (statistics.median(times[k]) for k in ("plain", "spectral"))
        hook = statistics.median(clock)
        per_layer = []
        for item in plan._installation.items:
            facts, state = item.unit.facts[0], plan._installation.state_of(item)
            w, spec = model.get_parameter(facts.name).detach(), item.geometry.spec(facts)
            t = _median_time(lambda: spectral_penalty_step(w, spec, 1.0, state["V"], 1), 4 * repeats)
            per_layer.append((facts.name, tuple(facts.input_shape[1:]), t))
        total = sum(t for *_, t in per_layer)
        print(f"{name}: {len(per_layer)} convs; training step {base * 1e3:.0f} ms plain, {with_penalty * 1e3:.0f} ms "
              f"with spectral ({100 * (with_penalty / base - 1):+.1f}%); penalty hook {hook * 1e3:.1f} ms = "
              f"{100 * hook / base:.1f}% of the plain step; sum of per-layer penalty steps {total * 1e3:.1f} ms")
        if name == "resnet20":
            print(f"  {'layer':<28} {'input (C,H,W)':>14} {'penalty step':>13}")
            for lname, shape, t in per_layer:
                print(f"  {lname:<28} {str(shape):>14} {t * 1e3:>10.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--iters", type=int, default=50, help="solver iterations per GD step (warm-started)")
    parser.add_argument("--cost", action="store_true", help="time the penalty in ResNet-20/56 instead")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for --cost (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        cost(args.batch, args.repeats)
    else:
        examples(args.out, args.iters)


if __name__ == "__main__":
    main()
