"""Node specs: which children of a hop run a job, and what each hands further down.

The grammar is the seed's::

    <nodes>   ::= <nodeset> | <nodeset> "/" <nodeset> | <nodeset> "," <nodes>
    <nodeset> ::= <node> | <node> "-" <node>
    <node>    ::= "." | <number>

`,` binds loosest, then `/`, then `-`; `/` nests to the right (`1/2/.`). A spec is
parsed once, on the client, so that a typo is reported with its position before any
byte is sent; every hop then only calls :func:`select` on the parsed form, which it
receives as a tuple of :class:`Term`.

A spec arrives from users and, at every hop, from the wire, so its cost is bounded where it
is parsed: at most :data:`MAX_LENGTH` characters and :data:`MAX_DEPTH` levels (``1/2/.`` has
three). The parser counts levels as it reads rather than recursing per level, and every
function here walks a term's levels in a loop, so no spec, however deep, can exhaust the
Python stack; the limits keep what :func:`select` and :func:`missing` do per hop small.
"""

from __future__ import annotations

import itertools
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from gproc.errors import GprocError

__all__ = [
    "MAX_DEPTH",
    "MAX_ID",
    "MAX_LENGTH",
    "SpecError",
    "Term",
    "Spec",
    "parse",
    "depth",
    "format_spec",
    "select",
    "missing",
    "fold",
]

# Ids are small (a parent has at most a few hundred children); the cap keeps a spec like
# 1-4000000000 from making every hop enumerate billions of ids.
MAX_ID = 99_999

# Levels one term may name: a real tree is 2 to 4 deep (master, rack masters, nodes), so 32
# leaves room for any tree anyone builds while keeping every walk down a term short.
MAX_DEPTH = 32

# Characters in a spec. A spec is typed by a person: 4096 is the line a terminal accepts
# (the Linux tty's canonical input limit) and holds an explicit list of ~800 scattered ids,
# while bounding the terms every hop matches against each of its children.
MAX_LENGTH = 4096

# How much of a long spec an error message quotes on each side of the fault.
_QUOTE = 32


def _quote(spec: str, position: int) -> str:
    """The spec as an error message shows it: whole when short, else around ``position``."""
    if len(spec) <= 2 * _QUOTE + 8:
        return repr(spec)
    start, end = max(position - _QUOTE, 0), min(position + _QUOTE, len(spec))
    text = ("..." if start else "") + spec[start:end] + ("..." if end < len(spec) else "")
    return f"{text!r} ({len(spec)} characters)"


class SpecError(GprocError, ValueError):
    """A malformed spec, located precisely so the user can fix it without guessing.

    ``spec`` is the whole text and ``position`` the index of the fault in it; the message
    quotes a long spec only around that position.
    """

    def __init__(self, spec: str, position: int, reason: str) -> None:
        super().__init__(f"bad node spec {_quote(spec, position)} at position {position}: {reason}")
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
_ID_DIGITS = len(str(MAX_ID))


