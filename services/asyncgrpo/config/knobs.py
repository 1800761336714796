"""The knobs that may change while a run is live, where each takes effect, and their validation.

A change is validated by the run's own config schema (the run's config with the change applied must build),
so a live value obeys the same bounds and cross-field rules as a value in YAML. Values are stored in Redis
(queue/run_control.py) and read by the services:

- rollout.max_head_offpolicyness: the admission script, at the next admission; the trainer's staleness check,
  at the next step.
- actor.temperature: rollout samples new groups with it; groups carry the temperature they were sampled at,
  and the trainer (whose log-probs use it) drops groups sampled at another temperature as stale (re-queued).
- rollout.top_p: rollout, at the next admission.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asyncgrpo.config.loader import ConfigError, _set_dotted, build, deep_merge
from asyncgrpo.config.schema import RunConfig

LIVE_KNOBS: dict[str, str] = {
    "rollout.max_head_offpolicyness": "staleness bound: next admission (rollout) and next step (trainer)",
    "actor.temperature": "sampling temperature: next admission; the trainer trains each temperature's groups only under it",
    "rollout.top_p": "nucleus sampling threshold: next admission",
}


def get_dotted(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def validate_knobs(config: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """The typed values of `changes` (dotted key -> value) applied to the run's `config` (a dumped RunConfig).
    ConfigError names the key and what is allowed."""
    if not changes:
        raise ConfigError("no knob given; set one of: " + ", ".join(LIVE_KNOBS))
    unknown = [k for k in changes if k not in LIVE_KNOBS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a live knob; live knobs are {', '.join(LIVE_KNOBS)} "
                          "(other keys need a restart with a new config)")
    over: dict[str, Any] = {}
    for k, v in changes.items():
        _set_dotted(over, k, v)
    cfg = build(RunConfig, deep_merge(dict(config), over))
    dumped = cfg.model_dump(mode="json")
    return {k: get_dotted(dumped, k) for k in changes}


def apply_knobs(cfg: RunConfig, knobs: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Set live knob values on a service's config in place (validated by assignment); returns what changed."""
    changed: dict[str, tuple[Any, Any]] = {}
    for k, v in knobs.items():
        if k not in LIVE_KNOBS:
            continue
        section, name = k.split(".")
        obj = getattr(cfg, section)
        old = getattr(obj, name)
        if old != v:
            setattr(obj, name, v)
            changed[k] = (old, v)
    return changed
