"""Analysis passes: capture the model, then write per-parameter facts (layout, invariance, shapes)."""
from __future__ import annotations

from torch import nn

from ..capture import capture
from ..errors import GeomCompileError
from ..names import canonical_named_parameters, unwrap_model
from .coupling import analyze_coupling
from .facts import Absorber, ParamFacts, ScaleInvariance, Structure
from .invariance import analyze_invariance
from .layout import layout_facts, param_uses
from .unshard import full_parameters

__all__ = ["analyze", "Absorber", "ParamFacts", "ScaleInvariance", "Structure"]


def analyze(model: nn.Module, example_inputs=None) -> Structure:
    """Facts for every parameter of `model`: kind, out_dim, groups, depthwise, scale invariance, shapes,
    G-chain links (``g_next`` / ``g_prev`` ..., ``analysis/coupling.py``).

    example_inputs: the inputs of one forward call, in one of these forms:

    * a tuple or list: positional inputs, ``model(*example_inputs)``;
    * one tensor: ``model(example_inputs)``;
    * a ``Mapping`` (a Hugging Face batch): keyword inputs, ``model(**example_inputs)``. A forward
      that takes one dict positionally gets ``(batch,)``;
    * ``geomcompile.capture.ExampleInputs(args, kwargs)``: both, for a forward that needs
      positional-only and keyword inputs together.

    Needed when the model cannot be traced symbolically, and for shapes (input sizes, ranks of
    Linear outputs). The model is left as it was (mode, buffers, RNG state).

    torch.compile, DDP/DataParallel, FSDP1 and checkpoint wrappers are seen through: the facts
    are keyed by canonical names (``geomcompile.names``), those of the unwrapped model.
    """
    if not isinstance(model, nn.Module):
        raise GeomCompileError(f"gc.analyze expects a torch.nn.Module, got {type(model).__name__}")
    with full_parameters(model):      # FSDP2: analyse the unsharded structure (analysis/unshard.py)
        return _analyze(model, example_inputs)


def _analyze(model: nn.Module, example_inputs) -> Structure:
    cap = capture(model, example_inputs)          # peels the root's wrappers itself, and says so
    primary: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    params = {}
    for name, p in canonical_named_parameters(model, remove_duplicate=False):
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
    analyze_coupling(facts, uses, cap)            # G-chains: needs every layer's facts (design gspace.md §8)
    notes = list(cap.notes) + _mode_notes(model)
    notes += [f"{name}: {note}" for name, f in facts.items() if f.kind == "other" for note in f.notes]
    if not cap.has_shapes:
        notes.append("no example_inputs: shapes unknown (Linear->BatchNorm1d invariance and input sizes "
                     "need them)")
    return Structure(facts, cap.path, notes)


def _mode_notes(model: nn.Module) -> list[str]:
    """What the analysis assumes about training mode, when the model is not simply in training mode."""
    inner, _ = unwrap_model(model)
    stats = [n for n, m in inner.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             and m.track_running_stats and m.running_mean is not None]
    if inner.training:
        frozen = [n for n in stats if not inner.get_submodule(n).training]
        if not frozen:
            return []
        return [f"{', '.join(frozen[:5])}{' and more' if len(frozen) > 5 else ''} in eval mode while the model "
                f"is in training mode (frozen statistics): they normalise with running statistics, which "
                f"absorb no scaling, so weights they normalise are not claimed scale-invariant"]
    return [f"the model is in eval mode; it was analysed as in training mode"
            + (f" (BatchNorm/InstanceNorm with batch statistics: {', '.join(stats[:3])}"
               f"{' ...' if len(stats) > 3 else ''})" if stats else "")
            + ". Scale invariance holds for training in training mode; a model trained with frozen "
              "(eval-mode) normalisation statistics is not scale-invariant, and psi must not be used on it"]
