"""Node specs: which children of a hop run a job, and what each hands further down.

The grammar is the seed's::

    <nodes>   ::= <nodeset> | <nodeset> "/" <nodeset> | <nodeset> "," <nodes>
    <nodeset> ::= <node> | <node> "-" <node>
    <node>    ::= "." | <number>

`,` binds loosest, then `/`, then `-`; `/` nests to the right (`1/2/.`). A spec is
parsed once, on the client, so that a typo is reported with its position before any
byte is sent; every hop then only calls :func:`select` on the parsed form, which it
receives as a tuple of :class:`Term`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["SpecError", "Term", "Spec", "parse", "format_spec", "select", "missing", "fold"]

# Ids are small (a parent has at most a few hundred children); the cap keeps a spec like
# 1-4000000000 from making every hop enumerate billions of ids.
MAX_ID = 99_999


class SpecError(ValueError):
    """A malformed spec, located precisely so the user can fix it without guessing."""

    def __init__(self, spec: str, position: int, reason: str) -> None:
        super().__init__(f"bad node spec {spec!r} at position {position}: {reason}")
        self.spec = spec
        self.position = position
        self.reason = reason


@dataclass(frozen=True)
class Term:
    """One comma-separated part of a spec.

    ``ids`` holds inclusive ranges of child ids, or None for "." (every child);
    ``sub`` is what a selected child receives to choose among its own children.
    """

    ids: tuple[tuple[int, int], ...] | None
    sub: Term | None = None


Spec = tuple[Term, ...]


_NUMBER = re.compile(r"[0-9]+")


class _Parser:
    """Recursive descent over the spec text; keeps the position for error messages."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, reason: str, position: int | None = None) -> SpecError:
        return SpecError(self.text, self.pos if position is None else position, reason)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def spec(self) -> Spec:
        terms = [self.term()]
        while self.peek() == ",":
            self.pos += 1
            terms.append(self.term())
        if self.pos < len(self.text):
            raise self.fail(f"expected ',' or '/' but {_describe(self.peek())}")
        return tuple(terms)

    def term(self) -> Term:
        ids = self.nodeset()
        if self.peek() != "/":
            return Term(ids)
        self.pos += 1
        return Term(ids, self.term())

    def nodeset(self) -> tuple[tuple[int, int], ...] | None:
        start = self.pos
        low = self.node()
        if self.peek() != "-":
            return None if low is None else ((low, low),)
        if low is None:
            raise self.fail("'.' cannot start a range (it already means every child)", start)
        self.pos += 1
        high = self.node()
        if high is None:
            raise self.fail("'.' cannot end a range", self.pos - 1)
        if high < low:
            raise self.fail(f"range {low}-{high} runs backwards (write the low id first)", start)
        return ((low, high),)

    def node(self) -> int | None:
        """Read "." (returns None) or a number."""
        char = self.peek()
        if char == ".":
            self.pos += 1
            return None
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            raise self.fail(f"expected a node number or '.' but {_describe(char)}")
        number = int(match.group())
        if number > MAX_ID:
            raise self.fail(f"node id {number} is larger than {MAX_ID}")
        self.pos = match.end()
        return number


def _describe(char: str) -> str:
    if char == "":
        return "the spec ends"
    if char.isspace():
        return "found whitespace (write the spec without spaces)"
    return f"found {char!r}"


def parse(text: str) -> Spec:
    """Parse a node spec; raises :class:`SpecError` naming the position of the first fault."""
    return _Parser(text).spec()


def _format_term(term: Term) -> list[str]:
    """Format one term as comma-separated parts.

    The grammar gives each part one range, so a term holding several ranges (or handing
    down several) becomes one part per combination; :func:`select` treats both alike.
    """
    if term.ids is None:
        heads = ["."]
    else:
        heads = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in term.ids]
    if term.sub is None:
        return heads
    return [f"{head}/{tail}" for head in heads for tail in _format_term(term.sub)]


def format_spec(spec: Spec) -> str:
    """The text that :func:`parse` turns back into ``spec``; "" for the empty spec."""
    return ",".join(part for term in spec for part in _format_term(term))


def _matches(term: Term, child: int) -> bool:
    return term.ids is None or any(lo <= child <= hi for lo, hi in term.ids)


def select(spec: Spec, child_ids: Iterable[int]) -> dict[int, Spec]:
    """Map each live child the spec names to the sub-spec it must apply below itself.

    A child named by several terms gets the subs of all of them (duplicates dropped), so
    `1/2,1/3` asks child 1 to run and to hand the job on to its children 2 and 3.
    """
    chosen: dict[int, Spec] = {}
    for child in child_ids:
        matching = [term for term in spec if _matches(term, child)]
        if matching:
            subs = (term.sub for term in matching if term.sub is not None)
            chosen[child] = tuple(dict.fromkeys(subs))
    return chosen


def missing(spec: Spec, child_ids: Iterable[int]) -> list[int]:
    """Ids named explicitly at this level that are not live, so they can be reported as lost.

    "." means "whatever is there", so it never makes an id missing.
    """
    live = set(child_ids)
    named = {
        child
        for term in spec
        if term.ids is not None
        for lo, hi in term.ids
        for child in range(lo, hi + 1)
    }
    return sorted(named - live)


_NUMBERED = re.compile(r"(.*?)([0-9]+)")


def fold_numbers(numbers: list[int], width: int = 0) -> str:
    """Turn sorted unique numbers into "1-3,5", zero-padded to ``width``."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    texts = [(str(lo).zfill(width), str(hi).zfill(width)) for lo, hi in runs]
    return ",".join(lo if lo == hi else f"{lo}-{hi}" for lo, hi in texts)


def fold(names: Iterable[str]) -> str:
    """Fold node names the way clush prints them: kn1,kn2,kn3,kn5 -> kn[1-3,5].

    Names are grouped by the text before their trailing digits. Zero-padded numbers
    (n01) only fold with numbers of the same width, so every name comes back exactly.
    """
    groups: dict[tuple[str, int], set[int]] = {}
    plain: set[str] = set()
    for name in names:
        match = _NUMBERED.fullmatch(name)
        if match is None:
            plain.add(name)
            continue
        prefix, digits = match.groups()
        width = len(digits) if digits.startswith("0") and len(digits) > 1 else 0
        groups.setdefault((prefix, width), set()).add(int(digits))
    parts: list[tuple[str, int, str]] = [(name, -1, name) for name in plain]
    for (prefix, width), numbers in groups.items():
        ordered = sorted(numbers)
        folded = fold_numbers(ordered, width)
        text = f"{prefix}{folded}" if len(ordered) == 1 else f"{prefix}[{folded}]"
        parts.append((prefix, ordered[0], text))
    return ",".join(text for _, _, text in sorted(parts))
