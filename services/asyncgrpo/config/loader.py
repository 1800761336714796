"""Load a RunConfig from YAML files and dotted command-line overrides.

Precedence: schema defaults < YAML files (in order) < overrides (`--actor.group_size=8` or
`--actor.group_size 8`). Unknown keys are errors that list the valid keys, with a close match when there
is one; type errors name the dotted key and what it accepts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from asyncgrpo.config.schema import RunConfig

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: which key, what is wrong, how to fix it."""


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class a field holds (also through Optional), or None for a leaf value."""
    candidates = [annotation, *get_args(annotation)] if get_origin(annotation) is not None else [annotation]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


# Keys that moved to another section: an old config gets the new place in its error, not a near-miss guess.
MOVED_KEYS = {"actor.dynamic_filtering": "rollout.dynamic_filtering",
              "weight_sync.auto_disk_fallback": "weight_sync.transport_fallback"}


def migrate_moved_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """An old key moves to its new place with a warning (a run directory's config.yaml from before the move still
    resumes); both given with different values is an error naming both."""
    import copy
    import logging

    out = copy.deepcopy(dict(data))
    for old, new in MOVED_KEYS.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        src = out.get(osec)
        if not isinstance(src, dict) or okey not in src:
            continue
        dst = out.setdefault(nsec, {})
        if not isinstance(dst, dict):
            continue
        value = src.pop(okey)
        if nkey in dst and dst[nkey] != value:
            raise ConfigError(f"config key '{old}' moved to '{new}', and both are given ({value!r} and {dst[nkey]!r}); "
                              f"keep only '{new}'")
        dst[nkey] = value
        logging.getLogger(__name__).warning("config key '%s' moved to '%s'; read it there (rename it in your file)", old, new)
    return out


def check_keys(model: type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ConfigError for the first key in `data` that `model` does not define (recursively)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    fields = model.model_fields
    for key, value in data.items():
        if f"{prefix}{key}" in MOVED_KEYS:  # only reached when migrate_moved_keys met a clash
            raise ConfigError(f"config key '{prefix}{key}' moved to '{MOVED_KEYS[prefix + key]}'; rename it there")
        if key not in fields:
            where = prefix.rstrip(".") or "the top level"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{hint} Valid keys at {where}: {', '.join(fields)}"
            )
        sub = _section_type(fields[key].annotation)
        if sub is not None and value is not None:
            check_keys(sub, value, f"{prefix}{key}.")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override '{dotted}': empty key segment; write it like --actor.group_size=8")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Turn ['--actor.group_size=8', '--seed', '3'] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --actor.group_size=8")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override '{arg}' has no value; write {arg}=VALUE")
            key, raw = body, args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override --{key}: cannot parse value {raw!r}: {e}") from e
        _set_dotted(tree, key.replace("-", "_"), value)
        i += 1
    return tree


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        got = e.get("input")
        lines.append(f"{key}: {e['msg']} (got {got!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build(model: type[M], data: Mapping[str, Any]) -> M:
    """Validate `data` against `model`, raising ConfigError with dotted keys on any problem."""
    if model is RunConfig:
        data = migrate_moved_keys(data)
        if data.get("preset") is not None:
            from asyncgrpo.config.presets import preset_values

            try:
                data = deep_merge(preset_values(data["preset"]), data)  # the user's own keys win
            except ValueError as e:
                raise ConfigError(str(e)) from None
    check_keys(model, data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def load_config(
    files: Iterable[str | Path] = (),
    overrides: Sequence[str] | Mapping[str, Any] = (),
    model: type[M] = RunConfig,  # type: ignore[assignment]
) -> M:
    """Defaults < each YAML file < overrides (a list of --dotted=value strings or a nested dict)."""
    data: dict[str, Any] = {}
    for f in files:
        data = deep_merge(data, read_yaml(f))
    over = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return build(model, deep_merge(data, over))


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf knob: the reference behind `asyncgrpo config docs`."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        sub = _section_type(field.annotation)
        if sub is not None:
            rows.extend(describe(sub, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            rows.append((f"{prefix}{name}", shown, field.description or ""))
    return rows
