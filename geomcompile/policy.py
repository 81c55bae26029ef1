"""The YAML policy language: which geometry each parameter gets, decided from the analysis facts.

    version: 1
    validate: strict                  # strict | warn (what resolve() does with model-dependent problems)
    rules:
      - name: bn-convs
        match: {param: "layer*.**.weight", kind: conv, scale_invariant: true}
        exclude: {param: "conv1.weight"}
        use: {psi: {max_norm: 1.0e4}}

A rule *matches* a parameter when every selector of ``match`` holds and not every selector of
``exclude`` does (exclusion wins). A rule uses at most one geometry per stage; for each parameter
and stage the first matching rule in file order that uses a geometry of that stage wins.
Selectors (``SELECTORS``): ``param`` / ``module`` (globs), ``kind``, ``scale_invariant``, ``depthwise``,
``g_coupled`` (a weight with a G-link to the next or previous layer, or the bias of such a weight:
the G-chains of ``analysis/coupling.py``), ``min_numel``, ``max_numel``, ``ndim``.

Loading always validates the document strictly (keys, types, geometry and option names, option
values); every error names ``file:line:column`` and says what to do. ``validate`` only governs the
problems that depend on the model, found by ``Policy.resolve``: a rule matching no parameter, and
a geometry that cannot apply to a parameter its rule matched (error in strict, warning in warn).
Neither is a problem where the policy says it is expected: a rule with ``optional: true`` may match
nothing (a linear-head rule on a fully convolutional net), and a geometry that cannot apply to a
parameter which a later rule covers for the same stage (``component: kernel`` on a 1x1 conv, taken
by a ``component: filter`` rule below) is a note. Problems of one cause are reported once, with the
count and the first names (``geomcompile.findings``); ``Resolution.warnings`` keeps one per parameter.

Names are canonical (``geomcompile.names``): without torch.compile / DDP / FSDP / checkpoint
wrapper components. A ``param``/``module`` glob written against a wrapped name (``module.head.weight``,
``_orig_mod.**``) is read without the wrapper components when, as written, it matches no name of the
model; the resolution's ``notes`` say so. An option combination that works but defeats its purpose
(``Geometry.config_warnings``) is a ``GeomCompileWarning`` at load time, placed at its ``use`` entry,
and is listed again in every resolution's ``warnings``.
"""
from __future__ import annotations

import difflib
import importlib.resources
import re
import warnings as _warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from . import geometries  # noqa: F401  (importing the package registers the geometries)
from .analysis.facts import KINDS, ParamFacts
from .errors import GeomCompileError, GeomCompileWarning
from .findings import Finding, group, mask
from .geometries.base import REGISTRY, STAGES, Geometry
from .names import canonical_name

