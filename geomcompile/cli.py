"""Command line: `geomcompile plan|validate|demo` (also `python -m geomcompile`)."""
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
        raise GeomCompileError(f"{module_name!r} has no attribute {attr!r}") from None


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise GeomCompileError(f"--input-shape expects comma-separated integers like 1,3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise GeomCompileError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def cmd_plan(args) -> int:
    import torch
    from .plan import plan
    factory = _load_factory(args.model)
    model = factory()
    inputs = (torch.randn(*_parse_shape(args.input_shape)),) if args.input_shape else None
    print(plan(model, args.policy, example_inputs=inputs).summary())
    return 0


def cmd_validate(args) -> int:
    from .policy import load_policy
    policy = load_policy(args.policy)
    print(policy.describe())
    print(f"ok: {policy.source} is a valid version-{policy.version} policy ({len(policy.rules)} rules)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(policy=args.policy, epochs=args.epochs, out_dir=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geomcompile", description="geometry-aware training for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="analyse a model and print which geometry a policy puts where")
    p.add_argument("model", help="MODULE:CALLABLE returning an nn.Module, e.g. tests.models:resnet20")
    p.add_argument("policy", help="policy file, shipped policy name (resnet, plain, ...) or YAML text")
    p.add_argument("--input-shape", help="shape of one example input batch, e.g. 1,3,32,32 (enables shapes)")
    p.set_defaults(func=cmd_plan)
    v = sub.add_parser("validate", help="check a policy file without a model")
    v.add_argument("policy")
    v.set_defaults(func=cmd_validate)
    d = sub.add_parser("demo", help="train a small BN ResNet on 8x8 digits with and without a policy")
    d.add_argument("--policy", default="resnet")
    d.add_argument("--epochs", type=int, default=12)
    d.add_argument("--out", default="demo_out", help="folder for the loss-curve PNG")
    d.set_defaults(func=cmd_demo)
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
