"""The one-shot GPU benchmark behind ``bash benchmarks/gpu.sh OUT_DIR``: everything a GPU figure needs.

    python -m geomcompile.bench.gpu --out OUT_DIR                    # on a CUDA machine (< 8 min, H100/H200)
    python -m geomcompile.bench.gpu --out OUT_DIR --device cpu --quick   # dry run of every part, no GPU

Parts, each writing one JSON file into OUT_DIR (and a line of summary to stdout):

1. ``parity.json``: every Triton kernel path against the eager reference on the device: psi
   (renormalised inside the kernel, and by the eager fallback where running statistics follow the
   rescale), channel_directed sobolev and h0; SGD-momentum, SGD-nesterov, Adam, AdamW; float32 and
   bfloat16; contiguous and channels_last weights. Parameters and every optimizer state tensor after
   ``PARITY_STEPS`` float32 steps (one bfloat16 step), within the tolerances of tests/registry.py.
2. ``optimizer_step_<model>.json`` for ResNet-50, VGG-16 and ResNet-56: ``geomcompile bench``'s
   optimizer step (CUDA events, medians) for plain SGD-momentum ``fused=True`` and ``foreach``, each
   geometry of ``STEP_GEOMETRIES`` (``--geometries``) x eager / compile / triton (a backend a geometry has
   no fast path for runs its eager program, and the row's note says so), and the copy bound; GB/s and x_copy give the achieved
   bandwidth against the measured copy bandwidth.
3. ``train_step_resnet56.json``: the full training step of ResNet-56 at batch 128 with the shipped
   ``resnet`` policy (triton backend) against plain training.

benchmarks/gpu.sh also runs ``geomcompile bench --host-overhead --model resnet50`` (CPU tensors, launches
stubbed) in a process of its own, since it needs the kernels in interpreter mode.

``--quick`` shrinks every part (a synthetic stack, a few steps, no compile backend) to check the
script end to end; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
from torch import nn

PARITY_STEPS = 5
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 * 2 ** -7, 2 * 2 ** -7)}   # tests/registry.py
PARITY_POLICIES = {
    "psi": {"match": {"scale_invariant": True}, "use": {"psi": {"max_norm": 1.5}}},
    "channel_directed sobolev": {"match": {"kind": ["conv", "linear"]},
                                 "use": {"channel_directed": {"metric": "sobolev", "lam": 0.5, "mix": 0.5}}},
    "channel_directed h0": {"match": {"kind": ["conv", "linear"]},
                            "use": {"channel_directed": {"metric": "h0", "lam": 0.5}}},
}
PARITY_OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
}
STEP_MODELS = ("resnet50", "vgg16", "resnet56")
# Every geometry with a policy on these CNNs (gspace needs ReLU chains without normalisation: not timed
# here). pom and spectral use their bench policies' defaults (geomcompile/bench/workloads.py).
STEP_GEOMETRIES = ("channel_directed", "psi", "pom", "spectral")


class ParityNet(nn.Module):
    """conv → BN without running statistics (psi renormalises inside the kernel) → conv → BN with
    them (the eager fallback renormalises, the statistics follow) → linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24, track_running_stats=False)
        self.conv2 = nn.Conv2d(24, 40, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(40)
        self.head = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


# ---- 1. parity ------------------------------------------------------------------------------------
def _parity_case(device, geometry: str, opt_name: str, dtype, channels_last: bool) -> dict:
    import geomcompile as gc
    policy = {"version": 1, "validate": "warn", "rules": [{"name": "r", **PARITY_POLICIES[geometry]}]}
    runs = {}
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        model = ParityNet()
        with torch.no_grad():
            model.conv1.weight.mul_(5.0)          # rows above max_norm: psi renormalises at once
            model.conv2.weight.mul_(5.0)
        model = model.to(device=device, dtype=dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = PARITY_OPTIMIZERS[opt_name](model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = gc.apply(model, policy, opt, example_inputs=(torch.zeros(2, 3, 8, 8, device=device, dtype=dtype),),
                            backend=backend)
        gen = torch.Generator().manual_seed(1)
        for _ in range(_parity_steps(dtype)):
            for p in model.parameters():
                g = (torch.randn(p.shape, generator=gen) * 0.5).to(device=device, dtype=dtype)
                p.grad = g.contiguous(memory_format=torch.channels_last) if p.dim() == 4 and channels_last else g
            opt.step()
        tensors = {f"param {n}": p.detach() for n, p in model.named_parameters()}
        names = {id(p): n for n, p in model.named_parameters()}
        for p, state in opt.state.items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    tensors[f"{k} {names[id(p)]}"] = v
        runs[backend] = (tensors, plan.backend_notes())
    rtol, atol = TOLERANCES[dtype]
    worst, failures = 0.0, []
    for key, ref in runs["eager"][0].items():
        ref32, got32 = ref.float(), runs["triton"][0][key].float()
        if dtype == torch.bfloat16:       # normwise, as tests/test_matrix.py::_close
            bound = torch.full_like(ref32, atol * max(float(ref32.abs().max()) if ref32.numel() else 0.0, 1.0))
        else:
            bound = atol + rtol * ref32.abs()
        err = float(((got32 - ref32).abs() / bound).max()) if ref32.numel() else 0.0
        worst = max(worst, err)
        if not err <= 1.0:                # NaN fails too
            failures.append(key)
    return {"geometry": geometry, "optimizer": opt_name, "dtype": str(dtype).replace("torch.", ""),
            "channels_last": channels_last, "ok": not failures, "failures": failures,
            "steps": _parity_steps(dtype), "worst_error_over_tolerance": worst,
            "tolerance": "|diff| <= atol * max(max|ref|, 1)" if dtype == torch.bfloat16 else
            "|diff| <= atol + rtol |ref|", "rtol": rtol, "atol": atol, "triton_notes": runs["triton"][1]}


def _parity_steps(dtype) -> int:
    """fp32: PARITY_STEPS steps of two independent runs. bf16: one step from the same state (as the
    test matrix, which restarts every bf16 step from the eager state: a trajectory of bf16 roundings
    diverges for real where psi's max_norm threshold is crossed in one run and not the other)."""
    return PARITY_STEPS if dtype == torch.float32 else 1


def parity(device, quick: bool) -> dict:
    cases = []
    geometries = list(PARITY_POLICIES)
    optimizers = ["sgd_momentum", "adam"] if quick else list(PARITY_OPTIMIZERS)
    for geometry in geometries:
        for opt_name in optimizers:
            for dtype in (torch.float32, torch.bfloat16):
                for channels_last in ((False,) if quick else (False, True)):
                    cases.append(_parity_case(device, geometry, opt_name, dtype, channels_last))
    return {"cases": cases, "failed": sum(not c["ok"] for c in cases)}


def eigh_parity(device, quick: bool) -> dict:
    """spectral's Jacobi kernel (kernels/spectral.py jacobi_eigh, which replaces torch.linalg.eigh for
    the solver's matrices up to 16×16 on a GPU) against torch's eigh on the device: eigenvalues,
    residual ‖AV − VΛ‖ and orthonormality, in units of n·eps·‖A‖ (tests/test_spectral_jacobi.py
    allows 20); and, on CUDA, both timed per call (host wall time over repeated calls, then one
    synchronize: eigh's own sync per call included, which is what the kernel avoids)."""
    from geomcompile.kernels.spectral import jacobi_eigh
    rows = []
    for dtype in (torch.float32, torch.float64):
        for n in ((4,) if quick else (4, 12, 16)):
            batch = 2 if quick else 64
            gen = torch.Generator().manual_seed(n)
            a = torch.randn(batch, n, n, dtype=torch.float64, generator=gen)
            a = ((a + a.mT) / 2).to(dtype).double()          # exactly the matrices the device gets
            A = a.to(device=device, dtype=dtype)
            w, V = jacobi_eigh(A)
            w, V = w.double().cpu(), V.double().cpu()
            unit = n * torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(a, ord=2).max().clamp_min(1.0))
            errors = {"eigenvalues": float((w - torch.linalg.eigvalsh(a)).abs().max()) / unit,
                      "residual": float((a @ V - V * w[..., None, :]).abs().max()) / unit,
                      "orthonormality": float((V.mT @ V - torch.eye(n, dtype=torch.float64)).abs().max())
                      / (n * torch.finfo(dtype).eps)}
            row = {"n": n, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "errors_in_n_eps": errors,
                   "ok": all(e <= 20 for e in errors.values())}
            if device.type == "cuda":
                for name, fn in (("jacobi_ms", lambda: jacobi_eigh(A)), ("torch_eigh_ms", lambda: torch.linalg.eigh(A))):
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize(device)
                    calls = 50
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    torch.cuda.synchronize(device)
                    row[name] = (time.perf_counter() - t0) * 1e3 / calls
            rows.append(row)
    return {"rows": rows, "failed": sum(not r["ok"] for r in rows)}


# ---- 2./3. timed steps ------------------------------------------------------------------------------
def step_bench(model: str, device: str, quick: bool, backends, geometries=STEP_GEOMETRIES) -> dict:
    from . import BenchConfig, run_bench
    if quick:
        config = BenchConfig(model="synthetic", synthetic="2x8", device=device, backends=tuple(backends),
                             geometries=tuple(geometries), steps=3, warmup=1, train_steps=0, progress=False)
    else:
        config = BenchConfig(model=model, device=device, backends=tuple(backends), geometries=tuple(geometries),
                             train_steps=0, progress=False)
    return run_bench(config)


def train_bench(device: str, quick: bool) -> dict:
    from . import BenchConfig, run_bench
    if quick:
        config = BenchConfig(model="synthetic", synthetic="2x8", policy="resnet", device=device, backends=("eager",),
                             steps=2, warmup=1, train_steps=2, train_warmup=1, batch_size=2, progress=False)
    else:
        config = BenchConfig(model="resnet56", policy="resnet", device=device, backends=("triton",),
                             steps=20, warmup=5, train_steps=100, train_warmup=10, batch_size=128, progress=False)
    return run_bench(config)


def _summary_lines(result: dict) -> list[str]:
    lines = []
    for r in result["results"]:
        if r["status"] != "ok":
            lines.append(f"  {r['workload']} {r['phase']} {r['geometry'] or ''} {r['variant']}: {r['status']}")
            continue
        gbps = f", {r['gb_per_s']:.0f} GB/s" if r.get("gb_per_s") else ""
        lines.append(f"  {r['workload']} {r['phase']} {r['geometry'] or ''} {r['variant']}: median "
                     f"{r['median_ms']:.3f} ms, x_plain {r['x_plain']:.2f}{gbps}")
    return lines


def _write(out: str, name: str, result: dict) -> str:
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geomcompile.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the JSON files (created)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: checks the script, not the GPU")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compile backend's rows")
    parser.add_argument("--geometries", default=",".join(STEP_GEOMETRIES),
                        help=f"geometries of the optimizer-step part (default {','.join(STEP_GEOMETRIES)})")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.sh: CUDA is not available here; run with --device cpu --quick for a dry run", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.quick:
        print("gpu.sh: --device cpu is only a dry run; add --quick", file=sys.stderr)
        return 2
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu.sh: the CPU dry run needs the Triton interpreter, chosen before triton is imported: "
              "run it as TRITON_INTERPRET=1 python -m geomcompile.bench.gpu ... (gpu.sh sets it)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    backends = [b for b in ("eager", "compile", "triton") if not (b == "compile" and (args.skip_compile or args.quick))]
    start = time.perf_counter()

    def stamp(text):
        print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True)

    stamp(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    result = parity(device, args.quick)
    failed = result["failed"]
    stamp(f"parity: {len(result['cases']) - result['failed']}/{len(result['cases'])} cases within tolerance "
          f"-> {_write(args.out, 'parity.json', result)}")
    for case in result["cases"]:
        if not case["ok"]:
            print(f"  FAILED {case['geometry']} {case['optimizer']} {case['dtype']} channels_last="
                  f"{case['channels_last']}: {', '.join(case['failures'][:4])}")
    result = eigh_parity(device, args.quick)
    failed += result["failed"]
    stamp(f"spectral's Jacobi eigh: {len(result['rows']) - result['failed']}/{len(result['rows'])} within "
          f"20 n eps -> {_write(args.out, 'spectral_eigh.json', result)}")
    for row in result["rows"]:
        timing = (f"  jacobi {row['jacobi_ms']:.3f} ms, torch eigh {row['torch_eigh_ms']:.3f} ms per call"
                  if "jacobi_ms" in row else "")
        print(f"  {'ok' if row['ok'] else 'FAILED'} n={row['n']} {row['dtype']} batch {row['batch']}: "
              + ", ".join(f"{k} {v:.2g}" for k, v in row["errors_in_n_eps"].items()) + timing)
    for model in (STEP_MODELS[:1] if args.quick else STEP_MODELS):
        result = step_bench(model, args.device, args.quick, backends, args.geometries.split(","))
        stamp(f"optimizer step {model} -> {_write(args.out, f'optimizer_step_{model}.json', result)}")
        print("\n".join(_summary_lines(result)))
    result = train_bench(args.device, args.quick)
    stamp(f"training step resnet56 -> {_write(args.out, 'train_step_resnet56.json', result)}")
    print("\n".join(_summary_lines(result)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
