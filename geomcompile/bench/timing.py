"""Timing one step many times, and counting what one step launches.

* CPU: ``time.perf_counter`` around each call; the untimed ``setup`` (restoring gradients) runs
  before it.
* CUDA: a pair of CUDA events around each call, one synchronisation at the end. ``setup`` is
  queued before the start event, so it is not timed either.
* Several cases are timed round-robin, one step of each per round, so that drift of the machine
  over the run affects them alike.

Launches per step come from ``torch.profiler`` over one step. On CUDA they are the device events
(kernels, memcpy, memset). On CPU there are no kernel launches, so they are operator calls: aten
ops not nested in another counted call, plus the C++ kernels inductor generated. Inductor records
those only when compiled with ``cpp.enable_kernel_profile``; ``kernel_profile()`` turns it on
for the code compiled inside it.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    """Per-step times in milliseconds, and the statistics the report shows."""

    samples_ms: list[float]

    def quantile(self, q: float) -> float:
        """Linear interpolation between order statistics (numpy's default)."""
        s = sorted(self.samples_ms)
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def summary(self) -> dict[str, float]:
        q1, q3 = self.quantile(0.25), self.quantile(0.75)
        return {"median_ms": self.median, "p10_ms": self.quantile(0.10), "p90_ms": self.quantile(0.90),
                "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": min(self.samples_ms),
                "n": len(self.samples_ms)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Case = tuple[Callable[[], object], Callable[[], object] | None]     # (step, untimed setup or None)


def measure(cases: dict[str, Case], device: torch.device, steps: int, warmup: int,
            tick: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Time every case round-robin: `warmup` untimed rounds, then `steps` timed rounds, each round
    running setup(); step() once per case. Interleaving spreads slow drift of the machine (clock,
    other tenants, thermal state) over all cases instead of biasing the one measured last.
    tick() after each call (progress bars)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for _ in range(warmup):
        for step, setup in cases.values():
            if setup is not None:
                setup()
            step()
            if tick is not None:
                tick()
    _sync(device)
    cuda = device.type == "cuda"
    samples: dict[str, list] = {key: [] for key in cases}
    for _ in range(steps):
        for key, (step, setup) in cases.items():
            if setup is not None:
                setup()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                samples[key].append((start, end))
            else:
                t0 = time.perf_counter()
                step()
                samples[key].append((time.perf_counter() - t0) * 1e3)
            if tick is not None:
                tick()
    if cuda:
        torch.cuda.synchronize(device)
        return {key: Timing([s.elapsed_time(e) for s, e in pairs]) for key, pairs in samples.items()}
    return {key: Timing(values) for key, values in samples.items()}


def _counted_on_cpu(name: str) -> bool:
    return name.startswith("aten::") or "cpp_fused" in name


def count_launches(step: Callable[[], object], device: torch.device,
                   setup: Callable[[], object] | None = None) -> int:
    """Kernel launches (CUDA) or operator calls (CPU) of one call of step(), from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if setup is not None:
        setup()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if getattr(e, "device_type", None) == DeviceType.CUDA)
    count = 0
    for e in events:
        if not _counted_on_cpu(e.name):
            continue
        parent = e.cpu_parent
        while parent is not None and not _counted_on_cpu(parent.name):
            parent = parent.cpu_parent
        count += parent is None
    return count


@contextlib.contextmanager
def kernel_profile(device: torch.device):
    """On CPU, compile with inductor's kernel profiling so count_launches sees its C++ kernels."""
    if device.type != "cpu":
        yield
        return
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config.cpp, "enable_kernel_profile"):   # another torch: counts miss its kernels
        yield
        return
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        yield