TOP_KEYS = ("version", "validate", "rules", "description")
RULE_KEYS = ("name", "description", "optional", "match", "exclude", "use")
MODES = ("strict", "warn")
_BARE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _hint(word: Any, known) -> str:
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- positions ------------------------------------------------------------------------------
def _render(path: tuple) -> str:
    """("rules", 0, "use", "psi") -> "rules[0].use.psi"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _at_mark(source: str, mark) -> str:
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source


class _Locator:
    """Turns a path inside the document into "file:line:column" (YAML) or "<dict>:rules[0].use" (dict)."""

    def __init__(self, source: str, marks: dict | None = None, key_marks: dict | None = None):
        self.source, self.marks = source, marks
        self.key_marks = key_marks if key_marks is not None else {}

    def at(self, path: tuple, key: bool = False) -> str:
        if self.marks is None:
            return f"{self.source}:{_render(path)}" if path else self.source
        if key and path in self.key_marks:
            return _at_mark(self.source, self.key_marks[path])
        while path and path not in self.marks:
            path = path[:-1]
        return _at_mark(self.source, self.marks.get(path))

    def fail(self, path: tuple, message: str, key: bool = False):
        raise GeomCompileError(f"{self.at(path, key)}: {message}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats like 1e4 and 1.0e4 (PyYAML reads them as strings)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _parse_yaml(text: str, source: str) -> tuple[Any, _Locator]:
    """Parse YAML into plain data, keeping the start mark of every value and every mapping key."""
    loader = _Loader(text)
    marks, key_marks = {}, {}
    loc = _Locator(source, marks, key_marks)

    def convert(node, path):
        marks[path] = node.start_mark
        if isinstance(node, yaml.SequenceNode):
            return [convert(item, path + (i,)) for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            return loader.construct_object(node, deep=True)
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise GeomCompileError(f"{_at_mark(source, key_node.start_mark)}: keys must be names, "
                                       f"got {key!r}. Fix: quote it or rename it")
            key_marks[path + (key,)] = key_node.start_mark
            if key in out:
                loc.fail(path + (key,), f"duplicate key {key!r}. Fix: keep only one of them", key=True)
            out[key] = convert(value_node, path + (key,))
        return out

    try:
        node = loader.get_single_node()
        if node is None:
            raise GeomCompileError(f"{source}: the policy is empty. Fix: start it with `version: 1` "
                                   f"and a `rules:` list")
        return convert(node, ()), loc
    except yaml.MarkedYAMLError as e:
        where = _at_mark(source, e.problem_mark or e.context_mark)
        fix = "check indentation, colons and quotes here"
        if "alias" in str(e.problem):
            fix = 'quote patterns that start with * (YAML reads *x as an alias), e.g. "*.weight"'
        raise GeomCompileError(f"{where}: YAML syntax error: {e.problem or e.context}. Fix: {fix}") from None
    except yaml.YAMLError as e:
        raise GeomCompileError(f"{source}: YAML error: {e}") from None
    finally:
        loader.dispose()


# ---- selectors ------------------------------------------------------------------------------
def glob_to_regex(pattern: str) -> str:
    """Dotted-name glob -> regex: `*` any run without dots, `?` one non-dot character, a whole
    component `**` any number of components (zero included). Matched against the whole name."""
    parts: list[str] = []
    for part in pattern.split("."):
        if not (part == "**" and parts and parts[-1] == "**"):   # "**.**" is the same as "**"
            parts.append(part)
    if parts == ["**"]:
        return ".*"
    out = ""
    for i, part in enumerate(parts):
        if part == "**":
            out += r"(?:[^.]+\.)*" if i == 0 else r"(?:\.[^.]+)*"
            continue
        if i > 0 and not (i == 1 and parts[0] == "**"):
            out += r"\."
        out += "".join("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c)
                       for c in re.sub(r"\*+", "*", part))
    return out


class _Names:
    """All parameter and module names of one analysed model, for the wrapped-glob fallback."""

    def __init__(self, structure: Mapping[str, ParamFacts]):
        self.of = {"param": [n for f in structure.values() for n in (f.name, *f.aliases)],
                   "module": [m for f in structure.values() for m in _module_names(f)]}
        self._hits: dict = {}

    def hit(self, space: str, regex: re.Pattern) -> bool:
        key = (space, regex.pattern)
        if key not in self._hits:
            self._hits[key] = any(regex.fullmatch(n) for n in self.of[space])
        return self._hits[key]


@dataclass
class _PatternTest:
    """A `param` or `module` selector. A glob with wrapper components (``module.head.weight``)
    also has a canonical form, used where the glob as written matches no name of the model
    (so a user submodule really called ``module`` is still matched as written)."""

    space: str                                    # "param" or "module"
    names_of: Callable[[ParamFacts], list[str]]
    regexes: list[re.Pattern]
    canonical: list[tuple[str, re.Pattern, str, re.Pattern]]   # (glob, its regex, canonical glob, regex)
    where: str = ""

    def __call__(self, facts: ParamFacts, names: _Names | None = None) -> bool:
        own = self.names_of(facts)
        if any(r.fullmatch(n) for n in own for r in self.regexes):
            return True
        return any(canon.fullmatch(n) for _, literal, _, canon in self.canonical
                   if names is None or not names.hit(self.space, literal) for n in own)

    def notes(self, names: _Names) -> list[str]:
        return [f"{self.where}: {self.space} pattern {glob!r} names a wrapper (torch.compile `_orig_mod`, "
                f"DDP `module`, FSDP or checkpoint wrapper) and matches no name as written; geomcompile "
                f"names parameters without wrappers, so it was read as {canon_glob!r}. Fix: write "
                f"{canon_glob!r} in the policy"
                for glob, literal, canon_glob, canon in self.canonical
                if not names.hit(self.space, literal) and names.hit(self.space, canon)]


def _pattern_test(value, bad, names_of, space: str) -> _PatternTest:
    patterns = value if isinstance(value, list) else [value]
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        bad(f'expected a name pattern or a list of them, got {value!r}. Fix: write e.g. "layer*.**.weight" '
            f'or "re:.*\\.weight"')
    regexes, canonical = [], []
    for p in patterns:
        try:
            regexes.append(re.compile(p[3:] if p.startswith("re:") else glob_to_regex(p)))
        except re.error as e:
            bad(f"invalid regular expression {p[3:]!r}: {e}. Fix: correct it, or use a glob without 're:'")
        canon = canonical_name(p) if not p.startswith("re:") else p
        if canon != p:
            canonical.append((p, regexes[-1], canon, re.compile(glob_to_regex(canon))))
    return _PatternTest(space, names_of, regexes, canonical)


def _module_names(facts: ParamFacts) -> list[str]:
    """The consuming module, plus the owners of a shared parameter's other names."""
    owners = [a.rpartition(".")[0] for a in facts.aliases if "." in a]
    return ([facts.module] if facts.module is not None else []) + owners


