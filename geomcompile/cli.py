"""Command line: `geomcompile plan|suggest|validate|schema|demo|reproduce|bench` (also `python -m geomcompile`)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import GeomCompileError


def _load_factory(spec: str):
    if ":" not in spec:
        raise GeomCompileError(f"expected MODULE:CALLABLE (e.g. tests.models:resnet20), got {spec!r}")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise GeomCompileError(f"cannot import {module_name!r}: {exc}. Run from the folder that contains it, "
                               f"or put it on PYTHONPATH.") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise GeomCompileError(f"{module_name!r} has no attribute {attr!r}. Fix: name a function or class "
                               f"defined in {module_name}, as MODULE:CALLABLE") from None


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise GeomCompileError(f"--input-shape expects comma-separated integers like 1,3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise GeomCompileError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def _build_model(spec: str):
    """The nn.Module that MODULE:CALLABLE returns when called without arguments."""
    import torch
    factory = _load_factory(spec)
    try:
        model = factory()
    except TypeError as exc:
        raise GeomCompileError(f"calling {spec}() failed: {exc}. MODEL must name a callable that takes no "
                               f"arguments and returns an nn.Module, e.g. tests.models:resnet20; wrap a class "
                               f"that needs arguments in a function") from None
    if not isinstance(model, torch.nn.Module):
        raise GeomCompileError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _example_inputs(shape: str | None):
    import torch
    return (torch.randn(*_parse_shape(shape)),) if shape else None


def cmd_plan(args) -> int:
    from .plan import plan
    model = _build_model(args.model)
    inputs = _example_inputs(args.input_shape)
    print(plan(model, args.policy, example_inputs=inputs).summary(chains=args.chains or None))
    return 0


def cmd_suggest(args) -> int:
    from .suggest import suggest_policy
    text = suggest_policy(_build_model(args.model), _example_inputs(args.input_shape))
    if args.output is None:
        print(text, end="")
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise GeomCompileError(f"cannot write {args.output!r}: {exc}. Fix: give a path in a folder you can "
                               f"write to, or leave out -o to print the policy") from None
    rules = sum(line.startswith("  - name: ") for line in text.splitlines())
    print(f"wrote {args.output} ({rules} rule{'s' if rules != 1 else ''}); check it with "
          f"`geomcompile plan {args.model} {args.output}"
          f"{' --input-shape ' + args.input_shape if args.input_shape else ''}`")
    return 0


def cmd_validate(args) -> int:
    import warnings
    from .errors import GeomCompileWarning
    from .policy import load_policy
    with warnings.catch_warnings():       # printed below as plain lines, with their file:line:column
        warnings.simplefilter("ignore", GeomCompileWarning)
        policy = load_policy(args.policy)
    print(policy.describe())
    for w in policy.config_warnings:
        print(f"warning: {w}")
    print(f"ok: {policy.source} is a valid version-{policy.version} policy ({len(policy.rules)} rules)")
    return 0


def cmd_schema(args) -> int:
    import json
    from .schema import policy_schema
    print(json.dumps(policy_schema(), indent=1, ensure_ascii=False))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(policy=args.policy, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, out_dir=args.out,
             seed=args.seed)
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import run_experiments
    run_experiments(args.paper, budget=args.budget, out_dir=args.out, progress=not args.no_progress)
    return 0


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def cmd_bench(args) -> int:
    from .bench import BenchConfig, run_and_report
    from .bench.workloads import DEFAULT_SYNTHETIC
    command = "geomcompile bench " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items()
        if key not in ("command", "func", "no_progress") and value is not None)
    if args.host_overhead:
        return _bench_host_overhead(args, command)
    config = BenchConfig(model=args.model, geometries=_comma_list(args.geometry or DEFAULT_GEOMETRIES),
                         policy=args.policy,
                         backends=_comma_list(args.backends), device=args.device, optimizer=args.optimizer,
                         steps=args.steps, warmup=args.warmup, train_steps=args.train_steps,
                         train_warmup=args.train_warmup, batch_size=args.batch_size,
                         synthetic=args.synthetic or DEFAULT_SYNTHETIC,
                         progress=not args.no_progress, command=command)
    run_and_report(config, json_path=args.json, png_path=args.png)
    return 0


DEFAULT_GEOMETRIES = "channel_directed,psi"


def _bench_host_overhead(args, command: str) -> int:
    if args.device != "cpu" or args.policy:
        raise GeomCompileError("--host-overhead runs on CPU with the kernel launches stubbed and takes "
                               "--geometry GEOMETRY[:OPTIMIZER],...; drop --device/--policy")
    if "geomcompile.kernels.psi" not in sys.modules:
        # The backend takes CPU tensors only in interpreter mode; the stubbed kernels never run.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .bench.host_overhead import DEFAULT_SUBJECTS, HostOverheadConfig, format_host_table, parse_subjects
    from .bench.report import write_json
    from .bench.workloads import DEFAULT_SYNTHETIC
    subjects = parse_subjects(args.geometry, args.optimizer) if args.geometry else DEFAULT_SUBJECTS
    config = HostOverheadConfig(model=args.model, subjects=subjects, backends=_comma_list(args.backends),
                                steps=args.steps or 200, warmup=10 if args.warmup is None else args.warmup,
                                synthetic=args.synthetic or DEFAULT_SYNTHETIC, command=command)
    from .bench.host_overhead import run_host_overhead
    result = run_host_overhead(config, echo=(lambda *_: None) if args.no_progress else print)
    print(format_host_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geomcompile", description="geometry-aware training for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="analyse a model and print which geometry a policy puts where")
    p.add_argument("model", help="MODULE:CALLABLE returning an nn.Module, e.g. tests.models:resnet20")
    p.add_argument("policy", help="policy file, shipped policy name (resnet, plain, ...) or YAML text")
    p.add_argument("--input-shape", help="shape of one example input batch, e.g. 1,3,32,32 (enables shapes)")
    p.add_argument("--chains", action="store_true",
                   help="list the G-chains (coupled conv/linear layers) and why the other layers are not "
                        "coupled; shown anyway when a rule uses gspace")
    p.set_defaults(func=cmd_plan)
    g = sub.add_parser("suggest", help="write a policy for a model from its analysis: which geometry for which "
                                       "parameters, and the facts that justify it")
    g.add_argument("model", help="MODULE:CALLABLE returning an nn.Module, e.g. tests.models:resnet20")
    g.add_argument("--input-shape", help="shape of one example input batch, e.g. 1,3,32,32 (a model torch.fx "
                                         "cannot trace needs it, and some facts need shapes)")
    g.add_argument("-o", "--output", help="write the policy to this file (default: print it)")
    g.set_defaults(func=cmd_suggest)
    v = sub.add_parser("validate", help="check a policy file without a model")
    v.add_argument("policy", help="policy file, shipped policy name (resnet, plain, ...) or YAML text")
    v.set_defaults(func=cmd_validate)
    s = sub.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the policy language, for editors")
    s.set_defaults(func=cmd_schema)
    d = sub.add_parser("demo", help="train a small BN ResNet on 8x8 digits with and without a policy")
    d.add_argument("--policy", default="resnet",
                   help="policy for the second run: file, shipped name or YAML text (default: resnet)")
    d.add_argument("--epochs", type=int, default=12, help="passes over the training set per run, >= 1 (default: 12)")
    d.add_argument("--batch-size", type=int, default=64, help="images per step, >= 1 (default: 64)")
    d.add_argument("--lr", type=float, default=0.05, help="learning rate of both runs, > 0 (default: 0.05)")
    d.add_argument("--seed", type=int, default=0, help="seed of the init, split and batches, >= 0 (default: 0)")
    d.add_argument("--out", default="demo_out", help="folder for the loss-curve PNG")
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("reproduce", help="rerun a small-scale experiment of a seed paper: claim, measured table, "
                                         "verdict, PNGs and JSON")
    r.add_argument("paper", choices=["000", "001", "002", "003", "004", "all"],
                   help="000 channel_directed, 001 FG-SGD (pom), 002 G-SGD (gspace), 003 PSI, 004 spectral, all")
    r.add_argument("--budget", default="full", choices=["full", "tiny"],
                   help="full: the committed runs (about 1-2 min each on 2 CPU cores); tiny: a smoke test")
    r.add_argument("--out", default=os.path.join("benchmarks", "results", "reproduce"),
                   help="folder for the JSON and PNG results (default: benchmarks/results/reproduce)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r.set_defaults(func=cmd_reproduce)
    b = sub.add_parser("bench", help="time optimizer and training steps: plain torch, geometry eager/compile/triton, "
                                     "copy bound")
    b.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56", "resnet50", "vgg16", "synthetic"],
                   help="parameter set; synthetic = a sweep of conv stacks (see --synthetic)")
    b.add_argument("--geometry",
                   help="comma list of geometries, each applied by its bench policy: channel_directed = sobolev "
                        "on convs and linears, psi = scale-invariant convs (default: both); with --host-overhead "
                        "GEOMETRY[:OPTIMIZER],... (default: psi:sgd_momentum,channel_directed:adam)")
    b.add_argument("--host-overhead", action="store_true",
                   help="instead: the host time per optimizer step of each backend with the kernel launches "
                        "stubbed, cached and fresh gradients, beside torch's foreach step (CPU; default 200 steps)")
    b.add_argument("--policy", help="a policy (file, shipped name or YAML) to benchmark instead of --geometry")
    b.add_argument("--backends", default="eager,compile,triton",
                   help="comma list; one that cannot run here is skipped with the reason")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    b.add_argument("--optimizer", default="sgd_momentum", choices=["sgd_momentum", "sgd", "adam", "adamw"],
                   help="base optimizer of every run (default: sgd_momentum)")
    b.add_argument("--steps", type=int, help="timed optimizer steps (default: 100 on CPU, 200 on CUDA)")
    b.add_argument("--warmup", type=int, help="untimed optimizer steps first (default: 10 CPU, 20 CUDA)")
    b.add_argument("--train-steps", type=int, help="timed full training steps, 0 to skip (default: 20 CPU, 100 CUDA)")
    b.add_argument("--train-warmup", type=int, help="untimed training steps first (default: 3 CPU, 10 CUDA)")
    b.add_argument("--batch-size", type=int, help="training-step batch (default: 8 on CPU, 128 on CUDA)")
    b.add_argument("--synthetic", help="for --model synthetic: COUNTxCHANNELS,... conv3x3-BN-ReLU stacks "
                                       "(default: 16x64,64x64,8x256)")
    b.add_argument("--json", help="write the results here (JSON)")
    b.add_argument("--png", help="write a bar chart here (PNG)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GeomCompileError as exc:
        print(f"geomcompile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
