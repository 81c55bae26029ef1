"""Run the benchmark: every variant of every workload, timed; returns a JSON-ready dict.

Variants, per workload and phase (optimizer step alone; full training step):

* ``plain``: the base optimizer alone, torch's fastest implementation (fused=True on CUDA,
  foreach=True on CPU);
* ``<geometry> <backend>``: the same base optimizer with the geometry's plan installed on that
  backend (eager, compile, triton). On CUDA the triton rows use torch's default base
  implementation instead of fused=True, which the Triton backend cannot fuse into its kernels;
* ``copy``: ``torch._foreach_copy_`` over parameter-shaped lists, the bandwidth lower bound
  (optimizer step only).

A backend that cannot run here (triton without a GPU) becomes a skipped row with the reason.
"""
from __future__ import annotations

import copy
import datetime
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import __version__
from ..analysis import analyze
from ..errors import GeomCompileError
from ..plan import Plan
from ..policy import load_policy
from . import traffic
from .timing import Timing, count_launches, kernel_profile, measure
from .workloads import (DEFAULT_SYNTHETIC, Workload, describe_optimizer, fastest_implementation, geometry_policy,
                        make_optimizer, workloads)

PHASES = ("optimizer_step", "train_step")
BACKEND_NAMES = ("eager", "compile", "triton")
# CPU defaults keep `geomcompile bench --device cpu --model resnet20` under 2 minutes on 2 cores
# (with a cold inductor cache): fewer, smaller full training steps than the optimizer steps.
DEFAULTS = {
    "cpu": {"steps": 100, "warmup": 10, "train_steps": 20, "train_warmup": 3, "batch_size": 8},
    "cuda": {"steps": 200, "warmup": 20, "train_steps": 100, "train_warmup": 10, "batch_size": 128},
}