def _kind_test(value, bad):
    kinds = value if isinstance(value, list) else [value]
    if not kinds:
        bad(f"empty kind list. Fix: give one or more of {', '.join(KINDS)}")
    for k in kinds:
        if not isinstance(k, str) or k not in KINDS:
            bad(f"unknown kind {k!r}{_hint(k, KINDS)}. Fix: use one of {', '.join(KINDS)}")
    return lambda facts: facts.kind in kinds


def _flag_test(read: Callable[[ParamFacts], bool]):
    def build(value, bad):
        if not isinstance(value, bool):
            bad(f"expected true or false, got {value!r}")
        return lambda facts: read(facts) == value
    return build


def _count_test(read: Callable[[ParamFacts], int], compare: Callable[[int, int], bool]):
    def build(value, bad):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            bad(f"expected an integer >= 0, got {value!r}")
        return lambda facts: compare(read(facts), value)
    return build


SELECTORS = {
    "param": lambda v, bad: _pattern_test(v, bad, lambda f: [f.name, *f.aliases], "param"),
    "module": lambda v, bad: _pattern_test(v, bad, _module_names, "module"),
    "kind": _kind_test,
    "scale_invariant": _flag_test(lambda f: f.scale_invariant is not None),
    "depthwise": _flag_test(lambda f: bool(f.depthwise)),
    "g_coupled": _flag_test(lambda f: f.g_coupled),    # a G-linked weight or its bias (analysis/coupling.py)
    "min_numel": _count_test(lambda f: f.numel, lambda n, v: n >= v),
    "max_numel": _count_test(lambda f: f.numel, lambda n, v: n <= v),
    "ndim": _count_test(lambda f: len(f.shape), lambda n, v: n == v),
}


def _compile_selectors(raw, path: tuple, loc: _Locator, what: str, patterns: list) -> Callable:
    """Validate a `match`/`exclude` mapping and return a test ``(facts, names=None) -> bool`` that
    holds when all selectors do. Name-pattern selectors are also appended to `patterns`."""
    if not isinstance(raw, Mapping):
        loc.fail(path, f"`{what}` must be a mapping of selectors ({', '.join(SELECTORS)}), got {raw!r}. "
                       f"Fix: write e.g. `{what}: {{kind: conv}}`" + ("; `match: {}` matches every parameter"
                                                                     if what == "match" else ""))
    tests = []
    for key, value in raw.items():
        if key not in SELECTORS:
            loc.fail(path + (key,), f"unknown selector {key!r}{_hint(key, SELECTORS)}. Fix: use one of "
                                    f"{', '.join(SELECTORS)}", key=True)
        test = SELECTORS[key](value, lambda msg, p=path + (key,): loc.fail(p, f"{what}.{key}: {msg}"))
        if isinstance(test, _PatternTest):
            test.where = loc.at(path + (key,))
            patterns.append(test)
        tests.append(test)
    return lambda facts, names=None: all(t(facts, names) if isinstance(t, _PatternTest) else t(facts)
                                         for t in tests)


