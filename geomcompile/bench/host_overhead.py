"""`geomcompile bench --host-overhead`: the host (Python) time of one optimizer step, device work removed.

A fused GPU step of ResNet-50 moves ~470 MB, ~0.12 ms at H200 bandwidth, so the host path of a
backend decides whether the GPU waits for Python. This measures it without a GPU:

* ``triton``: the plan on CPU tensors (Triton interpreter mode, so the backend accepts them) with
  every kernel launch replaced by a no-op (``stubs.stub_kernel_launches``): bucketing, tables,
  state and hidden gradients run as on a GPU, the kernels do not. The optimizer holds the
  parameters the geometry's bench policy assigns (all fused: torch's own step has nothing left
  to do). ``pre_step_ms`` (gradient transforms and fused updates: the kernels' host path) and
  ``post_step_ms`` (retractions) are timed apart. Where the backend falls back to a geometry's
  eager post_step (psi's renormalisation when running statistics must follow it: every BN conv
  of ResNet-50), that call is stubbed too and counted (``eager_fallbacks_per_step``), not timed:
  on CPU it would time its compute over every weight, not its GPU host time;
* ``eager`` and ``compile``: not applicable on CPU, with the reason: their ops compute on the CPU,
  so host time and device time cannot be told apart (benchmarks/gpu.sh times them on a GPU);
* ``torch foreach``: torch's own foreach step of the same optimizer, over as many parameters (the
  same list) with the same dtypes, one element each: its compute is then negligible and what remains is its
  host time, the anchor the issue compares against.

Each is timed with cached gradients (the same grad tensors every step) and with fresh ones
(``zero_grad(set_to_none=True)`` between steps, then new gradient tensors from two alternating
pools, so every pointer changes at every step: the worst case for cached tables). Median and p90
over ``steps`` steps (``time.perf_counter``), after ``warmup`` untimed ones. The triton rows also
give ``python_calls_per_step``: cProfile's count of Python calls over 5 further steps, which unlike
the times does not depend on the machine or its load, and over the whole run ``table_builds``,
``table_patches`` (tables whose gradient addresses were patched in place) and ``plan_builds`` (steps
the backend decided from scratch instead of replaying its step plan).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import __version__
from ..errors import GeomCompileError
from .timing import Timing
from .workloads import OPTIMIZERS, geometry_policy, make_optimizer, workloads

GRADS = ("cached", "fresh")
DEFAULT_SUBJECTS = (("psi", "sgd_momentum"), ("channel_directed", "adam"))


@dataclass
class HostOverheadConfig:
    model: str = "resnet50"
    subjects: tuple[tuple[str, str], ...] = DEFAULT_SUBJECTS     # (geometry, base optimizer)
    backends: tuple[str, ...] = ("eager", "compile", "triton")
    steps: int = 200
    warmup: int = 10
    seed: int = 0
    synthetic: str = "1x64"                   # for model "synthetic": one stack
    command: str = ""

    def check(self) -> "HostOverheadConfig":
        if self.steps < 1 or self.warmup < 0:
            raise GeomCompileError(f"--host-overhead needs --steps >= 1 and --warmup >= 0, got "
                                   f"{self.steps} and {self.warmup}")
        for geometry, optimizer in self.subjects:
            if optimizer not in OPTIMIZERS:
                raise GeomCompileError(f"--geometry {geometry}:{optimizer}: unknown optimizer; use one of "
                                       f"{', '.join(OPTIMIZERS)}")
        return self


def parse_subjects(spec: str, default_optimizer: str) -> tuple[tuple[str, str], ...]:
    """'psi:sgd_momentum,channel_directed:adam' (an entry without ':' takes the default optimizer)."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            geometry, _, optimizer = part.partition(":")
            out.append((geometry, optimizer or default_optimizer))
    if not out:
        raise GeomCompileError("--geometry is empty; give GEOMETRY[:OPTIMIZER][,...], e.g. psi:sgd_momentum")
    return tuple(out)


# ---- gradients ------------------------------------------------------------------------------------
class Gradients:
    """Untimed before each step: cached keeps the grads in place; fresh sets them to None (as
    zero_grad(set_to_none=True)) and then to tensors of the other of two pools."""

    def __init__(self, params: list[torch.Tensor], mode: str):
        self.params, self.mode = params, mode
        self.pools = [[torch.randn_like(p) * 1e-2 for p in params] for _ in range(2 if mode == "fresh" else 1)]
        self.turn = 0
        self.assign()

    def assign(self) -> None:
        for p, g in zip(self.params, self.pools[self.turn]):
            p.grad = g

    def before_step(self) -> None:
        if self.mode == "fresh":
            for p in self.params:
                p.grad = None
            self.turn = 1 - self.turn
            self.assign()