class _Parser:
    """Descent over the spec text, a loop for a term's levels; keeps the position for errors."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, reason: str, position: int | None = None) -> SpecError:
        return SpecError(self.text, self.pos if position is None else position, reason)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def spec(self) -> Spec:
        if len(self.text) > MAX_LENGTH:
            raise self.fail(
                f"the spec is {len(self.text)} characters long, more than {MAX_LENGTH}",
                MAX_LENGTH,
            )
        terms = [self.term()]
        while self.peek() == ",":
            self.pos += 1
            terms.append(self.term())
        if self.pos < len(self.text):
            raise self.fail(f"expected ',' or '/' but {_describe(self.peek())}")
        return tuple(terms)

    def term(self) -> Term:
        levels = [self.nodeset()]
        while self.peek() == "/":
            if len(levels) == MAX_DEPTH:
                raise self.fail(
                    f"the spec nests deeper than {MAX_DEPTH} levels "
                    "(a tree is rarely more than 4 deep)"
                )
            self.pos += 1
            levels.append(self.nodeset())
        term = Term(levels[-1])
        for ids in reversed(levels[:-1]):
            term = Term(ids, term)
        return term

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
        digits = match.group()
        # compare the digits before int(): a long run of them is too large whatever it says
        if len(digits.lstrip("0")) > _ID_DIGITS or int(digits) > MAX_ID:
            shown = digits if len(digits) <= 12 else digits[:12] + "..."
            raise self.fail(f"node id {shown} is larger than {MAX_ID}")
        self.pos = match.end()
        return int(digits)


def _describe(char: str) -> str:
    if char == "":
        return "the spec ends"
    if char.isspace():
        return "found whitespace (write the spec without spaces)"
    return f"found {char!r}"


def parse(text: str) -> Spec:
    """Parse a node spec; raises :class:`SpecError` naming the position of the first fault.

    Every spec it returns has at most :data:`MAX_DEPTH` levels and comes from at most
    :data:`MAX_LENGTH` characters.
    """
    return _Parser(text).spec()


def _levels(term: Term) -> list[Term]:
    """The term and each sub below it, top first."""
    chain = []
    level: Term | None = term
    while level is not None:
        chain.append(level)
        level = level.sub
    return chain


def depth(spec: Spec) -> int:
    """Levels the deepest term of ``spec`` names (``1/2/.`` has 3); 0 for the empty spec."""
    return max((len(_levels(term)) for term in spec), default=0)


def _format_term(term: Term) -> list[str]:
    """Format one term as comma-separated parts.

    The grammar gives each part one range, so a term holding several ranges (or handing
    down several) becomes one part per combination; :func:`select` treats both alike.
    A term from :func:`parse` has one range per level, so it gives one part.
    """
    heads = [
        ["."]
        if level.ids is None
        else [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in level.ids]
        for level in _levels(term)
    ]
    return ["/".join(parts) for parts in itertools.product(*heads)]


def format_spec(spec: Spec) -> str:
    """The text that :func:`parse` turns back into ``spec``; "" for the empty spec."""
    return ",".join(part for term in spec for part in _format_term(term))


def select(spec: Spec, child_ids: Iterable[int]) -> dict[int, Spec]:
    """Map each live child the spec names to the sub-spec it must apply below itself.

    A child named by several terms gets the subs of all of them (duplicates dropped), so
    `1/2,1/3` asks child 1 to run and to hand the job on to its children 2 and 3.

    Each distinct term finds its children by bisection among the sorted ids, so the work is
    the terms plus the matches, not the terms times the children.
    """
    children = list(dict.fromkeys(child_ids))
    ordered = sorted(children)
    subs: list[Term] = []  # distinct subs, in the order the spec first names them
    sub_index: dict[Term, int] = {}
    chosen: dict[int, dict[int, None]] = {}
    for term in dict.fromkeys(spec):
        if term.sub is None:
            index = None
        else:
            index = sub_index.setdefault(term.sub, len(subs))
            if index == len(subs):
                subs.append(term.sub)
        if term.ids is None:
            hits: Iterable[int] = ordered
        else:
            hits = itertools.chain.from_iterable(
                ordered[bisect_left(ordered, lo) : bisect_right(ordered, hi)] for lo, hi in term.ids
            )
        for child in hits:
            found = chosen.setdefault(child, {})
            if index is not None:
                found[index] = None
    return {child: tuple(subs[i] for i in chosen[child]) for child in children if child in chosen}


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges covering the same ids."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def missing(spec: Spec, child_ids: Iterable[int]) -> list[int]:
    """Ids named explicitly at this level that are not live, so they can be reported as lost.

    "." means "whatever is there", so it never makes an id missing. Overlapping ranges are
    merged first, so each id is looked at once however often the spec names it.
    """
    live = set(child_ids)
    named = _merged(r for term in spec if term.ids is not None for r in term.ids)
    return [child for lo, hi in named for child in range(lo, hi + 1) if child not in live]


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
