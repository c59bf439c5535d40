"""Regular expressions from untrusted files, matched in time linear in the text.

Python's `re` backtracks: PEFT matches a rank_pattern key as re.match(rf"(.*\\.)?({key})$", module_path), and a
key like `(.*.*.*)*Z` takes exponential time on a 40-character path. compile_pattern parses a pattern with `re`'s
own parser (so the syntax is exactly `re`'s) and runs it as a Thompson NFA: at most `states` steps per character
of text, whatever the pattern. It answers what re.match would (does the pattern match at the start of the text)
for the regular subset: literals, classes and escapes (\\d \\w \\s), `.`, groups, alternation, repetition
(greedy or lazy: the answer is the same), `^`, `$`, `\\A`, `\\Z`. Backreferences, lookaround, possessive and
atomic groups, word boundaries and flags raise ValueError, as does a pattern that expands past `max_states`
states (`(a{1000}){1000}`).
"""

from __future__ import annotations

import re

try:
    from re import _constants as sre  # Python >= 3.11
    from re import _parser as sre_parse
except ImportError:  # Python < 3.11
    import sre_constants as sre
    import sre_parse

MAX_PATTERN_LENGTH = 1000

# \d \w \s and their negations as re applies them to str patterns (Unicode)
_CATEGORIES = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda char: not char.isdecimal(),
    sre.CATEGORY_WORD: lambda char: char.isalnum() or char == "_",
    sre.CATEGORY_NOT_WORD: lambda char: not (char.isalnum() or char == "_"),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda char: not char.isspace(),
}

# position tests: (text, position) -> bool
_ANCHORS = {
    sre.AT_BEGINNING: lambda text, position: position == 0,
    sre.AT_BEGINNING_STRING: lambda text, position: position == 0,
    sre.AT_END: lambda text, position: position == len(text) or (position == len(text) - 1 and text[-1] == "\n"),
    sre.AT_END_STRING: lambda text, position: position == len(text),
}

# Node kinds. A node is a list [kind, payload, next]: CHAR (payload: char -> bool), SPLIT (payload: list of
# next nodes, next unused), ANCHOR (payload: (text, position) -> bool), MATCH.
CHAR, SPLIT, ANCHOR, MATCH = range(4)


class _TooLarge(Exception):
    pass


class SafePattern:
    """A compiled pattern; match(text) says whether re.match(pattern, text) would match."""

    def __init__(self, pattern: str, nodes: list, start: int):
        self.pattern, self._nodes, self._start = pattern, nodes, start

    def _closure(self, states, text: str, position: int) -> set[int]:
        """The states reachable from `states` at `position` without consuming a character."""
        reached, pending = set(), list(states)
        while pending:
            index = pending.pop()
            if index in reached:
                continue
            reached.add(index)
            kind, payload, following = self._nodes[index]
            if kind == SPLIT:
                pending.extend(payload)
            elif kind == ANCHOR and payload(text, position):
                pending.append(following)
        return reached

    def match(self, text: str) -> bool:
        current = self._closure((self._start,), text, 0)
        for position, char in enumerate(text):
            if any(self._nodes[index][0] == MATCH for index in current):
                return True
            advanced = {
                self._nodes[index][2]
                for index in current
                if self._nodes[index][0] == CHAR and self._nodes[index][1](char)
            }
            if not advanced:
                return False
            current = self._closure(advanced, text, position + 1)
        return any(self._nodes[index][0] == MATCH for index in current)

    def __repr__(self) -> str:
        return f"SafePattern({self.pattern!r})"


def _class_test(items) -> callable:
    """char -> bool for the items of a [...] class (or an escape like \\d, which re parses as one)."""
    negate = bool(items) and items[0][0] is sre.NEGATE
    tests = []
    for op, value in items[1:] if negate else items:
        if op is sre.LITERAL:
            tests.append(lambda char, code=value: ord(char) == code)
        elif op is sre.RANGE:
            tests.append(lambda char, low=value[0], high=value[1]: low <= ord(char) <= high)
        elif op is sre.CATEGORY and value in _CATEGORIES:
            tests.append(_CATEGORIES[value])
        else:
            raise ValueError(f"unsupported character class item {op} {value}")
    if negate:
        return lambda char: not any(test(char) for test in tests)
    return lambda char: any(test(char) for test in tests)


class _Builder:
    """Compiles re's parse tree backwards: each item is compiled knowing the node that follows it."""

    def __init__(self, max_states: int):
        self.nodes: list[list] = []
        self.max_states = max_states

    def add(self, kind, payload=None, following=None) -> int:
        if len(self.nodes) >= self.max_states:
            raise _TooLarge
        self.nodes.append([kind, payload, following])
        return len(self.nodes) - 1

    def sequence(self, items, following: int) -> int:
        for op, value in reversed(list(items)):
            following = self.item(op, value, following)
        return following

    def item(self, op, value, following: int) -> int:
        if op is sre.LITERAL:
            return self.add(CHAR, lambda char, code=value: ord(char) == code, following)
        if op is sre.NOT_LITERAL:
            return self.add(CHAR, lambda char, code=value: ord(char) != code, following)
        if op is sre.ANY:
            return self.add(CHAR, lambda char: char != "\n", following)
        if op is sre.IN:
            return self.add(CHAR, _class_test(value), following)
        if op is sre.AT:
            if value not in _ANCHORS:
                raise ValueError("word boundaries (\\b, \\B) are not supported")
            return self.add(ANCHOR, _ANCHORS[value], following)
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, body = value
            if add_flags or del_flags:
                raise ValueError("inline flags are not supported")
            return self.sequence(body, following)
        if op is sre.BRANCH:
            return self.add(SPLIT, [self.sequence(branch, following) for branch in value[1]])
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = value
            if high is sre.MAXREPEAT:  # body{low,}: low copies, then a loop
                loop = self.add(SPLIT, [])
                self.nodes[loop][1] = [self.sequence(body, loop), following]
                start = loop
            else:  # body{low,high}: low copies, then high - low optional ones
                start = following
                for _ in range(high - low):
                    start = self.add(SPLIT, [self.sequence(body, start), following])
            for _ in range(low):
                start = self.sequence(body, start)
            return start
        raise ValueError(f"{str(op).lower()} is not supported")


def compile_pattern(pattern: str, max_states: int = 5000) -> SafePattern:
    """Parse pattern with re's syntax into a SafePattern; ValueError says why a pattern is refused."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"pattern is {len(pattern)} characters long, more than {MAX_PATTERN_LENGTH}")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise ValueError(f"not a valid regular expression: {error}") from error
    if parsed.state.flags & ~(re.UNICODE | getattr(sre, "SRE_FLAG_UNICODE", 0)):
        raise ValueError("flags are not supported")
    builder = _Builder(max_states)
    try:
        start = builder.sequence(parsed, builder.add(MATCH))
    except _TooLarge:
        raise ValueError(f"the pattern expands to more than {max_states} states") from None
    except RecursionError:
        raise ValueError("the pattern nests too deeply") from None
    return SafePattern(pattern, builder.nodes, start)