def _time_steps(step: Callable[[], object], grads: Gradients, steps: int, warmup: int,
                phases: dict[str, list[float]] | None = None) -> Timing:
    for _ in range(warmup):
        grads.before_step()
        step()
    if phases is not None:
        for v in phases.values():
            v.clear()
    samples = []
    for _ in range(steps):
        grads.before_step()
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples)


@contextlib.contextmanager
def _phase_timers(backend):
    """Time the backend's pre_step and post_step apart (ms per call)."""
    phases = {"pre_step": [], "post_step": []}
    originals = {name: getattr(backend, name) for name in phases}

    def timed(name):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                phases[name].append((time.perf_counter() - t0) * 1e3)
        return run
    for name in phases:
        setattr(backend, name, timed(name))
    try:
        yield phases
    finally:
        for name, fn in originals.items():
            setattr(backend, name, fn)


# ---- rows -------------------------------------------------------------------------------------------
def _row(geometry, optimizer, variant, grads, **fields) -> dict:
    return {"geometry": geometry, "optimizer": optimizer, "variant": variant, "grads": grads, "status": "ok",
            "reason": None, "notes": [], **fields}


def torch_foreach_rows(params: list[torch.Tensor], optimizer: str, steps: int, warmup: int) -> list[dict]:
    """torch's own foreach step over one-element stand-ins of `params` (count and dtypes kept)."""
    rows = []
    for mode in GRADS:
        proxies = [torch.zeros(1, dtype=p.dtype, requires_grad=True) for p in params]
        opt = make_optimizer(optimizer, proxies, torch.device("cpu"), "foreach")
        grads = Gradients(proxies, mode)
        timing = _time_steps(opt.step, grads, steps, warmup)
        rows.append(_row(None, optimizer, "torch foreach", mode, **_stats(timing),
                         notes=[f"{len(params)} one-element parameters: the compute is negligible, "
                                f"the time is torch's host path"]))
    return rows


def python_calls_per_step(step: Callable[[], object], grads: Gradients, steps: int = 5) -> float:
    """Python function calls (cProfile's count, builtins included) per step: a measure of the host
    path that, unlike its time, does not depend on the machine or its load."""
    import cProfile
    import pstats
    profile = cProfile.Profile()
    for _ in range(steps):
        grads.before_step()
        profile.enable()
        step()
        profile.disable()
    return pstats.Stats(profile).total_calls / steps


def _stats(timing: Timing, phases: dict[str, list[float]] | None = None) -> dict:
    out = {"median_ms": timing.median, "p90_ms": timing.quantile(0.9), "n": len(timing.samples_ms)}
    for name, values in (phases or {}).items():
        out[f"{name}_median_ms"] = Timing(values).median if values else None
    return out


def geometry_params(model, structure, geometry: str) -> list[torch.Tensor]:
    """The parameters the geometry's bench policy assigns: the list every variant steps."""
    from ..plan import Plan
    from ..policy import load_policy
    policy = load_policy(geometry_policy(geometry))
    plan = Plan(model, structure, policy, policy.resolve(structure))
    named = dict(model.named_parameters())
    return [named[n] for n in named if n in plan.assignments]


@contextlib.contextmanager
def _stub_eager_fallbacks():
    """The triton backend's calls of a geometry's eager post_step become no-ops; yields their count.
    On CPU they would time their compute (psi's norms over every weight), not GPU host time."""
    from ..runtime import triton_backend
    original, calls = triton_backend.eager_post_step, []

    def counted(item, states, ctx):
        calls.append(item.geometry.name)
        return []
    triton_backend.eager_post_step = counted
    try:
        yield calls
    finally:
        triton_backend.eager_post_step = original


def triton_rows(structure, model0, geometry: str, optimizer: str, steps: int, warmup: int) -> list[dict]:
    from ..plan import Plan
    from ..policy import load_policy
    from ..runtime.triton_backend import triton_problem
    from .stubs import stub_kernel_launches
    problem = triton_problem([next(model0.parameters())])
    if problem:
        return [_row(geometry, optimizer, "triton", mode, status="skipped", reason=problem) for mode in GRADS]
    rows = []
    for mode in GRADS:
        model = copy.deepcopy(model0)
        params = geometry_params(model, structure, geometry)
        opt = make_optimizer(optimizer, params, torch.device("cpu"), "foreach")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policy = load_policy(geometry_policy(geometry))
            plan = Plan(model, structure, policy, policy.resolve(structure))
            plan.install(opt, backend="triton")
        grads = Gradients(params, mode)
        with stub_kernel_launches() as launched, _stub_eager_fallbacks() as eager, \
                _phase_timers(plan.backend) as phases:
            timing = _time_steps(opt.step, grads, steps, warmup, phases)
            per_step = len(launched) / (steps + warmup)
            eager_per_step = len(eager) / (steps + warmup)
            calls = python_calls_per_step(opt.step, grads)
        notes = _unique([str(w.message) for w in caught if "backend" in str(w.message)] + plan.backend_notes())
        notes.append("kernel launches stubbed (no-ops)")
        if eager:
            notes.append(f"{eager_per_step:g} eager post_step call(s) per step ({', '.join(sorted(set(eager)))}) "
                         f"stubbed and not timed: on CPU they would time their compute; on a GPU each is a "
                         f"few launches of the geometry's eager program")
        rows.append(_row(geometry, optimizer, "triton", mode, **_stats(timing, phases),
                         launches_per_step=per_step, eager_fallbacks_per_step=eager_per_step,
                         python_calls_per_step=calls,
                         table_builds=plan.backend.cache.builds, table_patches=plan.backend.cache.patches,
                         plan_builds=plan.backend.plan_builds, notes=notes))
    return rows


