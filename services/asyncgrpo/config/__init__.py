"""One config system for every service: typed pydantic sections, YAML files, dotted overrides."""

from asyncgrpo.config.loader import ConfigError, describe, dump_config, load_config, parse_overrides
from asyncgrpo.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "describe", "dump_config", "load_config", "parse_overrides"]
