"""The policy loader never crashes, hangs or accepts a value that breaks training (issue 15, R9).

Every input either loads or raises GeomCompileError naming file:line:column; each load runs under
a time limit that this test enforces itself (SIGALRM), so a hang fails the test instead of
blocking the suite. The numbers quoted in the comments are what the loader did before.
"""
from __future__ import annotations

import contextlib
import re
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geomcompile as gc
from geomcompile.errors import GeomCompileError

LIMIT_S = 10          # far above any real load (a policy loads in ~1 ms); only a hang reaches it
POSITION = re.compile(r"^<string>:\d+:\d+: ")

BASE = ("version: 1\nrules:\n  - name: convs\n    match: {kind: conv}\n"
        "    use: {USE}\n")


class _Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int = LIMIT_S):
    def on_alarm(signum, frame):
        raise _Hang(f"the policy loader ran for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def load_or_error(text) -> gc.Policy | GeomCompileError:
    """Load under the time limit: a Policy, or the GeomCompileError it raised. Anything else
    (another exception type, a hang) fails the calling test."""
    with time_limit():
        try:
            return gc.load_policy(text)
        except GeomCompileError as e:
            return e


def policy(use: str) -> str:
    return BASE.replace("{USE}", use)


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# Each of these raised another exception type, recursed, ran for seconds or was silently accepted.
BAD_DOCUMENTS = {
    "control character": (policy("{psi: {}}") + "\x07", "U+0007"),          # ReaderError
    "lone surrogate": (policy("{psi: {}}").replace("convs", "convs\ud800"), "U+D800"),
    "!!int abc": (policy("{psi: {max_norm: !!int abc}}"), "cannot read 'abc'"),          # ValueError
    "!!float abc": (policy("{psi: {max_norm: !!float abc}}"), "cannot read 'abc'"),
    "!!bool abc": (policy("{psi: {max_norm: !!bool abc}}"), "cannot read 'abc'"),        # KeyError
    "!!timestamp abc": (policy("{psi: {max_norm: !!timestamp abc}}"), "tag"),         # AttributeError
    "4300-digit integer": (policy("{pom: {seed: " + "9" * 4300 + "}}"), "4300 digits"),  # ValueError
    "600 block levels": ("a:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(600)) + "  " * 601 + "1\n",
                         "deeper than 64"),                                           # RecursionError
    "3000 flow levels": ("[" * 3000 + "]" * 3000, "deeper than 64"),
    "alias bomb": (_bomb(), "more than 100,000 values"),                              # > 20 s
    "recursive alias": ("a: &a [*a]\n", "deeper than 64"),
    "python tag on a mapping": (policy("!!python/object:collections.OrderedDict {psi: {}}"), "tag"),  # dropped
    "python tag on a document": ("!!python/object/apply:os.system\nargs: [ls]\n", "tag"),
    "set tag": (policy("!!set {psi: {}}"), "tag"),
    "merge key": ("x: &x {kind: conv}\n" + policy("{psi: {}}").replace("{kind: conv}", "{<<: *x}"), "merge keys"),
    "complex key": ("? [a, b]\n: 1\n", "complex keys"),
    "mix: .inf": (policy("{channel_directed: {mix: .inf}}"), "not a finite number"),    # NaN at step 1
    "coef: .inf": (policy("{spectral: {coef: .inf}}"), "not a finite number"),
    "alpha: 1e400": (policy("{spectral: {alpha: 1e400}}"), "not a finite number"),
    "radius: .inf": (policy("{pom: {radius: .inf}}"), "not a finite number"),
    "lam: .nan": (policy("{channel_directed: {lam: .nan}}"), "not a finite number"),
    "radius: 1e300": (policy("{pom: {radius: 1e300}}"), "must be <= 65504"),            # overflow at install
    "power_iters 1e12": (policy("{spectral: {power_iters: 1000000000000}}"), "must be <= 1000"),  # hangs
    "init_iters 1e9": (policy("{spectral: {init_iters: 1000000000}}"), "must be <= 10000"),
    "block 1e6": (policy("{spectral: {block: 1000000}}"), "must be <= 64"),
    "seed 2**70": (policy("{pom: {seed: " + str(2 ** 70) + "}}"), "must be <="),
}


@pytest.mark.parametrize("name", list(BAD_DOCUMENTS))
def test_bad_document_is_a_positioned_error(name):
    text, fragment = BAD_DOCUMENTS[name]
    result = load_or_error(text)
    assert isinstance(result, GeomCompileError), f"{name}: loaded {result!r}"
    message = str(result)
    assert POSITION.match(message), message
    assert fragment in message, message
    assert "Fix:" in message, message


@pytest.mark.parametrize("use, fragment", [
    ({"channel_directed": {"mix": float("inf")}}, "must be a finite number"),
    ({"spectral": {"alpha": float("nan")}}, "must be a finite number"),
    ({"pom": {"radius": 1e300}}, "must be <= 65504"),
    ({"spectral": {"power_iters": 10 ** 12}}, "must be <= 1000"),
])
def test_dict_policies_get_the_same_range_checks(use, fragment):
    with pytest.raises(GeomCompileError, match=re.escape(fragment)):
        gc.load_policy({"version": 1, "rules": [{"match": {"kind": "conv"}, "use": use}]})


@pytest.mark.parametrize("use", ["{spectral: {power_iters: 1000, init_iters: 10000, block: 64}}",
                                 "{pom: {radius: 65504, seed: 9223372036854775807}}",
                                 "{channel_directed: {lam: 1.0e6, mix: 0}}",
                                 "{psi: {max_norm: 1.0e30}}"])
def test_values_at_the_documented_limits_load(use):
    assert isinstance(load_or_error(policy(use)), gc.Policy)


def test_aliases_within_the_limit_still_work():
    text = ("version: 1\nrules:\n  - name: a\n    match: &m {kind: conv}\n    use: &u {psi: {max_norm: 1.0e4}}\n"
            "  - name: b\n    match: *m\n    use: *u\n")
    loaded = load_or_error(text)
    assert isinstance(loaded, gc.Policy), loaded
    assert [r.use["psi"].opts["max_norm"] for r in loaded.rules] == [1e4, 1e4]


# ---- fuzz -----------------------------------------------------------------------------------
VALID = policy("{spectral: {coef: 1.0e-4, power_iters: 2}}") + \
    "  - name: lin\n    match: {kind: linear, param: \"*.weight\"}\n    use: {channel_directed: {lam: 0.5}}\n"
ODD_CHARACTERS = ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\ud800", "\udfff", "\ufeff", "\u2028", "\U0001F600",
                  "\t", "\r", "\n", "&", "*", "!", "!!", "<<", "{", "}", "[", "]", ":", "-", "?", "|", ">", "%",
                  "@", "`", "#", "'", '"', "\\"]
