"""The `asyncgrpo` entry point: lists every command, and every command's module loads and parses --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asyncgrpo.cli import COMMANDS, main


def test_console_script_lists_commands() -> None:
    out = subprocess.run(["asyncgrpo", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_import_is_light() -> None:
    # `asyncgrpo --help` and `import asyncgrpo` must not pull torch or megatron (seconds of start-up).
    code = "import sys, asyncgrpo, asyncgrpo.cli, asyncgrpo.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"asyncgrpo {name}" in capsys.readouterr().out


def test_unknown_command_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["trainr"])
    assert e.value.code == 2
    assert "unknown command 'trainr'" in capsys.readouterr().err


def test_config_error_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--actor.grup_size=3"]) == 2
    assert "Did you mean 'actor.group_size'" in capsys.readouterr().err
