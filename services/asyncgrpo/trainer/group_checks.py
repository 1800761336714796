"""What the trainer refuses to train: a decoded group that would crash or poison a step.

A group that fails here goes to the dead-letter list with the (kind, reason) returned, once, and training
goes on; before this check one such message crash-looped the trainer on every restart while good groups
stayed pending behind it. Pure function over a decoded Group: no I/O.
"""

from __future__ import annotations

import math

import numpy as np

from asyncgrpo.queue.schema import Group


def group_problem(group: Group, *, run_id: str, group_size: int, vocab_size: int, max_seq_len: int) -> tuple[str, str] | None:
    """(kind, reason) when `group` cannot be trained by this trainer, None when it can.

    kinds: run (another run's group), group_size, shape, version, vocab, length, value (non-finite)."""
    if group.run_id != run_id:
        return "run", f"belongs to run {group.run_id!r}, this trainer trains {run_id!r}"
    if len(group.completions) != group_size:
        return "group_size", (f"has {len(group.completions)} completions, actor.group_size is {group_size}; "
                              "the rollout and trainer configs must agree")
    if not group.prompt_ids:
        return "shape", "prompt_ids is empty"
    prompt = np.asarray(group.prompt_ids, dtype=np.int64)
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        return "vocab", f"prompt token ids span [{prompt.min()}, {prompt.max()}], outside the vocabulary [0, {vocab_size})"
    for j, c in enumerate(group.completions):
        for v, _start, _end in c.version_spans:  # integers since decoding (a non-number is a schema error)
            if v < 0:
                return "version", f"completion {j}: weight version {v!r} is negative"
        if c.output_ids:
            ids = np.asarray(c.output_ids, dtype=np.int64)
            if ids.min() < 0 or ids.max() >= vocab_size:
                return "vocab", (f"completion {j}: token ids span [{ids.min()}, {ids.max()}], outside the vocabulary "
                                 f"[0, {vocab_size})")
        total = len(group.prompt_ids) + len(c.output_ids)
        if total > max_seq_len:
            return "length", f"completion {j}: prompt + completion is {total} tokens, the model's context is {max_seq_len}"
        if not math.isfinite(c.reward):
            return "value", f"completion {j}: reward {c.reward!r} is not finite"
        if c.logprobs and not np.isfinite(np.asarray(c.logprobs, dtype=np.float64)).all():
            return "value", f"completion {j}: a behaviour log-prob is not finite"
    return None
