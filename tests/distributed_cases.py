"""The distributed test cases (issue 9), run inside spawned gloo workers by tests/test_distributed.py.

Every spawned world runs all its cases in one go (spawning costs seconds) and rank 0 writes a
table back to the parent: per case, the gathered parameters and optimizer state (or the error of
the case). The parent computes the single-process reference on the same global batch and
compares. Workers never assert: a failing case is recorded and the next one runs.

The model has the shapes the issue asks for: 7, 9 and 1 output channels (uneven shards over 2
and 4 ranks, and ranks with no rows: 9 over 4 is 3, 3, 3, 0; 1 over 2 is 1, 0), a conv-transpose
weight (out_dim 1: the sharded dim is not the channel dim), and scale invariance by per-sample
normalisations (GroupNorm: batch statistics would differ between a rank's batch and the global
batch, so the reference would not be the same training run). Row units (GroupNorm(7, 7)), group
units that straddle shards (GroupNorm(3, 9): groups of 3 rows) and a tensor unit (GroupNorm(1, 1)).
"""
from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import geomcompile as gc
from geomcompile.errors import GeomCompileError

STEPS = 5
GLOBAL_BATCH = 4
CONV = {"kind": "conv", "depthwise": False}

POLICIES = {
    "psi": [({"scale_invariant": True}, {"psi": {"max_norm": 0.62}})],
    "channel_directed": [({"kind": ["conv", "conv_transpose", "linear"]},
                          {"channel_directed": {"metric": "sobolev", "lam": 0.5, "mix": 0.5}})],
    "channel_directed_h0": [({"kind": ["conv", "conv_transpose", "linear"]},
                             {"channel_directed": {"metric": "h0", "lam": 0.5}})],
    # The top end of the spectrum (alpha small), solved to convergence with a fixed iteration count
    # (tol 0): there the single-process run itself moves by ~2e-6 when the weights move by 1e-7.
    # At alpha 1 with 2 iterations a step (the clustered bottom end, unconverged Ritz vectors) it
    # moves by ~3e-5 for the same 1e-7: no run with other rounding (sharded sums) can match it to
    # 1e-5 (docs/distributed.md).
    "spectral": [(CONV, {"spectral": {"coef": 0.1, "alpha": 0.01, "power_iters": 20, "init_iters": 40,
                                      "tol": 0.0}})],
    "pom": [(CONV, {"pom": {"component": "kernel", "grouping": "PI"}}),
            ({"kind": "linear"}, {"pom": {"component": "filter", "grouping": "PIO", "group_size": 3}})],
    "pom_po": [(CONV, {"pom": {"component": "kernel", "grouping": "PO", "group_size": 2, "radius": "init"}}),
               ({"kind": "linear"}, {"pom": {"component": "filter", "grouping": "PO"}})],
}
# Only for the compile backend case (fsdp_compile_cases): psi on the GroupNorm'd convs but `up`,
# channel_directed on `up` (a conv-transpose) and fc.
COMPILE_POLICIES = {
    "psi_and_channel_directed": [
        ({"scale_invariant": True, "kind": "conv"}, {"psi": {"max_norm": 0.62}}),
        ({"kind": ["conv_transpose", "linear"]}, {"channel_directed": {"metric": "sobolev", "lam": 0.5, "mix": 0.5}})],
}
OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.0),
}


def policy(case: str) -> dict:
    return {"version": 1, "validate": "warn",
            "rules": [{"name": f"r{i}", "match": m, "use": u}
                      for i, (m, u) in enumerate({**POLICIES, **COMPILE_POLICIES, **DDP_ONLY_POLICIES}[case])]}


class ShardNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 7, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(7, 7)
        self.up = nn.ConvTranspose2d(7, 4, 3, padding=1, bias=False)      # weight (7, 4, 3, 3), out_dim 1
        self.gn_up = nn.GroupNorm(4, 4)
        self.conv2 = nn.Conv2d(4, 9, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(3, 9)
        self.conv3 = nn.Conv2d(9, 1, 3, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(1, 1)
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        x = torch.relu(self.gn1(self.conv1(x)))
        x = torch.relu(self.gn_up(self.up(x)))
        x = torch.relu(self.gn2(self.conv2(x)))
        x = torch.relu(self.gn3(self.conv3(x)))
        return self.fc(x.flatten(1))

    layers = ("conv1", "up", "conv2", "conv3", "fc")


class ChainNet(nn.Module):
    """For gspace under DDP: G-chains need layers joined by ReLUs alone (no normalisation), so ShardNet
    has none; fc1 -> fc2 -> fc3 is one chain. The same batches (flattened) and targets as ShardNet."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(48, 8), nn.Linear(8, 6), nn.Linear(6, 7)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


# DDP only (gspace has no sharded form: its skeleton products need whole chains, refused under FSDP2).
# The exact step needs plain SGD; with momentum and AdamW the tangent step is the one that runs.
DDP_ONLY_POLICIES = {"gspace": [({"g_coupled": True}, {"gspace": {"step": "tangent"}})]}
MODELS = {"gspace": ChainNet}


def build_model(case: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.get(case, ShardNet)()


def example_inputs():
    return (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)),)


def batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=gen), torch.randn(GLOBAL_BATCH, 7, generator=gen)


def local_batch(step: int, rank: int, world: int):
    x, y = batch(step)
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def train(model, opt, steps, rank: int = 0, world: int = 1, after_step=None):
    for step in steps:
        x, y = local_batch(step, rank, world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered(model: nn.Module, opt) -> dict:
    """{canonical name: {"param": full tensor, state key: full tensor}} (collective under FSDP2)."""
    from geomcompile.names import canonical_named_parameters
    out = {}
    for name, p in canonical_named_parameters(model):
        entry = {"param": _full(p.detach()).clone()}
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and key != "step":
                entry[key] = _full(value).clone()
        out[name] = entry
    return out


def reference(case: str, optimizer: str, steps: int = STEPS, world: int = 1) -> dict:
    """The single-process run on the global batch, its gradient accumulated over `world` micro-batches
    (the ranks' batches) as the data-parallel mean of per-rank means: the same gradient the ranks
    average, up to the order of the sum over ranks.

    It runs on one intra-op thread, as the workers do: with two threads the CPU convolution's weight
    gradient is reduced in another order (5.96e-8 apart after one backward here), and that alone grew
    to 1.8e-6 after five AdamW steps. Same threads, same arithmetic: DDP's gradients then equal this
    run's bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(case, optimizer, steps, world)
    finally:
        torch.set_num_threads(threads)


def _reference_run(case: str, optimizer: str, steps: int, world: int) -> dict:
    model = build_model(case)
    opt = OPTIMIZERS[optimizer](model.parameters())
    gc.apply(model, policy(case), opt, example_inputs=example_inputs())
    for step in range(steps):
        opt.zero_grad()
        for rank in range(world):
            x, y = local_batch(step, rank, world)
            (nn.functional.mse_loss(model(x), y) / world).backward()
        opt.step()
    return gathered(model, opt)


# ---- inside the workers ------------------------------------------------------------------------
def _sharded(plan_first: bool, case: str, optimizer: str, world: int, backend: str = "eager"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    model = build_model()
    plan = gc.plan(model, policy(case), example_inputs=example_inputs()) if plan_first else None
    for layer in ShardNet.layers:
        fully_shard(getattr(model, layer), mesh=mesh)
    fully_shard(model, mesh=mesh)
    if plan is None:
        plan = gc.plan(model, policy(case), example_inputs=example_inputs())
    opt = OPTIMIZERS[optimizer](model.parameters())
    plan.install(opt, backend=backend)
    return model, opt, plan


class CaseFailed(Exception):
    """A case raised: the ranks' collectives may be out of step, so the world stops there."""


def _run_case(out: dict, key, run) -> None:
    if os.environ.get("GC_DIST_ONLY") and os.environ["GC_DIST_ONLY"] not in "/".join(map(str, key)):
        return
    try:
        out[key] = run()
    except Exception:
        out[key] = {"error": f"rank {dist.get_rank()}: {traceback.format_exc()}"}
        raise CaseFailed(key)


def fsdp_cases(rank: int, world: int, out: dict) -> None:
    for i, case in enumerate(POLICIES):
        for optimizer in OPTIMIZERS:
            def run(case=case, optimizer=optimizer, plan_first=i % 2 == 0):
                model, opt, plan = _sharded(plan_first, case, optimizer, world)
                train(model, opt, range(STEPS), rank, world)
                return {"result": gathered(model, opt), "notes": plan.notes}
            _run_case(out, ("fsdp", world, case, optimizer), run)


# The compile and triton backends on shards, one run each through every path: psi's one-row units
# (conv1, conv3) and channel_directed's conv-transpose columns (up) run compiled / as kernels on the
# local shards; psi's groups (conv2) and channel_directed on fc (rows split over ranks) as eager
# sharded programs with collectives. Triton runs under its interpreter (TRITON_INTERPRET=1, set by
# tests/conftest.py and inherited by the spawned workers).
BACKEND_CASES = (("compile", "psi_and_channel_directed", "sgd_momentum"),
                 ("triton", "psi_and_channel_directed", "sgd_momentum"))


def fsdp_backend_cases(rank: int, world: int, out: dict) -> None:
    from geomcompile.runtime import compile_backend
    for backend, case, optimizer in BACKEND_CASES:
        def run(backend=backend, case=case, optimizer=optimizer):
            before = len(compile_backend._CACHE)
            model, opt, plan = _sharded(True, case, optimizer, world, backend=backend)
            train(model, opt, range(STEPS), rank, world)
            return {"result": gathered(model, opt), "summary": plan.summary(),
                    "compiled_functions": len(compile_backend._CACHE) - before}
        _run_case(out, ("fsdp_" + backend, world, case, optimizer), run)


def _ranks_differ(model) -> float:
    """Largest difference of any parameter between this rank and rank 0 (0.0: bitwise equal)."""
    worst = 0.0
    for p in model.parameters():
        mine = p.detach().clone()
        dist.broadcast(mine, src=0)
        worst = max(worst, float((mine - p.detach()).abs().max()) if p.numel() else 0.0)
    return worst


def ddp_cases(rank: int, world: int, out: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    for case in [*POLICIES, *DDP_ONLY_POLICIES]:
        for optimizer in OPTIMIZERS:
            def run(case=case, optimizer=optimizer):
                model = DDP(build_model(case))
                opt = OPTIMIZERS[optimizer](model.parameters())
                plan = gc.apply(model, policy(case), opt, example_inputs=example_inputs())
                spread = []
                train(model, opt, range(STEPS), rank, world, after_step=lambda: spread.append(_ranks_differ(model)))
                return {"result": gathered(model, opt), "rank_spread": spread,
                        "with_geometry": sum(1 for stages in plan.assignments.values() if stages)}
            _run_case(out, ("ddp", world, case, optimizer), run)


def refusal_cases(rank: int, world: int, out: dict) -> None:
    """A geometry without a sharded form on FSDP2 parameters, spectral on a grouped conv, and pom's
    feature_std under DDP: each refused at install with its reason."""
    from geomcompile.geometries.base import REGISTRY, Geometry, register
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    class TestOnlyUnsharded(Geometry):        # shard_refusal left at the default
        name, stage = "test_only_unsharded", "metric"

    register(TestOnlyUnsharded)
    try:
        attempts = {
            "no_sharded_form": ("fsdp", [(CONV, {"test_only_unsharded": {}})], nn.Sequential(nn.Conv2d(3, 5, 3))),
            "spectral_groups": ("fsdp", [(CONV, {"spectral": {}})], nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))),
            "control_spectral": ("fsdp", [(CONV, {"spectral": {}})], nn.Sequential(nn.Conv2d(4, 6, 3))),
            "pom_feature_std_ddp": ("ddp", [({"kind": "conv"}, {"pom": {"feature_std": True}})],
                                    nn.Sequential(nn.Conv2d(4, 6, 3))),
        }
        for label, (how, rules, model) in attempts.items():
            pol = {"version": 1, "validate": "warn",
                   "rules": [{"name": f"r{i}", "match": m, "use": u} for i, (m, u) in enumerate(rules)]}
            x = torch.randn(2, model[0].in_channels, 6, 6)
            if how == "fsdp":
                fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            else:
                model = DDP(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            try:
                gc.apply(model, pol, opt, example_inputs=(x,))
                out[("refusal", world, label)] = {"error": None}
            except GeomCompileError as e:
                out[("refusal", world, label)] = {"error": str(e)}
    finally:
        del REGISTRY["test_only_unsharded"]


def collective_counts(rank: int, world: int, out: dict) -> None:
    """The collectives geomcompile issues per optimizer step under FSDP2, per policy: the requests of
    the sharded programs (one per parameter and use) and the collectives that answer them (one per
    round and kind, batched over the parameters)."""
    import geomcompile.runtime.distributed as gdist
    counts = {"sum": 0, "gather": 0, "requests": 0}
    real_reduce, real_gather, real_answer = gdist._all_reduce, gdist._all_gather, gdist._answer

    def all_reduce(flat, group):
        counts["sum"] += 1
        real_reduce(flat, group)

    def all_gather(flat, group, n):
        counts["gather"] += 1
        return real_gather(flat, group, n)

    def answer(requests):
        counts["requests"] += len(requests)
        return real_answer(requests)

    gdist._all_reduce, gdist._all_gather, gdist._answer = all_reduce, all_gather, answer
    try:
        for case in POLICIES:
            def run(case=case):
                model, opt, plan = _sharded(False, case, "sgd_momentum", world)
                per_step = []
                for step in range(2):
                    before = dict(counts)
                    train(model, opt, [step], rank, world)
                    per_step.append({k: counts[k] - before[k] for k in counts})
                return {"per_step": per_step}
            _run_case(out, ("collectives", world, case), run)
    finally:
        gdist._all_reduce, gdist._all_gather, gdist._answer = real_reduce, real_gather, real_answer


def _fsdp_for_dcp(world):
    return _sharded(False, "psi", "sgd_momentum", world)


def dcp_save(rank: int, world: int, out: dict, directory: str) -> None:
    """3 steps, a DCP checkpoint, then on to step 6 (the uninterrupted run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def run():
        model, opt, plan = _fsdp_for_dcp(world)
        train(model, opt, range(3), rank, world)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd, "plan": plan.state}, checkpoint_id=directory)
        train(model, opt, range(3, 6), rank, world)
        return {"result": gathered(model, opt), "renormalised": _renormalised(plan)}
    _run_case(out, ("dcp", world, "uninterrupted"), run)


def dcp_load(rank: int, world: int, out: dict, directory: str) -> None:
    """Fresh processes: other initial weights, the checkpoint loaded, steps 4 to 6."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def run():
        torch.manual_seed(1)
        model, opt, plan = _fsdp_for_dcp(world)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)                           # not the saved weights: the checkpoint must decide
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "plan": plan.state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        steps_at_load = plan.steps
        train(model, opt, range(3, 6), rank, world)
        return {"result": gathered(model, opt), "steps_at_load": steps_at_load, "renormalised": _renormalised(plan)}
    _run_case(out, ("dcp", world, "resumed"), run)


def _renormalised(plan) -> float:
    return sum(v["psi"]["renormalised_units"] for v in plan.diagnostics().values() if "psi" in v)


JOBS = {"fsdp": fsdp_cases, "fsdp_backends": fsdp_backend_cases, "ddp": ddp_cases, "refusal": refusal_cases, "collectives": collective_counts,
        "dcp_save": dcp_save, "dcp_load": dcp_load}


def worker(rank: int, world: int, port: int, jobs: list, out_path: str, directory: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))      # a hung collective fails the case
    table: dict = {}
    try:
        for job in jobs:
            run = JOBS[job]
            run(rank, world, table, directory) if job.startswith("dcp") else run(rank, world, table)
    except CaseFailed:
        pass               # recorded; the cases not run are missing from the table
    finally:
        # rank 0's table; another rank's only when a case failed there (its error may be the first)
        if rank == 0 or any("error" in v for k, v in table.items() if k[0] != "refusal"):
            torch.save(table, out_path if rank == 0 else f"{out_path}.rank{rank}")
        dist.destroy_process_group()
