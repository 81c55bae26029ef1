"""`geomcompile demo`: a small BN ResNet on scikit-learn's 8x8 digits, plain SGD-momentum vs + a policy.

Both runs start from the same weights and see the same batches; only the optimizer hooks differ.
They train side by side, one step each in turn (who goes first alternates), so a change in machine
load hits both, and the `vs plain` column is the median of the per-step time ratios of those pairs.
Prints the plan and a results table, and writes a PNG of both loss curves.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import plan as make_plan
from .errors import GeomCompileError
from .models import small_resnet
from .policy import load_policy


@dataclass
class RunResult:
    label: str
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    test_accuracy: float = 0.0

    @property
    def final_loss(self) -> float:
        tail = self.losses[-20:]
        return sum(tail) / len(tail)

    @property
    def median_step_ms(self) -> float:
        return 1000 * statistics.median(self.step_times)


def load_digits_tensors(seed: int = 0):
    """The 1797 8x8 digit images (embedded in scikit-learn, no download), split 80/20, scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def batches(n: int, batch_size: int, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def train_step(model, optimizer, x, y) -> tuple[float, float]:
    """One optimizer step; returns (loss, seconds)."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item(), time.perf_counter() - t0


def train_side_by_side(runs, data, schedule, progress) -> list[RunResult]:
    """Train every (label, model, optimizer) of `runs` on the same batches, one step each in turn.

    The order within a pair alternates from step to step, so neither run always follows the other
    (caches, frequency boost); a load spike lands on both runs of the pair it hits."""
    x_train, y_train, x_test, y_test = data
    results = [RunResult(label) for label, _, _ in runs]
    for _, model, _ in runs:
        model.train()
    for step, idx in enumerate(schedule):
        order = range(len(runs)) if step % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            label, model, optimizer = runs[i]
            loss, seconds = train_step(model, optimizer, x_train[idx], y_train[idx])
            results[i].losses.append(loss)
            results[i].step_times.append(seconds)
            progress.update(1)
            progress.set_postfix_str(f"{label}: loss {loss:.3f}")
    for (_, model, _), result in zip(runs, results):
        model.eval()
        with torch.no_grad():
            result.test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return results


def vs_plain(plain_times: list[float], geometry_times: list[float]) -> float:
    """Median over paired steps of geometry time / plain time (robust to load that changes over the run)."""
    return statistics.median(g / p for p, g in zip(plain_times, geometry_times, strict=True))


def results_table(results: list[RunResult]) -> str:
    header = f"{'run':<34} {'final train loss':>16} {'test accuracy':>14} {'ms/step (median)':>17} {'vs plain':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.label:<34} {r.final_loss:>16.4f} {100 * r.test_accuracy:>13.1f}% "
                     f"{r.median_step_ms:>17.2f} {vs_plain(results[0].step_times, r.step_times):>8.2f}x")
    return "\n".join(lines)


def plot(results: list[RunResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        k = 10  # moving average over 10 steps for readability
        smooth = [sum(r.losses[max(0, i - k + 1):i + 1]) / len(r.losses[max(0, i - k + 1):i + 1])
                  for i in range(len(r.losses))]
        ax.plot(smooth, label=r.label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (10-step moving average)")
    ax.set_yscale("log")
    ax.set_title("small BN ResNet on 8x8 digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_demo_arguments(epochs, batch_size, lr, seed) -> None:
    """Refuse bad arguments before anything is loaded or trained, saying what is allowed."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if not is_int(epochs) or epochs < 1:
        raise GeomCompileError(f"epochs must be an integer >= 1, got {epochs!r} (e.g. --epochs 12)")
    if not is_int(batch_size) or batch_size < 1:
        raise GeomCompileError(f"batch_size must be an integer >= 1, got {batch_size!r} (e.g. --batch-size 64)")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise GeomCompileError(f"lr must be a finite number > 0, got {lr!r} (e.g. --lr 0.05)")
    if not is_int(seed) or seed < 0:
        raise GeomCompileError(f"seed must be an integer >= 0, got {seed!r} (e.g. --seed 0)")


def run_demo(policy: str = "resnet", epochs: int = 12, batch_size: int = 64, lr: float = 0.05,
             out_dir: str = "demo_out", seed: int = 0) -> list[RunResult]:
    from tqdm import tqdm
    check_demo_arguments(epochs, batch_size, lr, seed)
    # the policy is read first: an unknown name or a bad file fails in a second, before data and models
    label = policy if isinstance(policy, str) and "\n" not in policy and len(policy) <= 40 else "given"
    policy = load_policy(policy)
    torch.manual_seed(seed)
    data = load_digits_tensors(seed)
    base_model = small_resnet(num_classes=10, in_channels=1)
    n = len(data[1])
    steps = sum(1 for _ in batches(n, batch_size, epochs, seed))
    if steps < 1:
        raise GeomCompileError(f"batch_size {batch_size} is larger than the {n} training images; use at most {n}")
    # matched against the model before anything trains
    geo = copy.deepcopy(base_model)
    the_plan = make_plan(geo, policy, example_inputs=(data[0][:batch_size],))
    plain = copy.deepcopy(base_model)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9)
    opt_geo = torch.optim.SGD(geo.parameters(), lr=lr, momentum=0.9)
    the_plan.install(opt_geo)
    runs = [("plain SGD-momentum", plain, opt_plain), (f"SGD-momentum + '{label}' policy", geo, opt_geo)]
    with tqdm(total=2 * steps, desc="training (side by side)", unit="step") as progress:
        results = train_side_by_side(runs, data, batches(n, batch_size, epochs, seed), progress)
    print()
    print(the_plan.summary())
    print()
    print(f"{steps} steps per run, batch {batch_size}, lr {lr}, {torch.get_num_threads()} threads; the runs "
          f"alternate steps, 'vs plain' is the median per-step time ratio")
    print(results_table(results))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "demo_loss.png")
    plot(results, path)
    print(f"\nloss curves written to {path}")
    return results
