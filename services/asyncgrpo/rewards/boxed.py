"""\\boxed{} answers verified symbolically with math-verify (so 1/2, 0.5 and \\frac{1}{2} agree)."""

from __future__ import annotations

import logging
import warnings

from math_verify import LatexExtractionConfig, parse, verify

log = logging.getLogger(__name__)

# Only what the model put in \boxed{} counts; a number elsewhere in the text is not an answer.
_PRED_CONFIG = [LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0)]


def _parse(text: str, **kw: object) -> list:
    # math-verify's own timeouts use SIGALRM, which works only in the main thread; the caller (the
    # rollout service) bounds the time of a reward call instead, so they are turned off here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        return parse(text, parsing_timeout=None, **kw)  # type: ignore[arg-type]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def boxed_reward(completion: str, answer: str) -> float:
    """1 if the last \\boxed{...} in the completion is mathematically equal to the answer."""
    content = last_boxed(completion)
    if content is None or not content.strip():
        return 0.0
    pred = _parse(f"\\boxed{{{content}}}", extraction_config=_PRED_CONFIG)
    if not pred:
        return 0.0
    gold_text = answer if ("\\boxed" in answer or "$" in answer) else f"${answer}$"
    gold = _parse(gold_text)
    if not gold:
        log.warning("reference answer %r does not parse; scoring 0", answer)
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0
