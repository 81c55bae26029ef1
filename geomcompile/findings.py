"""Warnings and notes about single parameters, and how reports group them: one line per cause.

A geometry or the policy resolution that finds a problem with one parameter returns a
``Finding``: a ``str`` (the full sentence naming that parameter, as programs read it from
``plan.warnings``) that also carries its cause. ``group`` turns a list of them into one line per
cause, with the count and the first few names:

    rule 'psi-convs': psi on 53 parameters (conv1.weight, layer1.0.conv1.weight, ... and 50 more)
    whose param group has weight_decay=0.01, ...
"""
from __future__ import annotations

import re

from .names import short_list


class Finding(str):
    """One parameter's instance of a cause. ``str(finding)`` is the full sentence about ``name``;
    ``key`` is the same for every parameter with the same cause; ``head + <names> + tail`` is the
    grouped sentence (``<names>`` is "N parameters (a, b, ...)")."""

    name: str
    key: tuple
    head: str
    tail: str

    def __new__(cls, text: str, *, name: str, key: tuple, head: str, tail: str) -> "Finding":
        self = super().__new__(cls, text)
        self.name, self.key, self.head, self.tail = name, key, head, tail
        return self

    def __reduce__(self):          # picklable / deep-copyable like the str it is
        return (_rebuild, (str(self), self.name, self.key, self.head, self.tail))


def _rebuild(text, name, key, head, tail) -> Finding:
    return Finding(text, name=name, key=key, head=head, tail=tail)


def mask(text: str, *names: str | None) -> str:
    """`text` without the given names and without shapes, for grouping reasons that quote them."""
    for n in sorted({n for n in names if n}, key=len, reverse=True):
        text = text.replace(n, "<name>")
    return re.sub(r"\((?:\d+, )*\d*,?\)|\d+x\d+(?:x\d+)*", "<shape>", text)


def name_list(names: list[str], n: int = 3) -> str:
    """'a, b, c and 50 more'."""
    return short_list(names, n)


def group(messages: list[str]) -> list[str]:
    """One line per cause, in order of first appearance. A cause with one parameter keeps its full
    sentence; plain strings are de-duplicated."""
    order: dict = {}
    for m in messages:
        key = m.key if isinstance(m, Finding) else ("text", str(m))
        order.setdefault(key, []).append(m)
    lines = []
    for members in order.values():
        first = members[0]
        names = list(dict.fromkeys(m.name for m in members)) if isinstance(first, Finding) else []
        if len(names) <= 1:
            lines.append(str(first))
        else:
            lines.append(f"{first.head}{len(names)} parameters ({name_list(names)}){first.tail}")
    return lines