@dataclass
class BenchConfig:
    model: str = "resnet20"
    geometries: tuple[str, ...] = ("channel_directed", "psi")
    policy: str | None = None                 # overrides geometries: one subject, this policy
    backends: tuple[str, ...] = BACKEND_NAMES
    device: str = "cpu"
    optimizer: str = "sgd_momentum"
    steps: int | None = None                  # None: DEFAULTS for the device
    warmup: int | None = None
    train_steps: int | None = None            # 0 skips the full training step
    train_warmup: int | None = None
    batch_size: int | None = None
    synthetic: str = DEFAULT_SYNTHETIC
    seed: int = 0
    progress: bool = True
    command: str = ""
    settings: dict = field(default_factory=dict)

    def resolve(self) -> "BenchConfig":
        for key, value in DEFAULTS["cuda" if self.device.startswith("cuda") else "cpu"].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise GeomCompileError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup", "train_steps", "train_warmup"):
            if getattr(self, key) < 0:
                raise GeomCompileError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        unknown = [b for b in self.backends if b not in BACKEND_NAMES]
        if unknown:
            raise GeomCompileError(f"unknown backend(s) {unknown}; use a comma list of {', '.join(BACKEND_NAMES)}")
        return self


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GeomCompileError(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                               f"built for CUDA {torch.version.cuda}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise GeomCompileError(f"--device must be cpu or cuda, got {name!r}")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- one variant --------------------------------------------------------------------------------
class Snapshot:
    """Weights, gradients and optimizer state, saved once and written back (untimed) before every
    timed optimizer step: each step then does the same work. Without it, fixed random gradients,
    which unlike real ones are not orthogonal to scale-invariant weights, would blow up PSI's
    ‖w_u‖²-scaled steps within tens of steps and time renormalisations instead."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        state = [t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
        live = [p.detach() for p in params] + [p.grad for p in params if p.grad is not None] + state
        by_device: dict[tuple, list[torch.Tensor]] = {}
        for t in live:                 # Adam's `step` lives on the CPU even for CUDA parameters
            by_device.setdefault((t.device, t.dtype), []).append(t)
        self.groups = [(tensors, [t.clone() for t in tensors]) for tensors in by_device.values()]

    def restore(self) -> None:
        for live, saved in self.groups:
            torch._foreach_copy_(live, saved)


@dataclass
class Variant:
    """One row group of a workload: what one optimizer step and one training step run."""

    label: str | None                   # geometry (or policy) label; None for plain and copy
    name: str                           # plain, eager, compile, triton, copy
    base: str                           # the base optimizer, as text
    opt_step: Callable[[], object]
    restore: Callable[[], object] | None = None      # untimed, before every timed optimizer step
    train_step: Callable[[], object] | None = None
    bytes: int | None = None
    plan: Plan | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)        # JSON fields of its rows

    @property
    def key(self) -> str:
        return f"{self.label} {self.name}" if self.label else self.name


class Runner:
    def __init__(self, config: BenchConfig):
        self.config = config.resolve()
        self.device = _device(config.device)
        self.bar = None

    # -- progress ---------------------------------------------------------------------------------
    def _tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _set_bar(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    # -- subjects: (label, policy) ----------------------------------------------------------------
    def subjects(self) -> list[tuple[str, object]]:
        if self.config.policy:
            return [(f"policy {self.config.policy}", self.config.policy)]
        return [(g, geometry_policy(g)) for g in self.config.geometries]

    def run(self) -> dict:
        from tqdm.auto import tqdm
        c = self.config
        torch.manual_seed(c.seed)
        loads = workloads(c.model, c.synthetic)
        subjects = self.subjects()
        variants = 1 + len(subjects) * len(c.backends)        # at most; a skipped one ticks nothing
        per_load = (variants + 1) * (c.steps + c.warmup) + variants * (c.train_steps + c.train_warmup
                                                                       if c.train_steps else 0)
        self.bar = tqdm(total=len(loads) * per_load, desc="bench", unit="step", disable=not c.progress,
                        file=sys.stderr, leave=False)
        out = {"workloads": {}, "results": []}
        try:
            for load in loads:
                with kernel_profile(self.device):       # CPU: inductor's kernels visible to the launch count
                    info, rows = self.run_workload(load, subjects)
                out["workloads"][load.name] = info
                out["results"] += rows
        finally:
            self.bar.close()
        return out

    # -- one workload -----------------------------------------------------------------------------
    def run_workload(self, load: Workload, subjects) -> tuple[dict, list[dict]]:
        c, device = self.config, self.device
        torch.manual_seed(c.seed)
        self._set_bar(f"{load.name}: analysis")
        model0 = load.build().to(device).train()
        params0 = [p for p in model0.parameters() if p.requires_grad]
        example = torch.randn(2, *load.input_shape, device=device)
        structure = analyze(model0, (example,))
        grads0 = [torch.randn_like(p) * 1e-2 for p in params0]       # fixed gradients for the optimizer step
        x = torch.randn(c.batch_size, *load.input_shape, device=device)
        y = torch.randint(0, load.num_classes, (c.batch_size,), device=device)
        info = {"parameters": sum(p.numel() for p in params0), "tensors": len(params0),
                "input_shape": list(load.input_shape), "batch_size": c.batch_size}

        variants, skipped = [], []
        model = copy.deepcopy(model0)
        opt = make_optimizer(c.optimizer, model.parameters(), device, fastest_implementation(device))
        variants.append(self.ready(Variant(None, "plain", describe_optimizer(opt), opt.step,
                                           bytes=traffic.step_bytes(params0, c.optimizer).bytes),
                                   model, opt, grads0, x, y))
        if device.type == "cuda":        # torch's other fast path beside fused=True (the anchors)
            model = copy.deepcopy(model0)
            opt = make_optimizer(c.optimizer, model.parameters(), device, "foreach")
            variants.append(self.ready(Variant(None, "plain foreach", describe_optimizer(opt), opt.step,
                                               bytes=traffic.step_bytes(params0, c.optimizer).bytes),
                                       model, opt, grads0, x, y))
        for label, policy in subjects:
            for backend in c.backends:
                self._set_bar(f"{load.name}: install {label} {backend}")
                variant = self.prepare(load, model0, structure, label, policy, backend, grads0, x, y)
                if isinstance(variant, Variant):
                    variants.append(variant)
                else:
                    skipped += [{**variant, "phase": phase} for phase in (PHASES if c.train_steps else PHASES[:1])]
        variants.append(self.copy_variant(params0, max(v.bytes for v in variants)))

        self._set_bar(f"{load.name}: optimizer step")
        rows = self.time_phase(load, "optimizer_step", variants, c.steps, c.warmup)
        if c.train_steps:
            self._set_bar(f"{load.name}: training step")
            rows += self.time_phase(load, "train_step", [v for v in variants if v.train_step],
                                    c.train_steps, c.train_warmup)
        rows += skipped
        planned = [(None, "plain"), (None, "plain foreach")] + [(label, b) for label, _ in subjects for b in c.backends] + [(None, "copy")]
        order = {key: i for i, key in enumerate(planned)}
        rows.sort(key=lambda r: (PHASES.index(r["phase"]), order[(r["geometry"], r["variant"])]))
        _ratios(rows)
        return info, rows

    def time_phase(self, load, phase: str, variants: list[Variant], steps: int, warmup: int) -> list[dict]:
        device, optimizer = self.device, phase == "optimizer_step"
        cases = {v.key: ((v.opt_step, v.restore) if optimizer else (v.train_step, None)) for v in variants}
        timings = measure(cases, device, steps, warmup, tick=self._tick)
        rows = []
        for v in variants:
            step, setup = cases[v.key]
            launches = count_launches(step, device, setup=setup)
            row = _timed_row(load, phase, v.label, v.name, timings[v.key], v.base, launches,
                             v.bytes if optimizer else None)
            row.update(v.extra)
            row["notes"] = list(v.notes)
            compile_s = _compile_seconds(v.plan)
            if compile_s is not None:
                row["compile_s"] = round(compile_s, 2)
                row["notes"].append(f"first step compiled in {compile_s:.1f} s (not in the timings)")
            rows.append(row)
        return rows

    def prepare(self, load: Workload, model0, structure, label: str, policy, backend: str, grads0, x, y):
        """A ready Variant, or a skipped row (dict) that says why the backend cannot run."""
        c, device = self.config, self.device
        impl = "default" if backend == "triton" and device.type == "cuda" else fastest_implementation(device)
        model = copy.deepcopy(model0)
        optimizer = make_optimizer(c.optimizer, model.parameters(), device, impl)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                pol = load_policy(policy)
                plan = Plan(model, structure, pol, pol.resolve(structure))
                if not plan.assignments:
                    raise GeomCompileError(f"the policy assigns no geometry on {load.name}")
                plan.install(optimizer, backend=backend)
            except GeomCompileError as exc:
                return {**_row(load, "optimizer_step", label, backend), "status": "skipped",
                        "reason": str(exc), "base_optimizer": describe_optimizer(optimizer)}
        notes = [str(w.message) for w in caught] + [n for n in plan.notes if n.startswith("backend")]
        notes += plan.backend_notes()
        named = dict(model.named_parameters())
        geo_params: dict[str, list] = {}
        for name, stages in plan.assignments.items():
            for geometry in stages.values():
                geo_params.setdefault(geometry.name, []).append(named[name])
        step_traffic = traffic.step_bytes(model.parameters(), c.optimizer, geo_params)
        if not step_traffic.modelled:
            notes.append("bytes: this geometry's extra traffic is not modelled (counted as 0)")
        extra = {"geometry_tensors": sum(len(v) for v in geo_params.values()),
                 "geometry_elements": sum(p.numel() for v in geo_params.values() for p in v)}
        self._set_bar(f"{load.name}: first step {label} {backend}")
        variant = Variant(label, backend, describe_optimizer(optimizer), optimizer.step, bytes=step_traffic.bytes,
                          plan=plan, notes=_unique(notes), extra=extra)
        return self.ready(variant, model, optimizer, grads0, x, y)

    def ready(self, variant: Variant, model, opt, grads0, x, y) -> Variant:
        """One untimed step (creates the optimizer state, compiles on the compile backend), then the
        snapshot that every timed optimizer step starts from, and the training step."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p, g in zip(params, grads0):
            p.grad = g.clone()
        opt.step()
        torch._foreach_copy_([p.grad for p in params], grads0)
        variant.restore = Snapshot(params, opt).restore

        def train_step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        variant.train_step = train_step
        return variant

    def copy_variant(self, params0, largest_step_bytes: int) -> Variant:
        lists = traffic.copy_lists(largest_step_bytes, sum(p.numel() * p.element_size() for p in params0))
        src = [torch.randn_like(p) for p in params0 for _ in range(lists)]
        dst = [torch.empty_like(t) for t in src]
        return Variant(None, "copy", "torch._foreach_copy_", lambda: torch._foreach_copy_(dst, src),
                       bytes=2 * sum(t.numel() * t.element_size() for t in src),
                       notes=[f"copies {lists} parameter-shaped list(s): {2 * lists} accesses per element"])


# ---- rows -----------------------------------------------------------------------------------------
def _row(load: Workload, phase: str, label, variant: str) -> dict:
    return {"workload": load.name, "phase": phase, "geometry": label, "variant": variant, "status": "ok",
            "reason": None, "notes": []}


def _timed_row(load, phase, label, variant, timing: Timing, base: str, launches: int, nbytes) -> dict:
    row = {**_row(load, phase, label, variant), "base_optimizer": base, **timing.summary(),
           "launches_per_step": launches, "bytes_per_step": nbytes,
           "gb_per_s": (nbytes / (timing.median * 1e-3) / 1e9) if nbytes else None}
    return row


def _ratios(rows: list[dict]) -> None:
    """x_plain: median over the plain optimizer's median (same phase). x_copy: how many times a copy
    moving the same bytes would be faster (copy GB/s over the row's GB/s); optimizer step only."""
    plain = {r["phase"]: r["median_ms"] for r in rows if r["variant"] == "plain" and r["status"] == "ok"}
    copy_rows = [r for r in rows if r["variant"] == "copy" and r["status"] == "ok"]
    copy_gbps = copy_rows[0]["gb_per_s"] if copy_rows else None
    for r in rows:
        if r["status"] != "ok":
            continue
        r["x_plain"] = r["median_ms"] / plain[r["phase"]] if r["phase"] in plain else None
        r["x_copy"] = (copy_gbps / r["gb_per_s"]) if (copy_gbps and r.get("gb_per_s")) else None


def _compile_seconds(plan: Plan | None) -> float | None:
    seconds = getattr(plan.backend, "compile_seconds", None) if plan is not None else None
    return seconds if isinstance(seconds, (int, float)) else None


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


# ---- entry point ----------------------------------------------------------------------------------
def run_bench(config: BenchConfig) -> dict:
    """Run everything; the result is what --json writes."""
    runner = Runner(config)
    c, device = runner.config, runner.device
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = _load_average()
    body = runner.run()
    return {
        "schema": "geomcompile-bench/1",
        "date": started.isoformat(timespec="seconds"),
        "command": c.command or " ".join(["geomcompile", *sys.argv[1:]]),
        "geomcompile": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": {"type": device.type, "name": device_name(device), "torch_threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count()},
        # other processes competing for the cores distort CPU timings: the 1-minute load, before and after
        "load_average": {"before": load_before, "after": _load_average()},
        "settings": {"model": c.model, "geometries": list(c.geometries) if not c.policy else [],
                     "policy": c.policy, "backends": list(c.backends), "optimizer": c.optimizer,
                     "steps": c.steps, "warmup": c.warmup, "train_steps": c.train_steps,
                     "train_warmup": c.train_warmup, "batch_size": c.batch_size, "seed": c.seed,
                     "synthetic": c.synthetic if c.model == "synthetic" else None,
                     "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter"},
        "counting": {
            "bytes": (f"bytes_per_step: one ideal fused step, {traffic.BASE_ACCESSES[c.optimizer]} accesses per "
                      f"element ({traffic.ACCESS_TEXT[c.optimizer]}) of every parameter, plus per geometry "
                      f"{traffic.GEOMETRY_EXTRA} extra accesses on its parameters; the same count for every "
                      f"backend of a geometry. copy: the bytes it actually moves."),
            "launches": ("CUDA: profiler device events (kernels, memcpy, memset) in one step"
                         if device.type == "cuda" else
                         "CPU: operator calls in one step: aten ops not nested in another counted call, plus "
                         "inductor C++ kernels"),
            "x_plain": "median / plain optimizer's median, same phase",
            "x_copy": "copy GB/s / row GB/s: the row's time over that of a copy moving the same bytes",
        },
        **body,
    }
