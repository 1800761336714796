"""`asyncgrpo config [show|docs] --config FILE --key=value ...`"""

from __future__ import annotations

import argparse

from asyncgrpo.config.loader import describe, dump_config, load_config

ACCEPTS_OVERRIDES = True


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every config-driven command shares."""
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML run config (repeatable; later files win). Dotted overrides such as "
                             "--actor.group_size=8 follow and win over files.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["show", "docs"], default="show",
                        help="show: the resolved config as YAML; docs: every key with its default and doc")
    add_config_arguments(parser)


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.action == "docs":
        rows = describe()
        width = max(len(k) for k, _, _ in rows)
        for key, default, doc in rows:
            print(f"{key:<{width}}  {default:<12}  {doc}")
        return 0
    print(dump_config(load_config(args.config, overrides)), end="")
    return 0
