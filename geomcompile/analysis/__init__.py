"""Analysis passes: capture the model, then write per-parameter facts (layout, invariance, shapes)."""
from __future__ import annotations

from torch import nn

from ..capture import capture
from ..errors import GeomCompileError
from .facts import Absorber, ParamFacts, ScaleInvariance, Structure
from .invariance import analyze_invariance
from .layout import layout_facts, param_uses

__all__ = ["analyze", "Absorber", "ParamFacts", "ScaleInvariance", "Structure"]


def analyze(model: nn.Module, example_inputs=None) -> Structure:
    """Facts for every parameter of `model`: kind, out_dim, groups, depthwise, scale invariance, shapes.

    example_inputs: a tuple of inputs (or one tensor) for one forward call. Needed when the
    model cannot be traced symbolically, and for shapes (input sizes, ranks of Linear outputs).
    The model is left as it was (mode, buffers, RNG state).
    """
    if not isinstance(model, nn.Module):
        raise GeomCompileError(f"gc.analyze expects a torch.nn.Module, got {type(model).__name__}")
    from ..names import unwrap_model
    model, peeled = unwrap_model(model)      # torch.compile / DDP: analyse the user's own module
    cap = capture(model, example_inputs)
    primary: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in primary:
            aliases[primary[id(p)]].append(name)
        else:
            primary[id(p)] = name
            aliases[name] = []
            params[name] = p
    uses = param_uses(cap, primary, params)
    facts: dict[str, ParamFacts] = {}
    for name, p in params.items():
        f = layout_facts(name, p, uses[name], cap)
        f.aliases = tuple(aliases[name])
        if not uses[name]:
            f.invariance_reason = "not used by any op in the captured graph"
            f.absorbers_reason = "not scale-invariant: absorbers are recorded only for scale-invariant weights"
        else:
            analyze_invariance(f, uses[name], cap)
        facts[name] = f
    notes = list(cap.notes)
    if peeled:
        notes.append(f"analysed the module inside {' > '.join(peeled)}; parameter names are its own")
    if not cap.has_shapes:
        notes.append("no example_inputs: shapes unknown (Linear->BatchNorm1d invariance and input sizes "
                     "need them)")
    return Structure(facts, cap.path, notes)
