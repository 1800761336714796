"""Answer extraction for plain and GSM8K-style ("#### 42") answers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# GSM8K writes the final answer after "####"; numbers may carry thousands separators or a sign.
_GSM8K_RE = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number ('1,234.50' -> '1234.5'), or None if it is not one."""
    s = text.strip().replace(",", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    return format(d, "f") if d != d.to_integral() else str(int(d))


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after the last '####', or None when the completion has no such line."""
    found = _GSM8K_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def _same(pred: str | None, answer: str) -> bool:
    if pred is None:
        return False
    ref = normalize_number(answer)
    return pred == ref if ref is not None else pred.strip() == answer.strip()


def exact_reward(completion: str, answer: str) -> float:
    """1 if the whole completion (whitespace-stripped) is the answer, numerically or as text."""
    text = completion.strip()
    num = normalize_number(text)
    return 1.0 if (_same(num, answer) if num is not None else text == answer.strip()) else 0.0


def gsm8k_reward(completion: str, answer: str) -> float:
    """1 if the number after the last '####' equals the answer (GSM8K's own format)."""
    gold = extract_gsm8k_answer(answer) or answer
    return 1.0 if _same(extract_gsm8k_answer(completion), gold) else 0.0