TAGS = ["!!int", "!!float", "!!bool", "!!str", "!!null", "!!timestamp", "!!binary", "!!set", "!!omap", "!!map",
        "!!seq", "!!python/object:os.system", "!!python/name:os.system", "!local", "!", "!!merge", "!<tag:x>"]
SCALARS = ["abc", ".inf", "-.inf", ".nan", "1e400", "1e-400", "9" * 50, "0x" + "f" * 40, "1_000", "0o17",
           "1:30:00", "~", "null", "yes", "on", "2001-12-14", "-0", "1e12", "-1", "0", "3.5", '""']


@st.composite
def mutated_policies(draw):
    """The valid policy with random edits: inserted odd characters, tags, anchors and aliases,
    odd scalars in option positions, deep nesting, alias bombs."""
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "tag", "scalar", "nest", "bomb", "anchor"]))
        at = draw(st.integers(0, len(text)))
        if op == "insert":
            piece = draw(st.lists(st.sampled_from(ODD_CHARACTERS) | st.characters(), min_size=1, max_size=5))
            text = text[:at] + "".join(piece) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        elif op == "tag":
            text = text[:at] + draw(st.sampled_from(TAGS)) + " " + text[at:]
        elif op == "scalar":
            text = text.replace("2}", draw(st.sampled_from(SCALARS)) + "}", 1) if "2}" in text else \
                text.replace("0.5", draw(st.sampled_from(SCALARS)), 1)
        elif op == "nest":
            depth = draw(st.integers(1, 400))
            text = text[:at] + "[" * depth + "1" + "]" * depth + text[at:]
        elif op == "bomb":
            text = _bomb(draw(st.integers(2, 10))) + text
        else:
            text = text[:at] + draw(st.sampled_from(["&x ", "*x ", "*undefined ", "&x [*x] "])) + text[at:]
    return text


FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(mutated_policies())
def test_fuzz_mutated_policies_load_or_raise_a_positioned_error(text):
    result = load_or_error(text)
    if isinstance(result, GeomCompileError):
        assert str(result).startswith("<string>"), str(result)


@FUZZ
@given(st.lists(st.sampled_from(ODD_CHARACTERS) | st.characters(), max_size=200))
def test_fuzz_arbitrary_text_loads_or_raises(pieces):
    load_or_error("".join(pieces))


@settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20),
       st.sampled_from(["channel_directed", "psi", "pom", "spectral"]),
       st.sampled_from(["lam", "mix", "max_norm", "radius", "seed", "power_iters", "alpha", "coef", "block",
                        "metric", "manifold", "every", "tol"]))
def test_fuzz_option_values_of_any_type(value, geometry, option):
    """Any value in any option position, from YAML and as a dict: loads or is a GeomCompileError."""
    import yaml
    try:
        text = policy(yaml.safe_dump({geometry: {option: value}}, default_flow_style=True, width=10 ** 6).strip())
    except yaml.YAMLError:
        return
    load_or_error(text)
    with time_limit():
        try:
            gc.load_policy({"version": 1, "rules": [{"match": {"kind": "conv"}, "use": {geometry: {option: value}}}]})
        except GeomCompileError:
            pass