# ---- rules ----------------------------------------------------------------------------------
@dataclass
class Rule:
    """One rule of a policy. ``use`` maps geometry names to configured geometry instances."""

    name: str
    match: dict
    exclude: dict | None
    use: dict[str, Geometry]
    where: str
    description: str = ""
    use_where: dict[str, str] = field(default_factory=dict, repr=False)   # geometry -> its position
    _match_test: Callable = field(default=lambda f, names=None: True, repr=False, compare=False)
    _exclude_test: Callable | None = field(default=None, repr=False, compare=False)
    config_warnings: list[str] = field(default_factory=list, repr=False)   # "file:line:col: ..." per use entry
    _patterns: list = field(default_factory=list, repr=False, compare=False)
    optional: bool = False      # matching no parameter of a model is expected (a note, not a problem)

    def matches(self, facts: ParamFacts, names: _Names | None = None) -> bool:
        """The match holds and the exclusion does not. `names` (all names of the model) decides
        whether a glob with wrapper components is read as written or without them; without it,
        either form matches."""
        return self._match_test(facts, names) and not (self._exclude_test is not None
                                                       and self._exclude_test(facts, names))

    def describe(self) -> str:
        flow = lambda d: yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10**6).strip()
        text = f"{self.name}: match {flow(self.match)}"
        if self.exclude is not None:
            text += f" exclude {flow(self.exclude)}"
        return f"{text} -> {', '.join(map(repr, self.use.values()))}  [{self.where}]"


def _check_keys(raw: Mapping, allowed, path: tuple, loc: _Locator, what: str) -> None:
    for key in raw:
        if key not in allowed:
            loc.fail(path + (key,), f"unknown key {key!r} in {what}{_hint(key, allowed)}. Fix: rename or "
                                    f"remove it; allowed keys are {', '.join(allowed)}", key=True)


def _build_geometry(cls: type[Geometry], opts, path: tuple, loc: _Locator) -> Geometry:
    """Validate a geometry's options (names, types, ranges) and construct it."""
    if opts is None:
        opts = {}
    if not isinstance(opts, Mapping):
        loc.fail(path, f"options of {cls.name} must be a mapping, got {opts!r}. Fix: write e.g. "
                       f"`{cls.name}: {{}}` for the defaults")
    for key, value in opts.items():
        spec = cls.options.get(key)
        if spec is None:
            known = ", ".join(cls.options) or "none"
            loc.fail(path + (key,), f"unknown option {key!r} for {cls.name}{_hint(key, cls.options)}. "
                                    f"Fix: rename or remove it; {cls.name} options: {known}", key=True)
        problem = spec.validate(value)
        if problem:
            loc.fail(path + (key,), f"{cls.name}.{key}: {problem}. Fix: give a valid value "
                                    f"({key}: {spec.doc}; default {spec.default!r})")
    try:
        return cls(**opts)
    except (GeomCompileError, TypeError, ValueError) as e:
        loc.fail(path, f"cannot configure {cls.name}: {e}")


def _build_use(raw, path: tuple, loc: _Locator, rule: str) -> tuple[dict, dict, list]:
    if not isinstance(raw, Mapping) or not raw:
        loc.fail(path, f"rule {rule!r}: `use` must map geometry names to options, got {raw!r}. "
                       f"Fix: write e.g. `use: {{psi: {{max_norm: 1.0e4}}}}`")
    use, where, stage_of, config_warnings = {}, {}, {}, []
    for name, opts in raw.items():
        cls = REGISTRY.get(name)
        if cls is None:
            loc.fail(path + (name,), f"unknown geometry {name!r}{_hint(name, REGISTRY)}. Fix: use one of "
                                     f"{', '.join(sorted(REGISTRY))}", key=True)
        if cls.stage in stage_of:
            loc.fail(path + (name,), f"rule {rule!r} uses two {cls.stage}-stage geometries "
                                     f"({stage_of[cls.stage]} and {name}); a parameter gets at most one "
                                     f"geometry per stage. Fix: keep one, or put the other in its own rule",
                     key=True)
        stage_of[cls.stage] = name
        use[name] = _build_geometry(cls, opts, path + (name,), loc)
        where[name] = loc.at(path + (name,), key=True)
        for text in use[name].config_warnings():
            message = f"{where[name]}: rule {rule!r}: {name}: {text}"
            config_warnings.append(message)
            _warnings.warn(message, GeomCompileWarning, stacklevel=2)
    return use, where, config_warnings


