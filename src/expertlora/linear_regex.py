"""Regular expressions from files, matched without backtracking, within a bounded amount of work.

Python's ``re`` backtracks, so a pattern such as ``(.+)+X`` from an adapter_config.json takes
exponential time. Here each pattern is parsed by Python's own parser (same syntax, same
character classes) and all patterns of a set run together as one Thompson NFA, through a DFA
built lazily and cached: a character costs one cached transition, at worst one pass over the
NFA's states (never more than ``MAX_STATES``), and a set stops with an error past ``MAX_WORK``
state visits in all, whatever the patterns and texts.

``PatternSet(ps).first_match(text)`` is the index of the first ``p`` in ``ps`` with
``re.match(p, text)``, for every pattern it accepts. It refuses (``PatternError``) what an NFA
does not express, or would express only by changing the meaning: backreferences, lookarounds,
atomic groups, possessive repeats, and the flags IGNORECASE / MULTILINE / ASCII / LOCALE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

try:  # Python >= 3.11
    from re import _constants as _C, _parser as _sre
except ImportError:  # Python 3.10
    import sre_constants as _C  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

MAX_PATTERN = 1000  # characters of one pattern
MAX_STATES = 50_000  # NFA states of a whole set (a{1000} alone is 1000)
MAX_WORK = 10_000_000  # NFA state visits of a set over its lifetime (~12 s of Python at worst)
_MAX_CACHED = 1_000_000  # NFA states held by the cached DFA states; past it the cache restarts

_ALLOWED_FLAGS = _C.SRE_FLAG_UNICODE | _C.SRE_FLAG_VERBOSE | _C.SRE_FLAG_DOTALL
_REFUSED = {
    _C.GROUPREF: "a backreference",
    _C.GROUPREF_EXISTS: "a conditional group",
    _C.ASSERT: "a lookaround",
    _C.ASSERT_NOT: "a negative lookaround",
}
for _name, _what in (("ATOMIC_GROUP", "an atomic group"), ("POSSESSIVE_REPEAT", "a possessive repeat")):
    if hasattr(_C, _name):  # Python >= 3.11
        _REFUSED[getattr(_C, _name)] = _what

_UNSUPPORTED = "a pattern without backreferences, lookarounds, atomic groups or possessive repeats"
# NFA state kinds
_CHAR, _SPLIT, _ASSERT, _ACCEPT = range(4)
# What came before a position: the start, a word character, another character.
_START, _WORD, _OTHER = range(3)


class PatternError(ValueError):
    """A pattern this matcher does not take, or a set that needed too much work: what was
    expected and what was found, and ``index``, the pattern's place in its set (None for the
    work bound)."""

    def __init__(self, expected: str, found: str, index: int | None = None):
        super().__init__(f"expected {expected}, found {found}")
        self.expected, self.found, self.index = expected, found, index


class PatternSet:
    """Patterns compiled together; ``first_match(text)`` is the index of the first that
    ``re.match``-es ``text``, or None."""

    def __init__(self, patterns: Sequence[str], shared_prefix: str = ""):
        """``shared_prefix``: a start many patterns have in common (PEFT's ``(.*\\.)?``), run once
        for all of them rather than once each; the matches are the same."""
        self.patterns = tuple(patterns)
        self._kind: list[int] = []
        self._arg: list[object] = []  # char: the character or a predicate; split: [targets]; assert: AT code; accept: index
        self._next: list[int] = []
        starts, prefix, prefix_flags, join = [], [], 0, -1
        if shared_prefix:
            prefix, prefix_flags = _parse(shared_prefix)
            self._dotall = bool(prefix_flags & _C.SRE_FLAG_DOTALL)
            join = self._state(_SPLIT, [], -1)
            starts.append(self._seq(prefix, join))
        for i, pattern in enumerate(self.patterns):
            try:
                items, flags = _parse(pattern)
                self._dotall = bool(flags & _C.SRE_FLAG_DOTALL)
                accept = self._state(_ACCEPT, i, -1)
                rest = _after_prefix(pattern, shared_prefix, items, flags, prefix, prefix_flags) if shared_prefix else None
                if rest is None:
                    starts.append(self._seq(items, accept))
                else:
                    self._arg[join].append(self._seq(rest, accept))
            except PatternError as e:
                raise PatternError(e.expected, e.found, i) from None
        self._start = frozenset(starts)
        self._work = 0
        self._dfa: dict[frozenset[int], int] = {}  # NFA states -> DFA state
        self._closures: list[_Closure] = []  # DFA state -> its closure
        self._steps: list[dict] = []  # DFA state -> {(before, char, last): (accepted, DFA state)}
        self._after_assert: dict[int, _Closure] = {}  # NFA state after an anchor -> its closure
        self._cached = 0

    def first_match(self, text: str) -> int | None:
        """The index of the first pattern ``p`` with ``re.match(p, text)``, or None."""
        if not self.patterns:
            return None
        n, best = len(text), len(self.patterns)
        state, prev = self._intern(self._start), _START
        for i, c in enumerate(text):
            key = (prev, c, i == n - 1)
            step = self._steps[state].get(key)
            if step is None:
                step = self._step(state, key)
            accepted, state = step
            best = min(best, accepted)
            if state < 0 or best == 0:  # no thread left, or the first pattern matched
                break
            prev = _WORD if _is_word(c) else _OTHER
        else:
            best = min(best, self._advance(state, (prev, None, False), n == 0)[0])
        return best if best < len(self.patterns) else None

    # ---- the NFA, built backwards from each state's continuation ----------------------------

    def _state(self, kind: int, arg, nxt: int) -> int:
        if len(self._kind) >= MAX_STATES:
            raise PatternError(f"simpler patterns (at most {MAX_STATES} automaton states in all)", "more")
        self._kind.append(kind)
        self._arg.append(arg)
        self._next.append(nxt)
        return len(self._kind) - 1

    def _seq(self, items: list, nxt: int) -> int:
        for op, av in reversed(items):
            nxt = self._item(op, av, nxt)
        return nxt

    def _item(self, op, av, nxt: int) -> int:
        if op in _REFUSED:
            raise PatternError(_UNSUPPORTED, _REFUSED[op])
        if op is _C.LITERAL:
            return self._state(_CHAR, chr(av), nxt)  # a str: looked up by character, not called
        if op is _C.NOT_LITERAL:
            return self._state(_CHAR, chr(av).__ne__, nxt)
        if op is _C.ANY:
            return self._state(_CHAR, _any if self._dotall else "\n".__ne__, nxt)
        if op is _C.IN:
            return self._state(_CHAR, _char_class(av), nxt)
        if op is _C.AT:
            if av not in _AT:
                raise PatternError(_UNSUPPORTED, f"the anchor {str(av).lower()}")
            return self._state(_ASSERT, av, nxt)
        if op is _C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternError(_UNSUPPORTED, "local flags (?x:...)")
            return self._seq(list(sub), nxt)
        if op is _C.BRANCH:
            return self._state(_SPLIT, [self._seq(list(alt), nxt) for alt in av[1]], -1)
        if op in (_C.MAX_REPEAT, _C.MIN_REPEAT):  # greedy or lazy: the same texts match
            lo, hi, sub = av
            sub = list(sub)
            if hi == _C.MAXREPEAT:  # x{lo,} = x ... x x*
                loop = self._state(_SPLIT, [], -1)
                self._arg[loop] = [self._seq(sub, loop), nxt]
                nxt = loop
            else:  # x{lo,hi} = x ... x x? ... x?
                for _ in range(hi - lo):
                    nxt = self._state(_SPLIT, [self._seq(sub, nxt), nxt], -1)
            for _ in range(lo):
                nxt = self._seq(sub, nxt)
            return nxt
        raise PatternError(_UNSUPPORTED, str(op).lower())

    # ---- the lazy DFA ------------------------------------------------------------------------
    #
    # A DFA state is a set of NFA states; its closure (splits followed) is computed once, with
    # its character states indexed by literal, and its anchors left pending: they depend on
    # the position, so each transition checks the few that are pending and adds what they open.

    def _intern(self, states: frozenset[int]) -> int:
        if not states:
            return -1
        sid = self._dfa.get(states)
        if sid is None:
            if self._cached + len(states) > _MAX_CACHED:  # start the cache again: memory stays bounded
                self._dfa.clear(), self._closures.clear(), self._steps.clear(), self._after_assert.clear()
                self._cached = 0
            sid = self._dfa[states] = len(self._closures)
            self._closures.append(self._closure(states))
            self._steps.append({})
            self._cached += len(states)
        return sid

    def _step(self, state: int, key: tuple) -> tuple[int, int]:
        cached = self._steps[state]  # held: _intern may start the cache again
        accepted, after = self._advance(state, key, False)
        step = cached[key] = (accepted, self._intern(frozenset(after)))
        return step

    def _advance(self, state: int, ctx: tuple, empty: bool) -> tuple[int, set[int]]:
        """(the lowest pattern index accepted here, the NFA states after reading ctx's character)."""
        prev, c, last = ctx
        accepted, after = len(self.patterns), set()
        todo, opened = [self._closures[state]], set()
        while todo:
            closure = todo.pop()
            accepted = min(accepted, closure.accepted)
            if c is not None:
                after.update(closure.literals.get(c, ()))
                after.update(nxt for pred, nxt in closure.classes if pred(c))
            self._work += len(closure.classes) + len(closure.anchors) + 1
            for code, nxt in closure.anchors:
                if nxt not in opened and _AT[code](prev, c, last, empty):
                    opened.add(nxt)
                    if nxt not in self._after_assert:
                        self._after_assert[nxt] = self._closure((nxt,))
                    todo.append(self._after_assert[nxt])
        if self._work > MAX_WORK:
            raise PatternError(f"patterns that match these names within {MAX_WORK} automaton steps", "more steps")
        return accepted, after

    def _closure(self, states) -> "_Closure":
        """What ``states`` reach without reading and without passing an anchor."""
        out = _Closure({}, [], [], len(self.patterns))
        stack, seen = list(states), set(states)
        while stack:
            s = stack.pop()
            kind, arg = self._kind[s], self._arg[s]
            if kind == _CHAR:
                if isinstance(arg, str):
                    out.literals.setdefault(arg, []).append(self._next[s])
                else:
                    out.classes.append((arg, self._next[s]))
            elif kind == _ACCEPT:
                out.accepted = min(out.accepted, arg)
            elif kind == _ASSERT:
                out.anchors.append((arg, self._next[s]))
            else:
                for t in arg:
                    if t not in seen:
                        seen.add(t)
                        stack.append(t)
        self._work += len(seen)
        return out


@dataclass
class _Closure:
    literals: dict[str, list[int]]  # character -> NFA states after reading it
    classes: list[tuple[object, int]]  # (predicate, NFA state after a character it takes)
    anchors: list[tuple[object, int]]  # (AT code, NFA state once the anchor holds)
    accepted: int  # lowest pattern index whose accepting state is reached; len(patterns): none


def _parse(pattern: str) -> tuple[list, int]:
    """Python's own parse of ``pattern``: its top-level items and its flags."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        raise PatternError(f"a pattern of at most {MAX_PATTERN} characters", f"{len(pattern)}" if isinstance(pattern, str) else type(pattern).__name__)
    try:
        parsed = _sre.parse(pattern, 0)
    except (_C.error, RecursionError, OverflowError, ValueError) as e:
        raise PatternError("a regular expression", str(e)) from None
    flags = parsed.state.flags
    if flags & ~_ALLOWED_FLAGS:
        raise PatternError("a pattern without the flags i, m, a or L", "one of them")
    return list(parsed), flags


def _after_prefix(pattern: str, prefix: str, items: list, flags: int, prefix_items: list, prefix_flags: int) -> list | None:
    """The items of ``pattern`` after ``prefix`` when the pattern is exactly the prefix's items
    followed by those of its own rest (no alternation across the two, no flags that change
    the prefix), else None: then the pattern runs alone."""
    if not pattern.startswith(prefix) or flags != prefix_flags:
        return None
    try:
        rest, rest_flags = _parse(pattern[len(prefix):])
    except PatternError:
        return None
    return rest if rest_flags == flags and len(items) == len(prefix_items) + len(rest) else None


def _any(c: str) -> bool:
    return True


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"  # sre's Unicode word character


def _boundary(prev: int, c: str | None) -> bool:
    return (prev == _WORD) != (c is not None and _is_word(c))


# Anchors, given (what came before, the next character or None at the end, whether it is the
# last character, whether the whole text is empty): sre's rules without MULTILINE.
_AT = {
    _C.AT_BEGINNING: lambda prev, c, last, empty: prev == _START,
    _C.AT_BEGINNING_STRING: lambda prev, c, last, empty: prev == _START,
    _C.AT_END: lambda prev, c, last, empty: c is None or (last and c == "\n"),
    _C.AT_END_STRING: lambda prev, c, last, empty: c is None,
    _C.AT_BOUNDARY: lambda prev, c, last, empty: not empty and _boundary(prev, c),
    _C.AT_NON_BOUNDARY: lambda prev, c, last, empty: not empty and not _boundary(prev, c),
}

_CATEGORIES = {
    _C.CATEGORY_DIGIT: str.isdecimal,
    _C.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    _C.CATEGORY_SPACE: str.isspace,
    _C.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    _C.CATEGORY_WORD: _is_word,
    _C.CATEGORY_NOT_WORD: lambda c: not _is_word(c),
}


def _char_class(items):
    """A predicate for ``[...]`` (or an escape such as ``\\d``)."""
    negate, chars, ranges, cats = False, set(), [], []
    for op, av in items:
        if op is _C.NEGATE:
            negate = True
        elif op is _C.LITERAL:
            chars.add(chr(av))
        elif op is _C.RANGE:
            ranges.append((chr(av[0]), chr(av[1])))
        elif op is _C.CATEGORY and av in _CATEGORIES:
            cats.append(_CATEGORIES[av])
        else:
            raise PatternError(_UNSUPPORTED, f"{str(op).lower()} in a character class")

    def member(c: str) -> bool:
        hit = c in chars or any(lo <= c <= hi for lo, hi in ranges) or any(f(c) for f in cats)
        return hit != negate

    return member
