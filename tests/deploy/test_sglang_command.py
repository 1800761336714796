"""The SGLang command of the compose gpu profile and of the Helm chart uses only flags SGLang 0.5.23 has (the
contract's version; .ci/run downloads its wheel). sglang cannot be imported here (CUDA-only dependencies), so
its server arguments are read from the wheel's source: each `--flag` must be a field of sglang/srt/arg_groups/fields."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest

from .tools import ROOT, compose_model, manifests, render, unwrap_sh, values


@pytest.fixture(scope="module")
def sglang_fields() -> set[str]:
    wheel_dir = Path(os.environ.get("ASYNCGRPO_SGLANG_WHEEL_DIR") or ROOT / ".cache" / "wheels")
    wheels = sorted(wheel_dir.glob("sglang-0.5.23-*.whl"))
    if not wheels:
        pytest.skip(f"no sglang 0.5.23 wheel in {wheel_dir} (.ci/run downloads it)")
    fields = set()
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            # the dataclass fields of ServerArgs live in arg_groups/fields/; the hook modules beside them have
            # function parameters of the same shape (e.g. `tp_size: int,`) that are not flags
            if name.startswith("sglang/srt/arg_groups/fields/") and name.endswith(".py"):
                fields |= set(re.findall(r"^    ([a-z_][a-z0-9_]*)\s*:", z.read(name).decode(errors="ignore"), re.M))
    assert {"model_path", "api_key", "admin_api_key", "port"} <= fields, "the wheel's layout changed: update this test"
    return fields


def unknown_flags(argv: list[str], fields: set[str]) -> list[str]:
    return [a for a in argv if a.startswith("--") and a[2:].split("=")[0].replace("-", "_") not in fields]


def sglang_commands() -> dict[str, list[str]]:
    cmds = {name: unwrap_sh(svc["command"])[3:] for name, svc in compose_model("gpu")["services"].items()
            if unwrap_sh(svc.get("command") or [])[:3] == ["python3", "-m", "sglang.launch_server"]}
    for vals in ("default", "multinode-gpu"):
        for d in manifests(render(vals=values(vals))):
            for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c.get("command") == ["python3", "-m", "sglang.launch_server"]:
                    cmds[f"helm {vals} {d['metadata']['name']}"] = c["args"]
    return cmds


def test_sglang_commands_use_known_flags(sglang_fields: set[str]) -> None:
    cmds = sglang_commands()
    assert len(cmds) == 6  # 4 compose servers, 2 chart renderings
    for name, argv in cmds.items():
        assert unknown_flags(argv, sglang_fields) == [], name


def test_a_misspelled_flag_is_caught(sglang_fields: set[str]) -> None:
    assert unknown_flags(["--api-key", "k", "--admin-apikey", "a"], sglang_fields) == ["--admin-apikey"]
