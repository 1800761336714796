"""Completions as steps, for process rewards: a step ends at a run of the separator (kept with the step), so the
steps joined give the completion back exactly; their character ends map to token ends for the trainer."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache


@lru_cache(maxsize=16)
def _pattern(sep: str) -> re.Pattern[str]:
    s = re.escape(sep)
    return re.compile(f"(?:.*?(?:{s})+)|(?:.+$)", re.DOTALL)


def split_steps(text: str, separator: str) -> tuple[str, ...]:
    """``"a\\nb\\n\\nc"`` by ``"\\n"`` -> ``("a\\n", "b\\n\\n", "c")``; no text, no steps."""
    if not separator:
        raise ValueError("reward.step_separator is empty; give the string that ends a step (e.g. '\\n')")
    return tuple(m.group(0) for m in _pattern(separator).finditer(text) if m.group(0))


def char_ends(steps: Sequence[str]) -> list[int]:
    """The exclusive character index where each step ends in the joined text."""
    out, n = [], 0
    for s in steps:
        n += len(s)
        out.append(n)
    return out


def token_ends(decode: Callable[[list[int]], str], ids: Sequence[int], ends: Sequence[int]) -> list[int]:
    """For each character end, the fewest leading tokens whose decoded text reaches it (a step's last token is
    the one that completes its text); the last step always ends at the last token. Two steps that one token
    completes end at the same token (the earlier then has no tokens of its own, and its reward still counts).

    Binary search on decoded prefixes, each search starting at the previous end: O(steps x log(tokens)) decodes. A
    prefix cut inside a multi-byte character decodes to a trailing U+FFFD, which is not counted as reached."""
    ids = list(ids)
    out: list[int] = []
    lo0 = 1
    for e in ends:
        lo, hi = lo0, max(lo0, len(ids))
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(ids[:mid]).rstrip("\ufffd")) >= e:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
        lo0 = lo
    if out:
        out[-1] = len(ids)
        out = [min(x, len(ids)) for x in out]
    return out