def _build_rule(raw, index: int, loc: _Locator) -> Rule:
    path = ("rules", index)
    if not isinstance(raw, Mapping):
        loc.fail(path, f"rule {index + 1} must be a mapping with keys {', '.join(RULE_KEYS)}, got {raw!r}")
    _check_keys(raw, RULE_KEYS, path, loc, f"rule {index + 1}")
    name = raw.get("name", f"rule{index + 1}")
    if not isinstance(name, str) or not name:
        loc.fail(path + ("name",), f"a rule name must be a non-empty string, got {name!r}")
    for needed, example in (("match", "`match: {kind: conv}` (`match: {}` matches every parameter)"),
                            ("use", "`use: {channel_directed: {metric: sobolev}}`")):
        if needed not in raw:
            loc.fail(path, f"rule {name!r} has no `{needed}`. Fix: add {example}")
    patterns: list[_PatternTest] = []
    match_test = _compile_selectors(raw["match"], path + ("match",), loc, "match", patterns)
    exclude = raw.get("exclude")
    if isinstance(exclude, Mapping) and not exclude:
        loc.fail(path + ("exclude",), f"rule {name!r}: an empty `exclude` would exclude every parameter. "
                                      f"Fix: remove it, or give selectors")
    exclude_test = None if exclude is None else _compile_selectors(exclude, path + ("exclude",), loc, "exclude",
                                                                   patterns)
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        loc.fail(path + ("optional",), f"rule {name!r}: `optional` must be true or false, got {optional!r}. "
                                       f"Fix: write `optional: true` for a rule some models have no parameters "
                                       f"for, or remove the key")
    use, use_where, config_warnings = _build_use(raw["use"], path + ("use",), loc, name)
    return Rule(name, dict(raw["match"]), None if exclude is None else dict(exclude), use, loc.at(path),
                str(raw.get("description", "")), use_where, match_test, exclude_test, config_warnings, patterns,
                optional)


# ---- policy ---------------------------------------------------------------------------------
@dataclass
class Resolution:
    """Result of matching a policy against a model's facts."""

    assignments: dict[str, dict[str, Geometry]]   # param -> {stage: geometry}, params with >= 1 geometry
    rule_of: dict[tuple[str, str], str]           # (param, stage) -> rule that assigned it
    rule_counts: dict[str, int]                   # rule -> parameters its selectors matched
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the policy was read (e.g. wrapped names)