NOT_APPLICABLE = {
    "eager": "its ops compute on the CPU here, so its host time cannot be told apart from its compute; "
             "benchmarks/gpu.sh times it on a GPU",
    "compile": "inductor's CPU kernels compute inline, so host time and compute cannot be told apart on CPU; "
               "benchmarks/gpu.sh times it on a GPU",
}


def run_host_overhead(config: HostOverheadConfig, echo=print) -> dict:
    from ..analysis import analyze
    c = config.check()
    torch.manual_seed(c.seed)
    loads = workloads(c.model, c.synthetic)
    if len(loads) != 1:
        raise GeomCompileError(f"--host-overhead times one parameter set; --synthetic {c.synthetic!r} gives "
                               f"{len(loads)}: give one COUNTxCHANNELS")
    load = loads[0]
    model0 = load.build().train()
    structure = analyze(model0, (torch.randn(2, *load.input_shape),))
    params0 = [p for p in model0.parameters() if p.requires_grad]
    rows, tensors = [], {}
    for geometry, optimizer in c.subjects:
        echo(f"host overhead: {load.name}, {geometry} + {optimizer}")
        params = geometry_params(model0, structure, geometry)
        tensors[geometry] = len(params)
        rows += [{**r, "geometry": geometry} for r in torch_foreach_rows(params, optimizer, c.steps, c.warmup)]
        for backend in c.backends:
            if backend == "triton":
                rows += triton_rows(structure, model0, geometry, optimizer, c.steps, c.warmup)
            else:
                rows += [_row(geometry, optimizer, backend, mode, status="not applicable",
                              reason=NOT_APPLICABLE[backend]) for mode in GRADS]
    for r in rows:
        ref = next((x for x in rows if x["variant"] == "torch foreach" and x["geometry"] == r["geometry"]
                    and x["optimizer"] == r["optimizer"] and x["grads"] == r["grads"]), None)
        if r["status"] == "ok" and r["variant"] != "torch foreach" and ref:
            r["x_torch_foreach"] = r["median_ms"] / ref["median_ms"]
    return {
        "schema": "geomcompile-host-overhead/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": c.command or " ".join(["geomcompile", *sys.argv[1:]]),
        "geomcompile": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "load_average": _load_average(),
        "settings": {"model": c.model, "subjects": [list(s) for s in c.subjects], "backends": list(c.backends),
                     "steps": c.steps, "warmup": c.warmup, "timer": "time.perf_counter", "device": "cpu"},
        "workload": {"name": load.name, "tensors": len(params0), "parameters": sum(p.numel() for p in params0),
                     "tensors_per_geometry": tensors},
        "targets_ms": {"triton cached": 0.3, "triton fresh": 0.5},
        "results": rows,
    }


def format_host_table(result: dict) -> str:
    per = ", ".join(f"{g}: {n}" for g, n in result["workload"]["tensors_per_geometry"].items())
    lines = [f"host time per optimizer step, {result['workload']['name']} (tensors stepped: {per}), launches "
             f"stubbed, {result['settings']['steps']} steps",
             f"{'geometry':<17}{'optimizer':<14}{'variant':<15}{'grads':<8}{'median ms':>10}{'p90 ms':>9}"
             f"{'pre ms':>8}{'post ms':>8}{'x foreach':>10}  status"]
    for r in result["results"]:
        def f(key, width, digits=3):
            v = r.get(key)
            return f"{v:>{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"
        lines.append(f"{r['geometry'] or '-':<17}{r['optimizer']:<14}{r['variant']:<15}{r['grads']:<8}"
                     f"{f('median_ms', 10)}{f('p90_ms', 9)}{f('pre_step_median_ms', 8)}{f('post_step_median_ms', 8)}"
                     f"{f('x_torch_foreach', 10, 1)}  {r['status']}{': ' + r['reason'] if r['reason'] else ''}")
    return "\n".join(lines)


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
