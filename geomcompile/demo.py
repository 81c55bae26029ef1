"""`geomcompile demo`: a small BN ResNet on scikit-learn's 8x8 digits, plain SGD-momentum vs + a policy.

Both runs start from the same weights and see the same batches; only the optimizer hooks differ.
Prints the plan and a results table, and writes a PNG of both loss curves.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import plan as make_plan
from .errors import GeomCompileError
from .models import small_resnet


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


def train(model, optimizer, data, schedule, label: str, progress) -> RunResult:
    x_train, y_train, x_test, y_test = data
    result = RunResult(label)
    model.train()
    for idx in schedule:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        result.step_times.append(time.perf_counter() - t0)
        result.losses.append(loss.item())
        progress.update(1)
        progress.set_postfix_str(f"{label}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        result.test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return result


def results_table(results: list[RunResult]) -> str:
    base = results[0].median_step_ms
    header = f"{'run':<34} {'final train loss':>16} {'test accuracy':>14} {'ms/step (median)':>17} {'vs plain':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.label:<34} {r.final_loss:>16.4f} {100 * r.test_accuracy:>13.1f}% "
                     f"{r.median_step_ms:>17.2f} {r.median_step_ms / base:>8.2f}x")
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


def run_demo(policy: str = "resnet", epochs: int = 12, batch_size: int = 64, lr: float = 0.05,
             out_dir: str = "demo_out", seed: int = 0) -> list[RunResult]:
    from tqdm import tqdm
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise GeomCompileError(f"epochs must be an integer >= 1, got {epochs!r}")
    torch.manual_seed(seed)
    data = load_digits_tensors(seed)
    base_model = small_resnet(num_classes=10, in_channels=1)
    n = len(data[1])
    steps = sum(1 for _ in batches(n, batch_size, epochs, seed))
    if steps < 1:
        raise GeomCompileError(f"batch_size {batch_size} is larger than the {n} training images")
    # the policy is loaded and matched before anything trains: a bad one fails in a second, not after the baseline
    geo = copy.deepcopy(base_model)
    the_plan = make_plan(geo, policy, example_inputs=(data[0][:batch_size],))
    results = []
    with tqdm(total=2 * steps, desc="training", unit="step") as progress:
        plain = copy.deepcopy(base_model)
        opt = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9)
        results.append(train(plain, opt, data, batches(n, batch_size, epochs, seed), "plain SGD-momentum", progress))

        opt = torch.optim.SGD(geo.parameters(), lr=lr, momentum=0.9)
        the_plan.install(opt)
        results.append(train(geo, opt, data, batches(n, batch_size, epochs, seed),
                             f"SGD-momentum + '{policy}' policy", progress))
    print()
    print(the_plan.summary())
    print()
    print(f"{steps} steps per run, batch {batch_size}, lr {lr}, {torch.get_num_threads()} threads")
    print(results_table(results))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "demo_loss.png")
    plot(results, path)
    print(f"\nloss curves written to {path}")
    return results
