"""Kernel report: compile every kernel configuration the launchers can pick for a GPU target, without
a GPU, and read what the GPU would run.

    python -m geomcompile.kernels.report --target sm_90 [--json PATH] [--heaviest]

Per configuration: registers per thread, stack frame bytes, spill stores / loads (bytes, from
``ptxas -v``), 128-bit global loads and stores (``LDG.E.128`` / ``STG.E.128`` in the SASS of the
cubin Triton built), all global loads and stores, 64-bit integer divisions and remainders in the PTX
(``div``/``rem`` ``.s64``/``.u64``: each one is a subroutine call on the GPU, ``CALL.REL`` in SASS)
and those calls.

Which configurations: every *schedule* a launcher can pick (``configurations()`` of each kernel
module: mode, size class, block sizes, warps) for every update kind (gradient transform, SGD,
SGD with momentum, Adam) and for fp32 and bf16 (fp16 compiles to the same code as bf16 but for
the conversion instructions). The on/off flags that only add a few scalar operations (MAXIMIZE,
NESTEROV, weight decay, AdamW's decoupling) are compiled switched on, their heaviest setting.
``--heaviest`` keeps, per schedule, only the configuration with the most live tensors (what
``tests/test_kernel_report.py`` checks, to keep the suite short).

The tools are the ones Triton ships (``triton/backends/nvidia/bin``: ``ptxas``, ``cuobjdump``,
``nvdisasm``); ``toolchain_problem()`` says which is missing. The kernels must be built without
the Triton interpreter: run under ``TRITON_INTERPRET=1``, ``main`` re-runs itself without it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

LIMITS = {"registers": 128, "spill_bytes": 0}


@dataclass
class KernelConfig:
    """One compiled configuration: the @triton.jit kernel, its constexprs and launch options."""

    family: str                       # e.g. "channel_directed"
    kernel: Any                       # the JITFunction
    constexprs: dict
    num_warps: int
    schedule: str                     # the launcher's words for the schedule, e.g. "one tile, O<=16"
    arg_types: dict = field(default_factory=dict)   # non-constexpr argument -> triton type (default fp32)
    weight: int = 0                   # live tensors (roles); --heaviest keeps the largest per schedule

    @property
    def label(self) -> str:
        shown = {k: (str(v).replace("triton.language.", "") if not isinstance(v, (bool, int)) else v)
                 for k, v in self.constexprs.items() if k not in ("NF",)}
        return f"{self.kernel.__name__} [{self.schedule}] nw={self.num_warps} " + \
            " ".join(f"{k}={v}" for k, v in shown.items())


def tools_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for this architecture (it ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def toolchain_problem() -> str | None:
    """Why the report cannot run here, or None."""
    try:
        from triton.backends import backends
    except ImportError as e:
        return f"Triton is not installed ({e})"
    if "nvidia" not in backends:
        return "this Triton build has no NVIDIA compiler backend"
    missing = [t for t in ("ptxas", "cuobjdump", "nvdisasm") if not os.path.exists(os.path.join(tools_dir(), t))]
    if missing:
        return f"{', '.join(missing)} missing from {tools_dir()} (they ship with Triton's NVIDIA backend)"
    return None


def update_kinds() -> dict[str, dict]:
    """The constexpr flags of each update kind a launcher takes, at their heaviest setting."""
    from .optim_updates import AdamUpdate, SGDUpdate, kernel_args
    return {"transform": kernel_args(None)[1],
            "sgd": kernel_args(SGDUpdate(0.1, weight_decay=1e-4, maximize=True))[1],
            "sgd_momentum": kernel_args(SGDUpdate(0.1, 0.9, nesterov=True, weight_decay=1e-4, maximize=True))[1],
            "adam": kernel_args(AdamUpdate(0.1, weight_decay=0.1, decoupled=True, maximize=True, step=3))[1]}


def all_configurations() -> list[KernelConfig]:
    """Every module's configurations(); a family module without kernels (spectral's) has none to list,
    one with @triton.jit kernels but no configurations() is an error (the report would skip them)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from geomcompile.runtime.triton_backend import _kernels
    configs = []
    for module in _kernels():
        if hasattr(module, "configurations"):
            configs += module.configurations()
            continue
        jitted = sorted(n for n, v in vars(module).items() if isinstance(v, (JITFunction, InterpretedFunction)))
        if jitted:
            raise RuntimeError(f"{module.__name__} defines Triton kernels ({', '.join(jitted)}) but no "
                               f"configurations(): add one listing every schedule its launchers pick")
    return configs


