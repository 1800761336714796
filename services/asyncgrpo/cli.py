"""`asyncgrpo <command>`: the one entry point that starts every service and tool.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args, overrides) -> int`.
Modules are imported only when their command runs, so `asyncgrpo --help` stays fast (no torch import).
Commands that take a run config accept `--config FILE` (repeatable) and dotted overrides such as
`--actor.group_size=8`, passed to `run` as `overrides`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from asyncgrpo import __version__

# name -> (module, one-line help). Later services add their line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("asyncgrpo.config.command", "Print the resolved run config, or document every key (config docs)."),
    "build-tiny-model": ("asyncgrpo.tiny.command", "Build a tiny Qwen2-architecture HF checkpoint with its tokenizer, offline."),
    "make-task": ("asyncgrpo.tasks.command", "Write the synthetic arithmetic task as train/test JSONL."),
    "warm-start": ("asyncgrpo.tiny.warm_start", "Supervised warm start of a policy on the task's worked answers."),
    "prepare": ("asyncgrpo.tiny.prepare", "Build the tiny model and task, warm-start it and report its reward."),
    "evaluate": ("asyncgrpo.tiny.evaluate", "Sample a policy on a task file and report its reward."),
    "rollout": ("asyncgrpo.rollout.command", "Sample G completions per prompt, score them and stream groups into Redis."),
    "weight-sync": ("asyncgrpo.weight_sync.command", "Broadcast each new policy version to the generation servers."),
    "genserver": ("asyncgrpo.genserver.command", "Serve an HF model over SGLang's HTTP API (CPU/test stand-in for SGLang)."),
    "reward-server": ("asyncgrpo.reward_server.command", "Serve a reward model: an ORM over SGLang's /classify, a PRM over /score_steps."),
    "trainer": ("asyncgrpo.trainer.command", "Train the policy (megatron-core GRPO) on the scored groups in Redis; checkpoints and resumes."),
    "up": ("asyncgrpo.launch.up", "Run the whole system on this machine as processes, then evaluate before -> after."),
    "control": ("asyncgrpo.control.command", "Serve the control plane: REST API, dashboard and metrics for live runs."),
}

# Clients of the control plane's REST API (asyncgrpo.control.cli): name -> one-line help.
CLIENT_COMMANDS: dict[str, str] = {
    "runs": "List the runs the control plane knows.",
    "status": "Show a run: status, version, queue, staleness, knobs, servers.",
    "pause": "Pause a run: no new groups; the trainer stops at a step boundary.",
    "resume": "Resume a paused run.",
    "drain": "Finish what is admitted, then stop the run.",
    "stop": "Stop a run after the current step.",
    "set": "Change live knobs of a run: asyncgrpo set RUN actor.temperature=0.8",
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<18} {help_}" for name, help_ in
                      [*((n, h) for n, (_, h) in COMMANDS.items()), *CLIENT_COMMANDS.items()])
    p = argparse.ArgumentParser(
        prog="asyncgrpo",
        description="Asynchronous, decoupled GRPO for LLMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{lines}\n\nRun `asyncgrpo COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"asyncgrpo {__version__}")
    p.add_argument("command", nargs="?", help="one of the commands below")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)  # handles --help / --version and exits
        top.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    if name in CLIENT_COMMANDS:
        from asyncgrpo.control.cli import main as client_main

        return client_main(name, rest)
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from: {', '.join([*COMMANDS, *CLIENT_COMMANDS])}")
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"asyncgrpo {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args, extra = parser.parse_known_args(rest)
    from asyncgrpo.config import ConfigError

    try:
        if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(module.run(args, extra) or 0)
    except ConfigError as e:
        print(f"asyncgrpo {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