class Policy:
    """A validated policy. Build it with ``load_policy``."""

    def __init__(self, rules: list[Rule], *, version: int = 1, validate: str = "strict",
                 source: str = "<dict>", description: str = ""):
        self.rules, self.version, self.validate = rules, version, validate
        self.source, self.description = source, description

    def __repr__(self) -> str:
        return (f"Policy({self.source!r}, version={self.version}, validate={self.validate!r}, "
                f"rules={[r.name for r in self.rules]})")

    def describe(self) -> str:
        """One line per rule: its selectors and geometries (for `geomcompile validate POLICY`)."""
        head = f"policy {self.source}: version {self.version}, validate {self.validate}, {len(self.rules)} rule(s)"
        return "\n".join([head] + [f"  {i}. {r.describe()}" for i, r in enumerate(self.rules, 1)])

    @property
    def config_warnings(self) -> list[str]:
        """Option combinations that work but defeat their purpose, "file:line:col: ..." per use entry."""
        return [w for rule in self.rules for w in rule.config_warnings]

    def _assign(self, facts: ParamFacts, counts: dict, problems: list, notes: list,
                names: _Names) -> dict[str, tuple[Geometry, Rule]]:
        """Per stage, the first matching rule (file order) whose geometry of that stage applies."""
        chosen: dict[str, tuple[Geometry, Rule]] = {}
        matching = [rule for rule in self.rules if rule.matches(facts, names)]
        for i, rule in enumerate(matching):
            counts[rule.name] += 1
            for gname, geometry in rule.use.items():
                if geometry.stage in chosen:
                    continue                    # shadowed by an earlier rule for this stage
                reason = geometry.check(facts)
                if reason is None:
                    chosen[geometry.stage] = (geometry, rule)
                    continue
                where, key = rule.use_where[gname], (rule.name, gname, mask(reason, facts.name, facts.module))
                later = next((r for r in matching[i + 1:] for g in r.use.values()
                              if g.stage == geometry.stage and g.check(facts) is None), None)
                if later is not None:           # the policy handles it further down, as designed
                    notes.append(Finding(
                        f"{where}: rule {rule.name!r} leaves {facts.name} to rule {later.name!r} for the "
                        f"{geometry.stage} stage ({gname} cannot apply to it: {reason})",
                        name=facts.name, key=key + (later.name,), head=f"{where}: rule {rule.name!r} leaves ",
                        tail=f" to rule {later.name!r} for the {geometry.stage} stage ({gname} cannot apply "
                             f"to them; for {facts.name}: {reason})"))
                    continue
                fix = type(geometry).match_hint
                problems.append(Finding(
                    f"{where}: rule {rule.name!r} uses {gname} on {facts.name}, which it cannot apply to: "
                    f"{reason}. Fix: {fix}, or exclude it.",
                    name=facts.name, key=key, head=f"{where}: rule {rule.name!r} uses {gname} on ",
                    tail=f", which it cannot apply to; for {facts.name}: {reason}. Fix: {fix}, or exclude them."))
        return chosen

    @staticmethod
    def _check_compatible(name: str, chosen: dict[str, tuple[Geometry, Rule]]) -> None:
        pairs = list(chosen.values())
        for i, (a, rule_a) in enumerate(pairs):
            for b, rule_b in pairs[i + 1:]:
                if a.name in type(b).incompatible or b.name in type(a).incompatible:
                    raise GeomCompileError(
                        f"{name} gets {a.name} from rule {rule_a.name!r} ({rule_a.use_where[a.name]}) and "
                        f"{b.name} from rule {rule_b.name!r} ({rule_b.use_where[b.name]}), which are "
                        f"incompatible. Fix: exclude {name} from one of the two rules")

    def resolve(self, structure: Mapping[str, ParamFacts]) -> Resolution:
        """Assign geometries to the parameters of an analysed model (see the module docstring)."""
        counts = {rule.name: 0 for rule in self.rules}
        assignments, rule_of, problems, later_notes = {}, {}, [], []
        names = _Names(structure)
        notes = [note for rule in self.rules for pattern in rule._patterns for note in pattern.notes(names)]
        for name, facts in structure.items():
            chosen = self._assign(facts, counts, problems, later_notes, names)
            self._check_compatible(name, chosen)
            if chosen:
                assignments[name] = {s: chosen[s][0] for s in STAGES if s in chosen}
                rule_of.update({(name, s): chosen[s][1].name for s in chosen})
        notes += group(later_notes)
        for rule in self.rules:
            if counts[rule.name] == 0 and rule.optional:
                notes.append(f"{rule.where}: rule {rule.name!r} (optional) matches no parameter of the model")
            elif counts[rule.name] == 0:
                fix = ("correct its selectors, remove the rule, or mark it `optional: true` if models without "
                       "such parameters are expected")
                problems.append(f"{rule.where}: rule {rule.name!r} matches no parameter of the model. Fix: "
                                + fix + (" (or set `validate: warn`)" if self.validate == "strict" else ""))
        if problems and self.validate == "strict":
            lines = group(problems)
            raise GeomCompileError(lines[0] if len(lines) == 1 else
                                   f"{len(lines)} problems (validate: strict):\n" + "\n".join(lines))
        return Resolution(assignments, rule_of, counts, list(self.config_warnings) + problems, notes)