def heaviest(configs: list[KernelConfig]) -> list[KernelConfig]:
    """Per (kernel, schedule, dtype), the configuration with the most live tensors."""
    best: dict[tuple, KernelConfig] = {}
    for c in configs:
        key = (c.kernel.__name__, c.schedule, str(c.constexprs.get("DT")), c.num_warps)
        if key not in best or c.weight > best[key].weight:
            best[key] = c
    return list(best.values())


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def compile_config(c: KernelConfig, arch: int) -> dict:
    """Compile one configuration for sm_<arch> and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in c.constexprs else c.arg_types.get(n, "fp32") for n in c.kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=c.kernel, signature=sig, constexprs=c.constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": c.num_warps})
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    bin_dir = tools_dir()
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        # the same ptxas options Triton uses (backends/nvidia/compiler.py make_cubin), with -v
        log = subprocess.run([ptxas_path(arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{arch}a", ptx_path, "-o", os.path.join(tmp, "v.o")],
                             capture_output=True, text=True, check=True).stderr
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", cubin_path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin_path],
                              capture_output=True, text=True, check=True).stdout
    frame = _PTXAS_FRAME.search(log)
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {
        "family": c.family, "kernel": c.kernel.__name__, "schedule": c.schedule, "num_warps": c.num_warps,
        "constexprs": {k: str(v).replace("triton.language.", "") for k, v in c.constexprs.items()},
        "label": c.label,
        "registers": int(reg.group(1)) if reg else int(_PTXAS_USED.search(log).group(1)),
        "stack_bytes": int(stack.group(1)) if stack else int(frame.group(1)),
        "spill_store_bytes": int(frame.group(2)) if frame else None,
        "spill_load_bytes": int(frame.group(3)) if frame else None,
        "ldg_128": _count(r"\bLDG\.E\.128\b", sass) + _count(r"\bLDG\.E\.EL\.128\b", sass),
        "ldg_all": _count(r"\bLDG\.E\b[\w.]*", sass),
        "stg_128": _count(r"\bSTG\.E\.128\b", sass),
        "stg_all": _count(r"\bSTG\.E\b[\w.]*", sass),
        "ld_global_v4_ptx": _count(r"ld\.global(?:\.\w+)*\.v4", ptx),
        "div64_ptx": _count(r"\b(?:div|rem)(?:\.\w+)*\.[su]64\b", ptx),
        "call_rel_sass": _count(r"\bCALL\.REL\b", sass),
        "local_ops_sass": _count(r"\b(?:LDL|STL)\b", sass),
    }


def violations(row: dict) -> list[str]:
    bad = []
    if row["registers"] > LIMITS["registers"]:
        bad.append(f"{row['registers']} registers > {LIMITS['registers']}")
    spills = (row["spill_store_bytes"] or 0) + (row["spill_load_bytes"] or 0)
    if spills or row["local_ops_sass"]:
        bad.append(f"spills: {row['spill_store_bytes']} B stored, {row['spill_load_bytes']} B loaded, "
                   f"{row['local_ops_sass']} local memory instructions")
    return bad


def _selected(only_heaviest: bool) -> list[KernelConfig]:
    configs = all_configurations()
    return heaviest(configs) if only_heaviest else configs


def _compile_index(args: tuple[int, int, bool]) -> dict:
    """Worker: configuration `index` of the selection (JIT functions do not pickle; indices do)."""
    index, arch, only_heaviest = args
    row = compile_config(_selected(only_heaviest)[index], arch)
    row["violations"] = violations(row)
    return row


def run_report(arch: int = 90, only_heaviest: bool = False, jobs: int = 1, echo=print) -> dict:
    work = [(i, arch, only_heaviest) for i in range(len(_selected(only_heaviest)))]
    rows = []
    if jobs > 1:
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for row in pool.map(_compile_index, work):
                rows.append(row)
                echo(format_row(row))
    else:
        for w in work:
            rows.append(_compile_index(w))
            echo(format_row(rows[-1]))
    return {"target": f"sm_{arch}", "configurations": len(rows), "rows": rows,
            "violating": sum(1 for r in rows if r["violations"]),
            "max_registers": max(r["registers"] for r in rows),
            "total_spill_bytes": sum((r["spill_store_bytes"] or 0) + (r["spill_load_bytes"] or 0) for r in rows)}


HEADER = f"{'regs':>4} {'stack':>5} {'spill st/ld':>11} {'LDG128/all':>10} {'STG128/all':>10} {'div64':>5} {'calls':>5}  configuration"


def format_row(r: dict) -> str:
    spill = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
    flag = "  <-- " + "; ".join(r["violations"]) if r.get("violations") else ""
    return (f"{r['registers']:>4} {r['stack_bytes']:>5} {spill:>11} {r['ldg_128']:>4}/{r['ldg_all']:<5} "
            f"{r['stg_128']:>4}/{r['stg_all']:<5} {r['div64_ptx']:>5} {r['call_rel_sass']:>5}  {r['label']}{flag}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geomcompile.kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="sm_90", help="GPU architecture, sm_NN (default sm_90)")
    parser.add_argument("--json", help="write the report as JSON to this path")
    parser.add_argument("--heaviest", action="store_true",
                        help="per schedule only the configuration with the most live tensors")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    m = re.fullmatch(r"sm_(\d+)a?", args.target)
    if not m:
        parser.error(f"--target must look like sm_90, got {args.target!r}")
    problem = toolchain_problem()
    if problem:
        print(f"kernel report: cannot run: {problem}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # @triton.jit chose the interpreter at import: build the kernels in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "geomcompile.kernels.report", *(argv or sys.argv[1:])], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(HEADER)
    report = run_report(int(m.group(1)), args.heaviest, max(1, args.jobs))
    print(f"{report['configurations']} configurations for {report['target']}: max {report['max_registers']} "
          f"registers, {report['total_spill_bytes']} spill bytes, {report['violating']} over the limits "
          f"(<= {LIMITS['registers']} registers, no spills)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if report["violating"] else 0


if __name__ == "__main__":
    sys.exit(main())