def _build_policy(data, loc: _Locator) -> Policy:
    """Validate a whole document (already parsed) and build the Policy."""
    if not isinstance(data, Mapping):
        loc.fail((), f"a policy must be a mapping with keys {', '.join(TOP_KEYS)}, got {data!r}. "
                     f"Fix: start it with `version: 1` and a `rules:` list")
    _check_keys(data, TOP_KEYS, (), loc, "the policy")
    version = data.get("version")
    if "version" not in data:
        loc.fail((), "the policy has no `version`. Fix: add `version: 1` at the top")
    if type(version) is not int or version != 1:
        loc.fail(("version",), f"unsupported version {version!r}; this geomcompile reads version 1. "
                               f"Fix: write `version: 1`")
    mode = data.get("validate", "strict")
    if not isinstance(mode, str) or mode not in MODES:
        loc.fail(("validate",), f"`validate` must be strict or warn, got {mode!r}{_hint(mode, MODES)}. "
                                f"Fix: write `validate: strict` (errors) or `validate: warn` (warnings)")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        loc.fail(("rules",), f"`rules` must be a non-empty list of rules, got {raw_rules!r}. Fix: add "
                             f"`rules:` with items like `- {{name: convs, match: {{kind: conv}}, use: ...}}`")
    rules, seen = [], {}
    for i, raw in enumerate(raw_rules):
        rule = _build_rule(raw, i, loc)
        if rule.name in seen:
            loc.fail(("rules", i, "name"), f"duplicate rule name {rule.name!r} (first at {seen[rule.name]}). "
                                           f"Fix: give every rule its own name")
        seen[rule.name] = rule.where
        rules.append(rule)
    return Policy(rules, version=version, validate=mode, source=loc.source,
                  description=str(data.get("description", "")))


# ---- loading --------------------------------------------------------------------------------
def _shipped_dir():
    """The repo's policies/ folder when geomcompile is imported from a source checkout (so a checkout
    never reads the policies of another one that an editable install points at), else the installed
    package geomcompile.policies."""
    local = Path(__file__).resolve().parent.parent / "policies"
    if any(local.glob("*.yaml")):
        return local
    try:
        root = importlib.resources.files("geomcompile.policies")
        if any(p.name.endswith(".yaml") for p in root.iterdir()):
            return root
    except (ModuleNotFoundError, TypeError, OSError):
        pass
    return Path(__file__).resolve().parent.parent / "policies"


def shipped_policies() -> list[str]:
    """Names of the policies shipped with geomcompile (loadable as ``load_policy(name)``)."""
    root = _shipped_dir()
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")) if root.is_dir() else []


def _load_file(path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GeomCompileError(f"cannot read policy file {str(path)!r}: {e}. Fix: check the path; shipped "
                               f"policies are {', '.join(shipped_policies())}") from None
    return _build_policy(*_parse_yaml(text, str(path)))


def _is_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).is_file()
    except (OSError, ValueError):
        return False


def load_policy(src) -> Policy:
    """Load and validate a policy from a file path, a shipped name ("resnet", "plain"), a YAML
    string, a dict, or a Policy (returned as is)."""
    if isinstance(src, Policy):
        return src
    if isinstance(src, Mapping):
        return _build_policy(src, _Locator("<dict>"))
    if isinstance(src, Path):
        return _load_file(src)
    if not isinstance(src, str):
        raise GeomCompileError(f"load_policy expects a path, a shipped policy name ({', '.join(shipped_policies())}), "
                               f"a YAML string, a dict or a Policy; got {type(src).__name__}")
    if _is_file(src):
        return _load_file(Path(src))
    if _BARE_NAME.fullmatch(src):
        names = shipped_policies()
        if src not in names:
            raise GeomCompileError(f"unknown policy {src!r}{_hint(src, names)}: no such file and no shipped "
                                   f"policy of that name. Fix: use one of {', '.join(names)} or a path to a .yaml file")
        return _load_file(_shipped_dir().joinpath(src + ".yaml"))
    if "\n" not in src and src.endswith((".yaml", ".yml")):
        raise GeomCompileError(f"policy file {src!r} not found. Fix: check the path")
    return _build_policy(*_parse_yaml(src, "<string>"))
